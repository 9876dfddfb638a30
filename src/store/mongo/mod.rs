//! The MongoDB store (`MONGO_URI`): the owner's existing `users` collection, used as it is.
//!
//! - Layout: database = the URI's default database (`mongodb://host/dashboard`), else
//!   `facerec`; collection `users`; a unique index on `username` (created at start when
//!   missing; existing duplicates only earn a warning). A document is `username`,
//!   `embeddings` (an array of [`EMBEDDING_DIM`] numbers: doubles, ints or longs), and what
//!   facerec adds when it writes: `samples` (images behind the template), `model_id` (the
//!   recognizer) and `updated_at` (a BSON date, the server's clock). Documents written by the
//!   old service (no `samples`, no `model_id`) load unchanged: a missing count weighs as one
//!   image, a missing model id is taken as ours. Templates are L2-normalised when read (the
//!   old service may have stored raw means); the document itself is not touched until the next
//!   enrolment. Any other field of the owner's documents is left alone.
//! - Enrolment is one `findOneAndUpdate` with an aggregation-pipeline update
//!   ([`enroll_pipeline`]): the server takes the stored template (when it is an array of
//!   [`EMBEDDING_DIM`] finite numbers), normalises it, weighs it by `samples` (at least 1),
//!   adds the sum of the new embeddings, L2-normalises and writes `embeddings` (doubles),
//!   `samples`, `model_id`, `updated_at` in the same single-document write. Concurrent
//!   enrolments, from this process or any other, are serialised by the server and all count.
//!   The filter refuses a document whose template came from another recognizer, so a
//!   mismatch writes nothing.
//! - Outages: at start MongoDB must answer a `ping` within `MONGO_CONNECT_TIMEOUT`. After
//!   that every operation has a server-selection timeout of `MONGO_OP_TIMEOUT` (unless the URI
//!   sets `serverSelectionTimeoutMS`) and single-document operations are also bounded by twice
//!   that as a whole; failures to reach the server map to [`StoreError::Unavailable`]. The
//!   driver reconnects by itself: when the server is back the next operation works.
//! - Other replicas: [`MongoStore::follow`] gives a [`ChangeFeed`] that follows a change stream
//!   on `users` where the server offers one (replica sets, Atlas), else polls (`updated_at`
//!   newer than the last seen stamp, less an overlap; an estimated count compared with the
//!   documents known, and a full `_id`/`username`/`updated_at` compare when they differ or once
//!   a minute, which finds deletions and unstamped inserts). See [`super::follow`].

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{self, Bson, Document, RawArray, RawBsonRef, RawDocument, RawDocumentBuf, doc};
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, IndexModel};

use super::{
    Change, ChangeFeed, EMBEDDING_DIM, FaceStore, LoadedUsers, Retry, StoreError, StoreKind, UserRecord, UserSummary, check_new_embeddings,
    is_ours, rfc3339,
};

/// The second API's face records (`faces`, `face_images`).
mod face_feed;
mod face_records;
mod feed;
mod raw;
mod users;

pub use feed::MongoFeed;
use feed::{Source, open_stream};
use raw::*;
pub use users::enroll_pipeline;

/// Database used when the URI names none.
pub const DEFAULT_DATABASE: &str = "facerec";
/// The collection, as the owner's dashboard has it.
pub const COLLECTION: &str = "users";
/// Where facerec records the recognizer of a template.
pub const MODEL_FIELD: &str = "model_id";

/// Polling: stamps this much older than the newest one seen are read again, for writes stamped
/// before (and committed after) the newest one.
const POLL_OVERLAP: Duration = Duration::from_secs(5);
/// Polling: a full `_id` compare at least once every this many polls (deletions and unstamped
/// inserts that the count missed, names written here and deleted elsewhere before a poll saw
/// them): every 60 s at the default 500 ms interval.
const POLL_FULL_EVERY: u32 = 120;
/// Change streams: how long one getMore waits on the server for new events.
const STREAM_AWAIT: Duration = Duration::from_millis(500);
/// Users read per query when resolving changes.
const RESOLVE_CHUNK: usize = 500;

/// How to follow other replicas' writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowMode {
    /// A change stream where the server offers one (replica sets, Atlas), else polling.
    Auto,
    /// Always poll `updated_at` (and compare ids for deletions).
    Poll,
}

impl std::str::FromStr for FollowMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "change-stream" | "changestream" => Ok(Self::Auto),
            "poll" => Ok(Self::Poll),
            other => Err(format!("unknown follow mode '{other}': expected auto or poll")),
        }
    }
}

/// Timeouts and following.
#[derive(Debug, Clone)]
pub struct MongoOptions {
    /// Start: how long the server may take to answer a first `ping`.
    pub connect_timeout: Duration,
    /// After start: server selection timeout of every operation; a single-document operation
    /// is bounded by twice this as a whole.
    pub op_timeout: Duration,
    pub follow: FollowMode,
    pub poll_interval: Duration,
}

impl Default for MongoOptions {
    fn default() -> Self {
        MongoOptions {
            connect_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(3),
            follow: FollowMode::Auto,
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// Users in a MongoDB collection.
pub struct MongoStore {
    coll: Collection<RawDocumentBuf>,
    database: String,
    hosts: String,
    opts: MongoOptions,
    /// What the last `load_users` saw, handed to `follow`.
    seed: Mutex<Option<Seed>>,
}

impl std::fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoStore").field("hosts", &self.hosts).field("database", &self.database).finish_non_exhaustive()
    }
}

type EventStream = ChangeStream<ChangeStreamEvent<Document>>;

/// Where following starts: the change stream opened before the load (or polling), and every
/// document the load saw.
struct Seed {
    stream: Option<EventStream>,
    poll: bool,
    known: HashMap<IdKey, Entry>,
    watermark: Option<i64>,
}

/// A document's `_id` as a map key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum IdKey {
    Oid([u8; 12]),
    Other(String),
}

/// What the feed remembers of a document.
#[derive(Debug, Clone)]
struct Entry {
    id: Bson,
    username: Option<String>,
    /// `updated_at` in unix milliseconds.
    stamp: Option<i64>,
}

impl MongoStore {
    /// Connects to `uri` and checks (within `opts.connect_timeout`) that the server answers,
    /// then makes sure the unique index on `username` exists.
    pub async fn connect(uri: &str, opts: MongoOptions) -> Result<MongoStore, StoreError> {
        let started = Instant::now();
        let mut co = match tokio::time::timeout(opts.connect_timeout, ClientOptions::parse(uri)).await {
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "MONGO_URI could not be resolved within {} (MONGO_CONNECT_TIMEOUT)",
                    fmt_duration(opts.connect_timeout)
                )));
            }
            Ok(Err(e)) if matches!(*e.kind, ErrorKind::DnsResolve { .. } | ErrorKind::Io(_)) => {
                return Err(StoreError::Unavailable(format!("MONGO_URI could not be resolved: {}", one_line(&e))));
            }
            Ok(Err(e)) => return Err(StoreError::Internal(format!("MONGO_URI is not a usable connection string: {}", one_line(&e)))),
            Ok(Ok(co)) => co,
        };
        co.app_name.get_or_insert_with(|| "facerec".to_owned());
        co.server_selection_timeout.get_or_insert(opts.op_timeout);
        co.connect_timeout.get_or_insert(opts.op_timeout.min(opts.connect_timeout));
        let hosts = co.hosts.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let database = co.default_database.clone().filter(|d| !d.is_empty()).unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        let client = Client::with_options(co).map_err(|e| StoreError::Internal(format!("MongoDB client: {}", one_line(&e))))?;
        let db = client.database(&database);

        // The first ping: retried until the deadline (each try is bounded by the server
        // selection timeout, usually shorter than the connect timeout).
        let deadline = started + opts.connect_timeout;
        let mut last = String::from("no answer");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::Unavailable(format!(
                    "MongoDB at {hosts} did not answer within {} (MONGO_CONNECT_TIMEOUT): {last}",
                    fmt_duration(opts.connect_timeout)
                )));
            }
            match tokio::time::timeout(left, db.run_command(doc! {"ping": 1})).await {
                Ok(Ok(_)) => break,
                Ok(Err(e)) if is_unavailable(&e) && !matches!(*e.kind, ErrorKind::Authentication { .. }) => {
                    last = one_line(&e);
                    tokio::time::sleep(Duration::from_millis(200).min(left)).await;
                }
                Ok(Err(e)) => return Err(StoreError::Unavailable(format!("MongoDB at {hosts} refused facerec: {}", one_line(&e)))),
                Err(_) => {}
            }
        }
        let store = MongoStore { coll: db.collection(COLLECTION), database, hosts, opts, seed: Mutex::new(None) };
        store.ensure_index().await?;
        store.ensure_face_indexes().await?;
        tracing::info!(hosts = %store.hosts, database = %store.database, collection = COLLECTION, "mongo store: connected");
        Ok(store)
    }

    /// The database in use.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The servers named by the URI (no credentials).
    pub fn hosts(&self) -> &str {
        &self.hosts
    }

    async fn ensure_index(&self) -> Result<(), StoreError> {
        let index = IndexModel::builder().keys(doc! {"username": 1}).options(IndexOptions::builder().unique(true).build()).build();
        match self.bounded("creating the username index", self.coll.create_index(index).into_future()).await {
            Ok(_) => Ok(()),
            Err(StoreError::Unavailable(m)) => Err(StoreError::Unavailable(m)),
            Err(e) => {
                // Duplicate names already in the owner's data, or another index on `username`:
                // keep serving; create_user still checks before it inserts.
                tracing::warn!(
                    "mongo store: no unique index on users.username ({e}); two replicas creating the same name at the same moment could both succeed"
                );
                Ok(())
            }
        }
    }

    /// Runs a single-document operation, bounded by twice the operation timeout.
    async fn bounded<T>(&self, what: &str, op: impl Future<Output = Result<T, MongoError>>) -> Result<T, StoreError> {
        let limit = self.opts.op_timeout * 2;
        match tokio::time::timeout(limit, op).await {
            Ok(result) => result.map_err(|e| store_err(what, &e)),
            Err(_) => Err(StoreError::Unavailable(format!("{what}: no answer from MongoDB within {}", fmt_duration(limit)))),
        }
    }

    async fn find_raw(&self, username: &str) -> Result<Option<RawDocumentBuf>, StoreError> {
        self.bounded("reading a user", self.coll.find_one(doc! {"username": username}).into_future()).await
    }

    /// Opens a change stream on the collection; `Ok(None)` when the server has none to offer
    /// or refuses one (a user without the `changeStream` privilege): then replicas poll.
    async fn open_stream(&self) -> Result<Option<EventStream>, StoreError> {
        match open_stream(&self.coll, None).await {
            Ok(s) => Ok(s.map(|(s, _)| s)),
            Err(e) if is_unavailable(&e) => Err(store_err("opening a change stream", &e)),
            Err(e) => {
                tracing::warn!("mongo store: no change stream on {COLLECTION} ({}); polling instead", one_line(&e));
                Ok(None)
            }
        }
    }
}

/// Codes of server errors that mean "not now": stepping down, shutting down, timeouts, locks.
const UNAVAILABLE_CODES: &[i32] = &[6, 7, 24, 46, 50, 89, 91, 112, 133, 134, 189, 262, 462, 9001, 10107, 11600, 11602, 13435, 13436];

/// Whether an error means the database could not be reached or could not serve now (retry
/// later), rather than a problem with the request or the data.
fn is_unavailable(e: &MongoError) -> bool {
    match &*e.kind {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Authentication { .. }
        | ErrorKind::Shutdown => true,
        ErrorKind::Command(c) => UNAVAILABLE_CODES.contains(&c.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(_)) => true,
        ErrorKind::Write(WriteFailure::WriteError(w)) => UNAVAILABLE_CODES.contains(&w.code),
        _ => e.contains_label("RetryableWriteError") || e.contains_label("TransientTransactionError"),
    }
}

fn is_duplicate_key(e: &MongoError) -> bool {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}

fn store_err(what: &str, e: &MongoError) -> StoreError {
    let m = format!("{what}: {}", one_line(e));
    if is_unavailable(e) { StoreError::Unavailable(m) } else { StoreError::Internal(m) }
}

/// An error as one line of at most 400 characters.
fn one_line(e: &impl std::fmt::Display) -> String {
    let text = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(400) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(d: Document) -> RawDocumentBuf {
        RawDocumentBuf::from_document(&d).unwrap()
    }

    #[test]
    fn templates_of_every_stored_shape() {
        let ones: Vec<i32> = vec![1; EMBEDDING_DIM];
        let t = template_of(&raw(doc! {"embeddings": ones})).unwrap();
        let expected = 1.0 / (EMBEDDING_DIM as f32).sqrt();
        assert!(t.iter().all(|v| (v - expected).abs() < 1e-7));
        let mixed: Vec<Bson> = (0..EMBEDDING_DIM).map(|i| if i % 2 == 0 { Bson::Int64(2) } else { Bson::Double(2.0) }).collect();
        assert_eq!(template_of(&raw(doc! {"embeddings": mixed})).unwrap(), t);
        assert_eq!(template_of(&raw(doc! {"username": "a"})), Ok(Vec::new()));
        assert_eq!(template_of(&raw(doc! {"embeddings": Bson::Null})), Ok(Vec::new()));
        assert_eq!(template_of(&raw(doc! {"embeddings": []})), Ok(Vec::new()));
        assert!(template_of(&raw(doc! {"embeddings": vec![0.5f64; 128]})).unwrap_err().contains("128 numbers"));
        assert!(template_of(&raw(doc! {"embeddings": "abc"})).is_err());
        let mut nan = vec![0.5f64; EMBEDDING_DIM];
        nan[3] = f64::NAN;
        assert!(template_of(&raw(doc! {"embeddings": nan})).unwrap_err().contains("element 3"));
        let mut text: Vec<Bson> = vec![Bson::Double(0.5); EMBEDDING_DIM];
        text[7] = Bson::String("x".into());
        assert!(template_of(&raw(doc! {"embeddings": text})).unwrap_err().contains("element 7"));
        assert!(template_of(&raw(doc! {"embeddings": vec![0.0f64; EMBEDDING_DIM]})).is_err());
    }

    #[test]
    fn legacy_fields_read_as_defaults() {
        let d = raw(doc! {"username": "ann", "embeddings": vec![1.0f64; EMBEDDING_DIM]});
        assert_eq!((samples_of(&d), model_of(&d), updated_at_of(&d)), (0, None, SystemTime::UNIX_EPOCH));
        assert!(has_template(&d));
        let d = raw(doc! {"samples": 3.0, MODEL_FIELD: 7, "embeddings": [], "updated_at": bson::DateTime::from_millis(1_700_000_000_000)});
        assert_eq!((samples_of(&d), model_of(&d), stamp_of(&d)), (3, None, Some(1_700_000_000_000)));
        assert!(!has_template(&d));
        assert_eq!(samples_of(&raw(doc! {"samples": -2})), 0);
    }

    #[test]
    fn follow_modes_parse() {
        assert_eq!("auto".parse::<FollowMode>(), Ok(FollowMode::Auto));
        assert_eq!(" Poll ".parse::<FollowMode>(), Ok(FollowMode::Poll));
        assert!("sometimes".parse::<FollowMode>().is_err());
    }

    #[test]
    fn errors_are_one_short_line() {
        let long = format!("a\nb  c {}", "x".repeat(1000));
        let line = one_line(&long);
        assert!(line.starts_with("a b c ") && !line.contains('\n') && line.len() <= 404);
    }

    #[test]
    fn the_pipeline_literals_cannot_be_read_as_expressions() {
        let p = enroll_pipeline(&[0.0; 4], 1, "$embeddings");
        let set = p[5].get_document("$set").unwrap();
        assert_eq!(set.get_document(MODEL_FIELD).unwrap(), &doc! {"$literal": "$embeddings"});
        assert_eq!(p.len(), 7);
    }
}
