//! The second API, for web and mobile clients: `/api/face/*` (encode, register, search,
//! get, image, list, delete) and verify. Single images in (multipart), vectors and matches
//! out: the forms are read and checked here, the use cases are the service's
//! ([`crate::service::faces`]).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{Form, Part};
use crate::face::{Face, FoundBy};
use crate::gallery::RecordMatch;
use crate::service::faces::FaceImage;
use crate::store::faces::FaceView;

/// A face found in an image.
#[derive(Debug, Serialize, ToSchema)]
pub struct FaceOut {
    /// x1, y1, x2, y2 in the image's pixels.
    pub bbox: [f32; 4],
    /// Five points: left eye, right eye, nose, left and right mouth corners.
    pub landmarks: [[f32; 2]; 5],
    /// The detector's confidence; null for an input taken as aligned (ALIGNED_INPUT), which
    /// was not detected.
    pub det_score: Option<f32>,
    /// 512 numbers, L2-normalised.
    pub embedding: Vec<f32>,
    /// `detector`, `padded` (tight crop, found on a padded copy) or `aligned` (a 112x112 input
    /// taken as aligned, only with ALIGNED_INPUT=true).
    #[schema(value_type = String, example = "detector")]
    pub found_by: FoundBy,
}

/// `encode` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct EncodeResponse {
    /// The most prominent face's embedding.
    pub embedding: Vec<f32>,
    /// Every face, most prominent first.
    pub faces: Vec<FaceOut>,
    /// The recognizer that made these vectors: compare only vectors of one model.
    #[schema(example = "w600k_mbf@9cc6e4a75f0e")]
    pub model_id: String,
}

/// A search hit.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": "3f6c1a52-9d1e-4b8e-a0a4-0d3b8f1f2c11", "display_name": "Alice Martin", "score": 0.71, "image_url": "/api/face/3f6c1a52-9d1e-4b8e-a0a4-0d3b8f1f2c11/image"}))]
pub struct SearchHit {
    pub id: String,
    pub display_name: String,
    /// 1 - cosine distance, i.e. the cosine similarity.
    pub score: f32,
    pub image_url: String,
}

/// `verify` answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"similarity": 0.62, "distance": 0.38, "threshold": 0.3, "same_person": true}))]
pub struct VerifyResponse {
    /// Cosine similarity of the two images' most prominent faces.
    pub similarity: f32,
    /// 1 - similarity.
    pub distance: f32,
    /// The similarity threshold applied.
    pub threshold: f32,
    /// similarity >= threshold.
    pub same_person: bool,
}

/// `GET /api/face` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct FaceList {
    pub items: Vec<FaceView>,
    /// Records in all.
    pub total: usize,
    pub limit: usize,
    pub offset: usize,
}

/// `DELETE /api/face/{id}` answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"status": "deleted", "id": "3f6c1a52-9d1e-4b8e-a0a4-0d3b8f1f2c11"}))]
pub struct FaceDeleted {
    pub status: String,
    pub id: String,
}

/// Form: one image.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ImageForm {
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
}

/// Form: a display name and one image.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct RegisterForm {
    /// 1 to 128 characters, no control characters.
    #[serde(rename = "displayName")]
    #[schema(example = "Alice Martin")]
    display_name: String,
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
}

/// Form: the query image and the search's bounds.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct SearchForm {
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    /// Most results returned (1 to 100; default 5).
    #[serde(rename = "topK")]
    #[schema(example = 5)]
    top_k: Option<u32>,
    /// Largest cosine distance (1 - similarity) returned, between 0 and 2 (default 0.35).
    #[schema(example = 0.35)]
    threshold: Option<f32>,
}

/// Form: two images and an optional similarity threshold.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct VerifyForm {
    #[schema(value_type = String, format = Binary)]
    image1: Vec<u8>,
    #[schema(value_type = String, format = Binary)]
    image2: Vec<u8>,
    /// Cosine similarity at or above which the faces are the same person (default SIM_THRESHOLD).
    threshold: Option<f32>,
}

/// `GET /api/face` query.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    /// 1 to 1000 (default 50).
    pub limit: Option<usize>,
    /// Records to skip (default 0).
    pub offset: Option<usize>,
}

/// Multipart parts by name (the last one wins).
async fn form_parts(form: Form) -> Result<HashMap<String, Part>, ApiError> {
    Ok(form.parts().await?.into_iter().map(|p| (p.name.clone(), p)).collect())
}

fn required<'a>(parts: &'a HashMap<String, Part>, name: &str) -> Result<&'a Bytes, ApiError> {
    parts.get(name).map(|p| &p.bytes).ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, format!("the form has no `{name}` field")))
}

fn text(parts: &HashMap<String, Part>, name: &str) -> Result<Option<String>, ApiError> {
    parts
        .get(name)
        .map(|p| String::from_utf8(p.bytes.to_vec()))
        .transpose()
        .map_err(|_| ApiError::new(ErrorCode::InvalidRequest, format!("`{name}` is not UTF-8 text")))
}

fn number<T: std::str::FromStr>(parts: &HashMap<String, Part>, name: &str) -> Result<Option<T>, ApiError> {
    // A number may come with white space around it (form fields typed by hand); names never do.
    match text(parts, name)?.map(|s| s.trim().to_owned()) {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => {
            s.parse().map(Some).map_err(|_| ApiError::new(ErrorCode::InvalidRequest, format!("`{name}` must be a number, got '{s}'")))
        }
    }
}

fn face_out(f: Face) -> FaceOut {
    FaceOut { bbox: f.bbox, landmarks: f.kps, det_score: f.detected_score(), embedding: f.embedding, found_by: f.found_by }
}

/// Embed an image.
///
/// The most prominent face's embedding, and every face with its box, landmarks, score and embedding.
#[utoipa::path(
    post,
    path = "/api/face/encode",
    tag = "faces",
    request_body(content = ImageForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Faces found", body = EncodeResponse),
        (status = 400, description = "No `image`, or not an image (`invalid_request`, `invalid_image`)", body = ErrorBody),
        (status = 401, description = "Credentials missing or wrong (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "Authentication is off and the request comes from a page of another site: its `Origin` is not this host (`cross_origin`)", body = ErrorBody),
        (status = 413, description = "Too large (`payload_too_large`, `image_too_large`)", body = ErrorBody),
        (status = 422, description = "No face (`no_face_detected`)", body = ErrorBody),
        (status = 429, description = "Inference queue full (`overloaded`)", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn encode(State(st): State<Arc<AppState>>, form: Form) -> Result<Json<EncodeResponse>, ApiError> {
    let parts = form_parts(form).await?;
    let (faces, _) = st.service.faces_of(required(&parts, "image")?.to_vec(), "the image").await?;
    let faces: Vec<FaceOut> = faces.into_iter().map(face_out).collect();
    Ok(Json(EncodeResponse { embedding: faces[0].embedding.clone(), faces, model_id: st.service.model_id().to_owned() }))
}

/// Register a face.
///
/// Stores a record for the image's most prominent face: its vector, the display name, and
/// the image itself (served at `image_url`). Answers the record, without the vector.
#[utoipa::path(
    post,
    path = "/api/face/register",
    tag = "faces",
    request_body(content = RegisterForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Registered", body = FaceView),
        (status = 400, description = "Missing or bad field, or not an image (`invalid_request`, `invalid_username`, `invalid_image`)", body = ErrorBody),
        (status = 401, description = "Credentials missing or wrong (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "Authentication is off and the request comes from a page of another site: its `Origin` is not this host (`cross_origin`)", body = ErrorBody),
        (status = 413, description = "Too large (`payload_too_large`, `image_too_large`)", body = ErrorBody),
        (status = 422, description = "No face (`no_face_detected`)", body = ErrorBody),
        (status = 429, description = "Inference queue full (`overloaded`)", body = ErrorBody),
        (status = 503, description = "Database or image store (IMAGE_STORE) unavailable; nothing stored (`store_unavailable`)", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn register(State(st): State<Arc<AppState>>, form: Form) -> Result<(StatusCode, Json<FaceView>), ApiError> {
    let parts = form_parts(form).await?;
    let display_name =
        text(&parts, "displayName")?.ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, "the form has no `displayName` field"))?;
    super::extract::validate_name("displayName", &display_name, &st.limits)?;
    let record = st.service.register(display_name, required(&parts, "image")?.to_vec()).await?;
    Ok((StatusCode::CREATED, Json(FaceView::from(&record))))
}

/// Search registered faces.
///
/// The records whose cosine distance to the query's most prominent face is below
/// `threshold`, closest first, at most `topK`. No match is an empty list.
#[utoipa::path(
    post,
    path = "/api/face/search",
    tag = "faces",
    request_body(content = SearchForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Matches, closest first (possibly none)", body = [SearchHit],
            headers(("x-queue-time" = String, description = "ms waiting for inference"), ("x-inference-time" = String, description = "ms of decode + detect + align + embed"), ("x-search-time" = String, description = "ms of the gallery search"))),
        (status = 400, description = "Missing or bad field, or not an image (`invalid_request`, `invalid_image`)", body = ErrorBody),
        (status = 401, description = "Credentials missing or wrong (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "Authentication is off and the request comes from a page of another site: its `Origin` is not this host (`cross_origin`)", body = ErrorBody),
        (status = 413, description = "Too large (`payload_too_large`, `image_too_large`)", body = ErrorBody),
        (status = 422, description = "No face in the query (`no_face_detected`)", body = ErrorBody),
        (status = 429, description = "Inference queue full (`overloaded`)", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn search(State(st): State<Arc<AppState>>, form: Form) -> Result<(HeaderMap, Json<Vec<SearchHit>>), ApiError> {
    let parts = form_parts(form).await?;
    let top_k: u32 = number(&parts, "topK")?.unwrap_or(5);
    let threshold: f32 = number(&parts, "threshold")?.unwrap_or(0.35);
    if !(1..=100).contains(&top_k) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`topK` must be between 1 and 100"));
    }
    if !(0.0..=2.0).contains(&threshold) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`threshold` is a cosine distance between 0 and 2"));
    }
    let found = st.service.search(required(&parts, "image")?.to_vec(), top_k as usize, threshold).await?;
    // x-queue-time and x-inference-time are written by the timing middleware.
    Ok((super::timing::search_headers(found.search_time), Json(found.hits.into_iter().map(SearchHit::from).collect())))
}

/// A registered face.
#[utoipa::path(
    get,
    path = "/api/face/{id}",
    tag = "faces",
    params(("id" = String, Path, description = "Record id")),
    responses(
        (status = 200, description = "The record", body = FaceView),
        (status = 401, description = "Credentials missing or wrong (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such record (`face_not_found`)", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn get_face(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<FaceView>, ApiError> {
    Ok(Json(FaceView::from(&st.service.face(&id).await?)))
}

/// A registered face's image.
#[utoipa::path(
    get,
    path = "/api/face/{id}/image",
    tag = "faces",
    params(("id" = String, Path, description = "Record id")),
    responses(
        (status = 200, description = "The image as registered", content_type = "image/*", body = Vec<u8>),
        (status = 307, description = "With IMAGE_PRESIGN: the image is in the bucket, at the presigned URL of `Location` (valid for IMAGE_PRESIGN)"),
        (status = 401, description = "Credentials missing or wrong (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such record (`face_not_found`)", body = ErrorBody),
        (status = 503, description = "Database or image store (IMAGE_STORE) unavailable (`store_unavailable`)", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn get_face_image(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let no_store = (header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    match st.service.face_image(&id).await? {
        FaceImage::Bytes(image) => {
            let ct = HeaderValue::from_str(&image.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
            Ok(([(header::CONTENT_TYPE, ct), no_store], image.bytes).into_response())
        }
        FaceImage::Presigned(url) => {
            let location = HeaderValue::from_str(&url)
                .map_err(|_| ApiError::new(ErrorCode::Internal, "the image store signed a URL that is not a header value"))?;
            Ok((StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location), no_store]).into_response())
        }
    }
}

/// Registered faces, oldest first.
#[utoipa::path(
    get,
    path = "/api/face",
    tag = "faces",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of records", body = FaceList),
        (status = 400, description = "Bad `limit` or `offset` (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "Credentials missing or wrong (`unauthorized`)", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn list_faces(
    State(st): State<Arc<AppState>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<FaceList>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("bad query: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(50);
    let offset = q.offset.unwrap_or(0);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`limit` must be between 1 and 1000"));
    }
    let (records, total) = st.service.list_faces(limit, offset).await?;
    Ok(Json(FaceList { items: records.iter().map(FaceView::from).collect(), total, limit, offset }))
}

/// Delete a registered face: record, image and vector.
#[utoipa::path(
    delete,
    path = "/api/face/{id}",
    tag = "faces",
    params(("id" = String, Path, description = "Record id")),
    responses(
        (status = 200, description = "Deleted", body = FaceDeleted),
        (status = 401, description = "Credentials missing or wrong (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such record (`face_not_found`)", body = ErrorBody),
        (status = 503, description = "Database unavailable; nothing changed (`store_unavailable`)", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn delete_face(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<FaceDeleted>, ApiError> {
    st.service.delete_face(&id).await?;
    Ok(Json(FaceDeleted { status: "deleted".into(), id }))
}

/// Are two photos of the same person?
///
/// Cosine similarity of the two images' most prominent faces, and the decision at `threshold`.
#[utoipa::path(
    post,
    path = "/api/face/verify",
    tag = "faces",
    request_body(content = VerifyForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Similarity and decision", body = VerifyResponse),
        (status = 400, description = "Missing or bad field, or not an image (`invalid_request`, `invalid_image`)", body = ErrorBody),
        (status = 401, description = "Credentials missing or wrong (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "Authentication is off and the request comes from a page of another site: its `Origin` is not this host (`cross_origin`)", body = ErrorBody),
        (status = 413, description = "Too large (`payload_too_large`, `image_too_large`)", body = ErrorBody),
        (status = 422, description = "No face in one of the images (`no_face_detected`)", body = ErrorBody),
        (status = 429, description = "Inference queue full (`overloaded`)", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn verify(State(st): State<Arc<AppState>>, form: Form) -> Result<Json<VerifyResponse>, ApiError> {
    let parts = form_parts(form).await?;
    let threshold: f32 = number(&parts, "threshold")?.unwrap_or(st.service.options().sim_threshold);
    if !(-1.0..=1.0).contains(&threshold) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`threshold` is a cosine similarity between -1 and 1"));
    }
    let (a, b) = (required(&parts, "image1")?, required(&parts, "image2")?);
    let similarity = st.service.verify(a.to_vec(), b.to_vec()).await?;
    Ok(Json(VerifyResponse { similarity, distance: 1.0 - similarity, threshold, same_person: similarity >= threshold }))
}

impl From<RecordMatch> for SearchHit {
    fn from(m: RecordMatch) -> Self {
        SearchHit { image_url: format!("/api/face/{}/image", m.id), id: m.id, display_name: m.display_name, score: m.score }
    }
}
