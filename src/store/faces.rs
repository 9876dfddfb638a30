//! Face records of the second API (`/api/face/*`): one registered face each, with its
//! display name, its vector and the image it came from. Its own trait beside `FaceStore`,
//! implemented by the same stores; the schema is the other API's (`faces`: id,
//! display_name, image_url, face_vec, inserted_at) plus the recognizer's id.

use std::time::SystemTime;

use serde::Serialize;

use super::{ChangeFeed, StoreError, rfc3339};

/// A registered face.
#[derive(Debug, Clone, PartialEq)]
pub struct FaceRecord {
    /// UUID v4, as text.
    pub id: String,
    pub display_name: String,
    /// Where the image is served: `/api/face/<id>/image`.
    pub image_url: String,
    pub inserted_at: SystemTime,
    /// L2-normalised embedding of the image's most prominent face.
    pub face_vec: Vec<f32>,
    pub model_id: String,
}

/// A stored image and its media type.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredImage {
    pub bytes: Vec<u8>,
    pub content_type: String,
}

/// What the API shows of a record (no vector).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"id": "3f6c1a52-9d1e-4b8e-a0a4-0d3b8f1f2c11", "display_name": "Alice Martin", "image_url": "/api/face/3f6c1a52-9d1e-4b8e-a0a4-0d3b8f1f2c11/image", "inserted_at": "2026-11-22T08:00:00.000Z"}))]
pub struct FaceView {
    pub id: String,
    pub display_name: String,
    pub image_url: String,
    /// RFC 3339, UTC.
    pub inserted_at: String,
}

impl From<&FaceRecord> for FaceView {
    fn from(r: &FaceRecord) -> Self {
        FaceView {
            id: r.id.clone(),
            display_name: r.display_name.clone(),
            image_url: r.image_url.clone(),
            inserted_at: rfc3339(r.inserted_at),
        }
    }
}

/// Records loaded at start.
#[derive(Debug, Clone, Default)]
pub struct LoadedFaces {
    /// Records of the recognizer in use.
    pub faces: Vec<FaceRecord>,
    /// Records of another recognizer: kept, not searched.
    pub other_model: usize,
    /// Records with a malformed vector: skipped with a warning.
    pub malformed: usize,
}

/// A face record's state as another process (or this one) left it in the store, for the index.
#[derive(Debug, Clone, PartialEq)]
pub enum FaceChange {
    /// The record as stored now (records are written once, never updated).
    Upsert(FaceRecord),
    /// The record is gone.
    Remove(String),
}

/// Durable storage of face records and their images.
#[async_trait::async_trait]
pub trait FaceRecordStore: Send + Sync + 'static {
    /// Every record of `model_id` (vectors included, images not).
    async fn load_faces(&self, model_id: &str) -> Result<LoadedFaces, StoreError>;

    /// Stores a record and its image together (both or neither); `None`: the image is kept
    /// elsewhere (an image store, see `store::images`), the record alone is stored.
    async fn insert_face(&self, record: &FaceRecord, image: Option<&StoredImage>) -> Result<(), StoreError>;

    async fn get_face(&self, id: &str) -> Result<Option<FaceRecord>, StoreError>;

    /// The record's image, when it is kept in this store.
    async fn get_face_image(&self, id: &str) -> Result<Option<StoredImage>, StoreError>;

    /// Records oldest first, `limit` from `offset`, and the total count.
    async fn list_faces(&self, limit: usize, offset: usize) -> Result<(Vec<FaceRecord>, usize), StoreError>;

    /// Removes a record and its image; false if there was none.
    async fn delete_face(&self, id: &str) -> Result<bool, StoreError>;

    /// Other writers' records, for a store that several processes share; `None` (the default)
    /// for a store only this process writes (SQLite). `known` says which record ids the index
    /// holds now (what [`FaceRecordStore::load_faces`] gave, and this process's own writes
    /// since): a feed that compares the store with what it knows asks it at every compare, so
    /// that a record written here and deleted elsewhere before the feed saw it is still removed.
    async fn follow_faces(&self, known: super::Held) -> Result<Option<Box<dyn ChangeFeed<FaceChange>>>, StoreError> {
        let _ = known;
        Ok(None)
    }

    /// Searches the store itself (an index in the database): the records of `model_id` (or of
    /// no recorded recognizer) within cosine distance `threshold` of `query`, closest first, at
    /// most `top_k`. `None` (the default): this store cannot, search the in-memory index.
    async fn search_in_store(
        &self,
        query: &[f32],
        top_k: usize,
        threshold: f32,
        model_id: &str,
    ) -> Result<Option<Vec<crate::gallery::RecordMatch>>, StoreError> {
        let _ = (query, top_k, threshold, model_id);
        Ok(None)
    }

    /// How many records a search in the store would look at (to choose where to search);
    /// `None` (the default) for a store that cannot search itself.
    async fn count_for_search(&self) -> Result<Option<usize>, StoreError> {
        Ok(None)
    }
}
