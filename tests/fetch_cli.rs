//! `facerec fetch` as a user runs it: the real binary, the cache filled by the tests' first use.

mod support;

use std::process::Command;

use support::models::cache_dir;

fn facerec(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_facerec"))
        .args(args)
        .env("MODEL_CACHE_DIR", cache_dir())
        .env("EXECUTION_PROVIDER", "cpu")
        .env("RUST_LOG", "warn")
        .output()
        .expect("facerec runs")
}

#[test]
fn fetch_reports_the_cached_files() {
    let out = facerec(&["fetch"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fetch failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("libonnxruntime.so.1.31.1") && stdout.contains("w600k_mbf.onnx") && stdout.contains("scrfd_500m_bnkps.onnx"),
        "{stdout}"
    );
}
