//! The inference engine with the real models on real fixture crops: micro-batches give the
//! same answers as one image at a time, batches really form, the padded retry and the
//! aligned-112 paths work inside batches, a bad image fails alone, and jobs whose caller
//! went away are not computed.

mod support;

use std::time::Duration;

use facerec::config::analyzer_options;
use facerec::engine::{Analysis, Engine, EngineConfig, EngineError};
use facerec::face::crops::face_crops;
use facerec::face::image::{ImageLimits, decode};
use facerec::face::{AnalyzerOptions, FoundBy, StageTimes};
use futures_util::future::join_all;
use support::fixture;
use support::models::{analyzer, pack_dir, runtime};

/// One worker at det 640 (where tight crops need the padded retry).
fn engine(batch_size: usize, batch_wait: Duration, queue: usize) -> Engine {
    let files = facerec::face::pack::resolve(&pack_dir()).expect("pack");
    // ALIGNED_INPUT on, so that the aligned-112 path is exercised inside batches too.
    let analyzer = AnalyzerOptions { aligned_input: true, ..analyzer_options(640) };
    let cfg = EngineConfig { workers: 1, queue, batch_size, batch_wait, analyzer, ..EngineConfig::default() };
    Engine::start(runtime(), files, cfg).expect("engine starts")
}

/// A tight crop of img6.jpg's face (80% of its box, 192x192, as pipeline.rs cuts them): at
/// det 640 the detector alone misses it, the padded retry finds it.
fn tight_crop() -> Vec<u8> {
    let img = decode(&fixture("img6.jpg"), &ImageLimits::default()).expect("decodes").rgb;
    let faces = analyzer(analyzer_options(640)).analyze(&img, &mut StageTimes::default()).expect("runs");
    let b = faces[0].bbox;
    let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
    let side = (b[2] - b[0]) * 0.8;
    let (x, y) = ((cx - side / 2.0).max(0.0) as u32, (cy - side / 2.0).max(0.0) as u32);
    let cut = image::imageops::crop_imm(&img, x, y, side as u32, side as u32).to_image();
    let tight = facerec::face::resample::resize_linear(&cut, 192, 192);
    let mut png = Vec::new();
    tight.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).expect("encodes");
    png
}

/// Real inputs: 192x192 face crops of the fixtures, a six-face photo, an aligned 112x112
/// face, a tight crop that needs the padded retry, and bytes that are no image.
fn inputs() -> Vec<Vec<u8>> {
    let photos: Vec<Vec<u8>> = ["img5.jpg", "img6.jpg", "img10.jpg", "img12.jpg", "img16.jpg", "img17.jpg", "t1.jpg"].map(fixture).to_vec();
    let mut inputs = face_crops(&mut analyzer(analyzer_options(320)), &photos, 192).expect("crops");
    assert!(inputs.len() >= 10, "{} crops", inputs.len());
    inputs.insert(3, fixture("t1.jpg"));
    inputs.insert(5, fixture("Tom_Hanks_54745.png"));
    inputs.insert(7, tight_crop());
    inputs.insert(9, b"not an image at all".to_vec());
    inputs
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn compare(one: &Result<Analysis, EngineError>, batched: &Result<Analysis, EngineError>, i: usize) {
    match (one, batched) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.faces.len(), b.faces.len(), "input {i}: face count");
            for (fa, fb) in a.faces.iter().zip(&b.faces) {
                assert_eq!(fa.found_by, fb.found_by, "input {i}");
                assert_eq!(fa.bbox, fb.bbox, "input {i}: detection is per image, unchanged");
                let d = max_abs_diff(&fa.embedding, &fb.embedding);
                assert!(d <= 1e-5, "input {i}: embeddings differ by {d}");
            }
        }
        (Err(EngineError::Image(_)), Err(EngineError::Image(_))) => {}
        (a, b) => panic!("input {i}: {:?} vs {:?}", a.as_ref().map(|x| x.faces.len()), b.as_ref().map(|x| x.faces.len())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_results_equal_one_at_a_time() {
    let inputs = inputs();
    let single = engine(1, Duration::ZERO, 64);
    let mut one_by_one = Vec::new();
    for bytes in &inputs {
        one_by_one.push(single.analyze(bytes.clone()).await);
    }
    let s = single.stats();
    assert_eq!(s.batch_histogram.len(), 1);
    assert!(s.batches >= inputs.len() as u64 - 1, "{s:?}");

    // Submitted together, so they queue up and batches form.
    let batching = engine(16, Duration::from_millis(2), 64);
    let together = join_all(inputs.iter().map(|b| batching.analyze(b.clone()))).await;
    let s = batching.stats();
    let multi: u64 = s.batch_histogram.iter().skip(1).sum();
    assert!(multi >= 1, "no batch of more than one image formed: {s:?}");
    assert!(together.iter().any(|r| r.as_ref().is_ok_and(|a| a.batch_jobs > 1)));
    assert_eq!(s.jobs_done + s.jobs_failed, inputs.len() as u64);
    assert_eq!(s.jobs_failed, 1, "only the bytes that are no image fail");
    assert_eq!(s.queue_depth, 0);

    for (i, (a, b)) in one_by_one.iter().zip(&together).enumerate() {
        compare(a, b, i);
    }
    let worst = one_by_one
        .iter()
        .zip(&together)
        .filter_map(|(a, b)| Some((a.as_ref().ok()?, b.as_ref().ok()?)))
        .flat_map(|(a, b)| a.faces.iter().zip(&b.faces).map(|(x, y)| max_abs_diff(&x.embedding, &y.embedding)))
        .fold(0.0f32, f32::max);
    eprintln!("largest embedding difference, batched vs one at a time: {worst:e}; batches {:?}", s.batch_histogram);
    // The special paths, inside batches.
    let found = |i: usize| together[i].as_ref().map(|a| a.faces.iter().map(|f| f.found_by).collect::<Vec<_>>()).unwrap_or_default();
    assert_eq!(found(3).len(), 6, "t1.jpg has six faces");
    assert_eq!(found(5), vec![FoundBy::Aligned]);
    assert_eq!(found(7), vec![FoundBy::Padded]);
    assert!(matches!(together[9], Err(EngineError::Image(_))));
    assert!(together.iter().filter(|r| r.is_ok()).all(|r| r.as_ref().is_ok_and(|a| a.times.embed > Duration::ZERO || a.faces.is_empty())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_whose_caller_went_away_are_not_computed() {
    let photo = fixture("t1.jpg");
    let crop = fixture("img6.jpg");
    let eng = engine(16, Duration::ZERO, 8);
    // The worker takes the first job; the next three queue behind it. The second of them
    // is withdrawn (its future dropped after it was queued) before the worker gets to it.
    let first = tokio::spawn({
        let eng = eng.clone();
        let photo = photo.clone();
        async move { eng.analyze(photo).await }
    });
    while eng.stats().busy_workers == 0 && eng.stats().jobs_done == 0 {
        tokio::task::yield_now().await;
    }
    let b = tokio::spawn({
        let eng = eng.clone();
        let crop = crop.clone();
        async move { eng.analyze(crop).await }
    });
    while eng.stats().jobs_accepted < 2 {
        tokio::task::yield_now().await;
    }
    let withdrawn = tokio::time::timeout(Duration::ZERO, eng.analyze(crop.clone())).await;
    assert!(withdrawn.is_err(), "a zero timeout drops the future after queueing the job");
    let d = eng.analyze(crop.clone()).await.expect("the last job runs");
    let (a, b) = (first.await.expect("joins").expect("first runs"), b.await.expect("joins").expect("second runs"));
    assert_eq!(a.faces.len(), 6);
    assert_eq!((b.faces.len(), d.faces.len()), (1, 1));
    let s = eng.stats();
    assert_eq!(s.jobs_accepted, 4);
    // The withdrawn job is dropped microseconds after it is queued, while decoding and
    // detecting it alone takes milliseconds: it must be counted as cancelled, never computed
    // (the worker checks before detection and again before the recognizer run).
    assert_eq!(s.jobs_cancelled, 1, "the withdrawn job was cancelled: {s:?}");
    assert_eq!(s.jobs_done, 3, "{s:?}");
    assert_eq!(s.faces, 8, "the withdrawn job was not embedded: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once() {
    let photo = fixture("t1.jpg");
    let eng = engine(1, Duration::ZERO, 1);
    // Each call is a request of its own, so a full queue still takes one first image of each up to
    // twice its size (fair share): five at once into a queue of one behind a busy worker.
    let mut running = Vec::new();
    for _ in 0..5 {
        let eng = eng.clone();
        let photo = photo.clone();
        running.push(tokio::spawn(async move { eng.analyze(photo).await }));
    }
    let mut results = Vec::new();
    for r in running {
        results.push(r.await.expect("joins"));
    }
    let refused = results.iter().filter(|r| matches!(r, Err(EngineError::Overloaded))).count();
    assert!(refused >= 1, "five jobs at once into a queue of one behind a busy worker");
    let s = eng.stats();
    assert_eq!(s.jobs_rejected as usize, refused);
    assert_eq!(s.jobs_accepted as usize + refused, 5);
    assert!(results.iter().all(|r| r.is_ok() || matches!(r, Err(EngineError::Overloaded))));
}

/// `detect` finds the same faces as `analyze`, without embeddings, and `embed_faces` of its crops
/// gives `analyze`'s embeddings: the stream's two steps are the one-shot pipeline split in two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detect_then_embed_faces_equals_analyze() {
    let engine = engine(16, Duration::ZERO, 64);
    let bytes = fixture("t1.jpg");
    let whole = engine.analyze(bytes.clone()).await.expect("analyze");
    let detected = engine.detect(bytes).await.expect("detect");
    assert_eq!(detected.faces.len(), whole.faces.len());
    assert_eq!(detected.crops.len(), detected.faces.len());
    assert!(whole.crops.is_empty(), "analyze hands back no crops");
    assert!(detected.faces.iter().all(|f| f.embedding.is_empty()), "detect embeds nothing");
    let embeddings = engine.embed_faces(detected.crops.clone()).await.expect("embed");
    for (i, (d, w)) in detected.faces.iter().zip(&whole.faces).enumerate() {
        assert_eq!(d.bbox, w.bbox, "face {i}");
        assert!(max_abs_diff(&embeddings[i], &w.embedding) < 1e-4, "face {i}");
    }
    assert!(engine.embed_faces(Vec::new()).await.expect("nothing to embed").is_empty());
}
