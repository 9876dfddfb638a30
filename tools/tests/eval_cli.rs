//! `facerec-tools eval` as a user runs it: the real binary on the repository's fixtures, with
//! the repository's model cache (MODEL_CACHE_DIR, default `models/` at the root).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

fn cache_dir() -> PathBuf {
    std::env::var_os("MODEL_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("models"))
}

fn tools(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_facerec-tools"))
        .args(args)
        .env("MODEL_CACHE_DIR", cache_dir())
        .env("EXECUTION_PROVIDER", "cpu")
        .env("RUST_LOG", "warn")
        .output()
        .expect("facerec-tools runs")
}

#[test]
fn eval_prints_a_report_and_a_json_summary_last() {
    let dir = fixtures();
    let labels = dir.join("labels.json");
    let golden = dir.join("golden_det640.json");
    let out = tools(&[
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
    let out = tools(&["eval", "--images", ".", "--labels", "/nonexistent/labels.json"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/labels.json"), "{err}");
}

#[test]
fn a_bad_det_size_is_refused_with_one_clear_line() {
    let out = tools(&["eval", "--images", ".", "--labels", "x.json", "--det-size", "300"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("multiple of 32"), "{err}");
}
