//! The PostgreSQL store (`DATABASE_URL=postgres://...`), with pgvector: users of the original
//! contract and the second API's face records in one database, shared by any number of replicas
//! and by the other service that writes the `faces` table.
//!
//! - Schema ([`SCHEMA`], `schema.sql`): `users` (the seed layout `username`, `embeddings` as a
//!   512-element array or vector, plus `samples`, `model_id`, `updated_at`); `faces` exactly as
//!   the other service has it (`id` uuid, `display_name`, `image_url`, `face_vec vector(512)`,
//!   `inserted_at`) plus `model_id`, added with `add column if not exists`; `face_images`
//!   (facerec's images, deleted with their record); the `match_faces` function and an HNSW index
//!   (`vector_cosine_ops`) where absent; triggers that `NOTIFY` replicas of every change.
//!   `DATABASE_MIGRATE=auto` runs it at start under an advisory lock (idempotent); `off` leaves
//!   the schema to the operator (`psql -f src/store/postgres/schema.sql`).
//! - Rows written by another tool load as in MongoDB: a missing `model_id` is taken as ours, a
//!   vector that is not unit length is normalised when read, a missing `image_url` points at
//!   `/api/face/<id>/image`, a missing date reads as the epoch.
//! - Enrolment: one transaction that locks the user's row (`select ... for update`), folds the
//!   new embeddings in with [`super::weighted_template`] and writes the row: concurrent
//!   enrolments from any replica are serialised by the row lock and all count.
//! - A face record and its image are written in one transaction (both or neither), and deleted
//!   in one.
//! - Outages: at start the database must answer within `DATABASE_CONNECT_TIMEOUT`; after that
//!   every operation is bounded by twice `DATABASE_OP_TIMEOUT` and failures to reach the server
//!   map to [`StoreError::Unavailable`] (HTTP 503). The pool reconnects by itself.
//! - Other replicas: [`feed`] listens on `facerec_users` / `facerec_faces`.
//! - Search in the database ([`PgStore::search_faces`]): the HNSW index, with `hnsw.ef_search`
//!   set per query.

mod faces;
mod feed;
pub mod tls;
mod users;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;

use super::{EMBEDDING_DIM, StoreError};

/// The schema facerec needs, idempotent.
pub const SCHEMA: &str = include_str!("schema.sql");
/// Held while migrating, so that replicas starting together do not race on `create ... if not exists`.
const MIGRATE_LOCK: i64 = 0x0066_6163_6572_6563;
/// Notification channels.
pub const USERS_CHANNEL: &str = "facerec_users";
pub const FACES_CHANNEL: &str = "facerec_faces";
/// Connections in the pool.
const POOL_SIZE: usize = 16;

/// Whether facerec sets the schema up at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrate {
    Auto,
    Off,
}

impl std::str::FromStr for Migrate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "on" => Ok(Self::Auto),
            "off" | "none" => Ok(Self::Off),
            other => Err(format!("unknown DATABASE_MIGRATE '{other}': expected auto or off")),
        }
    }
}

/// Timeouts, schema and search settings.
#[derive(Debug, Clone)]
pub struct PgOptions {
    pub connect_timeout: Duration,
    pub op_timeout: Duration,
    pub migrate: Migrate,
    /// `hnsw.ef_search` of searches in the database.
    pub ef_search: u32,
    /// `m` and `ef_construction` of the HNSW index, when the migration creates it.
    pub hnsw_m: u32,
    pub hnsw_ef_construction: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            connect_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(3),
            migrate: Migrate::Auto,
            ef_search: 100,
            hnsw_m: 16,
            hnsw_ef_construction: 64,
        }
    }
}

/// Users and face records in PostgreSQL.
pub struct PgStore {
    pool: Pool,
    config: tokio_postgres::Config,
    /// The pool's TLS connector, shared by the listening connections.
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    opts: PgOptions,
    hosts: String,
    /// What the last `load_users` saw (name -> row hash), handed to `follow`.
    seed: std::sync::Mutex<Option<std::collections::HashMap<String, String>>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("hosts", &self.hosts).finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to `url`, checks within `opts.connect_timeout` that the server answers, and sets
    /// the schema up (DATABASE_MIGRATE=auto) or checks that it is there (off).
    pub async fn connect(url: &str, opts: PgOptions) -> Result<PgStore, StoreError> {
        let conn = tls::Connection::parse(url).map_err(StoreError::Internal)?;
        let protection = conn.describe();
        let (mut config, tls) = (conn.config, conn.tls);
        if config.get_application_name().is_none() {
            config.application_name("facerec");
        }
        config.connect_timeout(opts.op_timeout.min(opts.connect_timeout));
        let hosts = hosts_of(&config);
        let manager = Manager::from_config(config.clone(), tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(opts.op_timeout * 2))
            .create_timeout(Some(opts.op_timeout))
            .recycle_timeout(Some(opts.op_timeout))
            .build()
            .map_err(|e| StoreError::Internal(format!("PostgreSQL pool: {e}")))?;
        let store = PgStore { pool, config, tls, opts, hosts, seed: std::sync::Mutex::new(None) };
        let deadline = tokio::time::Instant::now() + store.opts.connect_timeout;
        let mut last = String::from("no answer");
        loop {
            match tokio::time::timeout_at(deadline, store.pool.get()).await {
                Ok(Ok(_)) => break,
                // A certificate refused is a setting to change, not an outage to wait out.
                Ok(Err(deadpool_postgres::PoolError::Backend(e))) if tls::is_handshake_refusal(&e) => {
                    return Err(StoreError::Unavailable(format!(
                        "PostgreSQL at {}: the TLS handshake failed ({}): check sslmode and sslrootcert in DATABASE_URL",
                        store.hosts,
                        pg_text(&e)
                    )));
                }
                Ok(Err(e)) => {
                    let e = pool_err("connecting", e);
                    match e {
                        StoreError::Unavailable(m) => last = m,
                        other => return Err(other),
                    }
                    if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline {
                        return Err(store.not_answering(&last));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(_) => return Err(store.not_answering(&last)),
            }
        }
        match store.opts.migrate {
            Migrate::Auto => store.migrate().await?,
            Migrate::Off => store.check_schema().await?,
        }
        store.report_index().await;
        tracing::info!(hosts = %store.hosts, migrate = ?store.opts.migrate, tls = %protection, "postgres store: connected");
        Ok(store)
    }

    fn not_answering(&self, last: &str) -> StoreError {
        StoreError::Unavailable(format!(
            "PostgreSQL at {} did not answer within {:?} (DATABASE_CONNECT_TIMEOUT): {last}",
            self.hosts, self.opts.connect_timeout
        ))
    }

    /// The servers named by the URL (no credentials).
    pub fn hosts(&self) -> &str {
        &self.hosts
    }

    /// Runs [`SCHEMA`] in one transaction under an advisory lock.
    async fn migrate(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        // The index's settings reach schema.sql as session settings (it falls back to pgvector's
        // defaults when run by hand without them).
        let (m, ef) = (self.opts.hnsw_m, self.opts.hnsw_ef_construction);
        let script = format!(
            "set client_min_messages = warning; begin; select pg_advisory_xact_lock({MIGRATE_LOCK}); \
             set local facerec.hnsw_m = '{m}'; set local facerec.hnsw_ef_construction = '{ef}'; {SCHEMA}; commit;"
        );
        // The schema may wait on another replica's migration: a generous bound.
        match tokio::time::timeout(self.opts.connect_timeout.max(self.opts.op_timeout * 10), client.batch_execute(&script)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                "setting up the schema (DATABASE_MIGRATE=auto; the role needs CREATE rights, or run schema.sql yourself and set DATABASE_MIGRATE=off): {}",
                pg_text(&e)
            ))),
            Err(_) => Err(StoreError::Unavailable("setting up the schema: no answer in time".into())),
        }
    }

    /// The HNSW index's `m` and `ef_construction` (pgvector's defaults where it was built
    /// without them); `None` without an index.
    pub async fn hnsw_settings(&self) -> Result<Option<(u32, u32)>, StoreError> {
        let sql = "select coalesce(array_to_string(c.reloptions, ','), '') from pg_index i \
                   join pg_class c on c.oid = i.indexrelid join pg_class t on t.oid = i.indrelid \
                   where t.relname = 'faces' and t.relnamespace = current_schema()::regnamespace \
                   and pg_get_indexdef(i.indexrelid) ilike '%using hnsw%face_vec%vector_cosine_ops%' limit 1";
        let row = self
            .bounded("reading the HNSW index", async { self.client().await?.query_opt(sql, &[]).await.map_err(|e| pg_err("", &e)) })
            .await?;
        Ok(row.map(|r| {
            let options: String = r.get(0);
            let value = |key: &str, default: u32| {
                options.split(',').find_map(|o| o.strip_prefix(key)?.strip_prefix('=')?.parse().ok()).unwrap_or(default)
            };
            (value("m", 16), value("ef_construction", 64))
        }))
    }

    /// Logs the index's settings, and says so when they are not the configured ones (HNSW_M
    /// and HNSW_EF_CONSTRUCTION apply when the index is created, not to one that is there).
    async fn report_index(&self) {
        let wanted = (self.opts.hnsw_m, self.opts.hnsw_ef_construction);
        match self.hnsw_settings().await {
            Ok(Some(have)) if have == wanted => tracing::info!(m = have.0, ef_construction = have.1, "postgres store: HNSW index"),
            Ok(Some((m, ef))) => tracing::warn!(
                m,
                ef_construction = ef,
                "postgres store: the HNSW index was built with other settings than HNSW_M={} HNSW_EF_CONSTRUCTION={}; they apply when it is \
                 created: `drop index faces_face_vec_hnsw` and restart (the build takes minutes per 100k rows) to rebuild it with them",
                wanted.0,
                wanted.1
            ),
            Ok(None) => tracing::warn!("postgres store: no HNSW index on faces.face_vec: a search in the database scans every row"),
            Err(e) => tracing::warn!(error = %e, "postgres store: the HNSW index could not be read"),
        }
    }

    /// With DATABASE_MIGRATE=off: the tables facerec needs are there.
    async fn check_schema(&self) -> Result<(), StoreError> {
        let sql = "select count(*) from information_schema.columns where table_schema = current_schema() and \
                   ((table_name = 'users' and column_name in ('username', 'embeddings', 'samples', 'model_id', 'updated_at')) or \
                    (table_name = 'faces' and column_name in ('id', 'display_name', 'image_url', 'face_vec', 'inserted_at', 'model_id')) or \
                    (table_name = 'face_images' and column_name in ('id', 'content_type', 'bytes')))";
        let row = self
            .bounded("checking the schema", async { self.client().await?.query_one(sql, &[]).await.map_err(|e| pg_err("", &e)) })
            .await?;
        let found: i64 = row.get(0);
        if found != 14 {
            return Err(StoreError::Unavailable(format!(
                "DATABASE_MIGRATE=off but the schema is incomplete ({found} of 14 columns of users, faces, face_images): run src/store/postgres/schema.sql"
            )));
        }
        Ok(())
    }

    /// A pooled connection.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| pool_err("connecting", e))
    }

    /// Runs an operation bounded by twice the operation timeout.
    async fn bounded<T>(&self, what: &str, op: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let limit = self.opts.op_timeout * 2;
        match tokio::time::timeout(limit, op).await {
            Ok(r) => r.map_err(|e| prefix(what, e)),
            Err(_) => Err(StoreError::Unavailable(format!("{what}: no answer from PostgreSQL within {limit:?}"))),
        }
    }
}

fn prefix(what: &str, e: StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(format!("{what}: {m}")),
        StoreError::Internal(m) => StoreError::Internal(format!("{what}: {m}")),
        other => other,
    }
}

fn hosts_of(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The server's message (and code), or the client's, on one line.
fn pg_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => one_line(&format!("{} ({})", db.message(), db.code().code())),
        None => one_line(&chain(e)),
    }
}

/// An error and its causes, `: `-separated (tokio-postgres' own text leaves them out: "error
/// performing TLS handshake" says nothing of the certificate).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Whether an error means "not now": the connection, the server's resources or its operator.
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => {
            let class = &code.code()[..2];
            matches!(class, "08" | "53" | "57" | "58")
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::INVALID_PASSWORD
                || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        }
        None => {
            e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()) || e.to_string().contains("timeout")
        }
    }
}

fn pg_err(what: &str, e: &tokio_postgres::Error) -> StoreError {
    let m = if what.is_empty() { pg_text(e) } else { format!("{what}: {}", pg_text(e)) };
    if is_unavailable(e) { StoreError::Unavailable(m) } else { StoreError::Internal(m) }
}

fn pool_err(what: &str, e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => {
            // A connection that cannot be opened is an outage, whatever the reason.
            StoreError::Unavailable(format!("{what}: {}", pg_text(&e)))
        }
        other => StoreError::Unavailable(format!("{what}: {}", one_line(&other))),
    }
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// An error as one line of at most 400 characters.
fn one_line(e: &impl std::fmt::Display) -> String {
    let text = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(400) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

/// A stored vector as a unit vector of [`EMBEDDING_DIM`] finite numbers: normalised when its norm
/// is off by more than 1e-4 (written by another tool), else exactly as stored.
fn unit_vector(values: &[f32]) -> Result<Vec<f32>, String> {
    if values.len() != EMBEDDING_DIM {
        return Err(format!("{} numbers, not {EMBEDDING_DIM}", values.len()));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("element {i} is not a finite number"));
    }
    let norm = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
    if norm <= 0.0 {
        return Err("all zeros".to_owned());
    }
    if (norm - 1.0).abs() > 1e-4 { Ok(values.iter().map(|&v| (f64::from(v) / norm) as f32).collect()) } else { Ok(values.to_vec()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_vectors_are_checked_and_normalised() {
        let v = unit_vector(&vec![2.0; EMBEDDING_DIM]).unwrap();
        assert!(v.iter().all(|x| (x - 1.0 / (EMBEDDING_DIM as f32).sqrt()).abs() < 1e-6));
        assert_eq!(unit_vector(&v).unwrap(), v);
        assert!(unit_vector(&[1.0; 3]).unwrap_err().contains("3 numbers"));
        assert!(unit_vector(&vec![0.0; EMBEDDING_DIM]).unwrap_err().contains("zeros"));
        let mut nan = vec![1.0; EMBEDDING_DIM];
        nan[5] = f32::NAN;
        assert!(unit_vector(&nan).unwrap_err().contains("element 5"));
    }

    #[test]
    fn migrate_modes_parse_and_urls_name_hosts() {
        assert_eq!(" Auto".parse::<Migrate>(), Ok(Migrate::Auto));
        assert_eq!("off".parse::<Migrate>(), Ok(Migrate::Off));
        assert!("maybe".parse::<Migrate>().is_err());
        let c: tokio_postgres::Config = "postgres://u:secret@db.example:6543/postgres".parse().unwrap();
        assert_eq!(hosts_of(&c), "db.example:6543");
    }
}
