//! The HTTP layer: parse, validate, call into the engine, gallery, store and audit; no
//! maths and no I/O of its own. [`app`] builds the router (tests call it without a socket);
//! one file per resource: `recognize` (the original contract), `users`, `health`.

pub mod error;
mod extract;
pub mod health;
pub mod recognize;
pub mod users;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::{Html, IntoResponse};
use axum::routing::{delete, get, post};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_redoc::{Redoc, Servable};
use utoipa_swagger_ui::SwaggerUi;

use crate::audit::AuditHandle;
use crate::engine::Engine;
use crate::gallery::Gallery;
use crate::store::{FaceStore, StoreKind};
pub use error::{ApiError, ErrorCode};

/// Everything a handler may use. Shared behind an `Arc`.
pub struct AppState {
    pub engine: Engine,
    pub gallery: Arc<Gallery>,
    pub store: Arc<dyn FaceStore>,
    pub audit: AuditHandle,
    /// The last /recognize answer's `meta` (`{}` before the first).
    pub metadata: std::sync::RwLock<serde_json::Value>,
    pub sim_threshold: f32,
    pub model_pack: String,
    pub store_kind: StoreKind,
    /// Users at start whose templates came from another recognizer (kept, not compared).
    pub skipped_other_model: usize,
    /// Rows at start with malformed embeddings (skipped).
    pub skipped_malformed: usize,
    /// Serialises "write the store, then the gallery" so the gallery applies writes in the
    /// store's order.
    pub writes: tokio::sync::Mutex<()>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Face Recognition API",
        description = "facerec: face detection, embeddings and recognition (InsightFace models through ONNX Runtime). \
The original contract (/recognize, /metadata, /calculate_average_embedding) is kept to the letter; \
every other error carries a stable `code`."
    ),
    paths(
        recognize::recognize,
        recognize::metadata,
        recognize::calculate_average_embedding,
        users::create_user,
        users::list_users,
        users::delete_user,
        health::health,
    ),
    components(schemas(error::ErrorBody, error::ErrorCode, error::EntryError)),
    tags(
        (name = "recognition", description = "The original contract: recognise face crops, enrol users"),
        (name = "users", description = "Enrolled users"),
        (name = "operations", description = "Health"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document served at /openapi.json.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The router with every route, the docs and the body limit.
pub fn app(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/", get(landing))
        .route("/recognize", post(recognize::recognize))
        .route("/metadata", get(recognize::metadata))
        .route("/calculate_average_embedding", post(recognize::calculate_average_embedding))
        .route("/users", post(users::create_user).get(users::list_users))
        .route("/users/{username}", delete(users::delete_user))
        .route("/health", get(health::health))
        .with_state(state);
    api.merge(SwaggerUi::new("/docs").url("/openapi.json", openapi()))
        .merge(Redoc::with_url("/redoc", openapi()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(TraceLayer::new_for_http())
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, format!("{method} is not allowed on {}", uri.path()))
}

/// `GET /`: what this is and how to call it.
async fn landing() -> impl IntoResponse {
    Html(LANDING)
}

const LANDING: &str = r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Face Recognition API</title>
<style>body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;line-height:1.5}code,pre{background:#f4f4f4;border-radius:4px}pre{padding:.8rem;overflow:auto}</style>
</head>
<body>
<h1>Face Recognition API</h1>
<p>facerec finds faces in images and tells who they are: InsightFace's SCRFD detector and ArcFace
recognizer, run through ONNX Runtime, compared by cosine similarity with every enrolled user.</p>
<h2>Recognise face crops</h2>
<pre>curl -s http://HOST:8000/recognize -H 'content-type: application/json' \
  -d '{"bboxes": [{"bbox": [10, 20, 110, 140], "crop": "'"$(base64 -w0 face.jpg)"'"}]}'</pre>
<p>Each entry comes back with <code>name</code> (the user, or <code>Unknown n</code>) and
<code>similarity</code>; every other field is echoed. The last answer is at <a href="/metadata">/metadata</a>.</p>
<h2>Enrol</h2>
<pre>curl -s http://HOST:8000/users -H 'content-type: application/json' -d '{"username": "alice"}'
curl -s http://HOST:8000/calculate_average_embedding -F username=alice -F files=@a1.jpg -F files=@a2.jpg</pre>
<h2>Reference</h2>
<p><a href="/docs">Swagger UI (/docs)</a> · <a href="/redoc">ReDoc (/redoc)</a> ·
<a href="/openapi.json">OpenAPI document</a> · <a href="/health">health</a></p>
</body>
</html>
"#;
