//! The embedded SQLite store (the default): one database file, `data/facerec.db` unless the
//! caller chooses another.
//!
//! - Schema: table `users` (`username TEXT PRIMARY KEY`, `embedding BLOB` of 512
//!   little-endian f32 or NULL/empty before the first enrolment, `samples INTEGER NOT NULL`,
//!   `model_id TEXT` (NULL for legacy rows), `updated_at INTEGER` in unix milliseconds). Its
//!   version lives in `PRAGMA user_version`; [`migrate`] brings older files up to
//!   [`SCHEMA_VERSION`] in one transaction and refuses files written by a newer build.
//! - Journal: WAL with `synchronous=NORMAL`. In WAL mode that setting never corrupts the
//!   file and loses nothing when the process crashes; only a power cut or kernel crash can
//!   roll back the last few commits (fsyncs happen at checkpoints, not at every commit). An
//!   enrolment lost that way is redone by enrolling again, while an fsync per commit would
//!   put a disk flush inside every request. WAL also lets other processes (backups, the
//!   `sqlite3` shell) read while the service writes.
//! - Concurrency: one connection behind a `std::sync::Mutex`, used only from
//!   `tokio::task::spawn_blocking`. Reads are served by the in-memory gallery, so the store
//!   only sees writes (one writer at a time in SQLite anyway), listings and the load at start:
//!   a pool would buy nothing but more open files and statement caches. Every write is one
//!   transaction; `enroll` reads and writes inside `BEGIN IMMEDIATE`, which takes the write
//!   lock before the read, so another process can't slip a write between them either. The
//!   busy timeout (5 s) makes a second writer wait rather than fail at once.
//! - Errors: SQLite busy/locked/I/O/full-disk/cannot-open/read-only/permission errors are
//!   [`StoreError::Unavailable`] (nothing was changed, retry later); anything else is
//!   [`StoreError::Internal`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, ffi, params};

use super::{
    EMBEDDING_DIM, FaceStore, LoadedUsers, StoreError, StoreKind, UserBatches, UserRecord, UserSummary, check_new_embeddings, is_ours,
    rfc3339, weighted_template,
};

/// Version of the schema this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i32 = 2;

/// How long a statement waits for another connection's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Page size of new database files (existing files keep theirs). A user row is a little over
/// 2 KiB, so 4 KiB pages hold one row each and waste half the file; 16 KiB pages hold seven
/// (about 90 % full), which makes the file and the scan at start almost half as large.
const PAGE_SIZE: u32 = 16_384;

/// Bytes of a stored embedding.
const EMBEDDING_BYTES: usize = EMBEDDING_DIM * 4;

/// Users in an embedded SQLite database file. Cheap to share behind an `Arc`; every call
/// runs on tokio's blocking pool.
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// The database file's identity when it was opened, for [`FaceStore::ping`].
    file_id: Option<(u64, u64)>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating the file and its parent folders, and the schema) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with_busy_timeout(path, BUSY_TIMEOUT)
    }

    fn open_with_busy_timeout(path: &Path, busy_timeout: Duration) -> Result<SqliteStore, StoreError> {
        let at = |e: StoreError| match e {
            StoreError::Unavailable(m) => StoreError::Unavailable(format!("{}: {m}", path.display())),
            StoreError::Internal(m) => StoreError::Internal(format!("{}: {m}", path.display())),
            other => other,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Unavailable(format!("cannot create the folder {}: {e}", parent.display())))?;
        }
        let mut conn = Connection::open(path).map_err(sql_err).map_err(at)?;
        configure(&conn, busy_timeout).map_err(at)?;
        migrate(&mut conn).map_err(at)?;
        let file_id = file_id(path).ok().flatten();
        Ok(SqliteStore { conn: Arc::new(Mutex::new(conn)), path: path.to_path_buf(), file_id })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on tokio's blocking pool.
    pub(super) async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&conn);
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("sqlite task failed: {e}")))?
    }
}

/// Locks the connection. A panic while it was held poisons the mutex; the connection itself
/// is still sound (a `Transaction` rolls back as the panic unwinds), so take it back, roll
/// back any transaction left open, and carry on rather than fail every later request.
fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    match conn.lock() {
        Ok(guard) => guard,
        Err(poisoned) => {
            conn.clear_poison();
            let guard = poisoned.into_inner();
            tracing::warn!("sqlite store: a previous operation panicked; recovering its connection");
            if !guard.is_autocommit()
                && let Err(e) = guard.execute_batch("ROLLBACK")
            {
                tracing::warn!("sqlite store: rollback after a panic failed: {e}");
            }
            guard
        }
    }
}

/// Connection settings; `page_size` only matters for a new, empty file.
fn configure(conn: &Connection, busy_timeout: Duration) -> Result<(), StoreError> {
    conn.busy_timeout(busy_timeout).map_err(sql_err)?;
    conn.pragma_update(None, "page_size", PAGE_SIZE).map_err(sql_err)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(sql_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!("sqlite store: WAL journal not available (journal_mode is {mode}); writers will block readers");
    }
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(sql_err)?;
    // For the tables to come (their rows will refer to `users` and go with it).
    conn.pragma_update(None, "foreign_keys", true).map_err(sql_err)?;
    Ok(())
}

/// Creates the schema, or upgrades it to [`SCHEMA_VERSION`], in one immediate transaction
/// (two processes opening a new file at once can't both create it).
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
    let version: i32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql_err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Internal(format!(
            "database schema version {version} is newer than this build's ({SCHEMA_VERSION}); upgrade the service"
        )));
    }
    if version < 1 {
        // IF NOT EXISTS: a file made before the version was recorded keeps its rows.
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS users (
                 username   TEXT PRIMARY KEY NOT NULL,
                 embedding  BLOB,
                 samples    INTEGER NOT NULL DEFAULT 0,
                 model_id   TEXT,
                 updated_at INTEGER
             );",
        )
        .map_err(sql_err)?;
    }
    if version < 2 {
        // The second API's face records (see `sqlite_faces`), their images apart so that
        // loading the vectors at start never reads the images.
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS faces (
                 id           TEXT PRIMARY KEY NOT NULL,
                 display_name TEXT NOT NULL,
                 image_url    TEXT NOT NULL,
                 face_vec     BLOB NOT NULL,
                 model_id     TEXT NOT NULL,
                 inserted_at  INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS faces_inserted_at ON faces (inserted_at, id);
             CREATE TABLE IF NOT EXISTS face_images (
                 id           TEXT PRIMARY KEY NOT NULL REFERENCES faces (id) ON DELETE CASCADE,
                 content_type TEXT NOT NULL,
                 bytes        BLOB NOT NULL
             );",
        )
        .map_err(sql_err)?;
    }
    // Later versions add their steps here (`if version < 3 { ... }`).
    if version != SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(sql_err)?;
    }
    tx.commit().map_err(sql_err)
}

/// Maps SQLite's errors: the database being busy, locked, unreadable or full is
/// `Unavailable` (nothing changed; try again later); the rest is `Internal`.
pub(super) fn sql_err(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied
            | ErrorCode::FileLockingProtocolFailed,
        ) => StoreError::Unavailable(format!("sqlite: {e}")),
        _ => StoreError::Internal(format!("sqlite: {e}")),
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == ErrorCode::ConstraintViolation
                && (f.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY || f.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE)
    )
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A stored time (NULL or out of range: the epoch).
pub(super) fn time_from_ms(ms: Option<i64>) -> SystemTime {
    ms.and_then(|ms| u64::try_from(ms).ok())
        .and_then(|ms| SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// A stored count (negative, which only a hand edit could write: none).
fn samples_from(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn samples_to_sql(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Internal(format!("sample count {n} does not fit the database")))
}

/// Whether a stored embedding is there at all (NULL and an empty blob are "no template").
fn has_template(v: ValueRef<'_>) -> bool {
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

fn load_users_blocking(conn: &mut Connection, model_id: &str) -> Result<LoadedUsers, StoreError> {
    let mut users = Vec::new();
    let loaded = scan_users(conn, model_id, &mut users)?;
    Ok(LoadedUsers { users, ..loaded })
}

/// Where [`scan_users`] puts the users it reads.
trait Scanned {
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
const STREAM_BATCH: usize = 1024;

/// Sends the users on in batches of [`STREAM_BATCH`]; stops sending once the receiver is gone.
struct Batches {
    sink: Option<UserBatches>,
    batch: Vec<UserRecord>,
}

impl Batches {
    fn send(&mut self) {
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

fn stream_users_blocking(conn: &mut Connection, model_id: &str, sink: UserBatches) -> Result<LoadedUsers, StoreError> {
    let mut batches = Batches { sink: Some(sink), batch: Vec::with_capacity(STREAM_BATCH) };
    let loaded = scan_users(conn, model_id, &mut batches)?;
    if !batches.batch.is_empty() {
        batches.send();
    }
    Ok(loaded)
}

/// Reads every comparable user (see [`LoadedUsers`]) into `out`; the answer has the counts
/// and no `users`.
fn scan_users(conn: &mut Connection, model_id: &str, out: &mut dyn Scanned) -> Result<LoadedUsers, StoreError> {
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

fn create_user_blocking(conn: &mut Connection, username: String) -> Result<UserRecord, StoreError> {
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

fn get_user_blocking(conn: &mut Connection, username: String) -> Result<Option<UserRecord>, StoreError> {
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

fn list_users_blocking(conn: &mut Connection) -> Result<Vec<UserSummary>, StoreError> {
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

fn delete_user_blocking(conn: &mut Connection, username: String) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached("DELETE FROM users WHERE username = ?1").map_err(sql_err)?;
    match stmt.execute(params![username]).map_err(sql_err)? {
        0 => Err(StoreError::UserNotFound(username)),
        _ => Ok(()),
    }
}

fn enroll_blocking(conn: &mut Connection, username: String, embeddings: &[Vec<f32>], model_id: &str) -> Result<UserRecord, StoreError> {
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

#[async_trait::async_trait]
impl FaceStore for SqliteStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Sqlite
    }

    async fn load_users(&self, model_id: &str) -> Result<LoadedUsers, StoreError> {
        let model_id = model_id.to_owned();
        self.call(move |conn| load_users_blocking(conn, &model_id)).await
    }

    async fn stream_users(&self, model_id: &str, sink: UserBatches) -> Result<LoadedUsers, StoreError> {
        let model_id = model_id.to_owned();
        self.call(move |conn| stream_users_blocking(conn, &model_id, sink)).await
    }

    async fn create_user(&self, username: &str) -> Result<UserRecord, StoreError> {
        let username = username.to_owned();
        self.call(move |conn| create_user_blocking(conn, username)).await
    }

    async fn get_user(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let username = username.to_owned();
        self.call(move |conn| get_user_blocking(conn, username)).await
    }

    async fn list_users(&self) -> Result<Vec<UserSummary>, StoreError> {
        self.call(list_users_blocking).await
    }

    async fn delete_user(&self, username: &str) -> Result<(), StoreError> {
        let username = username.to_owned();
        self.call(move |conn| delete_user_blocking(conn, username)).await
    }

    async fn enroll(&self, username: &str, embeddings: &[Vec<f32>], model_id: &str) -> Result<UserRecord, StoreError> {
        check_new_embeddings(embeddings)?;
        let (username, embeddings, model_id) = (username.to_owned(), embeddings.to_vec(), model_id.to_owned());
        self.call(move |conn| enroll_blocking(conn, username, &embeddings, &model_id)).await
    }

    /// The file at the path is still the database this connection opened (a deleted or
    /// replaced file would take every later write with it), and SQLite answers a query.
    async fn ping(&self) -> Result<(), StoreError> {
        let (path, opened) = (self.path.clone(), self.file_id);
        self.call(move |conn| {
            let now = file_id(&path).map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
            if opened.is_some() && now != opened {
                return Err(StoreError::Unavailable(format!("{} was replaced or removed since it was opened", path.display())));
            }
            conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)).map_err(sql_err)?;
            Ok(())
        })
        .await
    }
}

/// The identity of the file at `path` (device and inode on Unix; `None` elsewhere, where only
/// its existence is checked).
fn file_id(path: &Path) -> std::io::Result<Option<(u64, u64)>> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a file"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Ok(Some((meta.dev(), meta.ino())))
    }
    #[cfg(not(unix))]
    {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// A fresh folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static SEQ: AtomicUsize = AtomicUsize::new(0);
            let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let dir = std::env::temp_dir().join(format!(
                "facerec-sqlite-{tag}-{}-{nanos}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        /// A database path in a sub-folder that does not exist yet (`open` must create it).
        fn db(&self) -> PathBuf {
            self.0.join("data").join("facerec.db")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Deterministic pseudo-random numbers (xorshift64*), in [-1, 1).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }

        fn vector(&mut self, scale: f32) -> Vec<f32> {
            (0..EMBEDDING_DIM).map(|_| self.next() * scale).collect()
        }
    }

    fn normalised(v: &[f64]) -> Vec<f32> {
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| (x / norm) as f32).collect()
    }

    fn unit(seed: u64) -> Vec<f32> {
        let v = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).vector(1.0);
        normalised(&v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>())
    }

    /// The L2-normalised mean of `vs`.
    fn mean(vs: &[Vec<f32>]) -> Vec<f32> {
        let mut acc = vec![0.0f64; EMBEDDING_DIM];
        for v in vs {
            for (a, &x) in acc.iter_mut().zip(v) {
                *a += f64::from(x);
            }
        }
        normalised(&acc)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Writes a row as an older build, or a corrupted file, would.
    fn insert_raw(store: &SqliteStore, username: &str, embedding: Option<Vec<u8>>, samples: i64, model_id: Option<&str>) {
        let conn = lock(&store.conn);
        conn.execute(
            "INSERT INTO users (username, embedding, samples, model_id, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![username, embedding, samples, model_id, 1_700_000_000_000i64],
        )
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn create_get_list_delete_round_trip() {
        let dir = TempDir::new("roundtrip");
        let store = SqliteStore::open(&dir.db()).unwrap();
        assert_eq!(store.kind(), StoreKind::Sqlite);
        assert!(store.list_users().await.unwrap().is_empty());

        let bob = store.create_user("bob").await.unwrap();
        assert_eq!((bob.username.as_str(), bob.samples, bob.embedding.len(), bob.model_id.as_deref()), ("bob", 0, 0, None));
        let alice = store.create_user("alice").await.unwrap();
        assert_eq!(store.get_user("bob").await.unwrap(), Some(bob.clone()));
        assert_eq!(store.get_user("carol").await.unwrap(), None);

        let list = store.list_users().await.unwrap();
        assert_eq!(list.iter().map(|u| u.username.as_str()).collect::<Vec<_>>(), ["alice", "bob"]);
        assert_eq!(list[0], UserSummary { username: "alice".into(), samples: 0, model_id: None, updated_at: rfc3339(alice.updated_at) });

        assert!(matches!(store.create_user("bob").await, Err(StoreError::UserExists(u)) if u == "bob"));
        store.delete_user("bob").await.unwrap();
        assert_eq!(store.get_user("bob").await.unwrap(), None);
        assert!(matches!(store.delete_user("bob").await, Err(StoreError::UserNotFound(u)) if u == "bob"));
        assert!(matches!(store.enroll("bob", &[unit(1)], "m1").await, Err(StoreError::UserNotFound(u)) if u == "bob"));
        assert_eq!(store.list_users().await.unwrap().len(), 1);
        // The name is free again.
        store.create_user("bob").await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn enroll_takes_the_weighted_mean() {
        let dir = TempDir::new("enroll");
        let store = SqliteStore::open(&dir.db()).unwrap();
        store.create_user("ann").await.unwrap();

        let first: Vec<Vec<f32>> = (1..=3).map(unit).collect();
        let rec = store.enroll("ann", &first, "arcface-r100").await.unwrap();
        assert_eq!(rec.samples, 3);
        assert_eq!(rec.model_id.as_deref(), Some("arcface-r100"));
        assert!(max_diff(&rec.embedding, &mean(&first)) < 1e-6);
        assert_eq!(store.get_user("ann").await.unwrap().as_ref(), Some(&rec));

        let second: Vec<Vec<f32>> = (4..=5).map(unit).collect();
        let rec2 = store.enroll("ann", &second, "arcface-r100").await.unwrap();
        let (expected, n) = weighted_template(&rec.embedding, 3, &second);
        assert_eq!((rec2.samples, n), (5, 5));
        assert!(max_diff(&rec2.embedding, &expected) < 1e-6);
        let norm = rec2.embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        assert_eq!(store.get_user("ann").await.unwrap(), Some(rec2.clone()));

        let list = store.list_users().await.unwrap();
        assert_eq!(list[0].samples, 5);
        assert_eq!(list[0].model_id.as_deref(), Some("arcface-r100"));

        // Bad input from a caller is refused before it reaches the file.
        assert!(matches!(store.enroll("ann", &[], "arcface-r100").await, Err(StoreError::Internal(_))));
        assert!(matches!(store.enroll("ann", &[vec![1.0; 3]], "arcface-r100").await, Err(StoreError::Internal(_))));
        let mut nan = unit(9);
        nan[7] = f32::NAN;
        assert!(matches!(store.enroll("ann", &[nan], "arcface-r100").await, Err(StoreError::Internal(_))));
        assert_eq!(store.get_user("ann").await.unwrap(), Some(rec2));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_enrolments_all_count() {
        let dir = TempDir::new("concurrent");
        let store = Arc::new(SqliteStore::open(&dir.db()).unwrap());
        store.create_user("zoe").await.unwrap();

        // Ten images of one face: a common direction plus a little noise per image. (The
        // step-by-step weighted mean equals the mean of all only up to the norm of the
        // partial means, which for a real face's images is close to 1.)
        let base = unit(42);
        let images: Vec<Vec<f32>> = (0..10u64)
            .map(|i| {
                let noise = Rng(1000 + i).vector(0.05 / (EMBEDDING_DIM as f32 / 3.0).sqrt());
                mean(&[base.iter().zip(&noise).map(|(b, n)| b + n).collect()])
            })
            .collect();
        let expected = mean(&images);
        // The tolerance can tell a lost image.
        for skip in 0..images.len() {
            let others: Vec<Vec<f32>> = images.iter().enumerate().filter(|(i, _)| *i != skip).map(|(_, v)| v.clone()).collect();
            let d = max_diff(&mean(&others), &expected);
            assert!(d > 2e-4, "leaving image {skip} out moves the mean by only {d}");
        }

        let tasks: Vec<_> = images
            .iter()
            .cloned()
            .map(|image| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.enroll("zoe", &[image], "m1").await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let rec = store.get_user("zoe").await.unwrap().unwrap();
        assert_eq!(rec.samples, 10);
        let diff = max_diff(&rec.embedding, &expected);
        assert!(diff < 1e-4, "template is {diff} away from the mean of all ten images");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn model_mismatch_is_refused_and_legacy_rows_are_adopted() {
        let dir = TempDir::new("model");
        let store = SqliteStore::open(&dir.db()).unwrap();
        store.create_user("ann").await.unwrap();
        let before = store.enroll("ann", &[unit(1), unit(2)], "old-model").await.unwrap();
        match store.enroll("ann", &[unit(3)], "new-model").await {
            Err(StoreError::ModelMismatch { username, stored, ours }) => {
                assert_eq!((username.as_str(), stored.as_str(), ours.as_str()), ("ann", "old-model", "new-model"));
            }
            other => panic!("expected ModelMismatch, got {other:?}"),
        }
        assert_eq!(store.get_user("ann").await.unwrap(), Some(before));

        // No template yet: any model may enrol, and its id is written.
        store.create_user("bea").await.unwrap();
        let bea = store.enroll("bea", &[unit(4)], "new-model").await.unwrap();
        assert_eq!((bea.model_id.as_deref(), bea.samples), (Some("new-model"), 1));
        // A model id with no template (left by hand) does not block either.
        insert_raw(&store, "cid", None, 0, Some("old-model"));
        assert_eq!(store.enroll("cid", &[unit(5)], "new-model").await.unwrap().model_id.as_deref(), Some("new-model"));

        // A legacy row: a template, no model id, no count. It is taken as ours, weighs as one
        // image, and gets our model id.
        let legacy = unit(6);
        insert_raw(&store, "dan", Some(encode_embedding(&legacy)), 0, None);
        let got = store.get_user("dan").await.unwrap().unwrap();
        assert_eq!((got.samples, got.model_id, got.embedding.clone()), (0, None, legacy.clone()));
        assert_eq!(got.updated_at, SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000));
        let new = unit(7);
        let dan = store.enroll("dan", std::slice::from_ref(&new), "new-model").await.unwrap();
        assert_eq!((dan.samples, dan.model_id.as_deref()), (2, Some("new-model")));
        assert!(max_diff(&dan.embedding, &mean(&[legacy, new])) < 1e-6);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn load_users_skips_malformed_and_foreign_rows() {
        let dir = TempDir::new("load");
        let store = SqliteStore::open(&dir.db()).unwrap();
        store.create_user("fresh").await.unwrap();
        store.create_user("ours").await.unwrap();
        let ours = store.enroll("ours", &[unit(1)], "m1").await.unwrap();
        store.create_user("theirs").await.unwrap();
        store.enroll("theirs", &[unit(2)], "m2").await.unwrap();
        insert_raw(&store, "legacy", Some(encode_embedding(&unit(3))), 0, None);
        insert_raw(&store, "empty-blob", Some(Vec::new()), 0, None);
        insert_raw(&store, "short", Some(vec![0u8; 100]), 1, Some("m1"));
        let mut nan = unit(4);
        nan[100] = f32::NAN;
        insert_raw(&store, "nan", Some(encode_embedding(&nan)), 1, Some("m1"));
        let mut inf = unit(5);
        inf[0] = f32::INFINITY;
        insert_raw(&store, "inf", Some(encode_embedding(&inf)), 1, None);

        let loaded = store.load_users("m1").await.unwrap();
        assert_eq!((loaded.malformed, loaded.other_model), (3, 1));
        let mut names: Vec<&str> = loaded.users.iter().map(|u| u.username.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["empty-blob", "fresh", "legacy", "ours"]);
        assert_eq!(loaded.users.iter().find(|u| u.username == "ours"), Some(&ours));
        assert!(
            loaded.users.iter().filter(|u| u.username.contains("fresh") || u.username.contains("empty")).all(|u| u.embedding.is_empty())
        );

        // From the other model's side, "ours" is the foreign one.
        let loaded = store.load_users("m2").await.unwrap();
        // "short" and "nan" are m1's rows: foreign here, not judged; only the legacy "inf" row is malformed.
        assert_eq!((loaded.malformed, loaded.other_model, loaded.users.len()), (1, 3, 4));

        // A malformed row is an error for a single read, and enrolling replaces it.
        assert!(matches!(store.get_user("short").await, Err(StoreError::Internal(_))));
        let fixed = store.enroll("short", &[unit(6)], "m1").await.unwrap();
        assert_eq!(fixed.samples, 1);
        assert_eq!(store.load_users("m1").await.unwrap().malformed, 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn streaming_gives_what_a_load_gives_in_batches() {
        let dir = TempDir::new("stream");
        let store = SqliteStore::open(&dir.db()).unwrap();
        let n = 2 * STREAM_BATCH + 7;
        for i in 0..n {
            insert_raw(&store, &format!("u{i}"), Some(encode_embedding(&unit(i as u64))), 1, Some(if i % 100 == 0 { "m2" } else { "m1" }));
        }
        insert_raw(&store, "short", Some(vec![0u8; 100]), 1, Some("m1"));
        let loaded = store.load_users("m1").await.unwrap();

        let (sink, batches) = std::sync::mpsc::sync_channel(1);
        let reader = std::thread::spawn(move || batches.into_iter().collect::<Vec<Vec<UserRecord>>>());
        let streamed = store.stream_users("m1", sink).await.unwrap();
        let batches = reader.join().unwrap();
        assert_eq!((streamed.malformed, streamed.other_model, streamed.users.len()), (loaded.malformed, loaded.other_model, 0));
        assert_eq!((streamed.malformed, streamed.other_model), (1, n.div_ceil(100)));
        assert_eq!(batches.len(), loaded.users.len().div_ceil(STREAM_BATCH));
        assert!(batches.iter().all(|b| b.len() <= STREAM_BATCH));
        assert_eq!(batches.into_iter().flatten().collect::<Vec<_>>(), loaded.users, "the same users in the same order");

        // A receiver that is gone stops the sending, not the load.
        let (sink, batches) = std::sync::mpsc::sync_channel(1);
        drop(batches);
        assert_eq!(store.stream_users("m1", sink).await.unwrap().malformed, 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn data_survives_reopening() {
        let dir = TempDir::new("reopen");
        let (kept, listed) = {
            let store = SqliteStore::open(&dir.db()).unwrap();
            store.create_user("gone").await.unwrap();
            store.create_user("kept").await.unwrap();
            let kept = store.enroll("kept", &[unit(1), unit(2)], "m1").await.unwrap();
            store.delete_user("gone").await.unwrap();
            (kept, store.list_users().await.unwrap())
        };
        let store = SqliteStore::open(&dir.db()).unwrap();
        assert_eq!(store.get_user("kept").await.unwrap(), Some(kept.clone()));
        assert_eq!(store.get_user("gone").await.unwrap(), None);
        assert_eq!(store.list_users().await.unwrap(), listed);
        let loaded = store.load_users("m1").await.unwrap();
        assert_eq!(loaded.users, vec![kept]);
        let version: i32 = lock(&store.conn).query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let mode: String = lock(&store.conn).query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn odd_usernames_are_plain_data() {
        let dir = TempDir::new("names");
        let store = SqliteStore::open(&dir.db()).unwrap();
        let names = [
            "'; DROP TABLE users; --",
            "Robert'); DROP TABLE users;--",
            "O'Brien",
            "\"double\" quotes",
            "Zoë 張三 🙂",
            "back\\slash %_ wild",
            " spaced ",
        ];
        for name in names {
            let rec = store.create_user(name).await.unwrap();
            assert_eq!(rec.username, name);
        }
        assert!(matches!(store.create_user("O'Brien").await, Err(StoreError::UserExists(_))));
        for name in names {
            assert_eq!(store.get_user(name).await.unwrap().unwrap().username, name);
        }
        let mut sorted = names.map(str::to_owned).to_vec();
        sorted.sort();
        let list = store.list_users().await.unwrap();
        assert_eq!(list.iter().map(|u| u.username.clone()).collect::<Vec<_>>(), sorted);

        let rec = store.enroll("'; DROP TABLE users; --", &[unit(1)], "m'; --").await.unwrap();
        assert_eq!(rec.model_id.as_deref(), Some("m'; --"));
        store.delete_user("Robert'); DROP TABLE users;--").await.unwrap();
        assert_eq!(store.list_users().await.unwrap().len(), names.len() - 1);
        assert_eq!(store.load_users("m'; --").await.unwrap().users.len(), names.len() - 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_locked_database_is_unavailable_and_changes_nothing() {
        let dir = TempDir::new("busy");
        let store = SqliteStore::open_with_busy_timeout(&dir.db(), Duration::from_millis(200)).unwrap();
        store.create_user("ann").await.unwrap();
        let before = store.enroll("ann", &[unit(1)], "m1").await.unwrap();

        // Another process holds the write lock.
        let other = Connection::open(dir.db()).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let started = Instant::now();
        assert!(matches!(store.create_user("bob").await, Err(StoreError::Unavailable(_))));
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(matches!(store.enroll("ann", &[unit(2)], "m1").await, Err(StoreError::Unavailable(_))));
        // Readers are not blocked in WAL mode.
        assert_eq!(store.get_user("ann").await.unwrap(), Some(before.clone()));
        other.execute_batch("ROLLBACK").unwrap();

        assert_eq!(store.get_user("ann").await.unwrap(), Some(before));
        store.create_user("bob").await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_panic_does_not_poison_the_store() {
        let dir = TempDir::new("panic");
        let store = SqliteStore::open(&dir.db()).unwrap();
        // Panics with a transaction open and a row written in it.
        let result = store
            .call(|conn| -> Result<(), StoreError> {
                conn.execute_batch("BEGIN IMMEDIATE; INSERT INTO users (username, samples) VALUES ('half', 0);").unwrap();
                panic!("simulated bug");
            })
            .await;
        assert!(matches!(result, Err(StoreError::Internal(_))));
        assert!(store.conn.is_poisoned());
        // The next call recovers the connection and the half-done write is rolled back.
        assert_eq!(store.get_user("half").await.unwrap(), None);
        assert!(!store.conn.is_poisoned());
        store.create_user("ann").await.unwrap();
        store.enroll("ann", &[unit(1)], "m1").await.unwrap();
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = TempDir::new("schema");
        drop(SqliteStore::open(&dir.db()).unwrap());
        Connection::open(dir.db()).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        match SqliteStore::open(&dir.db()) {
            Err(StoreError::Internal(m)) => assert!(m.contains("newer"), "{m}"),
            other => panic!("expected Internal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn ping_fails_while_the_database_folder_is_replaced_by_a_file() {
        let dir = TempDir::new("ping");
        let store = SqliteStore::open(&dir.db()).unwrap();
        store.ping().await.unwrap();
        let (folder, moved) = (dir.0.join("data"), dir.0.join("data.moved"));
        std::fs::rename(&folder, &moved).unwrap();
        std::fs::write(&folder, b"not a folder").unwrap();
        assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))));
        // Another file at the same path is not the database either.
        std::fs::remove_file(&folder).unwrap();
        std::fs::create_dir(&folder).unwrap();
        std::fs::copy(moved.join("facerec.db"), dir.db()).unwrap();
        assert!(matches!(store.ping().await, Err(StoreError::Unavailable(m)) if m.contains("replaced")));
        std::fs::remove_dir_all(&folder).unwrap();
        std::fs::rename(&moved, &folder).unwrap();
        store.ping().await.unwrap();
    }

    #[test]
    fn open_fails_cleanly_when_the_folder_cannot_be_made() {
        let dir = TempDir::new("nofolder");
        let file = dir.0.join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(SqliteStore::open(&file.join("facerec.db")), Err(StoreError::Unavailable(_))));
    }

    /// Load time at start for many users. Release mode:
    /// `FACEREC_BENCH_USERS=1000000 cargo test --release --lib store::sqlite::tests::load_many_users -- --ignored --nocapture`
    /// With `FACEREC_BENCH_DB=/some/file.db` the database is kept (and reused when it exists),
    /// so that a later run can load it in a fresh process after its pages left the OS cache.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "benchmark: writes a large database"]
    async fn load_many_users() {
        let n: usize = std::env::var("FACEREC_BENCH_USERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
        let temp = TempDir::new("bench");
        let db = std::env::var_os("FACEREC_BENCH_DB").map_or_else(|| temp.db(), PathBuf::from);
        if !db.exists() {
            let store = SqliteStore::open(&db).unwrap();
            let started = Instant::now();
            let blobs: Vec<Vec<u8>> = (0..1024u64).map(|i| encode_embedding(&unit(i))).collect();
            let mut conn = lock(&store.conn);
            let tx = conn.transaction().unwrap();
            {
                let mut stmt = tx
                    .prepare("INSERT INTO users (username, embedding, samples, model_id, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)")
                    .unwrap();
                for i in 0..n {
                    stmt.execute(params![format!("user-{i:07}"), blobs[i % blobs.len()], 3, "buffalo_l", 1_700_000_000_000i64 + i as i64])
                        .unwrap();
                }
            }
            tx.commit().unwrap();
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
            eprintln!("inserted {n} users in {:.2?}", started.elapsed());
        }
        let size = std::fs::metadata(&db).unwrap().len();
        for round in 0..2 {
            let started = Instant::now();
            let store = SqliteStore::open(&db).unwrap();
            let loaded = store.load_users("buffalo_l").await.unwrap();
            let elapsed = started.elapsed();
            assert_eq!((loaded.users.len(), loaded.malformed, loaded.other_model), (n, 0, 0));
            eprintln!("round {round}: opened and loaded {n} users in {elapsed:.2?} (file {:.1} MiB)", size as f64 / 1048576.0);
        }
    }
}
