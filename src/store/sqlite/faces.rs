//! The second API's face records in the embedded SQLite store: tables `faces` (id,
//! display_name, image_url, face_vec, model_id, inserted_at) and `face_images` (created by
//! the schema migration in `sqlite`).

use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, decode_embedding, encode_embedding, sql_err, time_from_ms};
use crate::store::faces::{FaceRecord, FaceRecordStore, LoadedFaces, StoredImage};
use crate::store::{EMBEDDING_DIM, StoreError};

fn ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn record_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(FaceRecord, Result<Vec<f32>, String>)> {
    let vec = decode_embedding(r.get_ref(3)?);
    Ok((
        FaceRecord {
            id: r.get(0)?,
            display_name: r.get(1)?,
            image_url: r.get(2)?,
            face_vec: Vec::new(),
            model_id: r.get(4)?,
            inserted_at: time_from_ms(r.get(5)?),
        },
        vec,
    ))
}

const COLUMNS: &str = "id, display_name, image_url, face_vec, model_id, inserted_at";

fn with_vec((mut rec, vec): (FaceRecord, Result<Vec<f32>, String>)) -> Result<FaceRecord, StoreError> {
    rec.face_vec = vec.map_err(|e| StoreError::Internal(format!("face record {}: {e}", rec.id)))?;
    Ok(rec)
}

#[async_trait::async_trait]
impl FaceRecordStore for SqliteStore {
    async fn load_faces(&self, model_id: &str) -> Result<LoadedFaces, StoreError> {
        let model_id = model_id.to_string();
        self.call(move |conn| {
            let mut out = LoadedFaces::default();
            let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM faces ORDER BY inserted_at, id")).map_err(sql_err)?;
            let rows = stmt.query_map([], record_from_row).map_err(sql_err)?;
            for row in rows {
                let (mut rec, vec) = row.map_err(sql_err)?;
                match vec {
                    Ok(v) if v.len() == EMBEDDING_DIM => rec.face_vec = v,
                    _ => {
                        tracing::warn!(id = %rec.id, "face record with a malformed vector skipped");
                        out.malformed += 1;
                        continue;
                    }
                }
                if !crate::store::is_ours(Some(&rec.model_id), &model_id) {
                    out.other_model += 1;
                    continue;
                }
                out.faces.push(rec);
            }
            Ok(out)
        })
        .await
    }

    async fn insert_face(&self, record: &FaceRecord, image: Option<&StoredImage>) -> Result<(), StoreError> {
        if record.face_vec.len() != EMBEDDING_DIM || record.face_vec.iter().any(|v| !v.is_finite()) {
            return Err(StoreError::Internal(format!("face record {} has a malformed vector", record.id)));
        }
        let (record, image) = (record.clone(), image.cloned());
        self.call(move |conn| {
            let tx = conn.transaction().map_err(sql_err)?;
            tx.execute(
                "INSERT INTO faces (id, display_name, image_url, face_vec, model_id, inserted_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    record.id,
                    record.display_name,
                    record.image_url,
                    encode_embedding(&record.face_vec),
                    record.model_id,
                    ms(record.inserted_at)
                ],
            )
            .map_err(sql_err)?;
            if let Some(image) = image {
                tx.execute(
                    "INSERT INTO face_images (id, content_type, bytes) VALUES (?1, ?2, ?3)",
                    params![record.id, image.content_type, image.bytes],
                )
                .map_err(sql_err)?;
            }
            tx.commit().map_err(sql_err)
        })
        .await
    }

    async fn get_face(&self, id: &str) -> Result<Option<FaceRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            let row =
                conn.query_row(&format!("SELECT {COLUMNS} FROM faces WHERE id = ?1"), [id], record_from_row).optional().map_err(sql_err)?;
            row.map(with_vec).transpose()
        })
        .await
    }

    async fn get_face_image(&self, id: &str) -> Result<Option<StoredImage>, StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            conn.query_row("SELECT content_type, bytes FROM face_images WHERE id = ?1", [id], |r| {
                Ok(StoredImage { content_type: r.get(0)?, bytes: r.get(1)? })
            })
            .optional()
            .map_err(sql_err)
        })
        .await
    }

    async fn list_faces(&self, limit: usize, offset: usize) -> Result<(Vec<FaceRecord>, usize), StoreError> {
        self.call(move |conn| {
            let total: i64 = conn.query_row("SELECT COUNT(*) FROM faces", [], |r| r.get(0)).map_err(sql_err)?;
            let mut stmt =
                conn.prepare(&format!("SELECT {COLUMNS} FROM faces ORDER BY inserted_at, id LIMIT ?1 OFFSET ?2")).map_err(sql_err)?;
            let (limit, offset) = (i64::try_from(limit).unwrap_or(i64::MAX), i64::try_from(offset).unwrap_or(i64::MAX));
            let rows = stmt.query_map(params![limit, offset], record_from_row).map_err(sql_err)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(with_vec(row.map_err(sql_err)?)?);
            }
            Ok((out, usize::try_from(total).unwrap_or(0)))
        })
        .await
    }

    async fn delete_face(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            let tx = conn.transaction().map_err(sql_err)?;
            tx.execute("DELETE FROM face_images WHERE id = ?1", [&id]).map_err(sql_err)?;
            let n = tx.execute("DELETE FROM faces WHERE id = ?1", [&id]).map_err(sql_err)?;
            tx.commit().map_err(sql_err)?;
            Ok(n > 0)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn record(id: &str, name: &str, t: u64, hot: usize) -> FaceRecord {
        let mut v = vec![0.0f32; EMBEDDING_DIM];
        v[hot] = 1.0;
        FaceRecord {
            id: id.into(),
            display_name: name.into(),
            image_url: format!("/api/face/{id}/image"),
            inserted_at: SystemTime::UNIX_EPOCH + Duration::from_millis(t),
            face_vec: v,
            model_id: "m1".into(),
        }
    }

    fn store() -> SqliteStore {
        let dir = std::env::temp_dir().join(format!("facerec-faces-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&dir);
        SqliteStore::open(&dir.join("f.db")).expect("opens")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn records_round_trip_with_their_images() {
        let s = store();
        let img = StoredImage { bytes: vec![1, 2, 3], content_type: "image/jpeg".into() };
        s.insert_face(&record("a", "Ann", 2, 0), Some(&img)).await.expect("insert");
        s.insert_face(&record("b", "Bob", 1, 1), Some(&img)).await.expect("insert");
        let mut other = record("c", "Cy", 3, 2);
        other.model_id = "m2".into();
        s.insert_face(&other, Some(&img)).await.expect("insert");
        // Written by another tool without a recognizer id: ours, as on every store (store::policy).
        let mut foreign = record("d", "Di", 5, 3);
        foreign.model_id = String::new();
        s.insert_face(&foreign, Some(&img)).await.expect("insert");
        assert!(s.insert_face(&record("a", "Dup", 4, 0), Some(&img)).await.is_err(), "ids are unique");

        let got = s.get_face("a").await.expect("get").expect("present");
        assert_eq!(got, record("a", "Ann", 2, 0));
        assert_eq!(s.get_face_image("a").await.expect("image"), Some(img.clone()));
        let (page, total) = s.list_faces(2, 0).await.expect("list");
        assert_eq!(total, 4);
        assert_eq!(page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["b", "a"], "oldest first");
        let loaded = s.load_faces("m1").await.expect("load");
        assert_eq!((loaded.faces.len(), loaded.other_model, loaded.malformed), (3, 1, 0));

        assert!(s.delete_face("a").await.expect("delete"));
        assert!(!s.delete_face("a").await.expect("delete"));
        assert_eq!(s.get_face("a").await.expect("get"), None);
        assert_eq!(s.get_face_image("a").await.expect("image"), None, "the image goes with the record");
        assert_eq!(s.get_face("'; DROP TABLE faces; --").await.expect("get"), None);
    }
}
