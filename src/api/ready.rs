//! `GET /ready`: whether this process can answer recognition requests now, for load balancers
//! and orchestrators (`/health` only says it is alive). Three checks: the models are loaded
//! (inference workers running), the store answers a ping within [`STORE_TIMEOUT`] (every
//! call), and one real inference on a face photo built into the binary found a face, which
//! proves the execution provider computes (once: the proof is kept after the first success).
//! The answer names each check; failure details go to the log, not to the (public) client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::{AppState, ErrorCode};
use crate::engine::EngineError;

/// The face photo of the inference check: a 144x170 JPEG crop (9 KB) of the 2012 official
/// White House portrait of Barack Obama by Pete Souza, a US federal government work in the
/// public domain (from the face set's face_recognition/examples/obama.jpg; see
/// tests/fixtures/SOURCES.md for the exact command).
pub static READY_FACE: &[u8] = include_bytes!("ready_face.jpg");

/// How long the store may take to answer the ping.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the inference check may take (a busy queue included).
pub const INFERENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// The first successful inference check of this process.
static PROOF: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
/// The last answer (0: none yet, 1: ready, 2: not ready), to log changes only.
static LAST: AtomicU8 = AtomicU8::new(0);

/// Readiness answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"status": "ready", "checks": {"models": "ok", "store": "ok", "inference": "ok"}}))]
pub struct Ready {
    /// "ready" (200), or "error" (503, with `code` "not_ready").
    pub status: String,
    /// `not_ready` when a check failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The checks that failed, by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
    pub checks: Checks,
    /// The request's id, on a 503.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Each check: "ok", or "failed: <reason>".
#[derive(Debug, Serialize, ToSchema)]
pub struct Checks {
    /// Models loaded: the inference workers are running.
    pub models: String,
    /// The store answered a ping.
    pub store: String,
    /// One real inference on the built-in face photo found a face.
    pub inference: String,
}

/// Readiness: models loaded, store reachable, execution provider proven.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to serve: models loaded, store reachable, inference proven", body = Ready),
        (status = 503, description = "Not ready (`not_ready`): `failed` names the checks", body = Ready),
    )
)]
pub async fn ready(State(st): State<Arc<AppState>>) -> Response {
    let stats = st.service.engine().stats();
    let models = if stats.serving_workers > 0 {
        Ok(())
    } else if stats.live_workers > 0 {
        Err(("no inference worker is serving", format!("{} workers busy past INFERENCE_TIMEOUT", stats.live_workers)))
    } else {
        Err(("no inference worker is running", "all workers stopped or being replaced".to_owned()))
    };
    let (store, inference) = tokio::join!(check_store(&st), check_inference(&st));
    let mut failed = Vec::new();
    let mut show = |name: &str, r: Result<(), (&'static str, String)>| match r {
        Ok(()) => "ok".to_owned(),
        Err((public, detail)) => {
            failed.push((name.to_owned(), public, detail));
            format!("failed: {public}")
        }
    };
    let checks = Checks { models: show("models", models), store: show("store", store), inference: show("inference", inference) };
    if failed.is_empty() {
        if LAST.swap(1, Ordering::Relaxed) != 1 {
            tracing::info!("readiness: ready");
        }
        return Json(Ready { status: "ready".into(), code: None, message: None, failed: Vec::new(), checks, request_id: None })
            .into_response();
    }
    if LAST.swap(2, Ordering::Relaxed) != 2 {
        for (name, _, detail) in &failed {
            tracing::warn!(check = %name, reason = %detail, "readiness: not ready");
        }
    }
    let message = format!("not ready: {}", failed.iter().map(|(n, p, _)| format!("{n}: {p}")).collect::<Vec<_>>().join("; "));
    let body = Ready {
        status: "error".into(),
        code: Some(ErrorCode::NotReady),
        message: Some(message),
        failed: failed.into_iter().map(|(n, _, _)| n).collect(),
        checks,
        request_id: super::observe::current_request_id(),
    };
    let mut resp = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    resp.extensions_mut().insert(ErrorCode::NotReady);
    resp
}

/// The store's ping, bounded. Err: (what the client sees, what the log gets).
async fn check_store(st: &AppState) -> Result<(), (&'static str, String)> {
    match tokio::time::timeout(STORE_TIMEOUT, st.service.ping_store()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(("the store is unreachable", e.to_string())),
        Err(_) => Err(("the store did not answer in time", format!("no answer within {STORE_TIMEOUT:?}"))),
    }
}

/// The inference proof: taken once, kept after the first success.
async fn check_inference(st: &AppState) -> Result<(), (&'static str, String)> {
    PROOF
        .get_or_try_init(|| async {
            let started = Instant::now();
            let analysis = match tokio::time::timeout(INFERENCE_TIMEOUT, st.service.engine().analyze(READY_FACE.to_vec())).await {
                Ok(Ok(a)) => a,
                Ok(Err(EngineError::Overloaded)) => return Err(("the inference queue is full", "overloaded".to_owned())),
                Ok(Err(e)) => return Err(("inference failed", e.to_string())),
                Err(_) => return Err(("inference did not finish in time", format!("no answer within {INFERENCE_TIMEOUT:?}"))),
            };
            if analysis.faces.is_empty() {
                return Err((
                    "no face found in the built-in photo",
                    format!("the {} execution provider found no face in the built-in face photo", st.service.engine().info().provider),
                ));
            }
            tracing::info!(
                faces = analysis.faces.len(),
                provider = %st.service.engine().info().provider,
                ms = started.elapsed().as_secs_f64() * 1000.0,
                "readiness: inference on the built-in face photo passed"
            );
            Ok(())
        })
        .await
        .copied()
}
