//! Does the tight-crop retry earn its place? A measurement, not a check of the default build:
//! it needs the shared face set (`FACES_DIR`, with `labels.json` and `golden/`), so it is ignored
//! unless asked for:
//!
//! ```sh
//! FACES_DIR=../shared/faces [DET_SIZE=640] cargo test --test tight_crops -- --ignored --nocapture
//! ```
//!
//! Every face of the set's identity photos and singletons is cut out of its photo tightly around
//! insightface's own box (margins -25%, -10%, 0% and +10% of the box per side), and each crop goes through
//! the pipeline twice: as insightface does (no retry) and with the retry on a padded copy. A found
//! face is matched against templates made from insightface's golden embeddings of the identities'
//! other photos (the crop's own photo left out; singletons are in no template, so any name for
//! them is a false accept), at the service's threshold (0.3). It prints, per margin, how many
//! crops each way finds and names, and every accept of a wrong identity; it fails if the retry
//! adds a false accept.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;

use facerec::face::image::{ImageLimits, decode};
use facerec::face::{AnalyzerOptions, FoundBy, StageTimes, cosine, most_confident};

#[derive(serde::Deserialize)]
struct Labels {
    identities: BTreeMap<String, Vec<String>>,
    singletons: BTreeMap<String, Vec<String>>,
}

const THRESHOLD: f32 = 0.3;

#[derive(Default, Debug)]
struct Tally {
    crops: usize,
    found: usize,
    named_right: usize,
    named_wrong: usize,
}

#[test]
#[ignore = "needs FACES_DIR (the shared face set); a measurement that prints figures"]
fn tight_crop_retry_measurement() {
    let Some(dir) = std::env::var_os("FACES_DIR").map(PathBuf::from) else {
        panic!("set FACES_DIR to the shared face set (labels.json, golden/)");
    };
    let det_size: u32 = std::env::var("DET_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(320);
    let labels: Labels = serde_json::from_str(&std::fs::read_to_string(dir.join("labels.json")).expect("labels.json")).expect("labels");
    let golden_path = dir.join(format!("golden/insightface_buffalo_sc_det{det_size}.json"));
    let golden: support::models::GoldenFile =
        serde_json::from_str(&std::fs::read_to_string(&golden_path).expect("golden")).expect("golden parses");

    // Per photo: its identity (None for a singleton) and insightface's first face.
    let mut photos: Vec<(String, Option<String>)> = Vec::new();
    for (id, paths) in &labels.identities {
        photos.extend(paths.iter().map(|p| (p.clone(), Some(id.clone()))));
    }
    for paths in labels.singletons.values() {
        photos.extend(paths.iter().map(|p| (p.clone(), None)));
    }
    let template = |id: &str, except: &str| -> Option<Vec<f32>> {
        let mut sum = vec![0f32; 512];
        let mut n = 0;
        for p in &labels.identities[id] {
            if p == except {
                continue;
            }
            if let Some(f) = golden.images.get(p).and_then(|g| g.faces.first()) {
                sum.iter_mut().zip(&f.embedding).for_each(|(s, v)| *s += v);
                n += 1;
            }
        }
        let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt();
        (n > 0 && norm > 0.0).then(|| sum.iter().map(|v| v / norm).collect())
    };
    let best = |emb: &[f32], photo: &str| -> Option<(String, f32)> {
        labels
            .identities
            .keys()
            .filter_map(|id| template(id, photo).map(|t| (id.clone(), cosine(emb, &t))))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    };

    let base = AnalyzerOptions::parity(det_size);
    let with_retry = AnalyzerOptions { pad_retry: true, ..base };
    let mut report: BTreeMap<String, (Tally, Tally)> = BTreeMap::new();
    let mut wrong: Vec<String> = Vec::new();
    let mut added_false_accepts = 0;
    for (path, identity) in &photos {
        let Some(g) = golden.images.get(path) else { continue };
        let Some(face) = g.faces.first() else { continue };
        let bytes = std::fs::read(dir.join(path)).expect("photo");
        let img = decode(&bytes, &ImageLimits::default()).expect("decodes").rgb;
        let [x1, y1, x2, y2] = face.bbox;
        let (w, h) = (x2 - x1, y2 - y1);
        for margin in [-0.25f32, -0.1, 0.0, 0.1] {
            let cx1 = (x1 - w * margin).max(0.0).round() as u32;
            let cy1 = (y1 - h * margin).max(0.0).round() as u32;
            let cx2 = ((x2 + w * margin).round() as u32).min(img.width());
            let cy2 = ((y2 + h * margin).round() as u32).min(img.height());
            if cx2 <= cx1 + 8 || cy2 <= cy1 + 8 {
                continue;
            }
            let crop = image::imageops::crop_imm(&img, cx1, cy1, cx2 - cx1, cy2 - cy1).to_image();
            let entry = report.entry(format!("{margin:+.2}")).or_default();
            for (opts, tally, retry) in [(base, &mut entry.0, false), (with_retry, &mut entry.1, true)] {
                tally.crops += 1;
                let faces = support::models::analyzer(opts).analyze(&crop, &mut StageTimes::default()).expect("analysis");
                let Some(i) = most_confident(&faces) else { continue };
                tally.found += 1;
                let Some((name, score)) = best(&faces[i].embedding, path) else { continue };
                if score < THRESHOLD {
                    continue;
                }
                if identity.as_deref() == Some(name.as_str()) {
                    tally.named_right += 1;
                } else {
                    tally.named_wrong += 1;
                    let by = faces[i].found_by;
                    wrong.push(format!("{path} margin {margin:+.2} retry {retry}: named {name} at {score:.3} (found by {by:?})"));
                    if by == FoundBy::Padded {
                        added_false_accepts += 1;
                    }
                }
            }
        }
    }
    println!("tight crops of {} photos, det_size {det_size}, threshold {THRESHOLD}", photos.len());
    println!("| margin | crops | found without / with retry | named right without / with | false accepts without / with |");
    println!("|---|---|---|---|---|");
    let mut total = (Tally::default(), Tally::default());
    for (margin, (a, b)) in &report {
        println!(
            "| {margin} | {} | {} / {} | {} / {} | {} / {} |",
            a.crops, a.found, b.found, a.named_right, b.named_right, a.named_wrong, b.named_wrong
        );
        for (t, x) in [(&mut total.0, a), (&mut total.1, b)] {
            t.crops += x.crops;
            t.found += x.found;
            t.named_right += x.named_right;
            t.named_wrong += x.named_wrong;
        }
    }
    let (a, b) = &total;
    println!(
        "| all | {} | {} / {} | {} / {} | {} / {} |",
        a.crops, a.found, b.found, a.named_right, b.named_right, a.named_wrong, b.named_wrong
    );
    for w in &wrong {
        println!("wrong: {w}");
    }
    println!(
        "{}",
        serde_json::json!({"crops": a.crops, "found": [a.found, b.found], "named_right": [a.named_right, b.named_right],
            "false_accepts": [a.named_wrong, b.named_wrong], "false_accepts_added_by_retry": added_false_accepts})
    );
    assert_eq!(added_false_accepts, 0, "the retry added a false accept");
}
