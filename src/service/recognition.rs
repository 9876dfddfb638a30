//! The original contract's use cases: recognise face crops (each named after the closest user,
//! or `Unknown <n>`), record a recognition in the audit trail, and enrol users (the weighted-mean
//! template). The legacy rules of the original service ([`LegacyStatus`]) that change *what*
//! happens (which files count, when the user is looked up) are applied here; how the answer is
//! framed (HTTP 200 or a proper status) is the HTTP layer's.

use std::sync::Arc;

use serde::Serialize;
use tracing::Instrument;
use utoipa::ToSchema;

use super::Service;
use crate::audit::{AuditRecord, Crop};
use crate::error::{ApiError, ErrorCode};
use crate::face::image::{ImageKind, sniff};
use crate::face::most_confident;
use crate::store::{StoreError, UserRecord};

/// How the original contract's endpoints answer what the original answered with HTTP 200
/// (LEGACY_STATUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LegacyStatus {
    /// As the original service (FastAPI returning its dicts): `User '<u>' not found.` and `No faces
    /// detected in any image.` with HTTP 200; an unreadable file of an enrolment skipped (named in
    /// `skipped`); a `/recognize` body without `bboxes` answered with `bboxes: []`.
    #[default]
    Original,
    /// Proper statuses: 404 for an unknown user, 422 when no file has a face, 400 for an
    /// unreadable file or a `/recognize` body without `bboxes`. Same bodies.
    Http,
}

/// What one crop of a recognition gave.
#[derive(Debug)]
pub struct CropVerdict {
    /// The user, when the best similarity reaches SIM_THRESHOLD; else `Unknown <n>`, n counting
    /// the request's unknown entries from 1.
    pub name: String,
    /// Best cosine similarity with any user (0 with no users, no face or an error).
    pub similarity: f32,
    /// Why this crop could not be read (the others are still answered).
    pub error: Option<ApiError>,
    /// The decoded crop's bytes and format, for the photo folder (none when it is not an image).
    pub crop: Option<(Vec<u8>, ImageKind)>,
}

/// A file of an enrolment that did not count.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"file": "notes.txt", "code": "invalid_image", "message": "invalid image: not a supported image: expected JPEG, PNG, WebP or BMP"}))]
pub struct SkippedFile {
    /// The file name the form gave (`file <n>` when it gave none).
    pub file: String,
    /// `invalid_image`, `image_too_large` or `no_face_detected`.
    pub code: ErrorCode,
    pub message: String,
}

/// An enrolment done.
#[derive(Debug)]
pub struct Enrolled {
    /// The user's record with its new template.
    pub record: UserRecord,
    /// Images of this enrolment in which a face was found.
    pub images: usize,
    /// Files that did not count, in the order sent.
    pub skipped: Vec<SkippedFile>,
}

/// Crops of one request in the engine's queue at once: half the queue, at most 64 (four batches
/// of the default BATCH_SIZE, enough to keep every worker's batches full).
fn crops_in_flight(queue_capacity: usize) -> usize {
    (queue_capacity / 2).clamp(1, 64)
}

/// Runs `f` as a task of its own that keeps the caller's span and engine timing sink.
fn spawn_carried<T: Send + 'static>(tasks: &mut tokio::task::JoinSet<T>, f: impl std::future::Future<Output = T> + Send + 'static) {
    tasks.spawn(crate::engine::timing::carry(f).instrument(tracing::Span::current()));
}

impl Service {
    /// Recognises each crop (or passes on why it has none): its faces are found (tight crops
    /// included), the one the detector is surest of (insightface's first, as the original took)
    /// is compared with every user. An overloaded engine fails the whole request (the client
    /// should retry it): the crops not yet computed are withdrawn.
    ///
    /// The crops go to the engine a window at a time, so that a crowd frame (more crops than the
    /// queue holds) is answered instead of refused and leaves room for other requests.
    pub async fn recognize_crops(self: &Arc<Self>, crops: Vec<Result<Vec<u8>, ApiError>>) -> Result<Vec<CropVerdict>, ApiError> {
        let window = Arc::new(tokio::sync::Semaphore::new(crops_in_flight(self.engine.stats().queue_capacity)));
        let mut tasks = tokio::task::JoinSet::new();
        let n = crops.len();
        for (i, crop) in crops.into_iter().enumerate() {
            let service = Arc::clone(self);
            let window = Arc::clone(&window);
            spawn_carried(&mut tasks, async move {
                let _slot = window.acquire_owned().await;
                (i, service.best_match(crop).await)
            });
        }
        let mut outcomes: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            let (i, outcome) = joined.map_err(ApiError::internal)?;
            // A full queue or a stuck engine: the whole request is refused (it may be retried).
            if let Err(e) = &outcome.result
                && matches!(e.code, ErrorCode::Overloaded | ErrorCode::InferenceTimeout)
            {
                tasks.abort_all();
                return Err(e.clone());
            }
            outcomes[i] = Some(outcome);
        }
        let threshold = self.options.sim_threshold;
        let mut unknown = 0;
        let mut unknown_name = || {
            unknown += 1;
            format!("Unknown {unknown}")
        };
        let mut verdicts = Vec::with_capacity(n);
        for outcome in outcomes {
            let Some(Outcome { crop, result }) = outcome else { return Err(ApiError::internal("a crop task vanished")) };
            verdicts.push(match result {
                Ok(Some((user, score))) if score >= threshold => CropVerdict { name: user, similarity: score, error: None, crop },
                Ok(best) => CropVerdict { name: unknown_name(), similarity: best.map_or(0.0, |b| b.1), error: None, crop },
                Err(e) => CropVerdict { name: unknown_name(), similarity: 0.0, error: Some(e), crop },
            });
        }
        Ok(verdicts)
    }

    /// Analyses one crop and finds its best match (or passes on why it has none).
    async fn best_match(&self, crop: Result<Vec<u8>, ApiError>) -> Outcome {
        let bytes = match crop {
            Ok(b) => b,
            Err(e) => return Outcome { crop: None, result: Err(e) },
        };
        let kind = sniff(&bytes);
        let analysis = self.engine.analyze(bytes.clone()).await;
        let crop = kind.map(|k| (bytes, k));
        let result = analysis
            .map_err(ApiError::from)
            .map(|a| most_confident(&a.faces).and_then(|i| self.gallery.best(&a.faces[i].embedding)).map(|m| (m.name, m.score)));
        Outcome { crop, result }
    }

    /// Appends one answered recognition to the audit trail: `line` (the answer's `meta`) and each
    /// verdict's crop under its name. A disk fault does not fail the recognition: the writer
    /// warns and counts it.
    ///
    /// An entry whose crop is not an image keeps its place in the line but not its bytes (`crop`
    /// null, `crop_omitted` saying why and how long it was): a client cannot fill the disk with
    /// what no one can look at.
    pub async fn record_recognition(&self, mut line: serde_json::Value, verdicts: Vec<CropVerdict>) {
        if let Some(entries) = line.get_mut("bboxes").and_then(serde_json::Value::as_array_mut) {
            for (entry, v) in entries.iter_mut().zip(&verdicts) {
                let Some(fields) = entry.as_object_mut() else { continue };
                if v.crop.is_none()
                    && let Some(len) = fields.get("crop").and_then(serde_json::Value::as_str).map(str::len)
                {
                    let code = v.error.as_ref().map_or("invalid_image", |e| e.code.as_str());
                    fields.insert("crop".into(), serde_json::Value::Null);
                    fields.insert("crop_omitted".into(), serde_json::json!(format!("{code}: {len} characters, not an image")));
                }
            }
        }
        let crops = verdicts
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| {
                v.crop.map(|(bytes, kind)| Crop { name: v.name, bytes, ext: kind.extension(), at: Some(format!("/bboxes/{i}/crop")) })
            })
            .collect();
        if let Err(e) = self.audit.record(AuditRecord { line, crops }).await {
            tracing::debug!(error = %e, "recognition answered without its full audit record");
        }
    }

    /// Enrols `files` (name, bytes) into `username`'s template: the face of each file the detector
    /// is surest of, folded into the weighted mean. The original's two errors come back as
    /// legacy errors (`user_not_found`, `no_face_detected`); under [`LegacyStatus::Original`] an
    /// unreadable file is skipped and the user is looked up after the files (as the original
    /// did); under [`LegacyStatus::Http`] the user is looked up first and an unreadable file
    /// fails the enrolment. Nothing is written unless the answer is `Ok`.
    pub async fn enrol(&self, username: &str, files: Vec<(String, Vec<u8>)>, mode: LegacyStatus) -> Result<Enrolled, ApiError> {
        let not_found = || ApiError::legacy(ErrorCode::UserNotFound, format!("User '{username}' not found."));
        if mode == LegacyStatus::Http && self.store.get_user(username).await?.is_none() {
            return Err(not_found());
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (name, bytes)) in files.into_iter().enumerate() {
            let engine = self.engine.clone();
            spawn_carried(&mut tasks, async move { (i, name, engine.analyze(bytes).await) });
        }
        let mut found: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut skipped: Vec<(usize, SkippedFile)> = Vec::new();
        let mut first_error: Option<(usize, ApiError)> = None;
        while let Some(joined) = tasks.join_next().await {
            let (i, name, analysis) = joined.map_err(ApiError::internal)?;
            match analysis {
                Ok(a) => match most_confident(&a.faces) {
                    Some(f) => found.push((i, a.faces[f].embedding.clone())),
                    None => skipped.push((
                        i,
                        SkippedFile { file: name, code: ErrorCode::NoFaceDetected, message: "no face detected in this image".into() },
                    )),
                },
                Err(e) => {
                    let mut e = ApiError::from(e);
                    let unreadable = matches!(e.code, ErrorCode::InvalidImage | ErrorCode::ImageTooLarge);
                    if unreadable && mode == LegacyStatus::Original {
                        skipped.push((i, SkippedFile { file: name, code: e.code, message: e.message }));
                        continue;
                    }
                    if !matches!(e.code, ErrorCode::Overloaded | ErrorCode::InferenceTimeout | ErrorCode::Internal) {
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
        if mode == LegacyStatus::Original && self.store.get_user(username).await?.is_none() {
            return Err(not_found());
        }
        found.sort_by_key(|(i, _)| *i);
        skipped.sort_by_key(|(i, _)| *i);
        let embeddings: Vec<Vec<f32>> = found.into_iter().map(|(_, e)| e).collect();
        let written = {
            let _w = self.writes.lock().await;
            let written = self.store.enroll(username, &embeddings, self.model_id()).await;
            if let Ok(record) = &written {
                self.gallery.upsert(&record.username, &record.embedding);
            }
            written
        };
        match written {
            Ok(record) => Ok(Enrolled { record, images: embeddings.len(), skipped: skipped.into_iter().map(|(_, s)| s).collect() }),
            // Deleted meanwhile.
            Err(StoreError::UserNotFound(_)) => Err(not_found()),
            Err(other) => Err(other.into()),
        }
    }
}

/// What one crop gave, before naming.
struct Outcome {
    crop: Option<(Vec<u8>, ImageKind)>,
    /// Best match (name, score) or none; or why the entry failed.
    result: Result<Option<(String, f32)>, ApiError>,
}

/// `Unknown`, then any separators (white space of any kind, `_`, `-`, `.`), then digits or nothing,
/// compared without case.
pub fn looks_like_unknown(name: &str) -> bool {
    let lower = name.trim().to_lowercase();
    let Some(rest) = lower.strip_prefix("unknown") else { return false };
    let rest = rest.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '_' | '-' | '.' | '#' | '\u{200c}' | '\u{200d}'));
    rest.chars().all(|c| c.is_numeric())
}
