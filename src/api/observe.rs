//! What every request carries and leaves behind: its request id (kept from a sane
//! `x-request-id`, else a fresh UUID v4; echoed on every response), the tracing span that puts
//! that id and the matched route on every log line of the request, and its figures in the
//! process metrics (method, route, status, latency, the error code; the engine's queue and
//! inference times are recorded where they are measured, in `engine::timing`). The middleware [`observe`] is the router's outermost
//! layer; [`span_for`] is the `TraceLayer`'s span.

use std::future::Future;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use super::ErrorCode;
use crate::metrics::{self, RequestOutcome, UNMATCHED_ROUTE};

/// The request id header, read and written.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id kept from a client.
const MAX_REQUEST_ID: usize = 128;

/// The request id, in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

tokio::task_local! {
    static CURRENT: RequestId;
}

/// The id of the request being answered on this task, if any (for error bodies).
pub fn current_request_id() -> Option<String> {
    CURRENT.try_with(|id| id.as_str().to_owned()).ok()
}

/// Wraps a future that a handler spawns as its own task, so that it keeps the request's id and
/// span (task-locals and spans do not follow `tokio::spawn`).
pub fn carry<F: Future>(f: F) -> impl Future<Output = F::Output> {
    let span = tracing::Span::current();
    let id = CURRENT.try_with(Clone::clone).ok();
    async move {
        match id {
            Some(id) => CURRENT.scope(id, f).instrument(span).await,
            None => f.instrument(span).await,
        }
    }
}

/// A client's id is kept when it is 1 to 128 characters of `A-Z a-z 0-9 - _ . : @ / + =`.
fn sane(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:@/+=".contains(c))
}

fn fresh_id() -> HeaderValue {
    // A hyphenated UUID is always a valid header value.
    HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).unwrap_or_else(|_| HeaderValue::from_static("invalid-uuid"))
}

/// The matched route template of a request, or [`UNMATCHED_ROUTE`].
fn route_of<B>(req: &axum::http::Request<B>) -> String {
    req.extensions().get::<MatchedPath>().map_or_else(|| UNMATCHED_ROUTE.to_owned(), |m| m.as_str().to_owned())
}

/// The span of one request (the `TraceLayer`'s `make_span_with`): its id, method and route.
pub fn span_for<B>(req: &axum::http::Request<B>) -> tracing::Span {
    let id = req.extensions().get::<RequestId>().map(|r| r.as_str().to_owned()).unwrap_or_default();
    tracing::info_span!("request", request_id = %id, method = %req.method(), route = %route_of(req))
}

/// The outermost middleware: request id in, request id out, figures recorded.
pub async fn observe(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let metrics = metrics::global();
    let _in_flight = metrics.in_flight();
    let id = req.headers().get(&X_REQUEST_ID).filter(|v| sane(v)).cloned().unwrap_or_else(fresh_id);
    req.headers_mut().insert(X_REQUEST_ID.clone(), id.clone());
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let route = route_of(&req);

    let mut resp = CURRENT.scope(RequestId(id.clone()), next.run(req)).await;

    resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
    metrics.record(&RequestOutcome {
        method: method.as_str(),
        route: &route,
        status: resp.status().as_u16(),
        latency: started.elapsed(),
        error_code: resp.extensions().get::<ErrorCode>().map(|c| c.as_str()),
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sane_ids_are_kept() {
        for ok in ["abc", "0f8e-12_ab.cd:ef@x/y+z=", &"a".repeat(128)] {
            assert!(sane(&HeaderValue::from_str(ok).unwrap()), "{ok}");
        }
        for bad in ["", "a b", "a\"b", "<script>", &"a".repeat(129), "é"] {
            let Ok(v) = HeaderValue::from_str(bad) else { continue };
            assert!(!sane(&v), "{bad}");
        }
        assert!(sane(&fresh_id()));
    }

    async fn body_of(resp: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn server_errors_carry_the_request_id_and_no_detail() {
        use crate::api::ApiError;
        use crate::store::StoreError;
        use axum::response::IntoResponse;
        let id = RequestId(HeaderValue::from_static("req-500"));
        let (internal, unavailable, client) = CURRENT
            .scope(id, async {
                (
                    ApiError::internal("disk /secret/path exploded").into_response(),
                    ApiError::from(StoreError::Unavailable("sqlite: /secret/path locked".into())).into_response(),
                    ApiError::new(ErrorCode::InvalidJson, "bad").into_response(),
                )
            })
            .await;
        assert_eq!(internal.status(), 500);
        assert_eq!(internal.extensions().get::<ErrorCode>(), Some(&ErrorCode::Internal));
        let body = body_of(internal).await;
        assert_eq!(body["code"], "internal");
        assert_eq!(body["request_id"], "req-500");
        assert!(!body.to_string().contains("secret"), "{body}");
        let body = body_of(unavailable).await;
        assert_eq!((body["code"].as_str(), body["request_id"].as_str()), (Some("store_unavailable"), Some("req-500")));
        assert!(!body.to_string().contains("secret"), "{body}");
        // Client errors are answered as before: no id in the body (it is in the header).
        assert!(body_of(client).await.get("request_id").is_none());
    }

    #[tokio::test]
    async fn the_request_id_follows_spawned_tasks() {
        let id = RequestId(HeaderValue::from_static("req-1"));
        let seen = CURRENT.scope(id, async { tokio::spawn(carry(async { current_request_id() })).await.unwrap() }).await;
        assert_eq!(seen.as_deref(), Some("req-1"));
        assert_eq!(current_request_id(), None);
    }
}
