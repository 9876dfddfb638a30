//! `GET /health`: what is running, for operators and load balancers.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::runtime::{ActiveBackend, ActiveProvider};
use crate::store::StoreKind;

/// Health answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"status": "ok", "version": "0.1.0", "execution_provider": "cpu", "inference_backend": "openvino", "backend_reason": "auto: openvino 9.8 ms against onnxruntime 17.1 ms per probe pass (median of 7, interleaved)", "model_pack": "buffalo_sc", "model_id": "w600k_mbf@9cc6e4a75f0e", "users": 42, "face_records": 7, "store": "sqlite", "skipped_other_model": 0, "skipped_malformed": 0}))]
pub struct Health {
    /// "ok" once the models are loaded (the server listens only then).
    pub status: String,
    pub version: String,
    /// The execution provider sessions actually run on.
    #[schema(value_type = String, example = "cpu")]
    pub execution_provider: ActiveProvider,
    /// The inference library the models run on: onnxruntime or openvino.
    pub inference_backend: ActiveBackend,
    /// Why: the setting, or under `auto` the start-up measurement.
    pub backend_reason: String,
    pub model_pack: String,
    /// Recognizer id stored with every template.
    pub model_id: String,
    /// Users with a template, compared by /recognize.
    pub users: usize,
    /// Face records of the second API, searched by /api/face/search.
    pub face_records: usize,
    pub store: StoreKind,
    /// Users at start whose templates came from another recognizer (kept, not compared).
    pub skipped_other_model: usize,
    /// Stored rows with malformed embeddings, skipped at start.
    pub skipped_malformed: usize,
}

/// Service health.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "Models loaded, serving", body = Health)))]
pub async fn health(State(st): State<Arc<AppState>>) -> Json<Health> {
    let svc = &st.service;
    let info = svc.engine().info();
    let start = svc.start_counts();
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        execution_provider: info.provider,
        inference_backend: info.backend,
        backend_reason: info.backend_reason.clone(),
        model_pack: svc.options().model_pack.clone(),
        model_id: info.model_id.clone(),
        users: svc.gallery().len(),
        face_records: svc.face_index().len(),
        store: svc.store_kind(),
        skipped_other_model: start.users_other_model,
        skipped_malformed: start.users_malformed,
    })
}
