//! The original contract: `POST /recognize`, `GET /metadata`, `POST /calculate_average_embedding`.
//! Field names, statuses and the two legacy error messages are kept to the letter, and by default
//! ([`LegacyStatus::Original`]) answered as the original service answered them: its two errors with
//! HTTP 200, unreadable enrolment files skipped, a body without `bboxes` answered like any other.
//! LEGACY_STATUS=http switches these endpoints to proper statuses (404, 422, 400).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, EntryError, ErrorBody, ErrorCode};
use super::extract::{Form, JsonBody, validate_username};
pub use crate::service::{LegacyStatus, SkippedFile};

/// One of the original's two errors (`{"status": "error", "message": ...}`, no `code`): with HTTP
/// 200 under [`LegacyStatus::Original`], with its proper status under [`LegacyStatus::Http`]. The
/// code still reaches the metrics (errors by code) either way. Any other error passes as it is.
fn legacy_answer(mode: LegacyStatus, error: ApiError) -> Result<Response, ApiError> {
    match mode {
        LegacyStatus::Original if error.legacy => {
            let mut resp = error.into_response();
            *resp.status_mut() = StatusCode::OK;
            Ok(resp)
        }
        _ => Err(error),
    }
}

/// Keys of an entry that are the service's to write: whatever the client sent under them is
/// removed before the entry is answered, logged or kept for /metadata.
const RESERVED_ENTRY_KEYS: [&str; 3] = ["name", "similarity", "error"];

/// One face crop to recognise (any other fields are echoed back exactly as sent; `name`,
/// `similarity` and `error` are the service's and replaced).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct BboxEntry {
    /// Where the crop was cut from the camera frame: x1, y1, x2, y2 (echoed as sent; null when absent).
    #[schema(example = json!([120, 80, 312, 272]))]
    bbox: Option<Vec<f64>>,
    /// The crop: base64 of a JPEG (PNG, WebP and BMP also work); a `data:` URL prefix is accepted.
    #[schema(example = "/9j/4AAQSkZJRgABAQAAAQABAAD...")]
    crop: String,
}

/// `/recognize` body: `bboxes` and any other fields (camera id, timestamp...), echoed back exactly
/// as sent (numbers of any size or precision included), except a top-level `status`, which is the
/// answer's own and is dropped. Without `bboxes` (LEGACY_STATUS=original) the answer has `bboxes: []`.
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
    /// As sent; null when the entry had none (as the original answered).
    bbox: Option<Vec<f64>>,
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

/// Recognise face crops.
///
/// Each entry's crop is decoded, its faces found (crops cut tightly around a face included) and
/// the one the detector is surest of (insightface's first, as the original took) compared with
/// every enrolled user. The answer echoes the request with
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
        (status = 400, description = "The body is not a JSON object, `bboxes` is not an array of objects, or (LEGACY_STATUS=http only) there is no `bboxes` (`invalid_json`, `invalid_request`)", body = ErrorBody),
        (status = 413, description = "Body over MAX_BODY_BYTES (`payload_too_large`), or more than MAX_CROPS entries (`too_many_crops`)", body = ErrorBody),
        (status = 415, description = "The body is not labelled `Content-Type: application/json` (`unsupported_media_type`)", body = ErrorBody),
        (status = 429, description = "Inference queue full (`overloaded`); see Retry-After", body = ErrorBody),
        (status = 500, description = "Internal error (`internal`)", body = ErrorBody),
    )
)]
pub async fn recognize(State(st): State<Arc<AppState>>, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    let ParsedRecognize { mut request, crops } = parse_recognize_as(&body, st.limits.max_crops, st.legacy_status)?;
    let entries = request
        .get_mut("bboxes")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| ApiError::internal("a parsed /recognize body lost its `bboxes`"))?;
    let verdicts = st.service.recognize_crops(crops).await?;
    for (entry, verdict) in entries.iter_mut().zip(&verdicts) {
        let fields: &mut Map<String, Value> = entry.as_object_mut().ok_or_else(|| ApiError::internal("entry is not an object"))?;
        if let Some(e) = &verdict.error {
            fields.insert("error".into(), json!(e.entry()));
        }
        fields.insert("name".into(), json!(verdict.name));
        fields.insert("similarity".into(), json!(round6(verdict.similarity)));
    }
    st.service.record_recognition(request.clone(), verdicts).await;
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

/// [`parse_recognize_as`] as the original contract answers by default ([`LegacyStatus::Original`]).
pub fn parse_recognize(body: &[u8], max_crops: usize) -> Result<ParsedRecognize, ApiError> {
    parse_recognize_as(body, max_crops, LegacyStatus::Original)
}

/// Parses a `/recognize` body, without any I/O: the body must be a JSON object whose `bboxes`
/// is an array of at most `max_crops` objects. Without `bboxes` (or with `bboxes: null`) the
/// original answered with `bboxes: []`; so does [`LegacyStatus::Original`], while
/// [`LegacyStatus::Http`] refuses the body. An entry whose `crop` is missing, not a string or
/// not base64 fails alone (its slot in `crops` holds the error); the others go on.
///
/// What the service writes is cleared here: a top-level `status` and each entry's `name`,
/// `similarity` and `error` are removed (the handler writes its own), and an entry without
/// `bbox` gets `bbox: null`, as the original answered. Everything else stays as sent: numbers
/// keep their digits (serde_json's `arbitrary_precision`; only an exponent is written in one
/// form, `3E2` as `3e+2`), strings their text, keys their order.
pub fn parse_recognize_as(body: &[u8], max_crops: usize, mode: LegacyStatus) -> Result<ParsedRecognize, ApiError> {
    let mut request: Value = super::extract::parse_json(body)?;
    let shape = || ApiError::new(ErrorCode::InvalidRequest, "the body must be a JSON object with a `bboxes` array");
    let object = request.as_object_mut().ok_or_else(shape)?;
    object.shift_remove("status");
    match object.get("bboxes") {
        None | Some(Value::Null) if mode == LegacyStatus::Original => {
            object.insert("bboxes".into(), Value::Array(Vec::new()));
        }
        _ => {}
    }
    let entries = object.get_mut("bboxes").and_then(Value::as_array_mut).ok_or_else(shape)?;
    if entries.len() > max_crops {
        return Err(ApiError::new(
            ErrorCode::TooManyCrops,
            format!("`bboxes` has {} entries; at most {max_crops} per request (MAX_CROPS)", entries.len()),
        ));
    }
    let mut crops = Vec::with_capacity(entries.len());
    for entry in entries.iter_mut() {
        let Some(fields) = entry.as_object_mut() else {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "every entry of `bboxes` must be an object"));
        };
        for key in RESERVED_ENTRY_KEYS {
            fields.shift_remove(key);
        }
        if !fields.contains_key("bbox") {
            fields.insert("bbox".into(), Value::Null);
        }
        crops.push(match fields.get("crop") {
            Some(Value::String(s)) => decode_base64(s),
            Some(_) => Err(ApiError::new(ErrorCode::InvalidRequest, "`crop` must be a base64 string")),
            None => Err(ApiError::new(ErrorCode::InvalidRequest, "the entry has no `crop`")),
        });
    }
    Ok(ParsedRecognize { request, crops })
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
    /// Files of this request that gave no face, and why: unreadable (LEGACY_STATUS=original
    /// skips them, as the original did), or an image without a face. Absent when every file counted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedFile>,
}

/// Enrol photos of a user.
///
/// Embeds the face of each file the detector is surest of (insightface's first, as the original
/// took) and folds them into the user's template: the new template is the L2-normalised mean of
/// the old one and the new embeddings, each weighted by the number of images behind it. The next
/// `/recognize` sees it.
///
/// With LEGACY_STATUS=original (the default) the answers are the original service's: an unknown
/// user and "no face in any file" are its two error bodies with HTTP 200, and an unreadable file is
/// skipped (named in `skipped`) instead of failing the enrolment. LEGACY_STATUS=http answers them
/// 404, 422 and 400.
#[utoipa::path(
    post,
    path = "/calculate_average_embedding",
    tag = "recognition",
    request_body(content = EnrolForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Template updated (`status` \"success\"); or, with LEGACY_STATUS=original, one of the original's two errors: exactly `{\"status\": \"error\", \"message\": \"User '<username>' not found.\"}` or `{\"status\": \"error\", \"message\": \"No faces detected in any image.\"}`", body = EnrolResponse),
        (status = 400, description = "No `username` or no `files` (`invalid_request`, `invalid_username`); with LEGACY_STATUS=http also a file that is not an image (`invalid_image`)", body = ErrorBody),
        (status = 403, description = "Authentication is off and the request comes from a page of another site: its `Origin` is not this host (`cross_origin`)", body = ErrorBody),
        (status = 404, description = "LEGACY_STATUS=http: unknown user, exactly `{\"status\": \"error\", \"message\": \"User '<username>' not found.\"}`", body = ErrorBody,
            example = json!({"status": "error", "message": "User 'alice' not found."})),
        (status = 409, description = "The user's template came from another recognizer (`model_mismatch`)", body = ErrorBody),
        (status = 413, description = "Body too large or more than MAX_FILES files (`payload_too_large`, `too_many_files`); with LEGACY_STATUS=http also an image over the pixel limits (`image_too_large`)", body = ErrorBody),
        (status = 422, description = "LEGACY_STATUS=http: no face in any file, exactly `{\"status\": \"error\", \"message\": \"No faces detected in any image.\"}`", body = ErrorBody,
            example = json!({"status": "error", "message": "No faces detected in any image."})),
        (status = 429, description = "Inference queue full (`overloaded`)", body = ErrorBody),
        (status = 503, description = "Database unavailable; nothing changed (`store_unavailable`)", body = ErrorBody),
    )
)]
pub async fn calculate_average_embedding(State(st): State<Arc<AppState>>, form: Form) -> Result<Response, ApiError> {
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
                files.push((part.file_name.unwrap_or_else(|| format!("file {}", files.len() + 1)), part.bytes.to_vec()))
            }
            _ => {}
        }
    }
    let username = username.ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, "the form has no `username` field"))?;
    validate_username(&username, &st.limits)?;
    if files.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "the form has no `files`"));
    }
    match st.service.enrol(&username, files, st.legacy_status).await {
        Ok(done) => Ok(Json(EnrolResponse {
            status: "success".into(),
            username: done.record.username,
            embedding: done.record.embedding,
            images: done.images,
            skipped: done.skipped,
        })
        .into_response()),
        Err(e) => legacy_answer(st.legacy_status, e),
    }
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
    fn a_body_without_bboxes_is_answered_unless_statuses_are_proper() {
        for body in [&br#"{"camera": 3}"#[..], br#"{"camera": 3, "bboxes": null}"#, br#"{"camera": 3, "bboxes": []}"#] {
            let parsed = parse_recognize(body, 4).expect("the original answered it");
            assert_eq!(parsed.request, json!({"camera": 3, "bboxes": []}));
            assert!(parsed.crops.is_empty());
        }
        let e = parse_recognize_as(br#"{"camera": 3}"#, 4, LegacyStatus::Http).err().map(|e| e.code);
        assert_eq!(e, Some(ErrorCode::InvalidRequest));
        assert!(parse_recognize_as(br#"{"bboxes": []}"#, 4, LegacyStatus::Http).is_ok());
    }

    #[test]
    fn reserved_keys_are_cleared_and_everything_else_kept_as_sent() {
        let body = br#"{"status": "forged", "big": 18446744073709551616, "x": 1.10, "bboxes": [{"crop": "aGVsbG8=", "name": "alice", "similarity": 0.99, "error": "mine", "track": 123456789012345678901234567890, "z": 1e400}]}"#;
        let parsed = parse_recognize(body, 4).expect("parses");
        let text = serde_json::to_string(&parsed.request).expect("serialises");
        assert_eq!(
            text,
            r#"{"big":18446744073709551616,"x":1.10,"bboxes":[{"crop":"aGVsbG8=","track":123456789012345678901234567890,"z":1e+400,"bbox":null}]}"#
        );
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
