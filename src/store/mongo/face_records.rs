//! The second API's face records in MongoDB (a child of `mongo`: same client, timeouts and
//! error mapping).
//!
//! - Collection `faces`, the other API's schema: `id` (UUID text, unique index),
//!   `display_name`, `image_url`, `face_vec` (an array of [`EMBEDDING_DIM`] doubles),
//!   `inserted_at` (a BSON date), plus `model_id` (the recognizer). Documents written by
//!   another tool load too: `face_vec` may hold ints or longs and is L2-normalised when it is
//!   not already; a missing `model_id` is taken as ours (as in `users`); a missing
//!   `image_url` points at `/api/face/<id>/image`; a missing date reads as the epoch.
//! - Collection `face_images`: `id` (unique index), `content_type`, `bytes` (BSON binary).
//!   Apart from `faces` so that loading and listing records never reads images (register
//!   caps them at 15 MiB, under MongoDB's 16 MiB document limit).
//! - No multi-document transactions (a standalone server has none). Insert writes the image,
//!   then the record, after checking that the id is free; when the record cannot be written
//!   the image (and, after an outage, any record) of that fresh id is removed again. Delete
//!   removes the image, then the record: a delete cut short by an outage answers
//!   `Unavailable` with the record still there (and still searched), and is completed by
//!   asking again.
//! - A document without a string `id` is ignored; one whose vector cannot be used is listed
//!   and shown (with an empty `face_vec`) but not searched, and can be deleted.
//! - Outages map to [`StoreError::Unavailable`] (HTTP 503 `store_unavailable`), as for users.

use std::time::SystemTime;

use futures_util::TryStreamExt;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, DateTime, RawBsonRef, RawDocument, RawDocumentBuf, doc};
use mongodb::error::Error as MongoError;
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};

use super::super::faces::{FaceChange, FaceRecord, FaceRecordStore, LoadedFaces, StoredImage};
use super::super::{ChangeFeed, is_ours};
use super::{EMBEDDING_DIM, MODEL_FIELD, MongoStore, StoreError, fmt_duration, is_duplicate_key, numbers_of, store_err, str_of};

/// Face records, as the other API names them.
pub const FACES_COLLECTION: &str = "faces";
/// Their images.
pub const FACE_IMAGES_COLLECTION: &str = "face_images";

/// What `faces` documents give back (never `_id`).
pub(super) fn record_projection() -> mongodb::bson::Document {
    doc! {"_id": 0, "id": 1, "display_name": 1, "image_url": 1, "face_vec": 1, MODEL_FIELD: 1, "inserted_at": 1}
}

/// How an insert went.
enum Written {
    Done,
    /// The unique index refused it: the id is taken.
    Duplicate,
    /// Not written (or, after a timeout, perhaps written).
    Failed(StoreError),
}

impl MongoStore {
    pub(super) fn faces(&self) -> Collection<RawDocumentBuf> {
        self.coll.client().database(&self.database).collection(FACES_COLLECTION)
    }

    fn face_images(&self) -> Collection<RawDocumentBuf> {
        self.coll.client().database(&self.database).collection(FACE_IMAGES_COLLECTION)
    }

    /// Unique indexes on `faces.id` and `face_images.id`, and the listing order's index.
    /// Existing duplicates only earn a warning (insert still checks the id first).
    pub(super) async fn ensure_face_indexes(&self) -> Result<(), StoreError> {
        let unique = || IndexOptions::builder().unique(true).build();
        let indexes = [
            (self.faces(), IndexModel::builder().keys(doc! {"id": 1}).options(unique()).build(), "faces.id (unique)"),
            (self.faces(), IndexModel::builder().keys(doc! {"inserted_at": 1, "id": 1}).build(), "faces.inserted_at"),
            (self.face_images(), IndexModel::builder().keys(doc! {"id": 1}).options(unique()).build(), "face_images.id (unique)"),
        ];
        for (coll, index, what) in indexes {
            match self.bounded("creating a face record index", coll.create_index(index).into_future()).await {
                Ok(_) => {}
                Err(StoreError::Unavailable(m)) => return Err(StoreError::Unavailable(m)),
                Err(e) => tracing::warn!("mongo store: no index on {what} ({e})"),
            }
        }
        Ok(())
    }

    /// One `insert_one`, bounded by twice the operation timeout.
    async fn insert(&self, coll: &Collection<RawDocumentBuf>, doc: RawDocumentBuf, what: &str) -> Written {
        let limit = self.opts.op_timeout * 2;
        match tokio::time::timeout(limit, coll.insert_one(doc).into_future()).await {
            Ok(Ok(_)) => Written::Done,
            Ok(Err(e)) if is_duplicate_key(&e) => Written::Duplicate,
            Ok(Err(e)) => Written::Failed(store_err(what, &e)),
            Err(_) => Written::Failed(StoreError::Unavailable(format!("{what}: no answer from MongoDB within {}", fmt_duration(limit)))),
        }
    }

    async fn face_id_taken(&self, id: &str) -> Result<bool, StoreError> {
        let faces = self.faces();
        let found =
            self.bounded("reading a face record", faces.find_one(doc! {"id": id}).projection(doc! {"_id": 1}).into_future()).await?;
        Ok(found.is_some())
    }

    /// Removes what a failed insert of the fresh id `id` may have left; `record` too when the
    /// record write may have reached the server.
    async fn undo_insert(&self, id: &str, record: bool) {
        let images = self.bounded("undoing an image write", self.face_images().delete_many(doc! {"id": id}).into_future()).await;
        let records = if record {
            self.bounded("undoing a record write", self.faces().delete_many(doc! {"id": id}).into_future()).await.map(|_| ())
        } else {
            Ok(())
        };
        if let Err(e) = images.map(|_| ()).and(records) {
            tracing::warn!(id, "mongo store: a failed face registration may have left its image behind: {e}");
        }
    }
}

fn record_document(r: &FaceRecord) -> Result<RawDocumentBuf, StoreError> {
    let face_vec: Vec<Bson> = r.face_vec.iter().map(|&v| Bson::Double(f64::from(v))).collect();
    let d = doc! {
        "id": &r.id,
        "display_name": &r.display_name,
        "image_url": &r.image_url,
        "face_vec": face_vec,
        MODEL_FIELD: &r.model_id,
        "inserted_at": DateTime::from_system_time(r.inserted_at),
    };
    RawDocumentBuf::from_document(&d).map_err(|e| StoreError::Internal(format!("face record {}: {e}", r.id)))
}

fn image_document(id: &str, image: &StoredImage) -> Result<RawDocumentBuf, StoreError> {
    let d = doc! {
        "id": id,
        "content_type": &image.content_type,
        "bytes": Binary { subtype: BinarySubtype::Generic, bytes: image.bytes.clone() },
    };
    RawDocumentBuf::from_document(&d).map_err(|e| StoreError::Internal(format!("image of face record {id}: {e}")))
}

/// `face_vec`: exactly [`EMBEDDING_DIM`] finite numbers, not all zero; L2-normalised when its
/// norm is off by more than 1e-4 (written by another tool), else exactly as stored.
fn face_vec_of(raw: &RawDocument) -> Result<Vec<f32>, String> {
    let array = match raw.get("face_vec") {
        Ok(Some(RawBsonRef::Array(a))) => a,
        Ok(None) => return Err("no `face_vec`".to_owned()),
        Ok(Some(other)) => return Err(format!("`face_vec` is {:?}, not an array", other.element_type())),
        Err(e) => return Err(format!("`face_vec` cannot be read: {e}")),
    };
    let values = numbers_of(array)?;
    if values.len() != EMBEDDING_DIM {
        return Err(format!("`face_vec` has {} numbers, not {EMBEDDING_DIM}", values.len()));
    }
    let norm = values.iter().map(|v| v * v).sum::<f64>().sqrt();
    if !(norm > 0.0 && norm.is_finite()) {
        return Err("`face_vec` is all zeros".to_owned());
    }
    let scale = if (norm - 1.0).abs() > 1e-4 { norm } else { 1.0 };
    Ok(values.iter().map(|v| (v / scale) as f32).collect())
}

/// A `faces` document as a record: `Ok(None)` without a string `id`; `Err` (with the id) when
/// its vector cannot be used.
pub(super) fn record_of(raw: &RawDocument) -> Option<(FaceRecord, Result<(), String>)> {
    let id = str_of(raw, "id")?.to_owned();
    let inserted_at = match raw.get("inserted_at") {
        Ok(Some(RawBsonRef::DateTime(d))) => d.to_system_time(),
        _ => SystemTime::UNIX_EPOCH,
    };
    let (face_vec, check) = match face_vec_of(raw) {
        Ok(v) => (v, Ok(())),
        Err(why) => (Vec::new(), Err(why)),
    };
    let record = FaceRecord {
        display_name: str_of(raw, "display_name").unwrap_or_default().to_owned(),
        image_url: str_of(raw, "image_url").map_or_else(|| format!("/api/face/{id}/image"), str::to_owned),
        model_id: str_of(raw, MODEL_FIELD).unwrap_or_default().to_owned(),
        inserted_at,
        face_vec,
        id,
    };
    Some((record, check))
}

/// A record for get and list. One whose vector cannot be used (written by another tool) is
/// still shown, with an empty `face_vec`: it is not searched, and can be deleted.
fn shown_record(raw: &RawDocument) -> Option<FaceRecord> {
    let (rec, check) = record_of(raw)?;
    if let Err(why) = check {
        tracing::debug!(id = %rec.id, "mongo store: face record {} has an unusable vector: {why}", rec.id);
    }
    Some(rec)
}

/// Documents that are records: those with a string `id` (others cannot be addressed).
pub(super) fn with_id() -> mongodb::bson::Document {
    doc! {"id": {"$type": "string"}}
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[async_trait::async_trait]
impl FaceRecordStore for MongoStore {
    async fn load_faces(&self, model_id: &str) -> Result<LoadedFaces, StoreError> {
        let mut out = LoadedFaces::default();
        let what = "loading face records";
        let mut cursor =
            self.faces().find(doc! {}).projection(record_projection()).batch_size(1000).await.map_err(|e| store_err(what, &e))?;
        while let Some(raw) = cursor.try_next().await.map_err(|e| store_err(what, &e))? {
            let Some((rec, check)) = record_of(&raw) else {
                tracing::warn!("mongo store: skipping a faces document without a string id");
                out.malformed += 1;
                continue;
            };
            if let Err(why) = check {
                tracing::warn!(id = %rec.id, "mongo store: skipping face record {}: {why}", rec.id);
                out.malformed += 1;
                continue;
            }
            // A record without a model id (written by another tool) is taken as ours.
            if !is_ours(Some(&rec.model_id), model_id) {
                out.other_model += 1;
                continue;
            }
            out.faces.push(rec);
        }
        Ok(out)
    }

    async fn insert_face(&self, record: &FaceRecord, image: Option<&StoredImage>) -> Result<(), StoreError> {
        if record.face_vec.len() != EMBEDDING_DIM || record.face_vec.iter().any(|v| !v.is_finite()) {
            return Err(StoreError::Internal(format!("face record {} has a malformed vector", record.id)));
        }
        let record_doc = record_document(record)?;
        let image_doc = image.map(|image| image_document(&record.id, image)).transpose()?;
        let exists = || StoreError::Internal(format!("face record {} already exists", record.id));
        if self.face_id_taken(&record.id).await? {
            return Err(exists());
        }
        // Image first: a record is never visible without its image.
        if let Some(image_doc) = image_doc {
            match self.insert(&self.face_images(), image_doc, "storing a face image").await {
                Written::Done => {}
                // Someone else's image: leave it.
                Written::Duplicate => return Err(exists()),
                Written::Failed(e) => {
                    self.undo_insert(&record.id, false).await;
                    return Err(e);
                }
            }
        }
        match self.insert(&self.faces(), record_doc, "storing a face record").await {
            Written::Done => Ok(()),
            // Someone else's record: keep it, take back only our image.
            Written::Duplicate => {
                self.undo_insert(&record.id, false).await;
                Err(exists())
            }
            // The id was free and is fresh: whatever of it exists now is ours to take back.
            Written::Failed(e) => {
                self.undo_insert(&record.id, true).await;
                Err(e)
            }
        }
    }

    async fn get_face(&self, id: &str) -> Result<Option<FaceRecord>, StoreError> {
        let faces = self.faces();
        let op = faces.find_one(doc! {"id": id}).projection(record_projection()).into_future();
        match self.bounded("reading a face record", op).await? {
            Some(raw) => Ok(shown_record(&raw)),
            None => Ok(None),
        }
    }

    async fn get_face_image(&self, id: &str) -> Result<Option<StoredImage>, StoreError> {
        let images = self.face_images();
        let op = images.find_one(doc! {"id": id}).into_future();
        let Some(raw) = self.bounded("reading a face image", op).await? else { return Ok(None) };
        let bytes = match raw.get("bytes") {
            Ok(Some(RawBsonRef::Binary(b))) => b.bytes.to_vec(),
            _ => return Err(StoreError::Internal(format!("the image of face record {id} is not binary data"))),
        };
        let content_type = str_of(&raw, "content_type").unwrap_or("application/octet-stream").to_owned();
        Ok(Some(StoredImage { bytes, content_type }))
    }

    async fn list_faces(&self, limit: usize, offset: usize) -> Result<(Vec<FaceRecord>, usize), StoreError> {
        let faces = self.faces();
        let page = async {
            let total = faces.count_documents(with_id()).await?;
            let mut cursor = faces
                .find(with_id())
                .projection(record_projection())
                .sort(doc! {"inserted_at": 1, "id": 1})
                .skip(u64::try_from(offset).unwrap_or(u64::MAX))
                .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                .await?;
            let mut docs = Vec::new();
            while let Some(raw) = cursor.try_next().await? {
                docs.push(raw);
            }
            Ok::<_, MongoError>((docs, total))
        };
        let (docs, total) = self.bounded("listing face records", page).await?;
        Ok((docs.iter().filter_map(|raw| shown_record(raw)).collect(), usize_of(total)))
    }

    async fn follow_faces(&self, known: crate::store::Held) -> Result<Option<Box<dyn ChangeFeed<FaceChange>>>, StoreError> {
        let feed = self.faces_feed(known);
        tracing::info!("mongo store: following other replicas' face records");
        Ok(Some(Box::new(feed)))
    }

    async fn delete_face(&self, id: &str) -> Result<bool, StoreError> {
        // The image first: a delete cut short leaves the record (asking again completes it).
        self.bounded("deleting a face image", self.face_images().delete_many(doc! {"id": id}).into_future()).await?;
        let result = self.bounded("deleting a face record", self.faces().delete_many(doc! {"id": id}).into_future()).await?;
        Ok(result.deleted_count > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(d: mongodb::bson::Document) -> RawDocumentBuf {
        RawDocumentBuf::from_document(&d).unwrap()
    }

    #[test]
    fn vectors_of_every_stored_shape() {
        let mut v = vec![0.0f64; EMBEDDING_DIM];
        v[3] = 0.6;
        v[9] = 0.8;
        let got = face_vec_of(&raw(doc! {"face_vec": v.clone()})).unwrap();
        assert_eq!((got[3], got[9]), (0.6f32, 0.8f32), "a unit vector is kept exactly");
        let ints: Vec<Bson> = (0..EMBEDDING_DIM).map(|i| if i % 2 == 0 { Bson::Int32(2) } else { Bson::Int64(2) }).collect();
        let got = face_vec_of(&raw(doc! {"face_vec": ints})).unwrap();
        let expected = 1.0 / (EMBEDDING_DIM as f32).sqrt();
        assert!(got.iter().all(|x| (x - expected).abs() < 1e-6), "normalised when it was not");
        assert!(face_vec_of(&raw(doc! {"face_vec": vec![0.5f64; 128]})).unwrap_err().contains("128 numbers"));
        assert!(face_vec_of(&raw(doc! {"face_vec": vec![0.0f64; EMBEDDING_DIM]})).is_err());
        assert!(face_vec_of(&raw(doc! {"face_vec": "x"})).is_err());
        assert!(face_vec_of(&raw(doc! {"id": "a"})).is_err());
        let mut nan = v;
        nan[5] = f64::NAN;
        assert!(face_vec_of(&raw(doc! {"face_vec": nan})).unwrap_err().contains("element 5"));
    }

    #[test]
    fn foreign_documents_get_defaults() {
        let (rec, check) = record_of(&raw(doc! {"id": "abc", "face_vec": vec![1.0f64; EMBEDDING_DIM]})).unwrap();
        assert!(check.is_ok());
        assert_eq!((rec.image_url.as_str(), rec.model_id.as_str(), rec.inserted_at), ("/api/face/abc/image", "", SystemTime::UNIX_EPOCH));
        assert!(record_of(&raw(doc! {"id": 7})).is_none());
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_123);
        let rec = record(t);
        let back = record_of(&record_document(&rec).unwrap()).unwrap();
        assert_eq!(back, (rec, Ok(())), "a record survives the round trip exactly (millisecond dates)");
    }

    fn record(t: SystemTime) -> FaceRecord {
        let mut face_vec = vec![0.0f32; EMBEDDING_DIM];
        face_vec[1] = 1.0;
        FaceRecord {
            id: "r1".into(),
            display_name: "Ann".into(),
            image_url: "/api/face/r1/image".into(),
            inserted_at: t,
            face_vec,
            model_id: "m1".into(),
        }
    }
}
