//! The supervised engine (issue 15, item 2) as HTTP clients see it, on the real models, store
//! and audit writer, with faults injected into the worker through `EngineConfig::with_faults`
//! (a test-only builder: no configuration reaches it): a worker that panics fails its job
//! with 500 `internal`, is replaced, and the next requests succeed; a worker stuck past
//! INFERENCE_TIMEOUT gives 503 `inference_timeout` within the deadline, `/ready` says 503
//! while it is stuck and 200 again once it is free, by itself.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt;

use facerec::api::auth::AuthConfig;
use facerec::api::{AppState, LegacyStatus, RequestLimits, app};
use facerec::audit::{AuditConfig, AuditHandle};
use facerec::engine::{Engine, EngineConfig, FaultHooks};
use facerec::service::{Service, ServiceOptions};
use facerec::store::FaceStore;
use facerec::store::faces::FaceRecordStore;
use facerec::store::sqlite::SqliteStore;
use support::fixture;
use support::models::{pack_dir, runtime, temp_dir};

async fn service(timeout: Duration, faults: FaultHooks) -> Arc<AppState> {
    let dir = temp_dir("supervision");
    let files = facerec::face::pack::resolve(&pack_dir()).expect("pack");
    let cfg = EngineConfig { workers: 1, queue: 64, timeout, ..EngineConfig::default() }.with_faults(faults);
    let engine = tokio::task::spawn_blocking(move || Engine::start(runtime(), files, cfg)).await.expect("joins").expect("engine");
    let s = Arc::new(SqliteStore::open(&dir.join("facerec.db")).expect("store"));
    let (store, faces) = (Arc::clone(&s) as Arc<dyn FaceStore>, s as Arc<dyn FaceRecordStore>);
    let audit = AuditHandle::start(AuditConfig::new(dir.join("logs.txt"), dir.join("photo"))).await.expect("audit");
    let service = Arc::new(Service::open(engine, store, faces, audit, ServiceOptions::default()).await.expect("service"));
    Arc::new(AppState::new(service, Arc::new(AuthConfig::default()), RequestLimits::default(), LegacyStatus::default()))
}

async fn call(state: &Arc<AppState>, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app(Arc::clone(state), 20 << 20).oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn metrics(state: &Arc<AppState>) -> String {
    let resp = app(Arc::clone(state), 20 << 20).oneshot(get("/metrics")).await.expect("infallible");
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body");
    String::from_utf8_lossy(&bytes).into_owned()
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).expect("request")
}

/// `POST /api/face/encode` with one photo.
fn encode(photo: &[u8]) -> Request<Body> {
    let b = "supervisionBoundary7";
    let mut body =
        format!("--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n")
            .into_bytes();
    body.extend_from_slice(photo);
    body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    Request::post("/api/face/encode")
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={b}"))
        .body(Body::from(body))
        .expect("request")
}

/// Polls `/ready` until it answers `want`, at most `within`; the time it took.
async fn ready_becomes(state: &Arc<AppState>, want: StatusCode, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (status, body) = call(state, get("/ready")).await;
        if status == want {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "/ready still {status} after {within:?}: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_fails_its_job_and_is_replaced() {
    let state = service(Duration::from_secs(30), FaultHooks::panic_on(1)).await;
    let photo = fixture("img5.jpg");
    let t = Instant::now();
    let (status, body) = call(&state, encode(&photo)).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["code"], "internal");
    assert!(t.elapsed() < Duration::from_secs(5), "answered at once, not at the deadline: {:?}", t.elapsed());
    // The replacement serves: /ready comes back by itself and the next requests succeed.
    ready_becomes(&state, StatusCode::OK, Duration::from_secs(60)).await;
    for _ in 0..3 {
        let (status, body) = call(&state, encode(&photo)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["embedding"].as_array().map(Vec::len), Some(512));
    }
    let s = state.service.engine().stats();
    assert_eq!((s.worker_restarts, s.live_workers, s.serving_workers), (1, 1, 1), "{s:?}");
    let m = metrics(&state).await;
    assert_eq!(metric(&m, "facerec_engine_worker_restarts_total"), 1.0);
    assert_eq!(metric(&m, "facerec_engine_workers"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_worker_gives_503_within_the_deadline_and_ready_recovers() {
    let deadline = Duration::from_secs(1);
    let stall = Duration::from_secs(5);
    let state = service(deadline, FaultHooks::stall_on(1, stall)).await;
    let photo = fixture("img5.jpg");
    let t = Instant::now();
    let (status, body) = call(&state, encode(&photo)).await;
    let waited = t.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "inference_timeout");
    assert!(waited >= deadline && waited < deadline + Duration::from_secs(1), "answered after {waited:?}");
    // The worker is still stuck: not ready.
    let (status, body) = call(&state, get("/ready")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["failed"].as_array().is_some_and(|f| f.iter().any(|n| n == "models")), "{body}");
    assert_eq!(state.service.engine().stats().serving_workers, 0);
    // Free again once the stall ends, without anyone stepping in.
    let back = ready_becomes(&state, StatusCode::OK, stall + Duration::from_secs(30)).await;
    println!("ready again {back:?} after the first 503");
    let (status, body) = call(&state, encode(&photo)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let m = metrics(&state).await;
    assert!(metric(&m, "facerec_engine_jobs_timed_out_total") >= 1.0);
    assert_eq!(metric(&m, "facerec_engine_worker_restarts_total"), 0.0);
}

#[tokio::test]
async fn the_audit_writer_survives_a_panic_and_counts_it() {
    use facerec::audit::{AuditError, AuditRecord};
    let dir = temp_dir("supervision-audit");
    let audit = AuditHandle::start_with_fault(AuditConfig::new(dir.join("logs.txt"), dir.join("photo")), Some(1)).await.expect("audit");
    let rec = |n: u32| AuditRecord { line: serde_json::json!({"n": n}), crops: Vec::new() };
    match audit.record(rec(1)).await {
        Err(AuditError::Panicked(why)) => assert!(why.contains("injected"), "{why}"),
        other => panic!("expected the panic reported, got {other:?}"),
    }
    assert_eq!(audit.failures(), 1);
    // The writer goes on: the next records are written, and not counted as failures.
    for n in 2..=3 {
        audit.record(rec(n)).await.expect("written after the panic");
    }
    assert_eq!(audit.failures(), 1);
    audit.shutdown().await.expect("closes");
    let log = std::fs::read_to_string(dir.join("logs.txt")).expect("log");
    let lines: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines, vec![serde_json::json!({"n": 2}), serde_json::json!({"n": 3})]);
}
