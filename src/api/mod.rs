//! The HTTP layer: parse, validate, authorise, call one use case of the [`Service`], map the
//! answer to HTTP; no policy, maths or I/O of its own. [`app`] builds the router (tests call it
//! without a socket); one file per resource: `recognize` (the original contract), `users`,
//! `faces` (the second API), `health`, `ready`, `metrics`.

pub mod auth;
pub mod budget;
mod console;
mod docs;
pub mod error;
mod extract;
pub mod faces;
pub mod faces_batch;
pub mod health;
pub mod metrics;
pub mod names;
pub mod observe;
pub mod ready;
pub mod recognitions;
pub mod recognize;
pub mod stream;
pub mod timing;
pub mod users;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::{Html, IntoResponse};
use axum::routing::{delete, get, post};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

pub use crate::error::{ApiError, ErrorCode};
pub use crate::service::LegacyStatus;
use crate::service::Service;
pub use extract::{DEFAULT_BYTES_IN_FLIGHT, RequestLimits, looks_like_unknown};

/// Everything a handler may use: the service, and what only HTTP needs (authentication, the
/// request limits, how the original contract frames its answers, the last recognition for
/// `/metadata`). Shared behind an `Arc`.
pub struct AppState {
    pub service: Arc<Service>,
    pub auth: Arc<auth::AuthConfig>,
    /// What one request may ask for: crops per /recognize, files per enrolment, name lengths.
    pub limits: RequestLimits,
    /// How the original contract answers its errors (LEGACY_STATUS).
    pub legacy_status: LegacyStatus,
    /// The last /recognize answer's `meta` (`{}` before the first).
    pub metadata: std::sync::RwLock<serde_json::Value>,
    /// `/api/stream`'s limits and open streams (defaults unless set after [`AppState::new`]).
    pub streams: crate::stream::Streams,
    /// The audit log `/recognitions` reads (LOG_FILE; set after [`AppState::new`]).
    pub audit_log: std::path::PathBuf,
}

impl AppState {
    pub fn new(service: Arc<Service>, auth: Arc<auth::AuthConfig>, limits: RequestLimits, legacy_status: LegacyStatus) -> AppState {
        AppState {
            service,
            auth,
            limits,
            legacy_status,
            metadata: std::sync::RwLock::new(serde_json::json!({})),
            streams: Default::default(),
            audit_log: crate::audit::DEFAULT_LOG_FILE.into(),
        }
    }
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
        faces::encode,
        faces::register,
        faces_batch::register_batch,
        faces::search,
        faces::get_face,
        faces::get_face_image,
        faces::list_faces,
        faces::delete_face,
        faces::verify,
        health::health,
        ready::ready,
        metrics::metrics,
        stream::stream,
        recognitions::list,
        recognitions::crop,
    ),
    components(schemas(recognitions::RecognitionsPage, error::ErrorBody, error::ErrorCode, error::EntryError, recognize::SkippedFile)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "recognition", description = "The original contract: recognise face crops, enrol users"),
        (name = "users", description = "Enrolled users"),
        (name = "faces", description = "The second API: single images in, vectors and matches out"),
        (name = "operations", description = "Liveness (/health), readiness (/ready) and Prometheus metrics (/metrics)"),
    )
)]
pub struct ApiDoc;

/// Declares the two ways to authenticate, and applies them to the protected operations
/// that do not list them themselves (the original contract's).
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("HS256 JWT signed with JWT_SECRET_KEY, with an `exp` claim"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description("X-API-Key", "One of API_KEYS"))),
        );
        let protected = ["/recognize", "/metadata", "/calculate_average_embedding", "/users", "/users/{username}"];
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !protected.contains(&path.as_str()) {
                continue;
            }
            for op in [&mut item.get, &mut item.post, &mut item.delete].into_iter().flatten() {
                op.security.get_or_insert_with(Vec::new).extend([
                    SecurityRequirement::new("bearer", Vec::<String>::new()),
                    SecurityRequirement::new("api_key", Vec::<String>::new()),
                ]);
            }
        }
    }
}

/// The OpenAPI document served at /openapi.json.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The router with every route, the docs and the body limit.
pub fn app(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    // Everything that changes or reveals identities needs credentials when auth is on.
    // Form posts need no CORS preflight: with auth off, another site's page may not send them.
    let forms = Router::new()
        .route("/calculate_average_embedding", post(recognize::calculate_average_embedding))
        .route("/api/face/encode", post(faces::encode))
        .route("/api/face/register", post(faces::register))
        .route("/api/face/register/batch", post(faces_batch::register_batch))
        .route("/api/face/search", post(faces::search))
        .route("/api/face/verify", post(faces::verify))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state.auth), auth::refuse_foreign_forms));
    let protected = Router::new()
        .route("/recognize", post(recognize::recognize))
        .route("/metadata", get(recognize::metadata))
        .route("/recognitions", get(recognitions::list))
        .route("/recognitions/{id}/crops/{n}", get(recognitions::crop))
        .route("/users", post(users::create_user).get(users::list_users))
        .route("/users/{username}", delete(users::delete_user))
        .route("/api/face", get(faces::list_faces))
        .merge(forms)
        .route("/api/face/{id}", get(faces::get_face).delete(faces::delete_face))
        .route("/api/face/{id}/image", get(faces::get_face_image))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state.auth), auth::require_auth));
    let public = Router::new()
        .route("/", get(landing))
        .route("/health", get(health::health))
        .route("/ready", get(ready::ready))
        .route("/metrics", get(metrics::metrics))
        // Authenticates itself (first message or Sec-WebSocket-Protocol: browsers set no headers).
        .route("/api/stream", get(stream::stream));
    let budget = budget::BodyBudget::new(state.limits.bytes_in_flight, max_body_bytes);
    let api = protected.merge(public).with_state(state).layer(axum::middleware::from_fn(timing::engine_timing));
    // The reference pages run only their own scripts (compiled into the binary).
    let reference = Router::new()
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi()))
        .route("/redoc", get(docs::redoc_page))
        .route("/redoc/redoc.standalone.js", get(docs::redoc_script))
        .route("/redoc/redoc.init.js", get(docs::redoc_init))
        .layer(axum::middleware::map_response(docs::content_security_policy));
    api.merge(reference)
        .merge(console::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        // Before a byte of a body is read: its declared length in the budget, or 429.
        .layer(axum::middleware::from_fn_with_state(budget, budget::hold_body_bytes))
        // A declared length over the limit is refused before the body is read (and before
        // `100 Continue` invites the client to send it).
        .layer(axum::middleware::from_fn_with_state(max_body_bytes, extract::refuse_declared_oversize))
        // A panicking handler answers `internal`; any plain-text error (axum's rejections)
        // becomes catalogue JSON.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(error::panic_response))
        .layer(axum::middleware::map_response(error::json_errors))
        // Every log line of a request carries its id and route (the span); a 5xx is logged once,
        // where it is made (ApiError::internal, the store mapping), not again here.
        .layer(TraceLayer::new_for_http().make_span_with(observe::span_for).on_failure(()))
        // Every answer, errors and docs included: browsers must not guess another content type.
        .layer(axum::middleware::map_response(nosniff))
        // Outermost: request id in and out, metrics (it reads the timing headers set inside).
        .layer(axum::middleware::from_fn(observe::observe))
}

/// `X-Content-Type-Options: nosniff`: a stored image (or an error) is never run as HTML or script.
async fn nosniff(mut resp: axum::response::Response) -> axum::response::Response {
    resp.headers_mut().insert(axum::http::header::X_CONTENT_TYPE_OPTIONS, axum::http::HeaderValue::from_static("nosniff"));
    resp
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
<h2>Console</h2>
<p><a href="/console">The web console (/console)</a>: people and enrolment, face records, the live
camera through <code>/api/stream</code>, and the latest recognitions with their crops.</p>
<h2>Reference</h2>
<p><a href="/docs">Swagger UI (/docs)</a> · <a href="/redoc">ReDoc (/redoc)</a> ·
<a href="/openapi.json">OpenAPI document</a> · <a href="/health">health</a></p>
</body>
</html>
"#;
