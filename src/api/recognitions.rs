//! `GET /recognitions`: the latest recognitions from the audit trail (`/recognize` answers and
//! the identifications of streams with `log: true`), newest first, each face with the URL of its
//! crop (`GET /recognitions/{id}/crops/{n}`, decoded from the line, which holds every crop).
//! Protected like `/metadata`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use crate::audit::read as audit_read;
use crate::error::{ApiError, ErrorCode};
use crate::face::image::{ImageKind, sniff};

/// Most entries a page may ask for.
const MAX_LIMIT: usize = 200;

#[derive(Debug, Deserialize, IntoParams)]
pub struct RecognitionsQuery {
    /// Entries per page, 1 to 200 (default 20).
    pub limit: Option<usize>,
    /// Only entries older than this one (an `id`; `next_before` of the previous page).
    pub before: Option<u64>,
}

/// A page of recognitions.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"items": [{"id": 5120, "source": "stream", "faces": [{"name": "alice", "similarity": 0.62, "bbox": [10, 20, 110, 140], "track_id": 1, "crop_url": "/recognitions/5120/crops/0"}], "fields": {"frame_id": 42}}], "next_before": 5120}))]
pub struct RecognitionsPage {
    /// Newest first. `id`: where the entry's line starts in the log; `source`: `recognize` or
    /// `stream`; `faces`: each entry of the line's `bboxes` without its crop, with `crop_url`;
    /// `fields`: the line's other fields.
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<Value>,
    /// Pass as `before` for the next page; null on the last.
    pub next_before: Option<u64>,
}

/// The latest recognitions, newest first.
#[utoipa::path(
    get,
    path = "/recognitions",
    tag = "recognition",
    params(RecognitionsQuery),
    responses(
        (status = 200, description = "A page of the audit trail, newest first", body = RecognitionsPage),
        (status = 400, description = "`limit` out of range", body = super::error::ErrorBody),
        (status = 401, description = "Credentials required", body = super::error::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn list(State(st): State<Arc<AppState>>, Query(q): Query<RecognitionsQuery>) -> Result<axum::Json<RecognitionsPage>, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, format!("limit must be 1 to {MAX_LIMIT}")));
    }
    let path = st.audit_log.clone();
    let lines = tokio::task::spawn_blocking(move || audit_read::newest_lines(&path, q.before, limit))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let next_before = if lines.len() == limit { lines.last().map(|l| l.0) } else { None };
    let items = lines.into_iter().filter_map(|(id, line)| serde_json::from_slice::<Value>(&line).ok().map(|v| entry(id, v))).collect();
    Ok(axum::Json(RecognitionsPage { items, next_before }))
}

/// One log line as an entry of the page.
fn entry(id: u64, line: Value) -> Value {
    let Value::Object(mut fields) = line else { return json!({"id": id, "source": "unknown", "faces": [], "fields": {}}) };
    let source = fields.remove("source").and_then(|s| s.as_str().map(str::to_string)).unwrap_or_else(|| "recognize".into());
    let faces: Vec<Value> = match fields.remove("bboxes") {
        Some(Value::Array(entries)) => entries
            .into_iter()
            .enumerate()
            .map(|(n, e)| {
                let mut e = match e {
                    Value::Object(m) => m,
                    other => Map::from_iter([("value".to_string(), other)]),
                };
                if e.remove("crop").is_some_and(|c| c.is_string()) {
                    e.insert("crop_url".into(), json!(format!("/recognitions/{id}/crops/{n}")));
                }
                Value::Object(e)
            })
            .collect(),
        _ => Vec::new(),
    };
    json!({"id": id, "source": source, "faces": faces, "fields": fields})
}

/// The crop of face `n` of recognition `id`, as received (or, for a stream, the aligned face).
#[utoipa::path(
    get,
    path = "/recognitions/{id}/crops/{n}",
    tag = "recognition",
    params(("id" = u64, Path, description = "The recognition's id"), ("n" = usize, Path, description = "The face's index in it")),
    responses(
        (status = 200, description = "The image", content_type = "image/*", body = Vec<u8>),
        (status = 404, description = "No such recognition or crop", body = super::error::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn crop(State(st): State<Arc<AppState>>, Path((id, n)): Path<(u64, usize)>) -> Result<Response, ApiError> {
    let path = st.audit_log.clone();
    let line = tokio::task::spawn_blocking(move || audit_read::line_at(&path, id))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let missing = || ApiError::new(ErrorCode::NotFound, format!("no crop {n} in recognition {id}"));
    let value: Value = line.and_then(|l| serde_json::from_slice(&l).ok()).ok_or_else(missing)?;
    let b64 = value["bboxes"][n]["crop"].as_str().ok_or_else(missing)?;
    // A data: URL prefix is accepted by /recognize, so it may be in the line.
    let b64 = b64.strip_prefix("data:").and_then(|r| r.split_once(',')).map_or(b64, |(_, b)| b);
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|_| missing())?;
    let mime = match sniff(&bytes).ok_or_else(missing)? {
        ImageKind::Jpeg => "image/jpeg",
        ImageKind::Png => "image/png",
        ImageKind::Webp => "image/webp",
        ImageKind::Bmp => "image/bmp",
    };
    let mut resp = bytes.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    Ok(resp)
}
