//! The original contract: `POST /recognize`, `GET /metadata`, `POST /calculate_average_embedding`.
//! Field names, statuses and the two legacy error messages are kept to the letter.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, EntryError, ErrorBody, ErrorCode};
use super::extract::{Body, Form, validate_username};
use crate::audit::{AuditRecord, Crop};
use crate::face::image::{ImageKind, sniff};
use crate::face::most_prominent;

/// One face crop to recognise (any other fields are echoed back).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct BboxEntry {
    /// Where the crop was cut from the camera frame: x1, y1, x2, y2.
    #[schema(example = json!([120, 80, 312, 272]))]
    bbox: Vec<f64>,
    /// The crop: base64 of a JPEG (PNG, WebP and BMP also work); a `data:` URL prefix is accepted.
    #[schema(example = "/9j/4AAQSkZJRgABAQAAAQABAAD...")]
    crop: String,
}

/// `/recognize` body: `bboxes` and any other fields (camera id, timestamp...), echoed back.
#[derive(Debug, ToSchema)]
#[schema(example = json!({"camera": "gate-2", "timestamp": "2026-11-22T08:00:00Z", "bboxes": [{"bbox": [120, 80, 312, 272], "crop": "/9j/4AAQSkZJRgABAQAAAQABAAD..."}]}))]
#[allow(dead_code)]
pub struct RecognizeRequest {
    bboxes: Vec<BboxEntry>,
}

/// One entry of the answer: the request's entry with `name` and `similarity` added.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct RecognizedEntry {
    bbox: Vec<f64>,
    crop: String,
    /// The enrolled user, when the best similarity reaches SIM_THRESHOLD; else `Unknown <n>`,
    /// n counting this request's unknown entries from 1.
    #[schema(example = "alice")]
    name: String,
    /// Best cosine similarity with any enrolled user (0.0 with no users or no face).
    #[schema(example = 0.6412)]
    similarity: f64,
    /// Present only when this entry could not be read (the others are still answered).
    error: Option<EntryError>,
}

/// The request object, each entry enriched.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct RecognizeMeta {
    bboxes: Vec<RecognizedEntry>,
}

/// `/recognize` answer.
#[derive(Debug, ToSchema)]
#[schema(example = json!({"status": "recognized", "meta": {"camera": "gate-2", "bboxes": [{"bbox": [120, 80, 312, 272], "crop": "/9j/4AAQ...", "name": "alice", "similarity": 0.6412}]}}))]
#[allow(dead_code)]
pub struct RecognizeResponse {
    /// Always "recognized".
    status: String,
    meta: RecognizeMeta,
}

/// What one crop gave.
struct Outcome {
    /// Decoded crop bytes and their format, for the photo folder.
    crop: Option<(Vec<u8>, ImageKind)>,
    /// Best match (name, score) or none; or why the entry failed.
    result: Result<Option<(String, f32)>, ApiError>,
}

/// Recognise face crops.
///
/// Each entry's crop is decoded, its most prominent face found (crops cut tightly around a
/// face included) and compared with every enrolled user. The answer echoes the request with
/// `name` and `similarity` added to each entry. Each recognition is appended to the audit
/// log (one NDJSON line), its crops are saved to the photo folder, and it becomes the answer
/// of `GET /metadata`. One unreadable crop does not fail the others: its entry gets `error`.
#[utoipa::path(
    post,
    path = "/recognize",
    tag = "recognition",
    request_body = RecognizeRequest,
    responses(
        (status = 200, description = "Every entry enriched", body = RecognizeResponse),
        (status = 400, description = "The body is not a JSON object with a `bboxes` array of objects (`invalid_json`, `invalid_request`)", body = ErrorBody),
        (status = 413, description = "Body over MAX_BODY_BYTES (`payload_too_large`), or more than MAX_CROPS entries (`too_many_crops`)", body = ErrorBody),
        (status = 429, description = "Inference queue full (`overloaded`); see Retry-After", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
    )
)]
pub async fn recognize(State(st): State<Arc<AppState>>, Body(body): Body) -> Result<Json<Value>, ApiError> {
    let ParsedRecognize { mut request, crops } = parse_recognize(&body, st.limits.max_crops)?;
    let entries = request
        .get_mut("bboxes")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| ApiError::internal("a parsed /recognize body lost its `bboxes`"))?;

    // Every crop goes to the engine at once; the workers take them as they can.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, crop) in crops.into_iter().enumerate() {
        let st = Arc::clone(&st);
        tasks.spawn(super::observe::carry(crate::engine::timing::carry(async move { (i, recognize_crop(&st, crop).await) })));
    }
    let mut outcomes: Vec<Option<Outcome>> = (0..entries.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, outcome) = joined.map_err(ApiError::internal)?;
        outcomes[i] = Some(outcome);
    }
    // An overloaded engine fails the request as a whole: the client should retry it.
    if let Some(e) = outcomes.iter().flatten().find_map(|o| o.result.as_ref().err().filter(|e| e.code == ErrorCode::Overloaded)) {
        return Err(e.clone());
    }

    let mut unknown = 0;
    let mut crops = Vec::new();
    for (entry, outcome) in entries.iter_mut().zip(outcomes) {
        let Some(outcome) = outcome else { return Err(ApiError::internal("a crop task vanished")) };
        let fields: &mut Map<String, Value> = entry.as_object_mut().ok_or_else(|| ApiError::internal("entry is not an object"))?;
        let (name, similarity) = match &outcome.result {
            Ok(Some((user, score))) if *score >= st.sim_threshold => (user.clone(), *score),
            Ok(best) => {
                unknown += 1;
                (format!("Unknown {unknown}"), best.as_ref().map_or(0.0, |b| b.1))
            }
            Err(e) => {
                unknown += 1;
                fields.insert("error".into(), json!(e.entry()));
                (format!("Unknown {unknown}"), 0.0)
            }
        };
        fields.insert("name".into(), json!(name));
        fields.insert("similarity".into(), json!(round6(similarity)));
        if let Some((bytes, kind)) = outcome.crop {
            crops.push(Crop { name, bytes, ext: kind.extension() });
        }
    }

    // A disk fault in the audit trail does not fail the recognition: the writer warns and counts it.
    if let Err(e) = st.audit.record(AuditRecord { line: request.clone(), crops }).await {
        tracing::debug!(error = %e, "recognition answered without its full audit record");
    }
    if let Ok(mut m) = st.metadata.write() {
        *m = request.clone();
    }
    Ok(Json(json!({"status": "recognized", "meta": request})))
}

/// Similarity as the JSON number clients see (six decimals, like the float32 it is).
fn round6(v: f32) -> f64 {
    (f64::from(v) * 1e6).round() / 1e6
}

/// A `/recognize` body taken apart: the request object (answered back, each entry enriched)
/// and, per entry of `bboxes`, its crop's bytes or why the entry has none.
#[derive(Debug)]
pub struct ParsedRecognize {
    pub request: Value,
    pub crops: Vec<Result<Vec<u8>, ApiError>>,
}

/// Parses a `/recognize` body, without any I/O: the body must be a JSON object whose `bboxes`
/// is an array of at most `max_crops` objects. An entry whose `crop` is missing, not a string
/// or not base64 fails alone (its slot in `crops` holds the error); the others go on.
pub fn parse_recognize(body: &[u8], max_crops: usize) -> Result<ParsedRecognize, ApiError> {
    let request: Value = super::extract::parse_json(body)?;
    let entries = request
        .as_object()
        .and_then(|o| o.get("bboxes"))
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, "the body must be a JSON object with a `bboxes` array"))?;
    if entries.len() > max_crops {
        return Err(ApiError::new(
            ErrorCode::TooManyCrops,
            format!("`bboxes` has {} entries; at most {max_crops} per request (MAX_CROPS)", entries.len()),
        ));
    }
    if entries.iter().any(|e| !e.is_object()) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "every entry of `bboxes` must be an object"));
    }
    let crops = entries
        .iter()
        .map(|entry| match entry.get("crop") {
            Some(Value::String(s)) => decode_base64(s),
            Some(_) => Err(ApiError::new(ErrorCode::InvalidRequest, "`crop` must be a base64 string")),
            None => Err(ApiError::new(ErrorCode::InvalidRequest, "the entry has no `crop`")),
        })
        .collect();
    Ok(ParsedRecognize { request, crops })
}

/// Analyses and matches one entry's crop (or passes on why it has none).
async fn recognize_crop(st: &AppState, crop: Result<Vec<u8>, ApiError>) -> Outcome {
    let bytes = match crop {
        Ok(b) => b,
        Err(e) => return Outcome { crop: None, result: Err(e) },
    };
    let kind = sniff(&bytes);
    let analysis = st.engine.analyze(bytes.clone()).await;
    let crop = kind.map(|k| (bytes, k));
    let result = analysis
        .map_err(ApiError::from)
        .map(|a| most_prominent(&a.faces).and_then(|i| st.gallery.best(&a.faces[i].embedding)).map(|m| (m.name, m.score)));
    Outcome { crop, result }
}

/// Standard base64, padding optional, white space and a `data:...;base64,` prefix ignored.
pub fn decode_base64(s: &str) -> Result<Vec<u8>, ApiError> {
    let s = match s.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => s,
    };
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new().with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(compact.as_bytes())
        .map_err(|e| ApiError::new(ErrorCode::InvalidBase64, format!("`crop` is not valid base64: {e}")))?;
    if bytes.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidBase64, "`crop` is empty"));
    }
    Ok(bytes)
}

/// The last recognition.
///
/// The `meta` of the most recent `/recognize` answer; `{}` before the first.
#[utoipa::path(
    get,
    path = "/metadata",
    tag = "recognition",
    responses((status = 200, description = "The last recognition's meta, or {}", body = Object, example = json!({"camera": "gate-2", "bboxes": [{"bbox": [120, 80, 312, 272], "crop": "/9j/4AAQ...", "name": "alice", "similarity": 0.6412}]})))
)]
pub async fn metadata(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(st.metadata.read().map(|m| m.clone()).unwrap_or_else(|_| json!({})))
}

/// Enrolment form.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct EnrolForm {
    /// An existing user (see POST /users).
    #[schema(example = "alice")]
    username: String,
    /// One or more photos (JPEG, PNG, WebP, BMP); the most prominent face of each is used.
    #[schema(value_type = Vec<String>, format = Binary)]
    files: Vec<Vec<u8>>,
}

/// Enrolment answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"status": "success", "username": "alice", "embedding": [0.0123, -0.0456], "images": 3}))]
pub struct EnrolResponse {
    /// Always "success".
    pub status: String,
    pub username: String,
    /// The user's new template (512 numbers, L2-normalised).
    pub embedding: Vec<f32>,
    /// Images of this request in which a face was found.
    pub images: usize,
}

/// Enrol photos of a user.
///
/// Embeds the most prominent face of each file and folds them into the user's template: the
/// new template is the L2-normalised mean of the old one and the new embeddings, each
/// weighted by the number of images behind it. The next `/recognize` sees it.
#[utoipa::path(
    post,
    path = "/calculate_average_embedding",
    tag = "recognition",
    request_body(content = EnrolForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Template updated", body = EnrolResponse),
        (status = 400, description = "No `username` or no `files`, or a file that is not an image (`invalid_request`, `invalid_username`, `invalid_image`)", body = ErrorBody),
        (status = 404, description = "Unknown user: exactly `{\"status\": \"error\", \"message\": \"User '<username>' not found.\"}`", body = ErrorBody,
            example = json!({"status": "error", "message": "User 'alice' not found."})),
        (status = 409, description = "The user's template came from another recognizer (`model_mismatch`)", body = ErrorBody),
        (status = 413, description = "Body or image too large, or more than MAX_FILES files (`payload_too_large`, `image_too_large`, `too_many_files`)", body = ErrorBody),
        (status = 422, description = "No face in any file: exactly `{\"status\": \"error\", \"message\": \"No faces detected in any image.\"}`", body = ErrorBody,
            example = json!({"status": "error", "message": "No faces detected in any image."})),
        (status = 429, description = "Inference queue full (`overloaded`)", body = ErrorBody),
        (status = 503, description = "Database unavailable; nothing changed (`store_unavailable`)", body = ErrorBody),
    )
)]
pub async fn calculate_average_embedding(State(st): State<Arc<AppState>>, form: Form) -> Result<Json<EnrolResponse>, ApiError> {
    let mut username = None;
    let mut files = Vec::new();
    for part in form.parts().await? {
        match part.name.as_str() {
            "username" => {
                username = Some(
                    String::from_utf8(part.bytes.to_vec())
                        .map_err(|_| ApiError::new(ErrorCode::InvalidUsername, "username is not UTF-8 text"))?,
                )
            }
            "files" | "file" => {
                if files.len() == st.limits.max_files {
                    return Err(ApiError::new(
                        ErrorCode::TooManyFiles,
                        format!("more than {} files in one enrolment (MAX_FILES); send them in several", st.limits.max_files),
                    ));
                }
                files.push((part.file_name.unwrap_or_else(|| format!("file {}", files.len() + 1)), part.bytes))
            }
            _ => {}
        }
    }
    let username = username.ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, "the form has no `username` field"))?;
    validate_username(&username, &st.limits)?;
    if files.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "the form has no `files`"));
    }
    let not_found = || ApiError::legacy(ErrorCode::UserNotFound, format!("User '{username}' not found."));
    if st.store.get_user(&username).await?.is_none() {
        return Err(not_found());
    }

    let mut tasks = tokio::task::JoinSet::new();
    for (i, (name, bytes)) in files.into_iter().enumerate() {
        let engine = st.engine.clone();
        tasks.spawn(super::observe::carry(crate::engine::timing::carry(async move { (i, name, engine.analyze(bytes.to_vec()).await) })));
    }
    let mut found: Vec<(usize, Vec<f32>)> = Vec::new();
    let mut first_error: Option<(usize, ApiError)> = None;
    while let Some(joined) = tasks.join_next().await {
        let (i, name, analysis) = joined.map_err(ApiError::internal)?;
        match analysis {
            Ok(a) => {
                if let Some(f) = most_prominent(&a.faces) {
                    found.push((i, a.faces[f].embedding.clone()));
                }
            }
            Err(e) => {
                let mut e = ApiError::from(e);
                if e.code != ErrorCode::Overloaded && e.code != ErrorCode::Internal {
                    e.message = format!("{name}: {}", e.message);
                }
                if first_error.as_ref().is_none_or(|(j, _)| i < *j) {
                    first_error = Some((i, e));
                }
            }
        }
    }
    if let Some((_, e)) = first_error {
        return Err(e);
    }
    if found.is_empty() {
        return Err(ApiError::legacy(ErrorCode::NoFaceDetected, "No faces detected in any image."));
    }
    found.sort_by_key(|(i, _)| *i);
    let embeddings: Vec<Vec<f32>> = found.into_iter().map(|(_, e)| e).collect();

    let record = {
        let _w = st.writes.lock().await;
        let record = st.store.enroll(&username, &embeddings, &st.engine.info().model_id).await.map_err(|e| match e {
            crate::store::StoreError::UserNotFound(_) => not_found(),
            other => other.into(),
        })?;
        st.gallery.upsert(&record.username, &record.embedding);
        record
    };
    Ok(Json(EnrolResponse { status: "success".into(), username: record.username, embedding: record.embedding, images: embeddings.len() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_recognize_keeps_good_entries_and_bounds_the_count() {
        let body = br#"{"camera": 1, "bboxes": [{"crop": "aGVsbG8="}, {"crop": "***"}, {"crop": 5}, {"bbox": [1]}]}"#;
        let parsed = parse_recognize(body, 4).expect("parses");
        assert_eq!(parsed.request["camera"], 1);
        let codes: Vec<Option<ErrorCode>> = parsed.crops.iter().map(|c| c.as_ref().err().map(|e| e.code)).collect();
        assert_eq!(codes, [None, Some(ErrorCode::InvalidBase64), Some(ErrorCode::InvalidRequest), Some(ErrorCode::InvalidRequest)]);
        assert_eq!(parsed.crops[0].as_ref().ok(), Some(&b"hello".to_vec()));
        assert_eq!(parse_recognize(body, 3).err().map(|e| e.code), Some(ErrorCode::TooManyCrops));
        assert_eq!(parse_recognize(b"{", 3).err().map(|e| e.code), Some(ErrorCode::InvalidJson));
        assert_eq!(parse_recognize(b"[]", 3).err().map(|e| e.code), Some(ErrorCode::InvalidRequest));
    }

    #[test]
    fn base64_is_lenient_about_padding_prefix_and_white_space() {
        assert_eq!(decode_base64("aGVsbG8=").ok(), Some(b"hello".to_vec()));
        assert_eq!(decode_base64("aGVsbG8").ok(), Some(b"hello".to_vec()));
        assert_eq!(decode_base64("data:image/jpeg;base64,aGVs\nbG8=").ok(), Some(b"hello".to_vec()));
        assert_eq!(decode_base64("***").err().map(|e| e.code), Some(ErrorCode::InvalidBase64));
        assert_eq!(decode_base64("").err().map(|e| e.code), Some(ErrorCode::InvalidBase64));
    }
}
