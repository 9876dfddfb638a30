//! Request extractors whose rejections are our own errors, so a malformed or oversized
//! body gets the same JSON error shape as everything else.

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorCode};

/// The raw body, with the body limit turned into `payload_too_large`.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state).await.map(Body).map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorCode::PayloadTooLarge, "request body is larger than MAX_BODY_BYTES")
            } else {
                ApiError::new(ErrorCode::InvalidRequest, format!("could not read the request body: {e}"))
            }
        })
    }
}

/// Parses a JSON body into `T`, with `invalid_json` for bad syntax or shape.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("request body is not valid JSON for this endpoint: {e}")))
}

/// A multipart form, with its rejections as our errors.
pub struct Form(pub Multipart);

impl<S: Send + Sync> FromRequest<S> for Form {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Multipart::from_request(req, state)
            .await
            .map(Form)
            .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("expected a multipart/form-data body: {e}")))
    }
}

/// One part of a multipart form.
pub struct Part {
    pub name: String,
    pub file_name: Option<String>,
    pub bytes: Bytes,
}

impl Form {
    /// Every part, in order.
    pub async fn parts(mut self) -> Result<Vec<Part>, ApiError> {
        let mut out = Vec::new();
        loop {
            let field = self.0.next_field().await.map_err(multipart_error)?;
            let Some(field) = field else { return Ok(out) };
            let name = field.name().unwrap_or_default().to_string();
            let file_name = field.file_name().map(str::to_string);
            let bytes = field.bytes().await.map_err(multipart_error)?;
            out.push(Part { name, file_name, bytes });
        }
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(ErrorCode::PayloadTooLarge, "request body is larger than MAX_BODY_BYTES")
    } else {
        ApiError::new(ErrorCode::InvalidRequest, format!("malformed multipart body: {}", e.body_text()))
    }
}

/// Checks a username: see [`validate_name`].
pub fn validate_username(name: &str) -> Result<(), ApiError> {
    validate_name("username", name)
}

/// Checks a name given by a client (`username`, `displayName`): 1 to 128 characters, no
/// control characters, no surrounding white space.
pub fn validate_name(field: &str, name: &str) -> Result<(), ApiError> {
    let bad = |why: &str| Err(ApiError::new(ErrorCode::InvalidUsername, format!("invalid {field}: {why}")));
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.chars().count() > 128 {
        return bad("it is longer than 128 characters");
    }
    if name.chars().any(char::is_control) {
        return bad("it contains control characters");
    }
    if name.trim() != name {
        return bad("it starts or ends with white space");
    }
    Ok(())
}
