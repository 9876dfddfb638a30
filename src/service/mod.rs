//! The service layer: every use case of both APIs, over the engine (inference), the two
//! in-memory indexes (users' templates, face records), the store (the durable truth) and the
//! audit trail. The HTTP layer parses and authorises, calls one method here and maps the answer
//! to HTTP; nothing here knows HTTP.
//!
//! Writes follow one protocol, written once: take the write lock, write the store, then the
//! index ([`Service::writes`]). The indexes therefore apply writes in the store's order, and the
//! followers of other replicas' writes ([`follow`]) take the same lock to read and apply.
//!
//! - `recognition`: the original contract (recognise crops, record them, enrol users).
//! - `faces`: the second API (encode, register, search, verify, get, list, delete).
//! - `users`: users CRUD.
//! - `follow`: other replicas' writes, into both indexes.
//! - `load`: the indexes built from the store at start.

pub mod faces;
pub mod follow;
pub mod load;
pub mod recognition;
pub mod stream;
mod users;

use std::sync::Arc;

use crate::audit::AuditHandle;
use crate::engine::Engine;
use crate::gallery::{FaceIndex, Gallery, SearchOptions};
use crate::store::faces::FaceRecordStore;
use crate::store::images::ImageObjects;
use crate::store::{FaceStore, StoreError, StoreKind};

pub use recognition::{CropVerdict, Enrolled, LegacyStatus, SkippedFile, looks_like_unknown};

/// What the service decides with, besides its parts.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Cosine similarity at or above which a crop is named after a user (SIM_THRESHOLD), and the
    /// default of `/api/face/verify`.
    pub sim_threshold: f32,
    /// The model pack's name, as reported.
    pub model_pack: String,
    /// How both indexes search (GALLERY_SEARCH).
    pub search: SearchOptions,
    /// Where `/api/face/search` looks (GALLERY, GALLERY_DATABASE_FROM).
    pub face_search: faces::FaceSearchOptions,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            sim_threshold: 0.3,
            model_pack: "buffalo_sc".into(),
            search: SearchOptions::default(),
            face_search: faces::FaceSearchOptions::default(),
        }
    }
}

/// What the load at start skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartCounts {
    /// Users whose templates came from another recognizer (kept, not compared).
    pub users_other_model: usize,
    /// Users with malformed embeddings (skipped).
    pub users_malformed: usize,
}

/// The whole service behind both APIs. Shared behind an `Arc`.
pub struct Service {
    engine: Engine,
    gallery: Arc<Gallery>,
    face_index: Arc<FaceIndex>,
    store: Arc<dyn FaceStore>,
    faces: Arc<dyn FaceRecordStore>,
    audit: AuditHandle,
    /// Serialises "write the store, then the index", for local writes and the followers alike.
    writes: Arc<tokio::sync::Mutex<()>>,
    options: ServiceOptions,
    start: StartCounts,
    /// `/api/face/search` runs in the store (its index), not on `face_index` (left empty).
    search_in_store: bool,
    /// Where registered images go (IMAGE_STORE); `None`: with their record, in the store.
    images: Option<Arc<ImageObjects>>,
}

impl Service {
    /// The service over these parts, with both indexes loaded from the store (users streamed in
    /// batches, so that every template is never held twice).
    pub async fn open(
        engine: Engine,
        store: Arc<dyn FaceStore>,
        faces: Arc<dyn FaceRecordStore>,
        audit: AuditHandle,
        options: ServiceOptions,
    ) -> Result<Service, StoreError> {
        let info = engine.info().clone();
        let (gallery, users) = load::gallery(store.as_ref(), &info.model_id, info.embedding_dim).await?;
        if users.other_model > 0 {
            tracing::warn!(count = users.other_model, ours = %info.model_id, "users enrolled with another recognizer are kept but not compared");
        }
        let search_in_store = faces::search_in_store(faces.as_ref(), options.face_search).await?;
        let face_index = FaceIndex::new(info.embedding_dim).with_search(options.search);
        if !search_in_store {
            let loaded = faces.load_faces(&info.model_id).await?;
            face_index.extend(&loaded.faces);
        }
        let start = StartCounts { users_other_model: users.other_model, users_malformed: users.malformed };
        Ok(Service {
            gallery: Arc::new(gallery.with_search(options.search)),
            face_index: Arc::new(face_index),
            engine,
            store,
            faces,
            audit,
            writes: Arc::new(tokio::sync::Mutex::new(())),
            options,
            start,
            search_in_store,
            images: None,
        })
    }

    /// Registered images kept in `images` (IMAGE_STORE) rather than with their record.
    pub fn with_images(mut self, images: Option<ImageObjects>) -> Service {
        self.images = images.map(Arc::new);
        self
    }

    /// The image store, when images are not kept with their record.
    pub fn image_store(&self) -> Option<&ImageObjects> {
        self.images.as_deref()
    }

    /// Starts following other replicas' writes when the store is shared (MongoDB): users into
    /// the gallery, face records into their index. Nothing to do on SQLite.
    pub async fn follow(self: &Arc<Self>) -> Result<(), StoreError> {
        let model_id = self.model_id().to_owned();
        let gallery = Arc::clone(&self.gallery);
        if let Some(feed) = self.store.follow(Arc::new(move || gallery.names())).await? {
            tokio::spawn(follow::users(Arc::clone(&self.writes), Arc::clone(&self.gallery), model_id.clone(), feed));
        }
        if self.search_in_store {
            // Nothing of the records is held here: nothing to follow.
            return Ok(());
        }
        let index = Arc::clone(&self.face_index);
        if let Some(feed) = self.faces.follow_faces(Arc::new(move || index.ids())).await? {
            tokio::spawn(follow::faces(Arc::clone(&self.writes), Arc::clone(&self.face_index), model_id, feed));
        }
        Ok(())
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Users' templates, compared by `/recognize`.
    pub fn gallery(&self) -> &Gallery {
        &self.gallery
    }

    /// Face records' vectors, searched by `/api/face/search`.
    pub fn face_index(&self) -> &FaceIndex {
        &self.face_index
    }

    pub fn audit(&self) -> &AuditHandle {
        &self.audit
    }

    pub fn options(&self) -> &ServiceOptions {
        &self.options
    }

    pub fn start_counts(&self) -> StartCounts {
        self.start
    }

    /// Whether `/api/face/search` runs in the store rather than on [`Service::face_index`].
    pub fn searches_in_store(&self) -> bool {
        self.search_in_store
    }

    pub fn store_kind(&self) -> StoreKind {
        self.store.kind()
    }

    /// The recognizer in use: only vectors of one model are compared.
    pub fn model_id(&self) -> &str {
        &self.engine.info().model_id
    }

    /// A cheap check that the store answers now (for `/ready`).
    pub async fn ping_store(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }
}
