//! Timing headers, written in one place: every response whose request used the inference
//! engine carries `x-queue-time` and `x-inference-time` (milliseconds, decimal), taken from
//! the engine's per-request [`TimingSink`]; search adds `x-search-time`.

use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use crate::engine::timing::{self, TimingSink};

pub const QUEUE_TIME: HeaderName = HeaderName::from_static("x-queue-time");
pub const INFERENCE_TIME: HeaderName = HeaderName::from_static("x-inference-time");
pub const SEARCH_TIME: HeaderName = HeaderName::from_static("x-search-time");

/// A duration as milliseconds with three decimals.
pub fn millis(d: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1000.0)).unwrap_or(HeaderValue::from_static("0"))
}

/// Middleware: runs the request with a timing sink in scope and, when the engine computed
/// anything for it (errors included), writes the two engine headers on the response.
pub async fn engine_timing(req: Request, next: Next) -> Response {
    let sink = TimingSink::new();
    let mut resp = timing::scope(sink.clone(), next.run(req)).await;
    if let Some(t) = sink.get() {
        let h = resp.headers_mut();
        h.insert(QUEUE_TIME, millis(t.queue));
        h.insert(INFERENCE_TIME, millis(t.inference));
    }
    resp
}

/// `x-search-time` for a search that took `d`.
pub fn search_headers(d: Duration) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(SEARCH_TIME, millis(d));
    h
}
