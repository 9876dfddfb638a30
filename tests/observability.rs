//! Observability against the real `facerec` binary over a real socket: `/metrics` after real
//! requests (counters, histograms, engine and gallery figures), `/ready` on a healthy server and
//! while its database folder is replaced by a file (503 `not_ready`, no internal detail to the
//! client, ready again once restored) and while MongoDB (a real wire server) is down, the three
//! public without credentials, `x-request-id` kept or generated on every answer, and
//! `LOG_FORMAT=json` lines on stderr carrying the request id. Also: the face photo built into
//! the binary for the readiness check is found by the real pipeline at det sizes 320 and 640.
//!
//! Runs with the cached models in `<crate>/models` (or MODEL_CACHE_DIR); the MongoDB test uses the
//! SecantusDB server the harness installs (tests/mongo_support).

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use support::{Multipart, Response, Server, TempDir, fixture, request_with_headers};

/// One scrape: every sample line as `name{labels}` -> value (labels exactly as rendered).
fn scrape(server: &Server) -> (BTreeMap<String, f64>, String) {
    let r = server.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    let ct = r.header("content-type").unwrap_or_default().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "content type {ct}");
    let text = r.text();
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        assert!(samples.insert(key.to_string(), v).is_none(), "duplicate sample {key}");
    }
    (samples, text)
}

fn value(samples: &BTreeMap<String, f64>, key: &str, text: &str) -> f64 {
    *samples.get(key).unwrap_or_else(|| panic!("no sample {key} in\n{text}"))
}

/// Checks one histogram series: buckets never decrease, `+Inf` equals `_count`; returns `_count`.
fn histogram_count(samples: &BTreeMap<String, f64>, name: &str, labels: &str, text: &str) -> f64 {
    let (open, sep) = if labels.is_empty() { ("{", "") } else { ("{", ",") };
    let prefix = format!("{name}_bucket{open}{labels}{sep}le=\"");
    let buckets: Vec<f64> = samples.iter().filter(|(k, _)| k.starts_with(&prefix)).map(|(_, v)| *v).collect();
    assert!(!buckets.is_empty(), "no buckets for {name}{{{labels}}} in\n{text}");
    let series = |suffix: &str| if labels.is_empty() { format!("{name}_{suffix}") } else { format!("{name}_{suffix}{{{labels}}}") };
    let count = value(samples, &series("count"), text);
    let inf = value(samples, &format!("{prefix}+Inf\"}}"), text);
    assert_eq!(inf, count, "{name}{{{labels}}}: +Inf bucket vs _count");
    // The map orders buckets by their `le` text, not numerically: every bucket is at most the total.
    assert!(buckets.iter().all(|&b| b <= count), "{name}{{{labels}}} buckets {buckets:?}");
    assert!(value(samples, &series("sum"), text) >= 0.0);
    count
}

fn recognize_body(photo: &str) -> Value {
    let crop = base64::engine::general_purpose::STANDARD.encode(fixture(photo));
    json!({"bboxes": [{"bbox": [0, 0, 10, 10], "crop": crop}]})
}

#[test]
fn metrics_count_real_requests() {
    let dir = TempDir::new("obs-metrics");
    let server = Server::start(dir.path());
    let sent = 3;
    for _ in 0..sent {
        let r = server.post_json("/recognize", &recognize_body("img11.jpg"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.header("x-inference-time").is_some(), "engine timing header missing: {:?}", r.headers);
    }
    let bad = server.call("POST", "/recognize", Some("application/json"), b"{not json");
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(server.get("/no/such/route/42").status, 404);
    assert_eq!(server.post_json("/users", &json!({"username": "alice"})).status, 201);
    let form = Multipart::new().text("username", "alice").file("files", "img5.jpg", "image/jpeg", &fixture("img5.jpg"));
    let enrolled = server.post_multipart("/calculate_average_embedding", &form);
    assert_eq!(enrolled.status, 200, "{}", enrolled.text());

    let (m, text) = scrape(&server);
    let rec = "method=\"POST\",route=\"/recognize\"";
    assert_eq!(value(&m, &format!("facerec_http_requests_total{{{rec},status=\"200\"}}"), &text), f64::from(sent));
    assert_eq!(value(&m, &format!("facerec_http_requests_total{{{rec},status=\"400\"}}"), &text), 1.0);
    assert_eq!(histogram_count(&m, "facerec_http_request_duration_seconds", rec, &text), f64::from(sent) + 1.0);
    // The raw path of an unknown route is never a label.
    assert_eq!(value(&m, "facerec_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}", &text), 1.0);
    assert!(!text.contains("/no/such/route"), "{text}");
    assert_eq!(value(&m, "facerec_http_errors_total{code=\"invalid_json\"}", &text), 1.0);
    assert_eq!(value(&m, "facerec_http_errors_total{code=\"not_found\"}", &text), 1.0);
    // Three recognitions and one enrolment used the engine: one queue and inference figure each.
    assert_eq!(histogram_count(&m, "facerec_queue_time_seconds", "", &text), f64::from(sent) + 1.0);
    assert_eq!(histogram_count(&m, "facerec_inference_time_seconds", "", &text), f64::from(sent) + 1.0);
    assert!(value(&m, "facerec_inference_time_seconds_sum", &text) > 0.0);
    // The engine's own counters: four images computed, in at least one batch.
    let done = value(&m, "facerec_engine_jobs_total{result=\"done\"}", &text);
    assert!((4.0..=5.0).contains(&done), "jobs done {done}");
    let batches = histogram_count(&m, "facerec_engine_batch_size", "", &text);
    assert!(batches >= 1.0 && batches <= done, "batches {batches}, jobs {done}");
    assert_eq!(value(&m, "facerec_engine_batches_total", &text), batches);
    assert_eq!(value(&m, "facerec_engine_queue_depth", &text), 0.0);
    assert_eq!(value(&m, "facerec_gallery_users", &text), 1.0);
    assert_eq!(value(&m, "facerec_face_records", &text), 0.0);
    assert_eq!(value(&m, "facerec_store_errors_total{kind=\"unavailable\"}", &text), 0.0);
    assert_eq!(value(&m, "facerec_audit_write_failures_total", &text), 0.0);
    assert_eq!(value(&m, "facerec_http_requests_in_flight", &text), 1.0, "the scrape itself");
    assert!(text.contains("facerec_build_info{version=\""), "{text}");

    // A scrape is counted after its answer: the second one sees the first.
    let (m2, text2) = scrape(&server);
    assert_eq!(value(&m2, "facerec_http_requests_total{method=\"GET\",route=\"/metrics\",status=\"200\"}", &text2), 1.0);
    server.stop();
}

#[test]
fn request_ids_are_kept_or_made_and_returned() {
    let dir = TempDir::new("obs-ids");
    let server = Server::start(dir.path());
    let call = |path: &str, headers: &[(&str, &str)]| -> Response {
        request_with_headers(server.port, "GET", path, headers, None, b"", Duration::from_secs(60)).expect("request")
    };
    let kept = call("/health", &[("x-request-id", "client-id.42_a:b")]);
    assert_eq!(kept.status, 200);
    assert_eq!(kept.header("x-request-id"), Some("client-id.42_a:b"));
    // Made when absent or not sane; an error answer carries one too.
    let mut made = Vec::new();
    for (path, headers) in [("/health", &[][..]), ("/health", &[("x-request-id", "has space<script>")][..]), ("/nope", &[][..])] {
        let r = call(path, headers);
        let id = r.header("x-request-id").unwrap_or_else(|| panic!("{path}: no x-request-id in {:?}", r.headers)).to_string();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{path}: {id} is not a UUID");
        made.push(id);
    }
    made.sort();
    made.dedup();
    assert_eq!(made.len(), 3, "ids are unique: {made:?}");
    let too_long = "a".repeat(200);
    let r = call("/health", &[("x-request-id", &too_long)]);
    assert_ne!(r.header("x-request-id"), Some(too_long.as_str()));
    server.stop();
}

#[test]
fn ready_needs_the_store_and_hides_the_details() {
    let dir = TempDir::new("obs-ready");
    let data = dir.path().join("data");
    let db = data.join("facerec.db");
    let db_text = db.to_string_lossy().into_owned();
    let server = Server::start_with_env(dir.path(), &[("DATABASE_PATH", &db_text)]);

    let ok = server.get("/ready");
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json(), json!({"status": "ready", "checks": {"models": "ok", "store": "ok", "inference": "ok"}}));
    assert!(server.stderr().contains("readiness: inference on the built-in face photo passed"), "{}", server.stderr());

    // The database folder replaced by a file: the open connection would keep writing to a file
    // no one will find again; /ready says so.
    let moved = dir.path().join("data.moved");
    fs::rename(&data, &moved).expect("move the data folder away");
    fs::write(&data, b"not a folder").expect("a file where the folder was");
    let r = request_with_headers(server.port, "GET", "/ready", &[("x-request-id", "ready-check-1")], None, b"", Duration::from_secs(60))
        .expect("request");
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.json();
    assert_eq!(body["status"], "error");
    assert_eq!(body["code"], "not_ready");
    assert_eq!(body["failed"], json!(["store"]));
    assert_eq!(body["checks"]["models"], "ok");
    assert_eq!(body["checks"]["inference"], "ok");
    assert!(body["checks"]["store"].as_str().is_some_and(|s| s.starts_with("failed: ")), "{body}");
    assert_eq!(body["request_id"], "ready-check-1");
    assert_eq!(r.header("x-request-id"), Some("ready-check-1"));
    let text = r.text();
    assert!(!text.contains("facerec.db") && !text.contains(&*dir.path().to_string_lossy()), "internal detail leaked: {text}");
    // The details are in the log, once, with the request id.
    let err = server.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("readiness: not ready")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("ready-check-1") && lines[0].contains("facerec.db"), "{}", lines[0]);
    // Still alive meanwhile.
    assert_eq!(server.get("/health").status, 200);

    fs::remove_file(&data).expect("remove the file");
    fs::rename(&moved, &data).expect("put the folder back");
    let again = server.get("/ready");
    assert_eq!(again.status, 200, "{}", again.text());

    let (m, text) = scrape(&server);
    assert_eq!(value(&m, "facerec_http_requests_total{method=\"GET\",route=\"/ready\",status=\"503\"}", &text), 1.0);
    assert_eq!(value(&m, "facerec_http_requests_total{method=\"GET\",route=\"/ready\",status=\"200\"}", &text), 2.0);
    assert_eq!(value(&m, "facerec_http_errors_total{code=\"not_ready\"}", &text), 1.0);
    server.stop();
}

#[test]
fn ready_follows_a_mongodb_outage() {
    let dir = support::TempDir::new("obs-ready");
    let mut db = support::mongo::Secantus::start(&dir.path().join("db"), false);
    let f = support::mongo::Facerec::start(dir.path(), &db.uri("ready"), &[]);
    let ok = f.get("/ready");
    assert_eq!(ok.status, 200, "{}", ok.text());

    db.stop();
    let r = f.get("/ready");
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.json();
    assert_eq!((body["code"].as_str(), &body["failed"]), (Some("not_ready"), &json!(["store"])), "{body}");
    assert_eq!(f.get("/health").status, 200, "alive meanwhile");

    db.restart();
    let back = support::wait_until(Duration::from_secs(30), || f.get("/ready").status == 200);
    assert!(back.is_some(), "not ready again within 30 s after MongoDB came back:\n{}", f.stderr());
    f.stop();
}

#[test]
fn health_ready_and_metrics_need_no_credentials() {
    let dir = TempDir::new("obs-auth");
    let server = Server::start_with_env(dir.path(), &[("API_KEYS", "k-123")]);
    assert_eq!(server.get("/users").status, 401, "auth is on");
    for path in ["/health", "/ready", "/metrics"] {
        let r = server.get(path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let doc = server.get("/openapi.json").json();
    for path in ["/ready", "/metrics"] {
        let op = &doc["paths"][path]["get"];
        assert!(op.is_object(), "OpenAPI documents GET {path}");
        assert!(op.get("security").is_none(), "{path} is public: {op}");
    }
    server.stop();
}

#[test]
fn json_logs_carry_the_request_id() {
    let dir = TempDir::new("obs-json");
    let server = Server::start_with_env(dir.path(), &[("LOG_FORMAT", "json"), ("RUST_LOG", "info,ort=warn,tower_http=debug")]);
    let r = request_with_headers(server.port, "GET", "/health", &[("x-request-id", "json-log-7")], None, b"", Duration::from_secs(60))
        .expect("request");
    assert_eq!(r.status, 200);
    let err = server.stop();
    let lines: Vec<Value> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\nall:\n{err}")))
        .collect();
    assert!(lines.iter().any(|l| l["message"] == "listening" && l["level"] == "INFO"), "{err}");
    let ours: Vec<&Value> = lines.iter().filter(|l| l["span"]["request_id"] == "json-log-7").collect();
    assert!(!ours.is_empty(), "no line with the request id:\n{err}");
    assert!(ours.iter().all(|l| l["span"]["route"] == "/health" && l["span"]["method"] == "GET"), "{ours:?}");
}

#[test]
fn the_built_in_face_is_found_at_common_det_sizes() {
    use facerec::face::image::{ImageLimits, decode};
    let rgb = decode(facerec::api::ready::READY_FACE, &ImageLimits::default()).expect("the built-in photo decodes").rgb;
    let runtime = facerec::runtime::Runtime::init(&facerec::runtime::RuntimeOptions {
        dylib_path: std::env::var_os("ORT_DYLIB_PATH").map(Into::into),
        ..facerec::runtime::RuntimeOptions::cpu(support::model_cache_dir(), facerec::runtime::BackendChoice::OnnxRuntime, 2)
    })
    .expect("ONNX Runtime");
    let pack = facerec::fetch::ensure_pack(&support::model_cache_dir(), "buffalo_sc").expect("pack");
    for det in [320, 640] {
        let mut analyzer = facerec::face::FaceAnalyzer::load(&runtime, &pack, facerec::config::analyzer_options(det)).expect("pack loads");
        let faces = analyzer.analyze(&rgb, &mut Default::default()).expect("analysis");
        assert_eq!(faces.len(), 1, "det size {det}");
    }
}
