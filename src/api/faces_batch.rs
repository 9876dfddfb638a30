//! `POST /api/face/register/batch`: many registrations in one multipart body, each answered on
//! its own. The form is read and paired here; each item is the service's `register` (record and
//! image stored together, durable before the answer).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::Form;
use crate::store::faces::FaceView;

/// Most items in one batch.
pub const MAX_BATCH: usize = 100;

/// Form: `displayName` and `image` parts, repeated; the n-th name goes with the n-th image.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct RegisterBatchForm {
    /// One per image, in the same order (1 to 128 characters, no control characters).
    #[serde(rename = "displayName")]
    display_name: Vec<String>,
    #[schema(value_type = Vec<String>, format = Binary)]
    image: Vec<Vec<u8>>,
}

/// One item's answer: the record (`status` 201) or an error with its code and HTTP status.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItem {
    /// The item's position in the form, from 0.
    pub index: usize,
    /// What `POST /api/face/register` would have answered for it alone.
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub face: Option<FaceView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// The batch's answer: every item, in the form's order.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"registered": 1, "failed": 1, "items": [
    {"index": 0, "status": 201, "face": {"id": "3f6c1a52-9d1e-4b8e-a0a4-0d3b8f1f2c11", "display_name": "Alice Martin", "image_url": "/api/face/3f6c1a52-9d1e-4b8e-a0a4-0d3b8f1f2c11/image", "inserted_at": "2026-11-22T08:00:00.000Z"}},
    {"index": 1, "status": 422, "error": {"status": "error", "code": "no_face_detected", "message": "no face detected in the image"}}]}))]
pub struct BatchResponse {
    pub registered: usize,
    pub failed: usize,
    pub items: Vec<BatchItem>,
}

/// Register many faces.
///
/// Each `displayName` / `image` pair is registered as by `POST /api/face/register`, and
/// answered on its own: a stored item is durable (record and image) before this answers; a
/// failed one stored nothing. The whole request is refused (nothing stored) only when the form
/// itself is wrong: names and images not paired, none, or more than 100.
#[utoipa::path(
    post,
    path = "/api/face/register/batch",
    tag = "faces",
    request_body(content = RegisterBatchForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Every item answered on its own", body = BatchResponse),
        (status = 400, description = "Names and images not paired, none, or more than 100 (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "Credentials missing or wrong (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "Authentication is off and the request comes from a page of another site (`cross_origin`)", body = ErrorBody),
        (status = 413, description = "The body is too large (`payload_too_large`)", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn register_batch(State(st): State<Arc<AppState>>, form: Form) -> Result<Json<BatchResponse>, ApiError> {
    let parts = form.parts().await?;
    let mut names = Vec::new();
    let mut images = Vec::new();
    for p in parts {
        match p.name.as_str() {
            "displayName" => names.push(String::from_utf8(p.bytes.to_vec()).map_err(|_| {
                ApiError::new(ErrorCode::InvalidRequest, format!("`displayName` number {} is not UTF-8 text", names.len() + 1))
            })?),
            "image" => images.push(p.bytes.to_vec()),
            _ => {}
        }
    }
    if names.len() != images.len() {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("{} `displayName` and {} `image` parts: each image needs its name, in the same order", names.len(), images.len()),
        ));
    }
    if names.is_empty() || names.len() > MAX_BATCH {
        return Err(ApiError::new(ErrorCode::InvalidRequest, format!("a batch holds 1 to {MAX_BATCH} items, not {}", names.len())));
    }
    let items: Vec<(Result<String, ApiError>, Vec<u8>)> =
        names.into_iter().map(|n| super::extract::validate_name("displayName", &n, &st.limits).map(|()| n)).zip(images).collect();
    let results = st.service.register_batch(items).await;
    let mut out = BatchResponse { registered: 0, failed: 0, items: Vec::with_capacity(results.len()) };
    for (index, r) in results.into_iter().enumerate() {
        out.items.push(match r {
            Ok(record) => {
                out.registered += 1;
                BatchItem { index, status: 201, face: Some(FaceView::from(&record)), error: None }
            }
            Err(e) => {
                out.failed += 1;
                let status = e.code.status().as_u16();
                BatchItem {
                    index,
                    status,
                    face: None,
                    error: Some(ErrorBody { status: "error".into(), code: Some(e.code), message: e.message, request_id: None }),
                }
            }
        });
    }
    Ok(Json(out))
}
