//! The second API's use cases: single images in, vectors and matches out. Face records live in
//! the store (record and image together, or the image in the image store: IMAGE_STORE) and, for
//! search, in the face index.

use std::time::{Duration, Instant, SystemTime};

use super::Service;
use crate::error::{ApiError, ErrorCode};
use crate::face::image::ImageKind;
use crate::face::{Face, cosine, most_prominent};
use crate::gallery::RecordMatch;
use crate::store::StoreError;
use crate::store::faces::{FaceRecord, FaceRecordStore, StoredImage};
use crate::store::images::ImageObjects;

/// A registered image, as `GET /api/face/{id}/image` answers it.
#[derive(Debug)]
pub enum FaceImage {
    /// The bytes, from the database or the image store.
    Bytes(StoredImage),
    /// A presigned URL of the object in the bucket (IMAGE_PRESIGN).
    Presigned(String),
}

/// Largest image kept by register (MongoDB documents stop at 16 MiB).
pub const MAX_STORED_IMAGE: usize = 15 << 20;

/// Items of a batch registration in flight at once (the engine batches and queues them).
const BATCH_PARALLEL: usize = 4;

/// Where `/api/face/search` looks (GALLERY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchPlace {
    /// Every record's vector in this process (the face index), searched here.
    Memory,
    /// The store's own index (PostgreSQL's HNSW): this process holds no vectors.
    Database,
    /// The database from [`FaceSearchOptions::database_from`] records at start, else memory.
    Auto,
}

impl std::str::FromStr for SearchPlace {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "memory" => Ok(Self::Memory),
            "database" | "db" => Ok(Self::Database),
            "auto" => Ok(Self::Auto),
            other => Err(format!("unknown GALLERY '{other}': expected memory, database or auto")),
        }
    }
}

/// Where face search runs, and from what size the database takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaceSearchOptions {
    pub place: SearchPlace,
    /// GALLERY=auto: from this many records at start, search in the database.
    pub database_from: u64,
}

impl Default for FaceSearchOptions {
    fn default() -> Self {
        FaceSearchOptions { place: SearchPlace::Auto, database_from: 100_000 }
    }
}

/// Whether searches go to the store, decided once at start: never for a store that cannot search
/// itself (SQLite, MongoDB: GALLERY=database then warns and keeps the memory index).
pub async fn search_in_store(store: &dyn FaceRecordStore, options: FaceSearchOptions) -> Result<bool, StoreError> {
    if options.place == SearchPlace::Memory {
        return Ok(false);
    }
    let Some(count) = store.count_for_search().await? else {
        if options.place == SearchPlace::Database {
            tracing::warn!("GALLERY=database: this store cannot search itself (PostgreSQL can); searching in memory");
        }
        return Ok(false);
    };
    let in_store = options.place == SearchPlace::Database || count as u64 >= options.database_from;
    tracing::info!(records = count, in_store, "face search: {}", if in_store { "in the database" } else { "in memory" });
    Ok(in_store)
}

/// What a search found, and how long the index took.
#[derive(Debug)]
pub struct Found {
    pub hits: Vec<RecordMatch>,
    pub search_time: Duration,
}

impl Service {
    /// Every face of `image`, most prominent first (then by area and score); `no_face_detected`
    /// (naming `what`) when there is none.
    pub async fn faces_of(&self, image: Vec<u8>, what: &str) -> Result<(Vec<Face>, ImageKind), ApiError> {
        let analysis = self.engine.analyze(image).await?;
        let mut faces = analysis.faces;
        let Some(best) = most_prominent(&faces) else {
            return Err(ApiError::new(ErrorCode::NoFaceDetected, format!("no face detected in {what}")));
        };
        let first = faces.remove(best);
        faces.sort_by(|a, b| b.area().total_cmp(&a.area()).then(b.det_score.total_cmp(&a.det_score)));
        faces.insert(0, first);
        Ok((faces, analysis.kind))
    }

    /// Registers the image's most prominent face under `display_name` (checked by the caller):
    /// the record and the image are stored together, then the face is searchable.
    pub async fn register(&self, display_name: String, image: Vec<u8>) -> Result<FaceRecord, ApiError> {
        if image.len() > MAX_STORED_IMAGE {
            return Err(ApiError::new(ErrorCode::ImageTooLarge, format!("images kept by register are at most {MAX_STORED_IMAGE} bytes")));
        }
        let (faces, kind) = self.faces_of(image.clone(), "the image").await?;
        let id = uuid::Uuid::new_v4().to_string();
        let record = FaceRecord {
            image_url: format!("/api/face/{id}/image"),
            id,
            display_name,
            inserted_at: SystemTime::now(),
            face_vec: faces[0].embedding.clone(),
            model_id: self.model_id().to_owned(),
        };
        let stored = StoredImage { bytes: image, content_type: media_type(kind).into() };
        let Some(images) = &self.images else {
            // Record and image in one write of the store.
            let _w = self.writes.lock().await;
            self.faces.insert_face(&record, Some(&stored)).await?;
            self.index_new(&record);
            return Ok(record);
        };
        // The object first (outside the write lock: uploads run in parallel), then the row; a
        // row that cannot be written takes its object back.
        images.put(&record.id, &stored).await.map_err(image_store_down)?;
        let inserted = {
            let _w = self.writes.lock().await;
            let inserted = self.faces.insert_face(&record, None).await;
            if inserted.is_ok() {
                self.index_new(&record);
            }
            inserted
        };
        if let Err(e) = inserted {
            // A write that timed out may still have landed: its object stays while the row might.
            match self.faces.get_face(&record.id).await {
                Ok(None) => self.drop_image(images, &record.id, "after a failed insert").await,
                _ => {
                    tracing::warn!(id = %record.id, "face record {}: its insert failed ({e}) and may have landed; its image is kept", record.id)
                }
            }
            return Err(e.into());
        }
        Ok(record)
    }

    fn index_new(&self, record: &FaceRecord) {
        if !self.search_in_store {
            self.face_index.insert(record);
        }
    }

    /// Deletes the object of a record that is gone (or never was): a failure is logged and counted
    /// (`facerec_image_orphans_total`), the object is left behind, no row points at it.
    async fn drop_image(&self, images: &ImageObjects, id: &str, when: &str) {
        if let Err(e) = images.delete(id).await {
            crate::metrics::global().image_orphan();
            tracing::warn!(id, object = %images.key(id), "the image of face record {id} stays in the image store {when}: {e}");
        }
    }

    /// Registers each `(display name, image)` as [`Service::register`] does, a few at a time
    /// (the engine's queue bounds the rest), answering every item in order: a name already
    /// refused by the caller is that item's error. Every `Ok` item is stored before this returns;
    /// an `Err` item stored nothing.
    pub async fn register_batch(&self, items: Vec<(Result<String, ApiError>, Vec<u8>)>) -> Vec<Result<FaceRecord, ApiError>> {
        use futures_util::StreamExt;
        futures_util::stream::iter(items)
            .map(|(name, image)| async move {
                match name {
                    Ok(name) => self.register(name, image).await,
                    Err(e) => Err(e),
                }
            })
            .buffered(BATCH_PARALLEL)
            .collect()
            .await
    }

    /// The records within cosine distance `threshold` of the query's most prominent face,
    /// closest first, at most `top_k`.
    pub async fn search(&self, image: Vec<u8>, top_k: usize, threshold: f32) -> Result<Found, ApiError> {
        let (faces, _) = self.faces_of(image, "the query image").await?;
        let started = Instant::now();
        let query = &faces[0].embedding;
        let hits = match self.search_in_store {
            true => self.faces.search_in_store(query, top_k, threshold, self.model_id()).await?.unwrap_or_default(),
            false => self.face_index.search(query, top_k, threshold),
        };
        Ok(Found { hits, search_time: started.elapsed() })
    }

    /// Cosine similarity of the two images' most prominent faces.
    pub async fn verify(&self, first: Vec<u8>, second: Vec<u8>) -> Result<f32, ApiError> {
        let (a, b) = tokio::join!(self.faces_of(first, "image1"), self.faces_of(second, "image2"));
        let (a, b) = (a?.0, b?.0);
        Ok(cosine(&a[0].embedding, &b[0].embedding))
    }

    /// A record (`face_not_found` when absent).
    pub async fn face(&self, id: &str) -> Result<FaceRecord, ApiError> {
        self.faces.get_face(id).await?.ok_or_else(|| face_not_found(id))
    }

    /// A record's image (`face_not_found` when absent). With an image store, the record is
    /// looked up first (the row is the truth: an object without one is not served); an image
    /// registered before IMAGE_STORE was set is still read from the store.
    /// With IMAGE_PRESIGN, an image in the bucket is a presigned URL to it instead of its bytes.
    pub async fn face_image(&self, id: &str) -> Result<FaceImage, ApiError> {
        let Some(images) = &self.images else {
            return self.faces.get_face_image(id).await?.map(FaceImage::Bytes).ok_or_else(|| face_not_found(id));
        };
        self.face(id).await?;
        // Presigning looks the object up itself: when it is not there, the database is next.
        if images.presigns() {
            if let Some(url) = images.presigned(id).await.map_err(image_store_down)? {
                return Ok(FaceImage::Presigned(url));
            }
        } else if let Some(image) = images.get(id).await.map_err(image_store_down)? {
            return Ok(FaceImage::Bytes(image));
        }
        self.faces
            .get_face_image(id)
            .await?
            .map(FaceImage::Bytes)
            .ok_or_else(|| ApiError::new(ErrorCode::FaceNotFound, format!("face record '{id}' has no image in {}", images.describe())))
    }

    /// Records oldest first, `limit` from `offset`, and the total count.
    pub async fn list_faces(&self, limit: usize, offset: usize) -> Result<(Vec<FaceRecord>, usize), ApiError> {
        Ok(self.faces.list_faces(limit, offset).await?)
    }

    /// Record, image and vector gone (`face_not_found` when absent). With an image store, the row
    /// goes first, then the object (see [`Service::drop_image`]).
    pub async fn delete_face(&self, id: &str) -> Result<(), ApiError> {
        {
            let _w = self.writes.lock().await;
            if !self.faces.delete_face(id).await? {
                return Err(face_not_found(id));
            }
            self.face_index.remove(id);
        }
        if let Some(images) = &self.images {
            self.drop_image(images, id, "after its record was deleted").await;
        }
        Ok(())
    }
}

/// The image store failed: nothing was changed by this call (503, `store_unavailable`).
fn image_store_down(e: StoreError) -> ApiError {
    crate::metrics::global().store_failure(crate::metrics::StoreFailure::Unavailable);
    tracing::warn!(reason = %e, "image store unavailable");
    ApiError::new(ErrorCode::StoreUnavailable, "the image store is unavailable: nothing was changed; retry later")
}

fn face_not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::FaceNotFound, format!("no face record '{id}'"))
}

fn media_type(kind: ImageKind) -> &'static str {
    match kind {
        ImageKind::Jpeg => "image/jpeg",
        ImageKind::Png => "image/png",
        ImageKind::Webp => "image/webp",
        ImageKind::Bmp => "image/bmp",
    }
}
