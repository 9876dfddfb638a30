//! The error catalogue: every error the service answers has a stable machine-readable
//! `code`, one HTTP status, and a message. The service layer returns these values; `api::error`
//! renders them as bodies `{"status": "error", "code": ..., "message": ...}` (the original
//! contract's two enrolment errors keep their exact legacy shape `{"status": "error",
//! "message": ...}`). Internal details are logged once, here, and never sent to the client.

use axum::http::StatusCode;
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
    /// The request body stopped arriving for BODY_READ_TIMEOUT (408).
    RequestTimeout,
    /// The request line's URI is too long (414, written for hyper's own answer).
    UriTooLong,
    /// The request's headers are too large (431, written for hyper's own answer).
    HeaderTooLarge,
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
    InferenceTimeout,
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
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UserExists | Self::ModelMismatch => StatusCode::CONFLICT,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::StoreUnavailable | Self::NotReady | Self::InferenceTimeout => StatusCode::SERVICE_UNAVAILABLE,
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
            Self::RequestTimeout => "request_timeout",
            Self::UriTooLong => "uri_too_long",
            Self::HeaderTooLarge => "header_too_large",
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
            Self::InferenceTimeout => "inference_timeout",
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

impl From<FaceError> for ApiError {
    fn from(e: FaceError) -> Self {
        match e {
            FaceError::InvalidImage(m) => ApiError::new(ErrorCode::InvalidImage, format!("invalid image: {m}")),
            e @ (FaceError::ImageTooLarge { .. } | FaceError::TooCostly(_)) => ApiError::new(ErrorCode::ImageTooLarge, e.to_string()),
            other => ApiError::internal(other),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Image(f) => f.into(),
            EngineError::Overloaded => ApiError::new(ErrorCode::Overloaded, "the service is at capacity: retry shortly"),
            EngineError::Timeout(d) => {
                tracing::warn!(timeout = ?d, "an inference job passed INFERENCE_TIMEOUT and was abandoned");
                ApiError::new(
                    ErrorCode::InferenceTimeout,
                    format!("inference took longer than INFERENCE_TIMEOUT ({} s): the job was abandoned; retry later", d.as_secs_f64()),
                )
            }
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
            ErrorCode::InferenceTimeout,
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
