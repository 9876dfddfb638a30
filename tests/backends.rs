//! The two inference backends: OpenVINO gives the same faces and embeddings as ONNX Runtime
//! on real photos and the real models, and the backend settings behave as documented (auto
//! falls back to ONNX Runtime with one warning when OpenVINO cannot load; openvino refuses to
//! start). Both libraries come from their pinned PyPI wheels on first use.

mod support;

use std::path::PathBuf;

use facerec::face::image::{ImageLimits, decode};
use facerec::face::{FaceAnalyzer, StageTimes, cosine};
use facerec::runtime::{ActiveBackend, BackendChoice, Runtime, RuntimeOptions};
use support::{Server, TempDir};

const PHOTOS: &[&str] =
    &["img5.jpg", "img6.jpg", "img10.jpg", "img12.jpg", "img16.jpg", "t1.jpg", "Tom_Hanks_54745.png", "alex-lacamoire.png"];

fn openvino_runtime() -> Runtime {
    let rt = Runtime::init(&RuntimeOptions {
        openvino_path: std::env::var_os("OPENVINO_LIB_PATH").map(PathBuf::from),
        ..RuntimeOptions::cpu(support::models::cache_dir(), BackendChoice::OpenVino, 2)
    })
    .expect("OpenVINO loads (fetched from PyPI on first use)");
    assert_eq!(rt.active_backend(), Some(ActiveBackend::OpenVino));
    rt
}

#[test]
fn openvino_gives_the_embeddings_of_onnx_runtime() {
    let ov = openvino_runtime();
    let ort = support::models::runtime();
    assert_eq!(ort.active_backend(), Some(ActiveBackend::OnnxRuntime));
    let pack = support::models::pack_dir();
    let mut checked = 0;
    let mut worst = 1.0f32;
    for det in [320, 640] {
        let opts = facerec::config::analyzer_options(det);
        let mut a = FaceAnalyzer::load(&ort, &pack, opts).expect("pack on ONNX Runtime");
        let mut b = FaceAnalyzer::load(&ov, &pack, opts).expect("pack on OpenVINO");
        for name in PHOTOS {
            let img = decode(&support::fixture(name), &ImageLimits::default()).expect("decodes").rgb;
            let fa = a.analyze(&img, &mut StageTimes::default()).expect("ONNX Runtime analysis");
            let fb = b.analyze(&img, &mut StageTimes::default()).expect("OpenVINO analysis");
            assert_eq!(fa.len(), fb.len(), "{name} det {det}: face count");
            assert!(!fa.is_empty(), "{name} det {det}: no face");
            for (x, y) in fa.iter().zip(&fb) {
                for (p, q) in x.bbox.iter().zip(&y.bbox) {
                    assert!((p - q).abs() < 0.5, "{name} det {det}: boxes {:?} against {:?}", x.bbox, y.bbox);
                }
                assert!((x.det_score - y.det_score).abs() < 1e-3, "{name}: scores {} {}", x.det_score, y.det_score);
                let c = cosine(&x.embedding, &y.embedding);
                worst = worst.min(c);
                assert!(c >= 0.9999, "{name} det {det}: cosine between the backends {c}");
                checked += 1;
            }
        }
    }
    eprintln!("{checked} faces compared, lowest cosine between the backends {worst:.7}");
    assert!(checked >= 2 * PHOTOS.len());
}

#[test]
fn openvino_batches_like_single_runs() {
    let ov = openvino_runtime();
    let mut a = FaceAnalyzer::load(&ov, &support::models::pack_dir(), facerec::config::analyzer_options(320)).expect("pack");
    let mut crops = Vec::new();
    for name in PHOTOS {
        let img = decode(&support::fixture(name), &ImageLimits::default()).expect("decodes").rgb;
        crops.extend(a.prepare(&img, &mut StageTimes::default()).expect("prepare").crops);
    }
    let batched = a.embed_aligned(&crops, &mut StageTimes::default()).expect("batch");
    for (crop, e) in crops.iter().zip(&batched) {
        let one = a.embed_aligned(std::slice::from_ref(crop), &mut StageTimes::default()).expect("single");
        assert!(cosine(&one[0], e) >= 0.99999, "batched and single embeddings differ");
    }
}

#[test]
fn auto_falls_back_to_onnx_runtime_when_openvino_cannot_load() {
    let dir = TempDir::new("backend-fallback");
    let server =
        Server::start_with_env(dir.path(), &[("INFERENCE_BACKEND", "auto"), ("OPENVINO_LIB_PATH", "/nonexistent/libopenvino_c.so")]);
    let health = server.get("/health").json();
    assert_eq!(health["inference_backend"], "onnxruntime", "{health}");
    assert!(health["backend_reason"].as_str().unwrap_or("").contains("OpenVINO unavailable"), "{health}");
    let metrics = server.get("/metrics").text();
    assert!(metrics.contains("inference_backend=\"onnxruntime\""), "{metrics}");
    let log = server.stop();
    let warnings = log.lines().filter(|l| l.contains("WARN") && l.contains("OpenVINO unavailable")).count();
    assert_eq!(warnings, 1, "one warning, not {warnings}:\n{log}");
}

#[test]
fn auto_measures_and_names_the_backend_in_use() {
    let dir = TempDir::new("backend-auto");
    let server = Server::start_with_env(dir.path(), &[("INFERENCE_BACKEND", "auto")]);
    let health = server.get("/health").json();
    let backend = health["inference_backend"].as_str().unwrap_or("").to_owned();
    assert!(backend == "openvino" || backend == "onnxruntime", "{health}");
    let reason = health["backend_reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("openvino") && reason.contains("onnxruntime") && reason.contains("ms"),
        "the measurement is reported: {health}"
    );
    let metrics = server.get("/metrics").text();
    assert!(metrics.contains(&format!("inference_backend=\"{backend}\"")), "{metrics}");
    server.stop();
}

#[test]
fn openvino_refuses_to_start_without_its_library() {
    let dir = TempDir::new("backend-refuse");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_facerec"))
        .current_dir(dir.path())
        .env("INFERENCE_BACKEND", "openvino")
        .env("OPENVINO_LIB_PATH", "/nonexistent/libopenvino_c.so")
        .env("MODEL_CACHE_DIR", support::model_cache_dir())
        .env("DATABASE_PATH", dir.path().join("f.db"))
        .env("PORT", support::free_port().to_string())
        .env("HOST", "127.0.0.1")
        .env_remove("MONGO_URI")
        .output()
        .expect("runs");
    assert!(!out.status.success(), "it must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("INFERENCE_BACKEND=openvino, but OpenVINO could not be loaded"), "{stderr}");
    assert!(stderr.contains("/nonexistent/libopenvino_c.so"), "the path is named: {stderr}");
}
