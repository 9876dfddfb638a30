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

//!
//! Files: this one (opening, connection, errors, the [`FaceStore`] methods), `schema`
//! (migrations), `users` (the users table's operations), `faces` (the second API's face records
//! and images), `tests`.

mod faces;
mod schema;
#[cfg(test)]
mod tests;
mod users;

use schema::*;
use users::*;

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
