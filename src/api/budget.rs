//! The budget of request bytes in flight (REQUEST_BYTES_IN_FLIGHT): a request with a body holds
//! its declared length (`Content-Length`; MAX_BODY_BYTES when it sends none) from its arrival to
//! its answer; past the budget it is answered 429 `overloaded` with `Retry-After` at once, before
//! a byte of its body is read. Decoding, detection and the answer of a request cost a few times
//! its body, so this bounds the memory of concurrent large bodies (one 20 MB body alone may
//! touch 70 MB), where MAX_BODY_BYTES bounds only each one.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::error::{ApiError, ErrorCode};

/// Bytes are counted in KiB (a semaphore permit each), so that any body fits its `u32` count.
const UNIT: u64 = 1024;

/// The shared budget.
#[derive(Debug)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    total: u64,
    max_body: u64,
}

impl BodyBudget {
    /// `total` bytes in flight at most; a body of unknown length counts as `max_body`.
    pub fn new(total: usize, max_body: usize) -> Arc<BodyBudget> {
        let total = (total as u64).max(max_body as u64);
        let units = usize::try_from(total.div_ceil(UNIT)).unwrap_or(Semaphore::MAX_PERMITS).min(Semaphore::MAX_PERMITS);
        Arc::new(BodyBudget { permits: Arc::new(Semaphore::new(units)), total, max_body: max_body as u64 })
    }

    /// Bytes held by requests now.
    pub fn in_flight(&self) -> u64 {
        let free = self.permits.available_permits() as u64 * UNIT;
        self.total.div_ceil(UNIT) * UNIT - free
    }
}

/// What a request declares it will send: `None` when it has no body.
fn declared(req: &Request, max_body: u64) -> Option<u64> {
    let headers = req.headers();
    match headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(0) => None,
        // Over MAX_BODY_BYTES it is refused (413) before its body is read: it holds nothing more.
        Some(n) => Some(n.min(max_body)),
        None if headers.contains_key(header::TRANSFER_ENCODING) => Some(max_body),
        None => None,
    }
}

/// Middleware: holds the request's bytes in the budget until its answer, or answers 429.
pub async fn hold_body_bytes(State(budget): State<Arc<BodyBudget>>, req: Request, next: Next) -> Response {
    let Some(bytes) = declared(&req, budget.max_body) else {
        return next.run(req).await;
    };
    let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
    let Ok(permit) = Arc::clone(&budget.permits).try_acquire_many_owned(units) else {
        let in_flight = budget.in_flight();
        return ApiError::new(
            ErrorCode::Overloaded,
            format!("the service holds {in_flight} bytes of request bodies, REQUEST_BYTES_IN_FLIGHT is {}: retry shortly", budget.total),
        )
        .into_response();
    };
    // Held until the answer, or until the request is dropped (the client went away).
    let _held = (permit, crate::metrics::global().body_bytes_held(bytes));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_counts_what_is_held() {
        let b = BodyBudget::new(4 * 1024 * 1024, 1024 * 1024);
        assert_eq!(b.in_flight(), 0);
        let p = Arc::clone(&b.permits).try_acquire_many_owned(1024).expect("1 MiB fits");
        assert_eq!(b.in_flight(), 1024 * 1024);
        drop(p);
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn the_budget_is_never_below_one_body() {
        let b = BodyBudget::new(10, 1024 * 1024);
        assert!(Arc::clone(&b.permits).try_acquire_many_owned(1024).is_ok(), "one largest body always fits alone");
    }
}
