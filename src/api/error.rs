//! The error catalogue: every error the HTTP API returns has a stable machine-readable
//! `code`, one HTTP status, and a message. Bodies are `{"status": "error", "code": ...,
//! "message": ...}`; the original contract's two enrolment errors keep their exact legacy
//! shape `{"status": "error", "message": ...}`. Internal details are logged once, here,
//! and never sent to the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::EngineError;
use crate::face::FaceError;
use crate::store::StoreError;

/// Stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    InvalidRequest,
    InvalidUsername,
    InvalidBase64,
    InvalidImage,
    ImageTooLarge,
    PayloadTooLarge,
    UnsupportedMediaType,
    CrossOrigin,
    TooManyCrops,
    TooManyFiles,
    NoFaceDetected,
    FaceNotFound,
    Unauthorized,
    UserNotFound,
    UserExists,
    ModelMismatch,
    NotFound,
    MethodNotAllowed,
    Overloaded,
    StoreUnavailable,
    NotReady,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidJson | Self::InvalidRequest | Self::InvalidUsername | Self::InvalidBase64 | Self::InvalidImage => {
                StatusCode::BAD_REQUEST
            }
            Self::ImageTooLarge | Self::PayloadTooLarge | Self::TooManyCrops | Self::TooManyFiles => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NoFaceDetected => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UserNotFound | Self::FaceNotFound | Self::NotFound => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::CrossOrigin => StatusCode::FORBIDDEN,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UserExists | Self::ModelMismatch => StatusCode::CONFLICT,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::StoreUnavailable | Self::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidUsername => "invalid_username",
            Self::InvalidBase64 => "invalid_base64",
            Self::InvalidImage => "invalid_image",
            Self::ImageTooLarge => "image_too_large",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::CrossOrigin => "cross_origin",
            Self::TooManyCrops => "too_many_crops",
            Self::TooManyFiles => "too_many_files",
            Self::NoFaceDetected => "no_face_detected",
            Self::FaceNotFound => "face_not_found",
            Self::Unauthorized => "unauthorized",
            Self::UserNotFound => "user_not_found",
            Self::UserExists => "user_exists",
            Self::ModelMismatch => "model_mismatch",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Overloaded => "overloaded",
            Self::StoreUnavailable => "store_unavailable",
            Self::NotReady => "not_ready",
            Self::Internal => "internal",
        }
    }
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Render as the original service did: `{"status": "error", "message": ...}`.
    pub legacy: bool,
}

/// The error body, as documented in the OpenAPI document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"status": "error", "code": "invalid_image", "message": "invalid image: not a supported image: expected JPEG, PNG, WebP or BMP"}))]
pub struct ErrorBody {
    /// Always "error".
    pub status: String,
    /// Stable machine-readable code (absent only in the two legacy enrolment errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    pub message: String,
    /// The request's id (also in the `x-request-id` header), on server errors (5xx): quote it
    /// when reporting the incident; the details are in the server's log under that id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// An error attached to one entry of a `/recognize` request.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EntryError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into(), legacy: false }
    }

    /// The original contract's shape (no `code`).
    pub fn legacy(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into(), legacy: true }
    }

    /// An internal failure: the details are logged here, the client gets a generic message.
    pub fn internal(detail: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %detail, "internal error");
        ApiError::new(ErrorCode::Internal, "internal error: the incident was logged")
    }

    pub fn entry(&self) -> EntryError {
        EntryError { code: self.code, message: self.message.clone() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let request_id = (status.is_server_error() && !self.legacy).then(super::observe::current_request_id).flatten();
        let body = ErrorBody { status: "error".into(), code: (!self.legacy).then_some(self.code), message: self.message, request_id };
        let mut resp = (status, axum::Json(body)).into_response();
        // For the metrics (errors by code).
        resp.extensions_mut().insert(self.code);
        if self.code == ErrorCode::Overloaded {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Router layer (`map_response`): an error answer that is not JSON (axum's own rejections,
/// a layer's plain-text answer) is rewritten into the catalogue's shape with the same status,
/// so a client parses every error the same way. A client error keeps its text as the message;
/// a server error's text is logged and replaced by a generic message.
pub async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.map(|b| String::from_utf8_lossy(&b).trim().to_owned()).unwrap_or_default();
    let code = match status {
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::Overloaded,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::NotReady,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::InvalidRequest,
    };
    let message = if status.is_server_error() {
        tracing::error!(status = status.as_u16(), detail = %text, "server error");
        "internal error: the incident was logged".to_owned()
    } else if code == ErrorCode::PayloadTooLarge {
        "request body is larger than MAX_BODY_BYTES".to_owned()
    } else if text.is_empty() {
        status.canonical_reason().unwrap_or("bad request").to_owned()
    } else {
        text
    };
    let mut fresh = ApiError::new(code, message).into_response();
    *fresh.status_mut() = status;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRANSFER_ENCODING);
    for (name, value) in fresh.headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    parts.extensions.extend(std::mem::take(fresh.extensions_mut()));
    Response::from_parts(parts, fresh.into_body())
}

/// A handler that panicked (a bug): the client gets `internal`, the log gets the panic.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a handler panicked");
    ApiError::internal(format!("panic: {detail}")).into_response()
}

impl From<FaceError> for ApiError {
    fn from(e: FaceError) -> Self {
        match e {
            FaceError::InvalidImage(m) => ApiError::new(ErrorCode::InvalidImage, format!("invalid image: {m}")),
            e @ FaceError::ImageTooLarge { .. } => ApiError::new(ErrorCode::ImageTooLarge, e.to_string()),
            other => ApiError::internal(other),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Image(f) => f.into(),
            EngineError::Overloaded => ApiError::new(ErrorCode::Overloaded, "the service is at capacity: retry shortly"),
            other => ApiError::internal(other),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UserExists(u) => ApiError::new(ErrorCode::UserExists, format!("User '{u}' already exists.")),
            StoreError::UserNotFound(u) => ApiError::new(ErrorCode::UserNotFound, format!("User '{u}' not found.")),
            e @ StoreError::ModelMismatch { .. } => ApiError::new(ErrorCode::ModelMismatch, e.to_string()),
            StoreError::Unavailable(m) => {
                crate::metrics::global().store_failure(crate::metrics::StoreFailure::Unavailable);
                tracing::warn!(reason = %m, "store unavailable");
                ApiError::new(ErrorCode::StoreUnavailable, "the database is unavailable: nothing was changed; retry later")
            }
            other => {
                crate::metrics::global().store_failure(crate::metrics::StoreFailure::Internal);
                ApiError::internal(other)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(resp: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
        serde_json::from_slice(&bytes).expect("JSON body")
    }

    fn plain(status: StatusCode, text: &'static str) -> Response {
        (status, [(header::ALLOW, "GET")], text).into_response()
    }

    #[tokio::test]
    async fn plain_text_errors_become_catalogue_json() {
        let r = json_errors(plain(StatusCode::BAD_REQUEST, "Invalid URL: Cannot parse `%FF`")).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(r.headers()[header::ALLOW], "GET", "other headers are kept");
        let v = body_json(r).await;
        assert_eq!((v["status"].as_str(), v["code"].as_str()), (Some("error"), Some("invalid_request")));
        assert_eq!(v["message"], "Invalid URL: Cannot parse `%FF`");

        let r = json_errors(plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, "")).await;
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "the status is kept");
        let v = body_json(r).await;
        assert_eq!((v["code"].as_str(), v["message"].as_str()), (Some("unsupported_media_type"), Some("Unsupported Media Type")));

        let r = json_errors(plain(StatusCode::PAYLOAD_TOO_LARGE, "length limit exceeded")).await;
        assert_eq!(body_json(r).await["code"], "payload_too_large");

        // A server error's text is internal: logged, not sent.
        let r = json_errors(plain(StatusCode::BAD_GATEWAY, "db password is hunter2")).await;
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        let v = body_json(r).await;
        assert_eq!(v["code"], "internal");
        assert!(!v.to_string().contains("hunter2"));
    }

    #[tokio::test]
    async fn json_and_successes_pass_through() {
        let ok = json_errors((StatusCode::OK, "fine").into_response()).await;
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(axum::body::to_bytes(ok.into_body(), 64).await.expect("body"), "fine");
        let legacy = ApiError::legacy(ErrorCode::UserNotFound, "User 'a' not found.").into_response();
        let v = body_json(json_errors(legacy).await).await;
        assert_eq!(v, serde_json::json!({"status": "error", "message": "User 'a' not found."}));
    }

    #[tokio::test]
    async fn a_panic_is_internal_without_its_text() {
        let r = panic_response(Box::new("index out of bounds: secret detail".to_owned()));
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let v = body_json(r).await;
        assert_eq!(v["code"], "internal");
        assert!(!v.to_string().contains("secret"));
    }

    #[test]
    fn every_code_has_one_status_and_its_name() {
        let all = [
            ErrorCode::InvalidJson,
            ErrorCode::InvalidRequest,
            ErrorCode::InvalidUsername,
            ErrorCode::InvalidBase64,
            ErrorCode::InvalidImage,
            ErrorCode::ImageTooLarge,
            ErrorCode::PayloadTooLarge,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::CrossOrigin,
            ErrorCode::TooManyCrops,
            ErrorCode::TooManyFiles,
            ErrorCode::NoFaceDetected,
            ErrorCode::FaceNotFound,
            ErrorCode::Unauthorized,
            ErrorCode::UserNotFound,
            ErrorCode::UserExists,
            ErrorCode::ModelMismatch,
            ErrorCode::NotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::Overloaded,
            ErrorCode::StoreUnavailable,
            ErrorCode::NotReady,
            ErrorCode::Internal,
        ];
        for c in all {
            let json = serde_json::to_value(c).expect("serialises");
            assert_eq!(json, serde_json::Value::String(c.as_str().into()));
            assert!(c.status().is_client_error() || c.status().is_server_error());
        }
    }
}
