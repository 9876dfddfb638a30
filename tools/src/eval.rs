//! The `eval` command: runs the face pipeline over a labelled photo set and reports parity
//! with insightface's golden outputs (detections and embeddings), identity separation
//! (genuine/impostor scores, pair accuracy, leave-one-out rank-1), scene face counts, and
//! per-stage timings. Prints a readable report, then one JSON object as its last line.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use facerec::face::detector::iou;
use facerec::face::image::{ImageLimits, decode};
use facerec::face::{AnalyzerOptions, Face, FaceAnalyzer, StageTimes, cosine, most_prominent};

/// `labels.json`: see the face set's README.
#[derive(Debug, Clone, Deserialize)]
pub struct Labels {
    #[serde(default)]
    pub identities: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub singletons: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub scenes: BTreeMap<String, Scene>,
    #[serde(default)]
    pub cross_scene_queries: Vec<CrossSceneQuery>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Scene {
    pub expected_faces: Option<usize>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CrossSceneQuery {
    pub query: String,
    pub gallery_scene: String,
    pub expected_match_bbox_approx: [f32; 4],
}

/// A golden file: what insightface returned for every image.
#[derive(Debug, Clone, Deserialize)]
pub struct Golden {
    pub det_size: [u32; 2],
    pub images: BTreeMap<String, GoldenImage>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GoldenImage {
    pub width: u32,
    pub height: u32,
    pub faces: Vec<GoldenFace>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GoldenFace {
    pub bbox: [f32; 4],
    pub det_score: f32,
    pub embedding: Vec<f32>,
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalInput {
    pub images_dir: PathBuf,
    pub labels: Labels,
    pub golden: Option<Golden>,
    pub det_size: u32,
}

impl EvalInput {
    /// Reads the labels and golden files.
    pub fn load(images_dir: &Path, labels: &Path, golden: Option<&Path>, det_size: Option<u32>) -> anyhow::Result<EvalInput> {
        let read = |p: &Path| -> anyhow::Result<String> {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
        };
        let labels: Labels =
            serde_json::from_str(&read(labels)?).map_err(|e| anyhow::anyhow!("{} is not a labels file: {e}", labels.display()))?;
        let golden: Option<Golden> = match golden {
            Some(p) => Some(serde_json::from_str(&read(p)?).map_err(|e| anyhow::anyhow!("{} is not a golden file: {e}", p.display()))?),
            None => None,
        };
        let det_size = det_size.or(golden.as_ref().map(|g| g.det_size[0])).unwrap_or(320);
        Ok(EvalInput { images_dir: images_dir.to_path_buf(), labels, golden, det_size })
    }

    /// Every image the labels or the golden file name, sorted.
    pub fn image_paths(&self) -> Vec<String> {
        let l = &self.labels;
        let mut set: BTreeSet<String> = BTreeSet::new();
        set.extend(l.identities.values().flatten().cloned());
        set.extend(l.singletons.values().flatten().cloned());
        set.extend(l.scenes.keys().cloned());
        for q in &l.cross_scene_queries {
            set.insert(q.query.clone());
            set.insert(q.gallery_scene.clone());
        }
        if let Some(g) = &self.golden {
            set.extend(g.images.keys().cloned());
        }
        set.into_iter().collect()
    }
}

/// The summary printed as the last line.
#[derive(Debug, Clone, Serialize)]
pub struct EvalSummary {
    pub det_size: u32,
    pub images: usize,
    pub images_failed: usize,
    pub identity_photos: usize,
    pub identity_photos_with_face_ratio: f64,
    pub golden_faces: usize,
    pub golden_matched_ratio: f64,
    pub golden_cosine_mean: f64,
    pub golden_cosine_min: f64,
    pub bbox_iou_mean: f64,
    pub det_score_max_abs_diff: f64,
    pub extra_faces: usize,
    pub size_mismatches: usize,
    pub scenes_counted: usize,
    pub scene_count_exact_ratio: f64,
    pub genuine_min: f64,
    pub impostor_max: f64,
    pub pair_accuracy: f64,
    pub best_threshold: f64,
    pub rank1: f64,
    pub cross_scene_hits: usize,
    pub cross_scene_queries: usize,
    pub faces: usize,
    pub faces_per_second: f64,
    /// Mean milliseconds per image for each stage.
    pub stage_ms: StageMs,
    /// Milliseconds per face inside the models (detector time shared over the image's faces).
    pub model_ms_per_face: f64,
    /// Milliseconds per face outside the models and decoding (letterbox, anchors, NMS, alignment, blobs).
    pub pre_post_ms_per_face: f64,
    /// pre_post / model time.
    pub pre_post_over_model: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageMs {
    pub decode: f64,
    pub detect: f64,
    pub align: f64,
    pub embed: f64,
    pub detect_model: f64,
    pub embed_model: f64,
}

/// Per-image results kept for the report.
#[derive(Debug, Clone)]
struct ImageResult {
    faces: Vec<Face>,
    parity_faces: Vec<Face>,
    size: (u32, u32),
}

/// Runs the evaluation; `log` receives the readable report's lines as they come.
pub fn run(analyzer: &mut FaceAnalyzer, input: &EvalInput, log: &mut dyn FnMut(String)) -> EvalSummary {
    let parity_opts = AnalyzerOptions::parity(input.det_size);
    let full_opts = AnalyzerOptions { detect: parity_opts.detect, ..AnalyzerOptions::default() };
    let limits = ImageLimits::default();
    let mut results: HashMap<String, ImageResult> = HashMap::new();
    let mut times = StageTimes::default();
    let mut failed = 0;
    let paths = input.image_paths();
    let started = Instant::now();
    for rel in &paths {
        let path = input.images_dir.join(rel);
        let mut t = StageTimes::default();
        let t0 = Instant::now();
        let decoded = std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| decode(&b, &limits).map_err(|e| e.to_string()));
        t.decode = t0.elapsed();
        let img = match decoded {
            Ok(d) => d.rgb,
            Err(e) => {
                failed += 1;
                log(format!("FAILED {rel}: {e}"));
                continue;
            }
        };
        analyzer.set_options(parity_opts);
        let parity = analyzer.analyze(&img, &mut t);
        let parity_faces = match parity {
            Ok(f) => f,
            Err(e) => {
                failed += 1;
                log(format!("FAILED {rel}: {e}"));
                continue;
            }
        };
        // The service's path differs only when the detector found nothing or the input is 112x112.
        let faces = if parity_faces.is_empty() || img.dimensions() == (112, 112) {
            let mut tf = StageTimes { decode: t.decode, ..StageTimes::default() };
            analyzer.set_options(full_opts);
            let r = analyzer.analyze(&img, &mut tf).unwrap_or_default();
            t = tf;
            r
        } else {
            parity_faces.clone()
        };
        times.add(&t);
        results.insert(rel.clone(), ImageResult { faces, parity_faces, size: img.dimensions() });
    }
    analyzer.set_options(full_opts);
    let wall = started.elapsed();

    let mut s = EvalSummary {
        det_size: input.det_size,
        images: results.len(),
        images_failed: failed,
        identity_photos: 0,
        identity_photos_with_face_ratio: 0.0,
        golden_faces: 0,
        golden_matched_ratio: 0.0,
        golden_cosine_mean: 0.0,
        golden_cosine_min: 0.0,
        bbox_iou_mean: 0.0,
        det_score_max_abs_diff: 0.0,
        extra_faces: 0,
        size_mismatches: 0,
        scenes_counted: 0,
        scene_count_exact_ratio: 0.0,
        genuine_min: 0.0,
        impostor_max: 0.0,
        pair_accuracy: 0.0,
        best_threshold: 0.0,
        rank1: 0.0,
        cross_scene_hits: 0,
        cross_scene_queries: 0,
        faces: results.values().map(|r| r.faces.len()).sum(),
        faces_per_second: 0.0,
        stage_ms: StageMs { decode: 0.0, detect: 0.0, align: 0.0, embed: 0.0, detect_model: 0.0, embed_model: 0.0 },
        model_ms_per_face: 0.0,
        pre_post_ms_per_face: 0.0,
        pre_post_over_model: 0.0,
    };

    if let Some(golden) = &input.golden {
        golden_parity(golden, &results, &mut s, log);
    }
    identities(&input.labels, &results, &mut s, log);
    scenes(&input.labels, &results, &mut s, log);

    let n = s.images.max(1) as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    s.stage_ms = StageMs {
        decode: ms(times.decode) / n,
        detect: ms(times.detect) / n,
        align: ms(times.align) / n,
        embed: ms(times.embed) / n,
        detect_model: ms(times.detect_model) / n,
        embed_model: ms(times.embed_model) / n,
    };
    let faces = s.faces.max(1) as f64;
    let pipeline = times.decode + times.detect + times.align + times.embed;
    s.faces_per_second = if pipeline.is_zero() { 0.0 } else { s.faces as f64 / pipeline.as_secs_f64() };
    s.model_ms_per_face = ms(times.detect_model + times.embed_model) / faces;
    s.pre_post_ms_per_face = ms(times.pre_post()) / faces;
    s.pre_post_over_model = if s.model_ms_per_face > 0.0 { s.pre_post_ms_per_face / s.model_ms_per_face } else { 0.0 };
    log(format!(
        "timing: {} images, {} faces in {:.1} s; per image: decode {:.1} ms, detect {:.1} ms (model {:.1}), align {:.2} ms, embed {:.1} ms (model {:.1}); per face: model {:.2} ms, pre/post {:.3} ms ({:.1}% of model)",
        s.images,
        s.faces,
        wall.as_secs_f64(),
        s.stage_ms.decode,
        s.stage_ms.detect,
        s.stage_ms.detect_model,
        s.stage_ms.align,
        s.stage_ms.embed,
        s.stage_ms.embed_model,
        s.model_ms_per_face,
        s.pre_post_ms_per_face,
        100.0 * s.pre_post_over_model
    ));
    s
}

fn golden_parity(golden: &Golden, results: &HashMap<String, ImageResult>, s: &mut EvalSummary, log: &mut dyn FnMut(String)) {
    let (mut matched, mut cos_sum, mut iou_sum) = (0usize, 0.0f64, 0.0f64);
    let mut cos_min = f64::INFINITY;
    let mut worst: Vec<(f64, String)> = Vec::new();
    for (rel, g) in &golden.images {
        s.golden_faces += g.faces.len();
        let Some(r) = results.get(rel) else { continue };
        if r.size != (g.width, g.height) {
            s.size_mismatches += 1;
            log(format!("size mismatch {rel}: ours {:?}, golden {}x{}", r.size, g.width, g.height));
        }
        let pairs = match_boxes(
            &g.faces.iter().map(|f| f.bbox).collect::<Vec<_>>(),
            &r.parity_faces.iter().map(|f| f.bbox).collect::<Vec<_>>(),
            0.5,
        );
        s.extra_faces += r.parity_faces.len() - pairs.len();
        for (gi, oi, overlap) in &pairs {
            let (gf, of) = (&g.faces[*gi], &r.parity_faces[*oi]);
            let c = f64::from(cosine(&gf.embedding, &of.embedding));
            matched += 1;
            cos_sum += c;
            iou_sum += f64::from(*overlap);
            cos_min = cos_min.min(c);
            s.det_score_max_abs_diff = s.det_score_max_abs_diff.max(f64::from((gf.det_score - of.det_score).abs()));
            worst.push((c, format!("{rel} face {gi}")));
        }
        for gi in 0..g.faces.len() {
            if !pairs.iter().any(|p| p.0 == gi) {
                log(format!("golden face not found: {rel} face {gi} bbox {:?} score {}", g.faces[gi].bbox, g.faces[gi].det_score));
            }
        }
    }
    s.golden_matched_ratio = ratio(matched, s.golden_faces);
    s.golden_cosine_mean = if matched > 0 { cos_sum / matched as f64 } else { 0.0 };
    s.golden_cosine_min = if matched > 0 { cos_min } else { 0.0 };
    s.bbox_iou_mean = if matched > 0 { iou_sum / matched as f64 } else { 0.0 };
    worst.sort_by(|a, b| a.0.total_cmp(&b.0));
    let lowest: Vec<String> = worst.iter().take(3).map(|(c, n)| format!("{n}: {c:.4}")).collect();
    log(format!(
        "golden parity (det {}): {matched}/{} faces matched, cosine mean {:.5} min {:.5}, bbox IoU mean {:.4}, extra faces {}, lowest: {}",
        golden.det_size[0],
        s.golden_faces,
        s.golden_cosine_mean,
        s.golden_cosine_min,
        s.bbox_iou_mean,
        s.extra_faces,
        lowest.join(", ")
    ));
}

fn identities(labels: &Labels, results: &HashMap<String, ImageResult>, s: &mut EvalSummary, log: &mut dyn FnMut(String)) {
    // One embedding per identity photo: its most prominent face.
    let mut samples: Vec<(&str, &[f32])> = Vec::new();
    for (id, photos) in &labels.identities {
        for p in photos {
            s.identity_photos += 1;
            let Some(r) = results.get(p) else { continue };
            match most_prominent(&r.faces) {
                Some(i) => samples.push((id.as_str(), r.faces[i].embedding.as_slice())),
                None => log(format!("no face in identity photo {p}")),
            }
        }
    }
    s.identity_photos_with_face_ratio = ratio(samples.len(), s.identity_photos);
    let mut scored: Vec<(f32, bool)> = Vec::new();
    let (mut genuine_min, mut impostor_max) = (f32::INFINITY, f32::NEG_INFINITY);
    let (mut rank1_hits, mut rank1_queries) = (0, 0);
    for (i, (id_i, e_i)) in samples.iter().enumerate() {
        let mut best: Option<(f32, &str)> = None;
        for (j, (id_j, e_j)) in samples.iter().enumerate() {
            if i == j {
                continue;
            }
            let c = cosine(e_i, e_j);
            if best.is_none_or(|(b, _)| c > b) {
                best = Some((c, id_j));
            }
            if j > i {
                let same = id_i == id_j;
                scored.push((c, same));
                if same {
                    genuine_min = genuine_min.min(c);
                } else {
                    impostor_max = impostor_max.max(c);
                }
            }
        }
        // Rank-1 is asked only of photos whose identity has another photo with a face.
        if samples.iter().enumerate().any(|(j, (id_j, _))| j != i && id_j == id_i) {
            rank1_queries += 1;
            if best.is_some_and(|(_, id)| id == *id_i) {
                rank1_hits += 1;
            }
        }
    }
    s.genuine_min = f64::from(genuine_min);
    s.impostor_max = f64::from(impostor_max);
    s.rank1 = ratio(rank1_hits, rank1_queries);
    let (acc, thr) = best_threshold(&mut scored);
    s.pair_accuracy = acc;
    s.best_threshold = thr;
    log(format!(
        "identities: {} photos, {} with a face; genuine min {:.4}, impostor max {:.4}; pair accuracy {:.4} at {:.3}; rank-1 {:.4}",
        s.identity_photos,
        samples.len(),
        genuine_min,
        impostor_max,
        acc,
        thr,
        s.rank1
    ));
}

fn scenes(labels: &Labels, results: &HashMap<String, ImageResult>, s: &mut EvalSummary, log: &mut dyn FnMut(String)) {
    let mut exact = 0;
    for (path, scene) in &labels.scenes {
        let found = results.get(path).map(|r| r.faces.len());
        match (scene.expected_faces, found) {
            (Some(want), Some(got)) => {
                s.scenes_counted += 1;
                if want == got {
                    exact += 1;
                }
                log(format!("scene {path}: {got} faces (expected {want})"));
            }
            (None, Some(got)) => log(format!("scene {path}: {got} faces (not counted; {})", scene.description)),
            (_, None) => {}
        }
    }
    s.scene_count_exact_ratio = ratio(exact, s.scenes_counted);
    for q in &labels.cross_scene_queries {
        s.cross_scene_queries += 1;
        let (Some(qr), Some(gr)) = (results.get(&q.query), results.get(&q.gallery_scene)) else { continue };
        let Some(qi) = most_prominent(&qr.faces) else { continue };
        let best = gr
            .faces
            .iter()
            .max_by(|a, b| cosine(&qr.faces[qi].embedding, &a.embedding).total_cmp(&cosine(&qr.faces[qi].embedding, &b.embedding)));
        if let Some(b) = best {
            let hit = iou(&b.bbox, &q.expected_match_bbox_approx) >= 0.3;
            s.cross_scene_hits += usize::from(hit);
            log(format!(
                "cross-scene {} in {}: best cosine {:.3} at {:?} ({})",
                q.query,
                q.gallery_scene,
                cosine(&qr.faces[qi].embedding, &b.embedding),
                b.bbox,
                if hit { "hit" } else { "miss" }
            ));
        }
    }
}

/// One-to-one matches (golden index, ours index, IoU) with IoU >= `min_iou`, best first.
pub fn match_boxes(golden: &[[f32; 4]], ours: &[[f32; 4]], min_iou: f32) -> Vec<(usize, usize, f32)> {
    let mut cands: Vec<(usize, usize, f32)> = Vec::new();
    for (gi, g) in golden.iter().enumerate() {
        for (oi, o) in ours.iter().enumerate() {
            let v = iou(g, o);
            if v >= min_iou {
                cands.push((gi, oi, v));
            }
        }
    }
    cands.sort_by(|a, b| b.2.total_cmp(&a.2));
    let (mut used_g, mut used_o) = (vec![false; golden.len()], vec![false; ours.len()]);
    let mut out = Vec::new();
    for (gi, oi, v) in cands {
        if !used_g[gi] && !used_o[oi] {
            used_g[gi] = true;
            used_o[oi] = true;
            out.push((gi, oi, v));
        }
    }
    out
}

/// Best accuracy over thresholds separating same-identity pairs (score >= t) from others,
/// and the threshold (midway between neighbouring scores) that reaches it.
pub fn best_threshold(scored: &mut [(f32, bool)]) -> (f64, f64) {
    if scored.is_empty() {
        return (0.0, 0.0);
    }
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = scored.len();
    let positives = scored.iter().filter(|p| p.1).count();
    // Threshold below everything: all called "same".
    let (mut best_correct, mut best_t) = (positives, f64::from(scored[0].0) - 1e-3);
    let mut correct = positives;
    for i in 0..n {
        // Move pair i below the threshold.
        if scored[i].1 {
            correct -= 1;
        } else {
            correct += 1;
        }
        let t = if i + 1 < n { (f64::from(scored[i].0) + f64::from(scored[i + 1].0)) / 2.0 } else { f64::from(scored[i].0) + 1e-3 };
        if correct > best_correct {
            best_correct = correct;
            best_t = t;
        }
    }
    (best_correct as f64 / n as f64, best_t)
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_separates_perfectly_when_possible() {
        let mut s = vec![(0.1, false), (0.2, false), (0.5, true), (0.7, true)];
        let (acc, t) = best_threshold(&mut s);
        assert_eq!(acc, 1.0);
        assert!(t > 0.2 && t < 0.5);
        let mut s = vec![(0.1, true), (0.2, false), (0.5, true)];
        assert!((best_threshold(&mut s).0 - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn boxes_match_one_to_one() {
        let g = [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]];
        let o = [[21.0, 20.0, 31.0, 30.0], [0.0, 0.0, 10.0, 11.0], [0.0, 0.0, 10.0, 10.5]];
        let m = match_boxes(&g, &o, 0.5);
        assert_eq!(m.len(), 2);
        assert!(m.iter().any(|&(gi, oi, _)| gi == 0 && oi == 2));
        assert!(m.iter().any(|&(gi, oi, _)| gi == 1 && oi == 0));
    }
}
