//! The engine as HTTP clients see it, on the service `serve::build` makes (real models,
//! real SQLite, real audit writer): every endpoint that uses the engine answers 429
//! `overloaded` with Retry-After at once when the queue is full, and every response that
//! used the engine (errors included) carries x-queue-time and x-inference-time.

mod support;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use clap::Parser;
use serde_json::json;
use tower::ServiceExt;

use facerec::api::{AppState, app};
use facerec::config::ServeConfig;
use support::fixture;
use support::models::{cache_dir, temp_dir};

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    serve: ServeConfig,
}

async fn service(queue: usize) -> Arc<AppState> {
    let dir = temp_dir("engine-http");
    let args = [
        "facerec".to_string(),
        format!("--database-path={}", dir.join("facerec.db").display()),
        format!("--log-file={}", dir.join("logs.txt").display()),
        format!("--photo-dir={}", dir.join("photo").display()),
        format!("--model-cache-dir={}", cache_dir().display()),
        format!("--queue-size={queue}"),
        "--execution-provider=cpu".into(),
        "--workers=1".into(),
        "--batch-size=8".into(),
    ];
    let cfg = Flags::try_parse_from(args).expect("flags").serve;
    facerec::serve::build(&cfg).await.expect("service builds").state
}

async fn call(state: &Arc<AppState>, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    let resp = app(Arc::clone(state), 20 << 20).oneshot(req).await.expect("infallible");
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.expect("body");
    (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

fn post_json(uri: &str, body: &serde_json::Value) -> Request<Body> {
    Request::post(uri).header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_string())).expect("request")
}

fn form(uri: &str, texts: &[(&str, &str)], files: &[(&str, &[u8])]) -> Request<Body> {
    let b = "engineHttpBoundary42";
    let mut body = Vec::new();
    for (name, value) in texts {
        body.extend_from_slice(format!("--{b}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes());
    }
    for (name, bytes) in files {
        body.extend_from_slice(
            format!("--{b}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"x.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{b}--\r\n").as_bytes());
    Request::post(uri).header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={b}")).body(Body::from(body)).expect("request")
}

/// Every request that goes through the engine, on `face`.
fn engine_requests(face: &[u8]) -> Vec<(&'static str, Request<Body>)> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(face);
    vec![
        ("/recognize", post_json("/recognize", &json!({"bboxes": [{"bbox": [0, 0, 10, 10], "crop": b64}]}))),
        ("/calculate_average_embedding", form("/calculate_average_embedding", &[("username", "alice")], &[("files", face)])),
        ("/api/face/encode", form("/api/face/encode", &[], &[("image", face)])),
        ("/api/face/register", form("/api/face/register", &[("displayName", "Alice")], &[("image", face)])),
        ("/api/face/search", form("/api/face/search", &[], &[("image", face)])),
        ("/api/face/verify", form("/api/face/verify", &[], &[("image1", face), ("image2", face)])),
    ]
}

fn millis(h: &axum::http::HeaderMap, name: &str) -> Option<f64> {
    h.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// A noisy JPEG without a face; a large one is slow to decode and keeps the worker busy.
fn noise_image(side: u32) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let img = image::RgbImage::from_fn(side, side, |_, _| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        image::Rgb([x as u8, (x >> 8) as u8, (x >> 16) as u8])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95).encode_image(&img).expect("encodes");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once_and_every_engine_answer_is_timed() {
    let state = service(2).await;
    let face = fixture("img6.jpg");
    assert_eq!(call(&state, post_json("/users", &json!({"username": "alice"}))).await.0, StatusCode::CREATED);

    // Fill the engine: one image being computed, four waiting (QUEUE_SIZE=2: a new request's
    // first image is still taken up to twice the size, so that heavy requests cannot shut a
    // light one out; each blocker is a request of its own).
    let slow = noise_image(3000);
    let mut blockers = Vec::new();
    for _ in 0..5 {
        let engine = state.service.engine().clone();
        let slow = slow.clone();
        blockers.push(tokio::spawn(async move { engine.analyze(slow).await }));
        let want = blockers.len() as u64;
        while state.service.engine().stats().jobs_accepted < want {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(state.service.engine().stats().queue_depth, 4, "{:?}", state.service.engine().stats());
    for (path, req) in engine_requests(&face) {
        let (status, headers, body) = call(&state, req).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{path}: {body}");
        assert_eq!(body["code"], "overloaded", "{path}");
        assert!(headers.get(header::RETRY_AFTER).is_some(), "{path}: Retry-After");
        assert!(headers.get("x-inference-time").is_none(), "{path}: the engine computed nothing");
    }
    assert!(state.service.engine().stats().queue_depth == 4, "the refusals came while the queue was still full");
    assert!(state.service.engine().stats().jobs_rejected >= 7);
    for b in blockers {
        b.await.expect("joins").expect("the noise image is analysed (no face)");
    }

    // Now every engine endpoint answers, with the two timing headers.
    for (path, req) in engine_requests(&face) {
        let (status, headers, body) = call(&state, req).await;
        assert!(status.is_success(), "{path}: {status} {body}");
        let queue = millis(&headers, "x-queue-time").unwrap_or_else(|| panic!("{path}: x-queue-time"));
        let inference = millis(&headers, "x-inference-time").unwrap_or_else(|| panic!("{path}: x-inference-time"));
        assert!(queue >= 0.0 && inference > 0.0, "{path}: {queue} {inference}");
        assert!(inference < 60_000.0, "{path}: milliseconds");
        if path == "/api/face/search" {
            assert!(millis(&headers, "x-search-time").is_some());
        }
    }
    // An error the engine produced is timed too; a request without the engine is not.
    let (status, headers, _) = call(&state, form("/api/face/encode", &[], &[("image", &noise_image(300))])).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(millis(&headers, "x-inference-time").is_some_and(|ms| ms > 0.0));
    let (status, headers, _) = call(&state, Request::get("/users").body(Body::empty()).expect("request")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("x-queue-time").is_none());
}
