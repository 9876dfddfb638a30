//! The HTTP contract through the router (`app().oneshot(...)`, no socket), with the real
//! models, a real store and the real audit writer. Tests of what the store keeps run once per
//! store, same body: `NAME::sqlite` (a real SQLite file) and `NAME::mongodb` (a fresh database
//! on a real MongoDB wire-protocol server, SecantusDB, started by `mongo_support`) and
//! `NAME::postgres` (a fresh database on a real PostgreSQL with pgvector, started by
//! `pg_support`); never skipped: the test fails when a server cannot start.

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use serde_json::{Value, json};
use tower::ServiceExt;

use facerec::api::LegacyStatus;
use facerec::api::auth::AuthConfig;
use facerec::api::{AppState, app};
use facerec::audit::{AuditConfig, AuditHandle};
use facerec::config::ServeConfig;
use facerec::engine::{Engine, EngineConfig};
use facerec::face::AnalyzerOptions;
use facerec::service::{Service, ServiceOptions};
use facerec::store::FaceStore;
use facerec::store::faces::FaceRecordStore;
use facerec::store::mongo::{MongoOptions, MongoStore};
use facerec::store::postgres::{PgOptions, PgStore};
use facerec::store::sqlite::SqliteStore;
use support::fixture;
use support::models::{golden, pack_dir, runtime, temp_dir};

struct Harness {
    state: Arc<AppState>,
    dir: PathBuf,
    /// The router's body limit: the service's default (MAX_BODY_BYTES).
    max_body: usize,
}

/// What a harness is built with, beyond its store: the defaults of `facerec serve` unless changed.
struct Setup {
    auth: AuthConfig,
    legacy: LegacyStatus,
    analyzer: AnalyzerOptions,
}

impl Default for Setup {
    fn default() -> Self {
        Setup { auth: AuthConfig::new(None, None), legacy: defaults().legacy_status, analyzer: defaults().analyzer_options() }
    }
}

/// `facerec serve`'s configuration with no flag and no variable set.
fn defaults() -> ServeConfig {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeConfig,
    }
    <Cli as clap::Parser>::parse_from(["facerec"]).serve
}

impl Harness {
    async fn new() -> Harness {
        Harness::on(Backend::Sqlite).await
    }

    async fn on(backend: Backend) -> Harness {
        Harness::with(backend, Setup::default()).await
    }

    async fn build(backend: Backend, auth: AuthConfig) -> Harness {
        Harness::with(backend, Setup { auth, ..Setup::default() }).await
    }

    async fn with(backend: Backend, setup: Setup) -> Harness {
        let Setup { auth, legacy, analyzer } = setup;
        let dir = temp_dir("api");
        let files = facerec::face::pack::resolve(&pack_dir()).expect("pack");
        let cfg = EngineConfig { workers: 1, queue: 64, analyzer, ..EngineConfig::default() };
        let engine = Engine::start(runtime(), files, cfg).expect("engine");
        let (store, faces): (Arc<dyn FaceStore>, Arc<dyn FaceRecordStore>) = match backend {
            Backend::Sqlite => {
                let s = Arc::new(SqliteStore::open(&dir.join("data/facerec.db")).expect("store"));
                (Arc::clone(&s) as Arc<dyn FaceStore>, s)
            }
            Backend::Mongo => {
                let s = Arc::new(mongo_store().await);
                (Arc::clone(&s) as Arc<dyn FaceStore>, s)
            }
            Backend::Postgres => {
                let s = Arc::new(pg_store().await);
                (Arc::clone(&s) as Arc<dyn FaceStore>, s)
            }
        };
        let audit = AuditHandle::start(AuditConfig { queue: 64, ..AuditConfig::new(dir.join("logs.txt"), dir.join("photo")) })
            .await
            .expect("audit");
        let options = ServiceOptions { sim_threshold: 0.3, ..ServiceOptions::default() };
        let service = Arc::new(Service::open(engine, store, faces, audit, options).await.expect("service"));
        let state = Arc::new(AppState::new(service, Arc::new(auth), defaults().request_limits(), legacy));
        Harness { state, dir, max_body: defaults().max_body_bytes }
    }

    async fn call(&self, req: Request<Body>) -> (StatusCode, Vec<u8>) {
        let resp = app(Arc::clone(&self.state), self.max_body).oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body");
        (status, bytes.to_vec())
    }

    /// The whole answer: status, headers and body.
    async fn answer(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let resp = app(Arc::clone(&self.state), self.max_body).oneshot(req).await.expect("infallible");
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.expect("body");
        (parts.status, parts.headers, bytes.to_vec())
    }

    async fn json(&self, req: Request<Body>) -> (StatusCode, Value) {
        let (s, b) = self.call(req).await;
        (s, serde_json::from_slice(&b).unwrap_or_else(|_| panic!("JSON body, got {}", String::from_utf8_lossy(&b))))
    }

    async fn create(&self, name: &str) -> StatusCode {
        self.json(post_json("/users", &json!({"username": name}))).await.0
    }

    async fn enrol(&self, name: &str, files: &[(&str, Vec<u8>)]) -> (StatusCode, Value) {
        self.json(multipart("/calculate_average_embedding", name, files)).await
    }

    fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("logs.txt"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every log line is JSON"))
            .collect()
    }

    fn photos(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.join("photo"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// The store behind the router.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Mongo,
    Postgres,
}

/// A store on a fresh database of the PostgreSQL server this test binary shares (pgserver from
/// PyPI, installed and started on first use; a failure to start fails the test).
async fn pg_store() -> PgStore {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let db = format!("api_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let url = tokio::task::spawn_blocking(move || support::pg::Postgres::shared().create_database(&db)).await.expect("postgres starts");
    let opts = PgOptions {
        connect_timeout: std::time::Duration::from_secs(60),
        op_timeout: std::time::Duration::from_secs(10),
        ..PgOptions::default()
    };
    PgStore::connect(&url, opts).await.unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"))
}

/// A store on a fresh database of the SecantusDB server this test binary shares (installed and
/// started on first use; a failure to start fails the test).
async fn mongo_store() -> MongoStore {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let db = format!("api_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let uri = tokio::task::spawn_blocking(move || support::mongo::Secantus::shared().uri(&db)).await.expect("secantusd starts");
    // Generous timeouts: the server shares two cores with inference in parallel tests.
    let opts = MongoOptions {
        connect_timeout: std::time::Duration::from_secs(60),
        op_timeout: std::time::Duration::from_secs(10),
        ..MongoOptions::default()
    };
    MongoStore::connect(&uri, opts).await.unwrap_or_else(|e| panic!("MongoDB (SecantusDB) at {uri}: {e}"))
}

/// Runs the test body `$name(Backend)` once per store: tests `$name::sqlite`, `$name::mongodb`
/// and `$name::postgres`.
macro_rules! on_each_store {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread")]
            async fn sqlite() {
                super::$name(super::Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn mongodb() {
                super::$name(super::Backend::Mongo).await
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn postgres() {
                super::$name(super::Backend::Postgres).await
            }
        }
    };
}

fn post_json(uri: &str, body: &Value) -> Request<Body> {
    Request::post(uri).header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_string())).expect("request")
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).expect("request")
}

fn multipart(uri: &str, username: &str, files: &[(&str, Vec<u8>)]) -> Request<Body> {
    let boundary = "facerecBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\n{username}\r\n").as_bytes());
    for (name, bytes) in files {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Request::post(uri)
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={boundary}"))
        .body(Body::from(body))
        .expect("request")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The face of `name` cut out around its golden box (plus a margin), as a camera sends it.
fn face_crop(name: &str, margin: f32) -> Vec<u8> {
    let g = golden(320);
    let b = g.images[name].faces[0].bbox;
    let img = image::load_from_memory(&fixture(name)).expect("fixture").to_rgb8();
    let (w, h) = (b[2] - b[0], b[3] - b[1]);
    let x1 = (b[0] - w * margin).max(0.0) as u32;
    let y1 = (b[1] - h * margin).max(0.0) as u32;
    let x2 = ((b[2] + w * margin) as u32).min(img.width());
    let y2 = ((b[3] + h * margin) as u32).min(img.height());
    let crop = image::imageops::crop_imm(&img, x1, y1, x2 - x1, y2 - y1).to_image();
    let mut out = std::io::Cursor::new(Vec::new());
    crop.write_to(&mut out, image::ImageFormat::Jpeg).expect("encode");
    out.into_inner()
}

fn grey_png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(200, 200, image::Rgb([128, 128, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode");
    out.into_inner()
}

on_each_store!(the_original_client_flow_works_unchanged);
async fn the_original_client_flow_works_unchanged(store: Backend) {
    let h = Harness::on(store).await;
    assert_eq!(h.create("alice").await, StatusCode::CREATED);
    let (s, enrolled) = h
        .enrol("alice", &[("img5.jpg", fixture("img5.jpg")), ("img6.jpg", fixture("img6.jpg")), ("img10.jpg", fixture("img10.jpg"))])
        .await;
    assert_eq!(s, StatusCode::OK, "{enrolled}");
    assert_eq!(enrolled["status"], "success");
    assert_eq!(enrolled["username"], "alice");
    assert_eq!(enrolled["images"], 3);
    let emb: Vec<f64> = serde_json::from_value(enrolled["embedding"].clone()).expect("numbers");
    assert_eq!(emb.len(), 512);
    assert!((emb.iter().map(|v| v * v).sum::<f64>().sqrt() - 1.0).abs() < 1e-3);

    let alice_crop = b64(&face_crop("img11.jpg", 0.2));
    let stranger = b64(&fixture("img16.jpg"));
    let request = json!({
        "camera": "gate-2",
        "frame": 1234,
        "bboxes": [
            {"bbox": [10, 20, 110, 140], "crop": alice_crop, "track_id": 7},
            {"bbox": [1, 2, 3, 4], "crop": stranger},
        ]
    });
    let (s, answer) = h.json(post_json("/recognize", &request)).await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    assert_eq!(answer["status"], "recognized");
    let meta = &answer["meta"];
    assert_eq!(meta["camera"], "gate-2");
    assert_eq!(meta["frame"], 1234);
    let e0 = &meta["bboxes"][0];
    assert_eq!(e0["name"], "alice");
    assert!(e0["similarity"].as_f64().is_some_and(|v| v > 0.5), "{}", e0["similarity"]);
    assert_eq!(e0["track_id"], 7);
    assert_eq!(e0["bbox"], json!([10, 20, 110, 140]));
    assert_eq!(e0["crop"], request["bboxes"][0]["crop"]);
    let e1 = &meta["bboxes"][1];
    assert_eq!(e1["name"], "Unknown 1");
    assert!(e1["similarity"].as_f64().is_some_and(|v| (0.0..0.3).contains(&v)));
    assert!(e0.get("error").is_none() && e1.get("error").is_none());

    // One NDJSON line equal to meta, one crop file per entry, /metadata equal to meta.
    assert_eq!(h.log_lines(), vec![meta.clone()]);
    let photos = h.photos();
    assert_eq!(photos.len(), 2, "{photos:?}");
    assert!(photos.iter().any(|p| p.starts_with("photo_alice_") && p.ends_with(".jpg")));
    assert!(photos.iter().any(|p| p.starts_with("photo_Unknown 1_") && p.ends_with(".jpg")));
    let (s, m) = h.json(get("/metadata")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(&m, meta);
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_is_empty_before_the_first_recognition() {
    let h = Harness::new().await;
    assert_eq!(h.json(get("/metadata")).await, (StatusCode::OK, json!({})));
}

on_each_store!(legacy_error_bodies_are_byte_for_byte);
async fn legacy_error_bodies_are_byte_for_byte(store: Backend) {
    // LEGACY_STATUS=http: the same bodies with proper statuses.
    let h = Harness::with(store, Setup { legacy: LegacyStatus::Http, ..Setup::default() }).await;
    let (s, body) = h.call(multipart("/calculate_average_embedding", "bob", &[("a.jpg", fixture("img5.jpg"))])).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(String::from_utf8_lossy(&body), r#"{"status":"error","message":"User 'bob' not found."}"#);

    assert_eq!(h.create("bob").await, StatusCode::CREATED);
    let (s, body) = h.call(multipart("/calculate_average_embedding", "bob", &[("grey.png", grey_png()), ("grey2.png", grey_png())])).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(String::from_utf8_lossy(&body), r#"{"status":"error","message":"No faces detected in any image."}"#);
    // Nothing changed.
    let (_, users) = h.json(get("/users")).await;
    assert_eq!(users["users"][0]["samples"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_crop_does_not_fail_the_others() {
    let h = Harness::new().await;
    let request = json!({"bboxes": [
        {"bbox": [0, 0, 1, 1], "crop": "!!not base64!!"},
        {"bbox": [0, 0, 1, 1], "crop": b64(b"plain text, not an image")},
        {"bbox": [0, 0, 1, 1], "crop": b64(&fixture("img12.jpg"))},
        {"bbox": [0, 0, 1, 1]},
    ]});
    let (s, answer) = h.json(post_json("/recognize", &request)).await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    let e = &answer["meta"]["bboxes"];
    assert_eq!(e[0]["error"]["code"], "invalid_base64");
    assert_eq!(e[1]["error"]["code"], "invalid_image");
    assert!(e[2].get("error").is_none());
    assert_eq!(e[3]["error"]["code"], "invalid_request");
    let names: Vec<&str> = (0..4).map(|i| e[i]["name"].as_str().unwrap_or("")).collect();
    assert_eq!(names, ["Unknown 1", "Unknown 2", "Unknown 3", "Unknown 4"]);
    assert_eq!(e[2]["similarity"], 0.0, "no users enrolled");
    // Only the real image is kept as a crop.
    assert_eq!(h.photos().len(), 1);
    assert_eq!(h.log_lines().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_bodies_get_clear_json_errors_and_change_nothing() {
    let h = Harness::new().await;
    for (body, code) in [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_request"),
        (r#"{"bboxes": "nope"}"#, "invalid_request"),
        (r#"{"bboxes": [1, 2]}"#, "invalid_request"),
    ] {
        let req = Request::post("/recognize").header(header::CONTENT_TYPE, "application/json").body(Body::from(body)).expect("request");
        let (s, v) = h.json(req).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(v["status"], "error");
        assert_eq!(v["code"], code, "{body}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert!(h.log_lines().is_empty(), "a refused request is not logged");
    assert_eq!(h.json(get("/metadata")).await.1, json!({}));
}

on_each_store!(users_are_created_listed_and_deleted);
async fn users_are_created_listed_and_deleted(store: Backend) {
    let h = Harness::on(store).await;
    assert_eq!(h.create("carol").await, StatusCode::CREATED);
    let (s, v) = h.json(post_json("/users", &json!({"username": "carol"}))).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::CONFLICT, json!("user_exists")));
    for bad in [json!({"username": ""}), json!({"username": "a\u{0007}b"}), json!({"username": " padded "}), json!({"name": "x"})] {
        let (s, v) = h.json(post_json("/users", &bad)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    let (_, e) = h.enrol("carol", &[("img16.jpg", fixture("img16.jpg")), ("img17.jpg", fixture("img17.jpg"))]).await;
    assert_eq!(e["images"], 2);
    let (s, list) = h.json(get("/users")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["count"], 1);
    assert_eq!(list["users"][0]["username"], "carol");
    assert_eq!(list["users"][0]["samples"], 2);
    assert!(list["users"][0].get("embedding").is_none() && list["users"][0].get("embeddings").is_none(), "no vectors");
    assert_eq!(h.state.service.gallery().len(), 1);

    let req = Request::delete("/users/carol").body(Body::empty()).expect("request");
    assert_eq!(h.json(req).await.0, StatusCode::OK);
    assert_eq!(h.state.service.gallery().len(), 0, "gone from memory");
    assert_eq!(h.json(get("/users")).await.1["count"], 0, "gone from the store");
    let req = Request::delete("/users/carol").body(Body::empty()).expect("request");
    let (s, v) = h.json(req).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::NOT_FOUND, json!("user_not_found")));
}

on_each_store!(enrolment_is_a_weighted_mean_and_recognition_follows_it);
async fn enrolment_is_a_weighted_mean_and_recognition_follows_it(store: Backend) {
    let h = Harness::on(store).await;
    assert_eq!(h.create("dave").await, StatusCode::CREATED);
    let (_, one) = h.enrol("dave", &[("img5.jpg", fixture("img5.jpg"))]).await;
    let (_, two) = h.enrol("dave", &[("img6.jpg", fixture("img6.jpg")), ("img10.jpg", fixture("img10.jpg"))]).await;
    let (_, all) = {
        assert_eq!(h.create("erin").await, StatusCode::CREATED);
        h.enrol("erin", &[("img5.jpg", fixture("img5.jpg")), ("img6.jpg", fixture("img6.jpg")), ("img10.jpg", fixture("img10.jpg"))]).await
    };
    let v = |x: &Value| -> Vec<f64> { serde_json::from_value(x["embedding"].clone()).expect("numbers") };
    // One image then two equals three at once.
    let cos: f64 = v(&two).iter().zip(v(&all)).map(|(a, b)| a * b).sum();
    assert!(cos > 0.99999, "{cos}");
    assert!(v(&one) != v(&two));
    let (_, list) = h.json(get("/users")).await;
    assert_eq!(list["users"][0]["samples"], 3);
}

on_each_store!(enrolment_rejects_non_images_and_missing_fields);
async fn enrolment_rejects_non_images_and_missing_fields(store: Backend) {
    let h = Harness::with(store, Setup { legacy: LegacyStatus::Http, ..Setup::default() }).await;
    assert_eq!(h.create("fay").await, StatusCode::CREATED);
    let (s, v) = h.enrol("fay", &[("notes.txt", b"hello".to_vec())]).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_image")));
    assert!(v["message"].as_str().is_some_and(|m| m.contains("notes.txt")));
    // As the original: a file that is not an image gives no face.
    let o = Harness::on(store).await;
    assert_eq!(o.create("fay").await, StatusCode::CREATED);
    let (s, body) = o.call(multipart("/calculate_average_embedding", "fay", &[("notes.txt", b"hello".to_vec())])).await;
    assert_eq!((s, String::from_utf8_lossy(&body).into_owned()), (StatusCode::OK, NO_FACES.to_owned()));
    for h in [&h, &o] {
        let (s, v) = h.enrol("fay", &[]).await;
        assert_eq!((s, v["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_request")));
        let req = Request::post("/calculate_average_embedding")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .expect("request");
        let (s, v) = h.json(req).await;
        assert_eq!((s, v["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_request")));
        assert_eq!(h.json(get("/users")).await.1["users"][0]["samples"], 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn landing_health_docs_and_unknown_routes() {
    let h = Harness::new().await;
    let (s, body) = h.call(get("/")).await;
    let html = String::from_utf8_lossy(&body);
    assert_eq!(s, StatusCode::OK);
    assert!(
        html.contains("<title>Face Recognition API</title>")
            && html.contains("/recognize")
            && html.contains("/docs")
            && html.contains("/redoc")
    );

    let (s, health) = h.json(get("/health")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["execution_provider"], "cpu");
    assert_eq!(health["model_pack"], "buffalo_sc");
    assert_eq!(health["store"], "sqlite");
    assert_eq!(health["users"], 0);
    assert!(health["model_id"].as_str().is_some_and(|m| m.starts_with("w600k_mbf@")));

    let (s, doc) = h.json(get("/openapi.json")).await;
    assert_eq!(s, StatusCode::OK);
    for path in ["/recognize", "/metadata", "/calculate_average_embedding", "/users", "/users/{username}", "/health"] {
        assert!(doc["paths"].get(path).is_some(), "OpenAPI documents {path}");
    }
    let enrol = &doc["paths"]["/calculate_average_embedding"]["post"]["responses"];
    for status in ["200", "404", "422", "429", "503"] {
        assert!(enrol.get(status).is_some(), "enrolment documents {status}");
    }
    let (s, body) = h.call(get("/docs/")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("swagger"));
    let (s, body) = h.call(get("/redoc")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).to_lowercase().contains("redoc"));

    let (s, v) = h.json(get("/no/such/route")).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::NOT_FOUND, json!("not_found")));
    let (s, v) = h.json(get("/recognize")).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::METHOD_NOT_ALLOWED, json!("method_not_allowed")));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_body_is_413_json() {
    let mut h = Harness::new().await;
    h.max_body = 1 << 20;
    let big = "x".repeat(2 << 20);
    let req = Request::post("/recognize").header(header::CONTENT_TYPE, "application/json").body(Body::from(big)).expect("request");
    let (s, v) = h.json(req).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::PAYLOAD_TOO_LARGE, json!("payload_too_large")));
}

/// One multipart field.
enum Field {
    Text(&'static str, String),
    File(&'static str, String, Vec<u8>),
}

fn form(uri: &str, fields: &[Field]) -> Request<Body> {
    let boundary = "facerecBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for f in fields {
        match f {
            Field::Text(name, value) => body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
            ),
            Field::File(name, file, bytes) => {
                body.extend_from_slice(
                    format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Request::post(uri)
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={boundary}"))
        .body(Body::from(body))
        .expect("request")
}

fn image_form(uri: &str, file: &str) -> Request<Body> {
    form(uri, &[Field::File("image", file.into(), fixture(file))])
}

fn embedding_of(v: &Value) -> Vec<f64> {
    serde_json::from_value(v["embedding"].clone()).expect("numbers")
}

on_each_store!(second_api_registers_searches_and_forgets);
async fn second_api_registers_searches_and_forgets(store: Backend) {
    let h = Harness::on(store).await;
    let mut ids = Vec::new();
    for (name, file) in [("Alice", "img5.jpg"), ("Carol", "img16.jpg"), ("Bob", "img12.jpg")] {
        let (s, v) = h
            .json(form("/api/face/register", &[Field::Text("displayName", name.into()), Field::File("image", file.into(), fixture(file))]))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["display_name"], name);
        let id = v["id"].as_str().expect("id").to_string();
        assert_eq!(v["image_url"], format!("/api/face/{id}/image"));
        assert!(v.get("face_vec").is_none() && v.get("embedding").is_none(), "no vector in the record");
        ids.push(id);
    }
    // Search with another photo of Alice: Alice first, with the cosine encode gives for the two photos.
    let (s, hits) = h.json(image_form("/api/face/search", "img6.jpg")).await;
    assert_eq!(s, StatusCode::OK, "{hits}");
    assert_eq!(hits[0]["id"], ids[0].as_str());
    assert_eq!(hits[0]["display_name"], "Alice");
    let (_, e5) = h.json(image_form("/api/face/encode", "img5.jpg")).await;
    let (_, e6) = h.json(image_form("/api/face/encode", "img6.jpg")).await;
    assert_eq!(e5["faces"][0]["landmarks"].as_array().map(Vec::len), Some(5));
    assert_eq!(e5["faces"][0]["embedding"], e5["embedding"], "the most prominent face comes first");
    let cos: f64 = embedding_of(&e5).iter().zip(embedding_of(&e6)).map(|(a, b)| a * b).sum();
    let score = hits[0]["score"].as_f64().expect("score");
    assert!((score - cos).abs() < 1e-3, "search score {score} vs encode cosine {cos}");
    assert!(hits.as_array().is_some_and(|a| a.iter().all(|h| 1.0 - h["score"].as_f64().unwrap_or(0.0) < 0.35)));

    // Verify agrees with encode.
    let pair = |a: &str, b: &str| {
        form("/api/face/verify", &[Field::File("image1", "a".into(), fixture(a)), Field::File("image2", "b".into(), fixture(b))])
    };
    let (s, ver) = h.json(pair("img5.jpg", "img6.jpg")).await;
    assert_eq!(s, StatusCode::OK, "{ver}");
    assert!((ver["similarity"].as_f64().unwrap_or(0.0) - cos).abs() < 1e-3);
    assert_eq!(ver["same_person"], true);
    assert_eq!(h.json(pair("img5.jpg", "img16.jpg")).await.1["same_person"], false);

    // A strict threshold leaves nothing: an empty list, 200.
    let (s, none) = h
        .json(form("/api/face/search", &[Field::File("image", "q".into(), fixture("img6.jpg")), Field::Text("threshold", "0.01".into())]))
        .await;
    assert_eq!((s, none), (StatusCode::OK, json!([])));
    let (s, one) = h
        .json(form(
            "/api/face/search",
            &[Field::File("image", "q".into(), fixture("img6.jpg")), Field::Text("topK", "1".into()), Field::Text("threshold", "2".into())],
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(one.as_array().map(Vec::len), Some(1));

    // Get, image, list.
    let (s, rec) = h.json(get(&format!("/api/face/{}", ids[1]))).await;
    assert_eq!((s, rec["display_name"].clone()), (StatusCode::OK, json!("Carol")));
    let (s, headers, img) = h.answer(get(&format!("/api/face/{}/image", ids[1]))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(img, fixture("img16.jpg"), "the image is kept as sent");
    assert_eq!(headers[header::CACHE_CONTROL], "private, no-store", "a deleted face's image must not live on in caches");
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    let (_, page) = h.json(get("/api/face?limit=2&offset=1")).await;
    assert_eq!(page["total"], 3);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(page["items"][0]["id"], ids[1].as_str(), "oldest first");

    // Delete: record, image and vector gone.
    let del = |id: &str| Request::delete(format!("/api/face/{id}")).body(Body::empty()).expect("request");
    assert_eq!(h.json(del(&ids[0])).await.0, StatusCode::OK);
    for uri in [format!("/api/face/{}", ids[0]), format!("/api/face/{}/image", ids[0])] {
        let (s, v) = h.json(get(&uri)).await;
        assert_eq!((s, v["code"].clone()), (StatusCode::NOT_FOUND, json!("face_not_found")), "{uri}");
    }
    let (_, hits) = h.json(image_form("/api/face/search", "img6.jpg")).await;
    assert!(hits.as_array().is_some_and(|a| a.iter().all(|h| h["id"] != ids[0].as_str())));
    assert_eq!(h.json(del(&ids[0])).await.0, StatusCode::NOT_FOUND);
}

on_each_store!(second_api_errors);
async fn second_api_errors(store: Backend) {
    let h = Harness::on(store).await;
    let grey = grey_png();
    let (s, v) = h.json(form("/api/face/encode", &[Field::File("image", "g.png".into(), grey.clone())])).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("no_face_detected")));
    let (s, v) =
        h.json(form("/api/face/register", &[Field::Text("displayName", "X".into()), Field::File("image", "g.png".into(), grey)])).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("no_face_detected")));
    let (s, v) = h.json(form("/api/face/register", &[Field::File("image", "a.jpg".into(), fixture("img5.jpg"))])).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_request")));
    let (s, v) = h.json(form("/api/face/encode", &[Field::File("image", "t.txt".into(), b"text".to_vec())])).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_image")));
    for (k, val) in [("topK", "0"), ("topK", "x"), ("threshold", "3")] {
        let (s, v) =
            h.json(form("/api/face/search", &[Field::File("image", "q".into(), fixture("img6.jpg")), Field::Text(k, val.into())])).await;
        assert_eq!((s, v["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_request")), "{k}={val}");
    }
    let (s, v) = h.json(get("/api/face?limit=0")).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_request")));
    let (s, v) = h.json(get("/api/face?limit=abc")).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_request")));
    assert_eq!(h.json(get("/api/face")).await.1["total"], 0, "nothing was stored");
}

on_each_store!(with_auth_on_every_protected_endpoint_needs_a_token_or_a_key);
async fn with_auth_on_every_protected_endpoint_needs_a_token_or_a_key(store: Backend) {
    let secret = "test-secret";
    let h = Harness::build(store, AuthConfig::new(Some(secret), Some("key-one,key-two"))).await;
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 600;
    let token = facerec::api::auth::sign_hs256(&json!({"sub": "tests", "exp": exp}), secret.as_bytes());
    let expired = facerec::api::auth::sign_hs256(&json!({"sub": "tests", "exp": 1_000}), secret.as_bytes());
    let forged = facerec::api::auth::sign_hs256(&json!({"sub": "tests", "exp": exp}), b"another secret");

    type Make = Box<dyn Fn() -> Request<Body>>;
    let requests: Vec<(&str, Make)> = vec![
        ("recognize", Box::new(|| post_json("/recognize", &json!({"bboxes": []})))),
        ("metadata", Box::new(|| get("/metadata"))),
        ("users list", Box::new(|| get("/users"))),
        ("users create", Box::new(|| post_json("/users", &json!({"username": format!("u{}", uuid::Uuid::new_v4())})))),
        ("enrol", Box::new(|| multipart("/calculate_average_embedding", "nobody", &[("a.jpg", fixture("img5.jpg"))]))),
        ("users delete", Box::new(|| Request::delete("/users/nobody").body(Body::empty()).expect("request"))),
        ("face list", Box::new(|| get("/api/face"))),
        ("face get", Box::new(|| get("/api/face/none"))),
        ("face image", Box::new(|| get("/api/face/none/image"))),
        ("face delete", Box::new(|| Request::delete("/api/face/none").body(Body::empty()).expect("request"))),
        ("encode", Box::new(|| image_form("/api/face/encode", "img12.jpg"))),
        ("search", Box::new(|| image_form("/api/face/search", "img12.jpg"))),
        (
            "register",
            Box::new(|| {
                form(
                    "/api/face/register",
                    &[Field::Text("displayName", "Z".into()), Field::File("image", "z".into(), fixture("img12.jpg"))],
                )
            }),
        ),
        (
            "verify",
            Box::new(|| {
                form(
                    "/api/face/verify",
                    &[Field::File("image1", "a".into(), fixture("img12.jpg")), Field::File("image2", "b".into(), fixture("img12.jpg"))],
                )
            }),
        ),
    ];
    let with = |mut r: Request<Body>, name: &str, value: &str| {
        r.headers_mut().insert(header::HeaderName::from_bytes(name.as_bytes()).expect("name"), value.parse().expect("value"));
        r
    };
    for (what, make) in &requests {
        for (label, req) in [
            ("no credentials", make()),
            ("wrong key", with(make(), "x-api-key", "key-three")),
            ("expired token", with(make(), "authorization", &format!("Bearer {expired}"))),
            ("forged token", with(make(), "authorization", &format!("Bearer {forged}"))),
            ("not bearer", with(make(), "authorization", &format!("Token {token}"))),
        ] {
            let (s, v) = h.json(req).await;
            assert_eq!((s, v["code"].clone()), (StatusCode::UNAUTHORIZED, json!("unauthorized")), "{what} with {label}");
        }
        for (label, req) in
            [("a JWT", with(make(), "authorization", &format!("Bearer {token}"))), ("an API key", with(make(), "x-api-key", "key-two"))]
        {
            let (s, v) = h.call(req).await;
            assert!(s.is_success() || s == StatusCode::NOT_FOUND, "{what} with {label}: {s} {}", String::from_utf8_lossy(&v));
        }
    }
    // Public endpoints stay public.
    for uri in ["/", "/health", "/openapi.json", "/docs/", "/redoc"] {
        assert_eq!(h.call(get(uri)).await.0, StatusCode::OK, "{uri}");
    }
    let (_, doc) = h.json(get("/openapi.json")).await;
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["api_key"]["name"], "X-API-Key");
    assert!(doc["paths"]["/recognize"]["post"]["security"].is_array());
    assert!(doc["paths"]["/api/face/search"]["post"]["security"].is_array());
}

// ---------------------------------------------------------------------------------------------
// The original contract, answered as the original service answers it (issue 14): one test per
// difference the issue found, on both stores. LEGACY_STATUS=http where said.

const NOT_FOUND_BOB: &str = r#"{"status":"error","message":"User 'bob' not found."}"#;
const NO_FACES: &str = r#"{"status":"error","message":"No faces detected in any image."}"#;

fn http_statuses() -> Setup {
    Setup { legacy: LegacyStatus::Http, ..Setup::default() }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn square_png(side: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(side, side, image::Rgb(rgb));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode");
    out.into_inner()
}

fn resized_jpeg(jpeg: &[u8], w: u32, h: u32) -> Vec<u8> {
    let img = image::load_from_memory(jpeg).expect("decodes").to_rgb8();
    let small = image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle);
    let mut out = std::io::Cursor::new(Vec::new());
    small.write_to(&mut out, image::ImageFormat::Jpeg).expect("encode");
    out.into_inner()
}

impl Harness {
    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs.txt")).unwrap_or_default()
    }

    async fn enrol_alice(&self) {
        assert_eq!(self.create("alice").await, StatusCode::CREATED);
        let (s, v) = self
            .enrol("alice", &[("img5.jpg", fixture("img5.jpg")), ("img6.jpg", fixture("img6.jpg")), ("img10.jpg", fixture("img10.jpg"))])
            .await;
        assert_eq!((s, v["images"].clone()), (StatusCode::OK, json!(3)), "{v}");
    }
}

on_each_store!(original_enrolling_an_unknown_user_is_200_with_the_legacy_body);
async fn original_enrolling_an_unknown_user_is_200_with_the_legacy_body(store: Backend) {
    let h = Harness::on(store).await;
    let (s, body) = h.call(multipart("/calculate_average_embedding", "bob", &[("a.jpg", fixture("img5.jpg"))])).await;
    assert_eq!((s, text(&body)), (StatusCode::OK, NOT_FOUND_BOB.to_owned()));
    assert_eq!(h.json(get("/users")).await.1["count"], 0, "no user was made");
    // As the original, the files are looked at first: no face at all says so, even for an unknown user.
    let (s, body) = h.call(multipart("/calculate_average_embedding", "bob", &[("g.png", grey_png())])).await;
    assert_eq!((s, text(&body)), (StatusCode::OK, NO_FACES.to_owned()));
    // LEGACY_STATUS=http: 404, same body.
    let p = Harness::with(store, http_statuses()).await;
    let (s, body) = p.call(multipart("/calculate_average_embedding", "bob", &[("a.jpg", fixture("img5.jpg"))])).await;
    assert_eq!((s, text(&body)), (StatusCode::NOT_FOUND, NOT_FOUND_BOB.to_owned()));
}

on_each_store!(original_enrolling_no_face_is_200_with_the_legacy_body);
async fn original_enrolling_no_face_is_200_with_the_legacy_body(store: Backend) {
    for (setup, status) in [(Setup::default(), StatusCode::OK), (http_statuses(), StatusCode::UNPROCESSABLE_ENTITY)] {
        let h = Harness::with(store, setup).await;
        assert_eq!(h.create("bob").await, StatusCode::CREATED);
        let (s, body) = h.call(multipart("/calculate_average_embedding", "bob", &[("g.png", grey_png()), ("g2.png", grey_png())])).await;
        assert_eq!((s, text(&body)), (status, NO_FACES.to_owned()));
        assert_eq!(h.json(get("/users")).await.1["users"][0]["samples"], 0, "nothing changed");
    }
}

on_each_store!(original_enrolment_skips_an_unreadable_file);
async fn original_enrolment_skips_an_unreadable_file(store: Backend) {
    let h = Harness::on(store).await;
    assert_eq!(h.create("bob").await, StatusCode::CREATED);
    let files = [("img5.jpg", fixture("img5.jpg")), ("notes.txt", b"not an image".to_vec()), ("grey.png", grey_png())];
    let (s, v) = h.enrol("bob", &files).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["status"].clone(), v["images"].clone()), (json!("success"), json!(1)), "images counts the good ones");
    assert_eq!(v["embedding"].as_array().map(Vec::len), Some(512));
    let skipped = v["skipped"].as_array().expect("skipped files are named");
    assert_eq!(skipped.len(), 2, "{v}");
    assert_eq!((skipped[0]["file"].clone(), skipped[0]["code"].clone()), (json!("notes.txt"), json!("invalid_image")));
    assert_eq!((skipped[1]["file"].clone(), skipped[1]["code"].clone()), (json!("grey.png"), json!("no_face_detected")));
    assert_eq!(h.json(get("/users")).await.1["users"][0]["samples"], 1);
    // Every file good: no `skipped` at all, the original's body exactly.
    let (_, v) = h.enrol("bob", &[("img6.jpg", fixture("img6.jpg"))]).await;
    assert_eq!(
        v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["status".into(), "username".into(), "embedding".into(), "images".into()])
    );
    // LEGACY_STATUS=http: the enrolment is refused, nothing changes.
    let p = Harness::with(store, http_statuses()).await;
    assert_eq!(p.create("bob").await, StatusCode::CREATED);
    let (s, v) = p.enrol("bob", &files).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_image")));
    assert_eq!(p.json(get("/users")).await.1["users"][0]["samples"], 0);
}

on_each_store!(original_recognize_without_bboxes_is_answered_logged_and_kept);
async fn original_recognize_without_bboxes_is_answered_logged_and_kept(store: Backend) {
    let h = Harness::on(store).await;
    let mut metas = Vec::new();
    for body in [json!({"camera": "gate-2"}), json!({"camera": "gate-3", "bboxes": []}), json!({"camera": "gate-4", "bboxes": null})] {
        let (s, v) = h.json(post_json("/recognize", &body)).await;
        let camera = body["camera"].clone();
        assert_eq!((s, &v), (StatusCode::OK, &json!({"status": "recognized", "meta": {"camera": camera, "bboxes": []}})), "{body}");
        assert_eq!(h.json(get("/metadata")).await.1, v["meta"], "it becomes /metadata");
        metas.push(v["meta"].clone());
    }
    assert_eq!(h.log_lines(), metas, "each is logged");
    assert!(h.photos().is_empty());
    // LEGACY_STATUS=http: a body without `bboxes` is refused; `bboxes: []` is answered.
    let p = Harness::with(store, http_statuses()).await;
    let (s, v) = p.json(post_json("/recognize", &json!({"camera": "gate-2"}))).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_request")));
    assert_eq!(p.json(post_json("/recognize", &json!({"bboxes": []}))).await.0, StatusCode::OK);
}

on_each_store!(an_entry_without_bbox_is_answered_with_bbox_null);
async fn an_entry_without_bbox_is_answered_with_bbox_null(store: Backend) {
    let h = Harness::on(store).await;
    let crop = b64(&face_crop("img11.jpg", 0.2));
    let (s, v) = h.json(post_json("/recognize", &json!({"bboxes": [{"crop": crop}, {"crop": crop, "bbox": [1, 2, 3, 4]}]}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let entries = &v["meta"]["bboxes"];
    assert!(entries[0].get("bbox").is_some_and(Value::is_null), "{}", entries[0]);
    assert_eq!(entries[1]["bbox"], json!([1, 2, 3, 4]));
    assert!(h.log_lines()[0]["bboxes"][0].get("bbox").is_some_and(Value::is_null));
    assert!(h.json(get("/metadata")).await.1["bboxes"][0].get("bbox").is_some_and(Value::is_null));
}

on_each_store!(a_112_pixel_crop_goes_through_the_detector);
async fn a_112_pixel_crop_goes_through_the_detector(store: Backend) {
    let h = Harness::on(store).await;
    h.enrol_alice().await;
    // A genuine face crop of exactly 112x112: detected and aligned like any crop, and named.
    let face = resized_jpeg(&face_crop("img11.jpg", 0.2), 112, 112);
    let (s, v) = h.json(post_json("/recognize", &json!({"bboxes": [{"bbox": [0, 0, 112, 112], "crop": b64(&face)}]}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["meta"]["bboxes"][0]["name"], "alice", "{v}");
    let (s, enc) = h.json(form("/api/face/encode", &[Field::File("image", "f.jpg".into(), face)])).await;
    assert_eq!(s, StatusCode::OK, "{enc}");
    assert_ne!(enc["faces"][0]["found_by"], "aligned");
    assert!(enc["faces"][0]["det_score"].as_f64().is_some_and(|d| d > 0.5 && d < 1.0), "{}", enc["faces"][0]["det_score"]);
    // Plain squares are no face: not named, not enrollable, not encoded.
    let squares: Vec<Vec<u8>> = [[128, 128, 128], [255, 255, 255], [0, 0, 255]].into_iter().map(|c| square_png(112, c)).collect();
    let entries: Vec<Value> = squares.iter().map(|sq| json!({"bbox": [0, 0, 112, 112], "crop": b64(sq)})).collect();
    let (_, v) = h.json(post_json("/recognize", &json!({"bboxes": entries}))).await;
    for (i, e) in v["meta"]["bboxes"].as_array().expect("entries").iter().enumerate() {
        assert_eq!((e["name"].clone(), e["similarity"].clone()), (json!(format!("Unknown {}", i + 1)), json!(0.0)), "{e}");
        assert!(e.get("error").is_none());
    }
    assert_eq!(h.create("square").await, StatusCode::CREATED);
    let files: Vec<(&str, Vec<u8>)> = squares.iter().map(|sq| ("sq.png", sq.clone())).collect();
    let (s, body) = h.call(multipart("/calculate_average_embedding", "square", &files)).await;
    assert_eq!((s, text(&body)), (StatusCode::OK, NO_FACES.to_owned()));
    let (s, v) = h.json(form("/api/face/encode", &[Field::File("image", "sq.png".into(), squares[0].clone())])).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("no_face_detected")));
    // ALIGNED_INPUT=true: the caller says its 112x112 inputs are aligned faces; no detection
    // score is claimed for them.
    let aligned =
        Harness::with(store, Setup { analyzer: AnalyzerOptions { aligned_input: true, ..Setup::default().analyzer }, ..Setup::default() })
            .await;
    let (s, v) = aligned.json(form("/api/face/encode", &[Field::File("image", "sq.png".into(), squares[0].clone())])).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["faces"][0]["found_by"], "aligned");
    assert!(v["faces"][0]["det_score"].is_null(), "{}", v["faces"][0]);
}

on_each_store!(a_crop_with_several_faces_stands_for_the_surest_face);
async fn a_crop_with_several_faces_stands_for_the_surest_face(store: Backend) {
    let h = Harness::on(store).await;
    let g = golden(320);
    let faces = &g.images["t1.jpg"].faces;
    let area = |b: [f32; 4]| (b[2] - b[0]) * (b[3] - b[1]);
    let largest = (0..faces.len()).max_by(|&a, &b| area(faces[a].bbox).total_cmp(&area(faces[b].bbox))).expect("faces");
    assert_ne!(largest, 0, "the fixture's largest face is not its surest one");
    h.state.service.gallery().upsert("surest", &faces[0].embedding);
    h.state.service.gallery().upsert("largest", &faces[largest].embedding);
    let (s, v) = h.json(post_json("/recognize", &json!({"bboxes": [{"bbox": [0, 0, 1, 1], "crop": b64(&fixture("t1.jpg"))}]}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let e = &v["meta"]["bboxes"][0];
    assert_eq!(e["name"], "surest", "insightface's first face, as the original took: {e}");
    assert!(e["similarity"].as_f64().is_some_and(|s| s > 0.999), "{e}");
    // Enrolment takes the same face.
    assert_eq!(h.create("group").await, StatusCode::CREATED);
    let (_, v) = h.enrol("group", &[("t1.jpg", fixture("t1.jpg"))]).await;
    let cos: f64 = embedding_of(&v).iter().zip(&faces[0].embedding).map(|(a, b)| a * f64::from(*b)).sum();
    assert!(cos > 0.999, "{cos}");
    // /api/face/* embeds the largest face.
    let (_, enc) = h.json(form("/api/face/encode", &[Field::File("image", "t1.jpg".into(), fixture("t1.jpg"))])).await;
    let cos: f64 = embedding_of(&enc).iter().zip(&faces[largest].embedding).map(|(a, b)| a * f64::from(*b)).sum();
    assert!(cos > 0.999, "{cos}");
}

on_each_store!(a_crowd_frame_is_answered_by_default);
async fn a_crowd_frame_is_answered_by_default(store: Backend) {
    let d = defaults();
    assert!(d.max_crops >= 512, "MAX_CROPS {}", d.max_crops);
    assert!(d.max_body_bytes >= 512 * 256 * 1024, "MAX_BODY_BYTES {}", d.max_body_bytes);
    let h = Harness::on(store).await;
    h.enrol_alice().await;
    // 116 faces, 22 MiB: each entry carries a face crop and what a tracker adds (here padding).
    let crop = b64(&face_crop("img11.jpg", 0.2));
    let pad = "p".repeat(200_000);
    let entries: Vec<Value> = (0..116).map(|i| json!({"bbox": [i, 0, i + 100, 100], "crop": crop, "track": i, "pad": pad})).collect();
    let body = json!({"camera": "hall", "bboxes": entries});
    let bytes = body.to_string().len();
    assert!(bytes > 22 << 20, "{bytes}");
    let (s, v) = h.json(post_json("/recognize", &body)).await;
    assert_eq!(s, StatusCode::OK, "{}", v["message"]);
    let answered = v["meta"]["bboxes"].as_array().expect("entries");
    assert_eq!(answered.len(), 116);
    assert!(answered.iter().all(|e| e["name"] == "alice"), "{}", answered[0]["name"]);
    // Past MAX_CROPS: 413 too_many_crops, without any inference.
    let many: Vec<Value> = (0..=d.max_crops).map(|_| json!({"crop": "AAAA"})).collect();
    let (s, v) = h.json(post_json("/recognize", &json!({"bboxes": many}))).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::PAYLOAD_TOO_LARGE, json!("too_many_crops")));
}

on_each_store!(unknown_n_cannot_be_a_username);
async fn unknown_n_cannot_be_a_username(store: Backend) {
    let h = Harness::on(store).await;
    for name in ["Unknown 1", "unknown 1", "UNKNOWN 2", "Unknown  3", "Unknown\u{a0}4", "Unknown_5", "Unknown-6", "Unknown7", "Unknown"] {
        let (s, v) = h.json(post_json("/users", &json!({"username": name}))).await;
        assert_eq!((s, v["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_username")), "{name:?}: {v}");
    }
    for name in ["Unknownson", "Unknown Pleasures"] {
        assert_eq!(h.create(name).await, StatusCode::CREATED, "{name}");
    }
    assert_eq!(h.json(get("/users")).await.1["count"], 2);
}

on_each_store!(every_number_and_string_is_echoed_as_sent);
async fn every_number_and_string_is_echoed_as_sent(store: Backend) {
    let h = Harness::on(store).await;
    let crop = b64(&face_crop("img11.jpg", 0.2));
    // Written by hand: serde_json's own output could not carry these numbers.
    let body = format!(
        r#"{{"frame": 18446744073709551616, "ts": 1.000, "neg": -123456789012345678901234567890, "tiny": 1e-400, "exp": 3E2, "s": "caf\u00e9 \ud83d\ude00 \"q\"", "bboxes": [{{"bbox": [1.50, 2, 3e2, 4.0], "crop": "{crop}", "track": 99999999999999999999}}]}}"#
    );
    let req = Request::post("/recognize").header(header::CONTENT_TYPE, "application/json").body(Body::from(body)).expect("request");
    let (s, answer) = h.call(req).await;
    assert_eq!(s, StatusCode::OK, "{}", text(&answer));
    let (_, metadata) = h.call(get("/metadata")).await;
    for (what, t) in [("answer", text(&answer)), ("log line", h.log_text()), ("/metadata", text(&metadata))] {
        for want in [
            r#""frame":18446744073709551616"#,
            r#""ts":1.000"#,
            r#""neg":-123456789012345678901234567890"#,
            r#""tiny":1e-400"#,
            r#""exp":3e+2"#,
            r#""bbox":[1.50,2,3e+2,4.0]"#,
            r#""track":99999999999999999999"#,
        ] {
            assert!(t.contains(want), "{what} lost {want}: {}", &t[..t.len().min(300)]);
        }
        let v: Value = serde_json::from_str(t.trim()).expect("JSON");
        let s = v.get("meta").unwrap_or(&v)["s"].clone();
        assert_eq!(s, json!("café 😀 \"q\""), "{what}");
    }
}

on_each_store!(client_sent_reserved_keys_never_pass_on);
async fn client_sent_reserved_keys_never_pass_on(store: Backend) {
    let h = Harness::on(store).await;
    let crop = b64(&face_crop("img11.jpg", 0.2));
    let body = json!({"status": "error", "camera": 1, "bboxes": [
        {"bbox": [1, 2, 3, 4], "crop": crop, "name": "alice", "similarity": 0.99, "error": {"code": "forged"}},
        {"bbox": [1, 2, 3, 4], "crop": "!!", "error": "client"},
    ]});
    let (s, v) = h.json(post_json("/recognize", &body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "recognized");
    let meta = &v["meta"];
    assert!(meta.get("status").is_none(), "{meta}");
    assert_eq!(meta["camera"], 1);
    let e0 = &meta["bboxes"][0];
    assert_eq!((e0["name"].clone(), e0["similarity"].clone()), (json!("Unknown 1"), json!(0.0)), "no user is enrolled: {e0}");
    assert!(e0.get("error").is_none(), "{e0}");
    assert_eq!(meta["bboxes"][1]["error"]["code"], "invalid_base64", "the service's own error replaces the client's");
    // The log keeps the undecodable crop's place, not its bytes.
    let mut logged = meta.clone();
    logged["bboxes"][1]["crop"] = Value::Null;
    logged["bboxes"][1]["crop_omitted"] = json!("invalid_base64: 2 characters, not an image");
    assert_eq!(h.log_lines(), vec![logged]);
    assert_eq!(&h.json(get("/metadata")).await.1, meta);
}

on_each_store!(crop_file_names_stay_readable);
async fn crop_file_names_stay_readable(store: Backend) {
    let h = Harness::on(store).await;
    assert_eq!(h.create("José").await, StatusCode::CREATED);
    let (s, _) = h.enrol("José", &[("img5.jpg", fixture("img5.jpg")), ("img6.jpg", fixture("img6.jpg"))]).await;
    assert_eq!(s, StatusCode::OK);
    let jpeg = face_crop("img11.jpg", 0.2);
    let png = {
        let img = image::load_from_memory(&fixture("img16.jpg")).expect("decodes");
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).expect("encode");
        out.into_inner()
    };
    let body = json!({"bboxes": [{"bbox": [0, 0, 1, 1], "crop": b64(&jpeg)}, {"bbox": [0, 0, 1, 1], "crop": b64(&png)}]});
    let (s, v) = h.json(post_json("/recognize", &body)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!((v["meta"]["bboxes"][0]["name"].clone(), v["meta"]["bboxes"][1]["name"].clone()), (json!("José"), json!("Unknown 1")));
    let photos = h.photos();
    assert_eq!(photos.len(), 2, "{photos:?}");
    assert!(photos.iter().any(|p| p.starts_with("photo_José_") && p.ends_with(".jpg")), "{photos:?}");
    assert!(photos.iter().any(|p| p.starts_with("photo_Unknown 1_") && p.ends_with(".png")), "the real format's extension: {photos:?}");
}

/// `req` with one more header.
fn with_header(mut req: Request<Body>, name: header::HeaderName, value: &str) -> Request<Body> {
    req.headers_mut().insert(name, value.parse().expect("header value"));
    req
}

#[tokio::test(flavor = "multi_thread")]
async fn json_endpoints_refuse_bodies_not_labelled_json() {
    let h = Harness::new().await;
    let raw = |uri: &str, content_type: Option<&str>, body: &str| {
        let mut r = Request::post(uri);
        if let Some(ct) = content_type {
            r = r.header(header::CONTENT_TYPE, ct);
        }
        r.body(Body::from(body.to_owned())).expect("request")
    };
    // The cross-site request of issue 15: a text/plain "simple" request creating a user.
    for (uri, body) in [("/users", r#"{"username":"x"}"#), ("/recognize", r#"{"bboxes":[]}"#)] {
        for ct in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=b"),
            Some("text/json"),
            None,
        ] {
            let (s, v) = h.json(raw(uri, ct, body)).await;
            assert_eq!(
                (s, v["status"].clone(), v["code"].clone()),
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, json!("error"), json!("unsupported_media_type")),
                "{uri} with {ct:?}: {v}"
            );
            assert!(v["message"].as_str().is_some_and(|m| m.contains("application/json")), "{v}");
        }
    }
    assert_eq!(h.json(get("/users")).await.1["count"], 0, "no user was created");
    assert_eq!(h.json(get("/metadata")).await.1, json!({}), "no recognition ran");
    // application/json with parameters, in any case, is JSON.
    let (s, _) = h.json(raw("/users", Some("Application/JSON; charset=utf-8"), r#"{"username":"x"}"#)).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = h.json(raw("/recognize", Some("application/json;charset=UTF-8"), r#"{"bboxes":[]}"#)).await;
    assert_eq!(s, StatusCode::OK);
    // The OpenAPI document says so.
    let (_, doc) = h.json(get("/openapi.json")).await;
    for path in ["/users", "/recognize"] {
        let r = &doc["paths"][path]["post"]["responses"]["415"];
        assert!(r["description"].as_str().is_some_and(|d| d.contains("unsupported_media_type")), "{path}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_auth_off_form_posts_from_other_sites_are_refused() {
    let h = Harness::new().await;
    let register = || {
        form("/api/face/register", &[Field::Text("displayName", "Mallory".into()), Field::File("image", "m".into(), fixture("img12.jpg"))])
    };
    type Make = Box<dyn Fn() -> Request<Body>>;
    let forms: Vec<(&str, Make)> = vec![
        ("enrol", Box::new(|| multipart("/calculate_average_embedding", "alice", &[("a.jpg", fixture("img5.jpg"))]))),
        ("encode", Box::new(|| image_form("/api/face/encode", "img12.jpg"))),
        ("search", Box::new(|| image_form("/api/face/search", "img12.jpg"))),
        ("register", Box::new(register)),
        (
            "verify",
            Box::new(|| {
                form(
                    "/api/face/verify",
                    &[Field::File("image1", "a".into(), fixture("img12.jpg")), Field::File("image2", "b".into(), fixture("img12.jpg"))],
                )
            }),
        ),
    ];
    assert_eq!(h.create("alice").await, StatusCode::CREATED);
    let at = |req: Request<Body>, origin: Option<&str>| {
        let req = with_header(req, header::HOST, "localhost:8000");
        match origin {
            Some(o) => with_header(req, header::ORIGIN, o),
            None => req,
        }
    };
    for (what, make) in &forms {
        for origin in ["http://evil.example", "http://localhost:8001", "null", "https://localhost:8000.evil.example"] {
            let (s, v) = h.json(at(make(), Some(origin))).await;
            assert_eq!((s, v["code"].clone()), (StatusCode::FORBIDDEN, json!("cross_origin")), "{what} from {origin}: {v}");
        }
    }
    assert_eq!(h.json(get("/api/face")).await.1["total"], 0, "nothing was registered");
    assert_eq!(h.json(get("/users")).await.1["users"][0]["samples"], 0, "nothing was enrolled");
    // The same host (Swagger UI's "Try it out") and no Origin at all (curl, scripts) pass.
    for (what, make) in &forms {
        for origin in [Some("http://localhost:8000"), Some("http://LocalHost:8000"), None] {
            let (s, v) = h.call(at(make(), origin)).await;
            assert!(s.is_success(), "{what} from {origin:?}: {s} {}", String::from_utf8_lossy(&v));
        }
    }
    // JSON writes are covered by their content type; a DELETE is never a simple request.
    let (s, _) = h.call(at(post_json("/users", &json!({"username": "bob"})), Some("http://evil.example"))).await;
    assert_eq!(s, StatusCode::CREATED, "only the form endpoints check Origin");
    let (_, doc) = h.json(get("/openapi.json")).await;
    for path in ["/calculate_average_embedding", "/api/face/encode", "/api/face/register", "/api/face/search", "/api/face/verify"] {
        let r = &doc["paths"][path]["post"]["responses"]["403"];
        assert!(r["description"].as_str().is_some_and(|d| d.contains("cross_origin")), "{path}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_auth_on_a_foreign_origin_with_credentials_passes() {
    let h = Harness::build(Backend::Sqlite, AuthConfig::new(None, Some("key-one"))).await;
    let req = with_header(
        with_header(image_form("/api/face/encode", "img12.jpg"), header::HOST, "localhost:8000"),
        header::ORIGIN,
        "http://app.example",
    );
    let (s, v) = h.json(req).await;
    assert_eq!((s, v["code"].clone()), (StatusCode::UNAUTHORIZED, json!("unauthorized")), "no credentials: 401 first");
    let req = with_header(
        with_header(image_form("/api/face/encode", "img12.jpg"), header::ORIGIN, "http://app.example"),
        header::HeaderName::from_static("x-api-key"),
        "key-one",
    );
    let (s, v) = h.call(req).await;
    assert_eq!(s, StatusCode::OK, "a page that holds a key is the operator's: {}", String::from_utf8_lossy(&v));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_says_nosniff_and_the_reference_pages_carry_a_policy() {
    let h = Harness::new().await;
    let requests: Vec<(&str, Request<Body>)> = vec![
        ("landing", get("/")),
        ("health", get("/health")),
        ("users", get("/users")),
        ("unknown route", get("/no/such")),
        ("wrong method", get("/recognize")),
        ("415", Request::post("/users").header(header::CONTENT_TYPE, "text/plain").body(Body::from("{}")).expect("request")),
        ("400", post_json("/users", &json!({"username": ""}))),
        ("docs", get("/docs/")),
        ("redoc", get("/redoc")),
        ("openapi", get("/openapi.json")),
    ];
    for (what, req) in requests {
        let (_, headers, _) = h.answer(req).await;
        assert_eq!(headers.get(header::X_CONTENT_TYPE_OPTIONS).map(|v| v.as_bytes()), Some(&b"nosniff"[..]), "{what}");
    }
    for uri in ["/docs/", "/docs/swagger-initializer.js", "/redoc", "/redoc/redoc.init.js"] {
        let (s, headers, _) = h.answer(get(uri)).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
        let csp = headers.get(header::CONTENT_SECURITY_POLICY).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("{uri}: no CSP"));
        for directive in ["default-src 'none'", "script-src 'self';", "connect-src 'self'", "frame-ancestors 'none'"] {
            assert!(csp.contains(directive), "{uri}: {csp}");
        }
        assert!(!csp.contains("unsafe-eval") && !csp.contains("script-src 'self' 'unsafe-inline'"), "{uri}: {csp}");
    }
    let (_, page) = h.call(get("/redoc")).await;
    let page = String::from_utf8_lossy(&page);
    assert!(!page.contains("<script>"), "no inline script on /redoc (the policy forbids it): {page}");
    let (_, headers, _) = h.answer(get("/users")).await;
    assert!(headers.get(header::CONTENT_SECURITY_POLICY).is_none(), "the API's answers are JSON, not pages");
}
