//! `facerec eval` and `facerec fetch` as a user runs them: the real binary on the fixtures.

mod support;

use std::process::Command;

use support::models::{cache_dir, fixtures};

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
fn eval_prints_a_report_and_a_json_summary_last() {
    let dir = fixtures();
    let labels = dir.join("labels.json");
    let golden = dir.join("golden_det640.json");
    let out = facerec(&[
        "eval",
        "--images",
        dir.to_str().unwrap_or("."),
        "--labels",
        labels.to_str().unwrap_or("."),
        "--golden",
        golden.to_str().unwrap_or("."),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "eval failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("golden parity (det 640)"), "readable report: {stdout}");
    let last = stdout.lines().last().expect("output");
    let s: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    for key in [
        "images",
        "identity_photos",
        "identity_photos_with_face_ratio",
        "golden_faces",
        "golden_matched_ratio",
        "golden_cosine_mean",
        "golden_cosine_min",
        "bbox_iou_mean",
        "scene_count_exact_ratio",
        "genuine_min",
        "impostor_max",
        "pair_accuracy",
        "rank1",
        "faces_per_second",
    ] {
        assert!(s.get(key).is_some_and(|v| v.is_number()), "summary has {key}: {last}");
    }
    for stage in ["decode", "detect", "align", "embed"] {
        assert!(s["stage_ms"][stage].as_f64().is_some_and(|v| v >= 0.0), "stage_ms.{stage}");
    }
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    assert_eq!(s["images"], 11);
    assert_eq!(s["identity_photos"], 7);
    assert_eq!(f("identity_photos_with_face_ratio"), 1.0);
    assert_eq!(f("golden_matched_ratio"), 1.0);
    assert!(f("golden_cosine_mean") > 0.9999 && f("golden_cosine_min") > 0.9999, "{last}");
    assert!(f("bbox_iou_mean") > 0.99);
    assert_eq!(f("scene_count_exact_ratio"), 1.0);
    assert_eq!(f("rank1"), 1.0);
    assert_eq!(f("pair_accuracy"), 1.0);
    assert!(f("genuine_min") > f("impostor_max"));
}

#[test]
fn eval_with_a_missing_labels_file_says_so() {
    let out = facerec(&["eval", "--images", ".", "--labels", "/nonexistent/labels.json"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/labels.json"), "{err}");
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

#[test]
fn a_bad_det_size_is_refused_with_one_clear_line() {
    let out = facerec(&["eval", "--images", ".", "--labels", "x.json", "--det-size", "300"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("multiple of 32"), "{err}");
}
