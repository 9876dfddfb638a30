//! Guard rails for refactoring: the OpenAPI document the binary serves and the names and
//! types of the metrics it exports must equal the committed snapshots (`docs/openapi.json`,
//! `docs/metrics.txt`). A change that means to alter either regenerates them with
//! `UPDATE_SNAPSHOTS=1 cargo test --test snapshots` and commits the difference, which
//! then shows in review; anything else that moves them fails here.

mod support;

use std::path::PathBuf;

use support::{Server, TempDir};

fn snapshot(name: &str) -> PathBuf {
    support::manifest_dir().join("docs").join(name)
}

/// Compares `actual` with the committed snapshot, or rewrites it under UPDATE_SNAPSHOTS=1.
fn check(name: &str, actual: &str) {
    let path = snapshot(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().expect("docs/")).expect("docs/ folder");
        std::fs::write(&path, actual).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; create it with UPDATE_SNAPSHOTS=1 cargo test --test snapshots", path.display()));
    if expected != actual {
        let diff: Vec<String> = expected
            .lines()
            .zip(actual.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(10)
            .map(|(i, (a, b))| format!("line {}:\n  committed: {a}\n  served:    {b}", i + 1))
            .collect();
        panic!(
            "{name} differs from what the binary serves ({} committed lines, {} served); first differences:\n{}\n\
             If the change is meant, run UPDATE_SNAPSHOTS=1 cargo test --test snapshots and commit docs/{name}",
            expected.lines().count(),
            actual.lines().count(),
            diff.join("\n")
        );
    }
}

/// `# TYPE name kind` lines of a Prometheus exposition, sorted: the metric families.
fn metric_families(text: &str) -> String {
    let mut families: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).map(|l| &l["# TYPE ".len()..]).collect();
    families.sort_unstable();
    families.dedup();
    families.iter().map(|f| format!("{f}\n")).collect()
}

#[test]
fn the_served_openapi_document_and_metric_names_match_the_snapshots() {
    let dir = TempDir::new("snapshots");
    let server = Server::start(dir.path());
    let doc = server.get("/openapi.json");
    assert_eq!(doc.status, 200);
    let mut doc = doc.json();
    // The version is the crate's own: not part of the contract under review.
    doc["info"]["version"] = serde_json::Value::String("(crate version)".into());
    let pretty = serde_json::to_string_pretty(&doc).expect("serialises") + "\n";
    // Traffic first, so that every family a request creates is there.
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.get("/nope").status, 404);
    let metrics = server.get("/metrics");
    assert_eq!(metrics.status, 200);
    let families = metric_families(&metrics.text());
    assert!(families.lines().count() >= 10, "too few metric families:\n{families}");
    check("openapi.json", &pretty);
    check("metrics.txt", &families);
    server.stop();
}

#[test]
fn metric_families_are_read_from_type_lines() {
    let text = "# HELP b x\n# TYPE b counter\nb 1\n# TYPE a gauge\na 2\n# TYPE b counter\n";
    assert_eq!(metric_families(text), "a gauge\nb counter\n");
}
