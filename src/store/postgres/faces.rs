//! The second API's face records in PostgreSQL: the other service's `faces` table as it is (plus
//! `model_id`), facerec's images in `face_images`, and search on the HNSW index.

use std::time::SystemTime;

use futures_util::TryStreamExt;
use pgvector::Vector;
use tokio_postgres::Row;

use super::super::faces::{FaceChange, FaceRecord, FaceRecordStore, LoadedFaces, StoredImage};
use super::super::{ChangeFeed, EMBEDDING_DIM, StoreError, is_ours};
use super::{PgStore, is_unique_violation, pg_err, unit_vector};
use crate::gallery::RecordMatch;
use crate::store::Held as KnownIds;

/// The columns every record query reads, in this order.
pub(super) const FACE_COLUMNS: &str =
    "f.id::text, f.display_name, f.image_url, coalesce(f.inserted_at, 'epoch'::timestamptz), f.face_vec, f.model_id";

/// A `faces` row as a record, and why its vector cannot be searched, if it cannot (then
/// `face_vec` is empty).
pub(super) fn record_of(row: &Row) -> Result<(FaceRecord, Result<(), String>), String> {
    let id: String = row.try_get(0).map_err(|e| e.to_string())?;
    let display_name: Option<String> = row.try_get(1).map_err(|e| e.to_string())?;
    let image_url: Option<String> = row.try_get(2).map_err(|e| e.to_string())?;
    let inserted_at: SystemTime = row.try_get(3).map_err(|e| e.to_string())?;
    let face_vec: Option<Vector> = row.try_get(4).map_err(|e| format!("face record {id}: face_vec: {e}"))?;
    let model_id: Option<String> = row.try_get(5).map_err(|e| e.to_string())?;
    let (face_vec, check) = match face_vec {
        None => (Vec::new(), Err("no face_vec".to_owned())),
        Some(v) => match unit_vector(v.as_slice()) {
            Ok(v) => (v, Ok(())),
            Err(why) => (Vec::new(), Err(format!("face_vec: {why}"))),
        },
    };
    let record = FaceRecord {
        image_url: image_url.unwrap_or_else(|| format!("/api/face/{id}/image")),
        display_name: display_name.unwrap_or_default(),
        inserted_at,
        face_vec,
        model_id: model_id.unwrap_or_default(),
        id,
    };
    Ok((record, check))
}

/// The id as a UUID: anything else names no record.
fn uuid_of(id: &str) -> Option<uuid::Uuid> {
    uuid::Uuid::parse_str(id).ok()
}

impl PgStore {
    /// The records closest to `query` within cosine distance `threshold`, at most `top_k`, found
    /// by the HNSW index with `hnsw.ef_search` as configured: the `match_faces` query, limited
    /// to records of `model_id` (or of no recorded recognizer).
    pub async fn search_faces(&self, query: &[f32], top_k: usize, threshold: f32, model_id: &str) -> Result<Vec<RecordMatch>, StoreError> {
        let sql = "select f.id::text, coalesce(f.display_name, ''), (1 - (f.face_vec <=> $1))::real from faces f \
                   where f.face_vec is not null and (f.face_vec <=> $1) < $3 \
                   and (f.model_id is null or f.model_id = '' or f.model_id = $4) \
                   order by f.face_vec <=> $1 limit $2";
        let query = Vector::from(query.to_vec());
        let k = i64::try_from(top_k).unwrap_or(i64::MAX);
        let threshold = f64::from(threshold);
        // The planner may price a sequential scan below the index (pgvector's estimate grows with
        // ef_search; the threshold's selectivity is a guess): measured at 200k rows, ef_search 100,
        // that was a 1 s exact scan instead of a 30 ms index scan. Without the index (an operator
        // schema without it) the scan still runs.
        let set = format!("set local hnsw.ef_search = {}; set local enable_seqscan = off", self.opts.ef_search.max(1));
        let rows = self
            .bounded("searching face records", async {
                let mut client = self.client().await?;
                let tx = client.transaction().await.map_err(|e| pg_err("", &e))?;
                tx.batch_execute(&set).await.map_err(|e| pg_err("", &e))?;
                let rows = tx.query(sql, &[&query, &k, &threshold, &model_id]).await.map_err(|e| pg_err("", &e))?;
                tx.commit().await.map_err(|e| pg_err("", &e))?;
                Ok(rows)
            })
            .await?;
        Ok(rows.iter().map(|r| RecordMatch { id: r.get(0), display_name: r.get(1), score: r.get(2) }).collect())
    }

    /// How many records there are.
    pub async fn count_faces(&self) -> Result<usize, StoreError> {
        let row = self
            .bounded("counting face records", async {
                self.client().await?.query_one("select count(*) from faces", &[]).await.map_err(|e| pg_err("", &e))
            })
            .await?;
        Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(usize::MAX))
    }
}

#[async_trait::async_trait]
impl FaceRecordStore for PgStore {
    async fn load_faces(&self, model_id: &str) -> Result<LoadedFaces, StoreError> {
        let what = "loading face records";
        let client = self.client().await?;
        let sql = format!("select {FACE_COLUMNS} from faces f");
        let rows = client.query_raw(&sql, std::iter::empty::<i32>()).await.map_err(|e| pg_err(what, &e))?;
        let mut rows = std::pin::pin!(rows);
        let mut out = LoadedFaces::default();
        let mut unusable = 0usize;
        while let Some(row) = rows.try_next().await.map_err(|e| pg_err(what, &e))? {
            let (record, check) = record_of(&row).map_err(StoreError::Internal)?;
            if let Err(why) = check {
                if unusable < 10 {
                    tracing::warn!(id = %record.id, "postgres store: face record {} is not searched: {why}", record.id);
                }
                unusable += 1;
                out.malformed += 1;
                continue;
            }
            if !is_ours(Some(&record.model_id), model_id) {
                out.other_model += 1;
                continue;
            }
            out.faces.push(record);
        }
        if unusable >= 10 {
            tracing::warn!(count = unusable, "postgres store: face records without a usable face_vec are not searched");
        }
        Ok(out)
    }

    async fn insert_face(&self, record: &FaceRecord, image: Option<&StoredImage>) -> Result<(), StoreError> {
        if record.face_vec.len() != EMBEDDING_DIM || record.face_vec.iter().any(|v| !v.is_finite()) {
            return Err(StoreError::Internal(format!("face record {} has a malformed vector", record.id)));
        }
        let id = uuid_of(&record.id).ok_or_else(|| StoreError::Internal(format!("face record id {} is not a UUID", record.id)))?;
        let id = id.to_string();
        let face_vec = Vector::from(record.face_vec.clone());
        self.bounded("storing a face record", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| pg_err("", &e))?;
            let inserted = tx
                .execute(
                    "insert into faces (id, display_name, image_url, face_vec, inserted_at, model_id) values ($1::text::uuid, $2, $3, $4, $5, $6)",
                    &[&id, &record.display_name, &record.image_url, &face_vec, &record.inserted_at, &record.model_id],
                )
                .await;
            match inserted {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => return Err(StoreError::Internal(format!("face record {id} already exists"))),
                Err(e) => return Err(pg_err("", &e)),
            }
            if let Some(image) = image {
                tx.execute(
                    "insert into face_images (id, content_type, bytes) values ($1::text::uuid, $2, $3)",
                    &[&id, &image.content_type, &image.bytes],
                )
                .await
                .map_err(|e| pg_err("storing its image", &e))?;
            }
            tx.commit().await.map_err(|e| pg_err("committing", &e))
        })
        .await
    }

    async fn get_face(&self, id: &str) -> Result<Option<FaceRecord>, StoreError> {
        let Some(uuid) = uuid_of(id) else { return Ok(None) };
        let sql = format!("select {FACE_COLUMNS} from faces f where f.id = $1::text::uuid");
        let row = self
            .bounded("reading a face record", async {
                self.client().await?.query_opt(&sql, &[&uuid.to_string()]).await.map_err(|e| pg_err("", &e))
            })
            .await?;
        match row {
            Some(row) => Ok(Some(record_of(&row).map_err(StoreError::Internal)?.0)),
            None => Ok(None),
        }
    }

    async fn get_face_image(&self, id: &str) -> Result<Option<StoredImage>, StoreError> {
        let Some(uuid) = uuid_of(id) else { return Ok(None) };
        let row = self
            .bounded("reading a face image", async {
                self.client()
                    .await?
                    .query_opt("select content_type, bytes from face_images where id = $1::text::uuid", &[&uuid.to_string()])
                    .await
                    .map_err(|e| pg_err("", &e))
            })
            .await?;
        Ok(row.map(|r| StoredImage { content_type: r.get(0), bytes: r.get(1) }))
    }

    async fn list_faces(&self, limit: usize, offset: usize) -> Result<(Vec<FaceRecord>, usize), StoreError> {
        let sql = format!("select {FACE_COLUMNS} from faces f order by f.inserted_at nulls first, f.id limit $1 offset $2");
        let (limit, offset) = (i64::try_from(limit).unwrap_or(i64::MAX), i64::try_from(offset).unwrap_or(i64::MAX));
        let (rows, total) = self
            .bounded("listing face records", async {
                let client = self.client().await?;
                let total: i64 = client.query_one("select count(*) from faces", &[]).await.map_err(|e| pg_err("", &e))?.get(0);
                let rows = client.query(&sql, &[&limit, &offset]).await.map_err(|e| pg_err("", &e))?;
                Ok((rows, total))
            })
            .await?;
        let records = rows.iter().map(|r| record_of(r).map(|(rec, _)| rec)).collect::<Result<Vec<_>, _>>().map_err(StoreError::Internal)?;
        Ok((records, usize::try_from(total).unwrap_or(usize::MAX)))
    }

    async fn delete_face(&self, id: &str) -> Result<bool, StoreError> {
        let Some(uuid) = uuid_of(id) else { return Ok(false) };
        let id = uuid.to_string();
        self.bounded("deleting a face record", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| pg_err("", &e))?;
            tx.execute("delete from face_images where id = $1::text::uuid", &[&id]).await.map_err(|e| pg_err("", &e))?;
            let n = tx.execute("delete from faces where id = $1::text::uuid", &[&id]).await.map_err(|e| pg_err("", &e))?;
            tx.commit().await.map_err(|e| pg_err("committing", &e))?;
            Ok(n > 0)
        })
        .await
    }

    async fn follow_faces(&self, known: KnownIds) -> Result<Option<Box<dyn ChangeFeed<FaceChange>>>, StoreError> {
        tracing::info!("postgres store: following other replicas' face records (LISTEN {})", super::FACES_CHANNEL);
        Ok(Some(Box::new(self.faces_feed(known))))
    }

    async fn search_in_store(
        &self,
        query: &[f32],
        top_k: usize,
        threshold: f32,
        model_id: &str,
    ) -> Result<Option<Vec<RecordMatch>>, StoreError> {
        self.search_faces(query, top_k, threshold, model_id).await.map(Some)
    }

    async fn count_for_search(&self) -> Result<Option<usize>, StoreError> {
        self.count_faces().await.map(Some)
    }
}
