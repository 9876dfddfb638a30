//! The users table: loading (whole or in batches), the CRUD operations and atomic enrolment, run on the
//! blocking pool by [`SqliteStore`]'s [`FaceStore`] methods; stored embeddings' encoding.

use super::*;

/// A stored count (negative, which only a hand edit could write: none).
pub(super) fn samples_from(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

pub(super) fn samples_to_sql(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Internal(format!("sample count {n} does not fit the database")))
}

/// Whether a stored embedding is there at all (NULL and an empty blob are "no template").
pub(super) fn has_template(v: ValueRef<'_>) -> bool {
    match v {
        ValueRef::Null => false,
        ValueRef::Blob(b) => !b.is_empty(),
        _ => true,
    }
}

/// Decodes a stored embedding: none (NULL or empty) or exactly [`EMBEDDING_DIM`] finite
/// little-endian f32; anything else is described in the error.
pub(super) fn decode_embedding(v: ValueRef<'_>) -> Result<Vec<f32>, String> {
    match v {
        ValueRef::Null => Ok(Vec::new()),
        ValueRef::Blob([]) => Ok(Vec::new()),
        ValueRef::Blob(b) if b.len() == EMBEDDING_BYTES => {
            let mut out = Vec::with_capacity(EMBEDDING_DIM);
            out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            if out.iter().all(|x| x.is_finite()) { Ok(out) } else { Err("the embedding has non-finite values".to_owned()) }
        }
        ValueRef::Blob(b) => Err(format!("the embedding has {} bytes, not {EMBEDDING_BYTES}", b.len())),
        other => Err(format!("the embedding is {}, not a blob", other.data_type())),
    }
}

pub(super) fn encode_embedding(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

pub(super) fn load_users_blocking(conn: &mut Connection, model_id: &str) -> Result<LoadedUsers, StoreError> {
    let mut users = Vec::new();
    let loaded = scan_users(conn, model_id, &mut users)?;
    Ok(LoadedUsers { users, ..loaded })
}

/// Where [`scan_users`] puts the users it reads.
pub(super) trait Scanned {
    /// The number of rows, before the first user.
    fn rows(&mut self, _rows: usize) {}
    fn user(&mut self, user: UserRecord);
}

impl Scanned for Vec<UserRecord> {
    fn rows(&mut self, rows: usize) {
        self.reserve(rows);
    }
    fn user(&mut self, user: UserRecord) {
        self.push(user);
    }
}

/// Users per batch of [`SqliteStore::stream_users`].
pub(super) const STREAM_BATCH: usize = 1024;

/// Sends the users on in batches of [`STREAM_BATCH`]; stops sending once the receiver is gone.
pub(super) struct Batches {
    pub(super) sink: Option<UserBatches>,
    pub(super) batch: Vec<UserRecord>,
}

impl Batches {
    pub(super) fn send(&mut self) {
        if let Some(sink) = &self.sink
            && sink.send(std::mem::replace(&mut self.batch, Vec::with_capacity(STREAM_BATCH))).is_err()
        {
            self.sink = None;
        }
    }
}

impl Scanned for Batches {
    fn user(&mut self, user: UserRecord) {
        if self.sink.is_some() {
            self.batch.push(user);
            if self.batch.len() == STREAM_BATCH {
                self.send();
            }
        }
    }
}

pub(super) fn stream_users_blocking(conn: &mut Connection, model_id: &str, sink: UserBatches) -> Result<LoadedUsers, StoreError> {
    let mut batches = Batches { sink: Some(sink), batch: Vec::with_capacity(STREAM_BATCH) };
    let loaded = scan_users(conn, model_id, &mut batches)?;
    if !batches.batch.is_empty() {
        batches.send();
    }
    Ok(loaded)
}

/// Reads every comparable user (see [`LoadedUsers`]) into `out`; the answer has the counts
/// and no `users`.
pub(super) fn scan_users(conn: &mut Connection, model_id: &str, out: &mut dyn Scanned) -> Result<LoadedUsers, StoreError> {
    // One read transaction: the count and the scan see the same snapshot.
    let tx = conn.transaction().map_err(sql_err)?;
    let rows: i64 = tx.query_row("SELECT count(*) FROM users", [], |r| r.get(0)).map_err(sql_err)?;
    out.rows(usize::try_from(rows).unwrap_or(0));
    let mut loaded = LoadedUsers { users: Vec::new(), other_model: 0, malformed: 0 };
    {
        // Table order (rowid), not name order: a name order would read the table through its
        // index, one random page per row.
        let mut stmt = tx.prepare("SELECT username, embedding, samples, model_id, updated_at FROM users").map_err(sql_err)?;
        let mut rows = stmt.query([]).map_err(sql_err)?;
        while let Some(row) = rows.next().map_err(sql_err)? {
            let embedding = row.get_ref(1).map_err(sql_err)?;
            let stored_model = row.get_ref(3).map_err(sql_err)?.as_str_or_null().map_err(|e| sql_err(e.into()))?;
            if has_template(embedding) && !is_ours(stored_model, model_id) {
                loaded.other_model += 1;
                continue;
            }
            let username: String = row.get(0).map_err(sql_err)?;
            let embedding = match decode_embedding(embedding) {
                Ok(e) => e,
                Err(why) => {
                    tracing::warn!(username = %username, "sqlite store: skipping user '{username}': {why}");
                    loaded.malformed += 1;
                    continue;
                }
            };
            out.user(UserRecord {
                username,
                embedding,
                samples: samples_from(row.get(2).map_err(sql_err)?),
                model_id: stored_model.map(str::to_owned),
                updated_at: time_from_ms(row.get(4).map_err(sql_err)?),
            });
        }
    }
    tx.commit().map_err(sql_err)?;
    Ok(loaded)
}

pub(super) fn create_user_blocking(conn: &mut Connection, username: String) -> Result<UserRecord, StoreError> {
    let now = now_ms();
    let mut stmt = conn
        .prepare_cached("INSERT INTO users (username, embedding, samples, model_id, updated_at) VALUES (?1, NULL, 0, NULL, ?2)")
        .map_err(sql_err)?;
    match stmt.execute(params![username, now]) {
        Ok(_) => Ok(UserRecord { username, embedding: Vec::new(), samples: 0, model_id: None, updated_at: time_from_ms(Some(now)) }),
        Err(e) if is_unique_violation(&e) => Err(StoreError::UserExists(username)),
        Err(e) => Err(sql_err(e)),
    }
}

pub(super) fn get_user_blocking(conn: &mut Connection, username: String) -> Result<Option<UserRecord>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT embedding, samples, model_id, updated_at FROM users WHERE username = ?1").map_err(sql_err)?;
    let row = stmt
        .query_row(params![username], |r| {
            Ok((decode_embedding(r.get_ref(0)?), r.get::<_, i64>(1)?, r.get::<_, Option<String>>(2)?, r.get::<_, Option<i64>>(3)?))
        })
        .optional()
        .map_err(sql_err)?;
    let Some((embedding, samples, model_id, updated_at)) = row else { return Ok(None) };
    let embedding = embedding.map_err(|why| StoreError::Internal(format!("user '{username}': {why}")))?;
    Ok(Some(UserRecord { username, embedding, samples: samples_from(samples), model_id, updated_at: time_from_ms(updated_at) }))
}

pub(super) fn list_users_blocking(conn: &mut Connection) -> Result<Vec<UserSummary>, StoreError> {
    // BINARY collation on UTF-8 text: the same order as Rust's `str`.
    let mut stmt = conn.prepare_cached("SELECT username, samples, model_id, updated_at FROM users ORDER BY username").map_err(sql_err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(UserSummary {
                username: r.get(0)?,
                samples: samples_from(r.get(1)?),
                model_id: r.get(2)?,
                updated_at: rfc3339(time_from_ms(r.get(3)?)),
            })
        })
        .map_err(sql_err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sql_err)
}

pub(super) fn delete_user_blocking(conn: &mut Connection, username: String) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached("DELETE FROM users WHERE username = ?1").map_err(sql_err)?;
    match stmt.execute(params![username]).map_err(sql_err)? {
        0 => Err(StoreError::UserNotFound(username)),
        _ => Ok(()),
    }
}

pub(super) fn enroll_blocking(
    conn: &mut Connection,
    username: String,
    embeddings: &[Vec<f32>],
    model_id: &str,
) -> Result<UserRecord, StoreError> {
    // IMMEDIATE: the write lock is taken before the read, so no other writer (this process or
    // another) can change the row between our read and our write.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
    let row = {
        let mut stmt = tx.prepare_cached("SELECT embedding, samples, model_id FROM users WHERE username = ?1").map_err(sql_err)?;
        stmt.query_row(params![username], |r| {
            let embedding = r.get_ref(0)?;
            Ok((has_template(embedding), decode_embedding(embedding), r.get::<_, i64>(1)?, r.get::<_, Option<String>>(2)?))
        })
        .optional()
        .map_err(sql_err)?
    };
    let Some((has_old, old, old_samples, stored_model)) = row else { return Err(StoreError::UserNotFound(username)) };
    if has_old
        && let Some(stored) = stored_model
        && !is_ours(Some(&stored), model_id)
    {
        // Dropping `tx` rolls back: nothing written.
        return Err(StoreError::ModelMismatch { username, stored, ours: model_id.to_owned() });
    }
    let (old, old_samples) = match old {
        Ok(old) => (old, samples_from(old_samples)),
        Err(why) => {
            tracing::warn!(username = %username, "sqlite store: replacing the unusable template of '{username}': {why}");
            (Vec::new(), 0)
        }
    };
    let (template, samples) = weighted_template(&old, old_samples, embeddings);
    let now = now_ms();
    {
        let mut stmt = tx
            .prepare_cached("UPDATE users SET embedding = ?2, samples = ?3, model_id = ?4, updated_at = ?5 WHERE username = ?1")
            .map_err(sql_err)?;
        stmt.execute(params![username, encode_embedding(&template), samples_to_sql(samples)?, model_id, now]).map_err(sql_err)?;
    }
    tx.commit().map_err(sql_err)?;
    Ok(UserRecord { username, embedding: template, samples, model_id: Some(model_id.to_owned()), updated_at: time_from_ms(Some(now)) })
}
