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

use super::{Change, ChangeFeed, EMBEDDING_DIM, FaceStore, LoadedUsers, StoreError, StoreKind, UserRecord, UserSummary, backoff, rfc3339};

/// The second API's face records (`faces`, `face_images`).
#[path = "mongo_faces.rs"]
mod mongo_faces;
#[path = "mongo_faces_feed.rs"]
mod mongo_faces_feed;

/// Database used when the URI names none.
pub const DEFAULT_DATABASE: &str = "facerec";
/// The collection, as the owner's dashboard has it.
pub const COLLECTION: &str = "users";
/// Where facerec records the recognizer of a template.
pub const MODEL_FIELD: &str = "model_id";

/// Polling: stamps this much older than the newest one seen are read again, for writes stamped
/// before (and committed after) the newest one.
const POLL_OVERLAP: Duration = Duration::from_secs(5);
/// Polling: a full `_id` compare at least this often (deletions and unstamped inserts that the
/// count missed).
const POLL_FULL_EVERY: Duration = Duration::from_secs(60);
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

#[async_trait::async_trait]
impl FaceStore for MongoStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Mongodb
    }

    async fn load_users(&self, model_id: &str) -> Result<LoadedUsers, StoreError> {
        // Follow from here on: the stream is opened before the scan, so a write made during the
        // scan is delivered again later (and re-read: harmless).
        let (stream, poll) = match self.opts.follow {
            FollowMode::Poll => (None, true),
            FollowMode::Auto => match self.open_stream().await? {
                Some(s) => (Some(s), false),
                None => (None, true),
            },
        };
        let mut loaded = LoadedUsers::default();
        let mut known = HashMap::new();
        let mut watermark = None;
        let mut cursor = self.coll.find(doc! {}).batch_size(1000).await.map_err(|e| store_err("loading users", &e))?;
        while let Some(raw) = cursor.try_next().await.map_err(|e| store_err("loading users", &e))? {
            let Some((key, entry)) = entry_of(&raw) else { continue };
            watermark = watermark.max(entry.stamp);
            let username = entry.username.clone();
            known.insert(key, entry);
            let Some(username) = username else {
                tracing::warn!("mongo store: skipping a users document without a string username (_id {})", id_text(&raw));
                loaded.malformed += 1;
                continue;
            };
            if has_template(&raw) && model_of(&raw).is_some_and(|m| m != model_id) {
                loaded.other_model += 1;
                continue;
            }
            match template_of(&raw) {
                Ok(embedding) => loaded.users.push(record_of(&raw, username, embedding)),
                Err(why) => {
                    tracing::warn!(username = %username, "mongo store: skipping user '{username}': {why}");
                    loaded.malformed += 1;
                }
            }
        }
        if let Ok(mut seed) = self.seed.lock() {
            *seed = Some(Seed { stream, poll, known, watermark });
        }
        Ok(loaded)
    }

    async fn create_user(&self, username: &str) -> Result<UserRecord, StoreError> {
        if self.find_raw(username).await?.is_some() {
            return Err(StoreError::UserExists(username.to_owned()));
        }
        // An upsert whose filter can never match an existing document: it always inserts
        // (`username` from the filter's equality), stamped with the server's clock like every
        // other write; a concurrent insert of the same name hits the unique index.
        let filter = doc! {"username": username, "_id": {"$exists": false}};
        let update = vec![doc! {"$set": {"embeddings": {"$literal": []}, "samples": {"$literal": 0_i64}, "updated_at": "$$NOW"}}];
        let op = self.coll.find_one_and_update(filter, update).upsert(true).return_document(ReturnDocument::After).into_future();
        match tokio::time::timeout(self.opts.op_timeout * 2, op).await {
            Ok(Ok(Some(raw))) => parsed_record(&raw),
            Ok(Ok(None)) => Err(StoreError::Internal(format!("creating '{username}': the server returned no document"))),
            Ok(Err(e)) if is_duplicate_key(&e) => Err(StoreError::UserExists(username.to_owned())),
            Ok(Err(e)) => Err(store_err("creating a user", &e)),
            Err(_) => Err(StoreError::Unavailable(format!("creating a user: no answer within {}", fmt_duration(self.opts.op_timeout * 2)))),
        }
    }

    async fn get_user(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let Some(raw) = self.find_raw(username).await? else { return Ok(None) };
        let embedding = template_of(&raw).unwrap_or_else(|why| {
            // The user exists; its template cannot be used (enrolling replaces it).
            tracing::warn!(username = %username, "mongo store: user '{username}' has an unusable template: {why}");
            Vec::new()
        });
        Ok(Some(record_of(&raw, username.to_owned(), embedding)))
    }

    async fn list_users(&self) -> Result<Vec<UserSummary>, StoreError> {
        let projection = doc! {"_id": 0, "username": 1, "samples": 1, MODEL_FIELD: 1, "updated_at": 1};
        let mut cursor =
            self.coll.find(doc! {}).projection(projection).sort(doc! {"username": 1}).await.map_err(|e| store_err("listing users", &e))?;
        let mut out = Vec::new();
        while let Some(raw) = cursor.try_next().await.map_err(|e| store_err("listing users", &e))? {
            let Some(username) = str_of(&raw, "username") else { continue };
            out.push(UserSummary {
                username: username.to_owned(),
                samples: samples_of(&raw),
                model_id: model_of(&raw).map(str::to_owned),
                updated_at: rfc3339(updated_at_of(&raw)),
            });
        }
        // Byte order, as the embedded store lists them.
        out.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(out)
    }

    async fn delete_user(&self, username: &str) -> Result<(), StoreError> {
        let result = self.bounded("deleting a user", self.coll.delete_many(doc! {"username": username}).into_future()).await?;
        if result.deleted_count == 0 {
            return Err(StoreError::UserNotFound(username.to_owned()));
        }
        Ok(())
    }

    async fn enroll(&self, username: &str, embeddings: &[Vec<f32>], model_id: &str) -> Result<UserRecord, StoreError> {
        check_new_embeddings(embeddings)?;
        let mut sum = vec![0.0f64; EMBEDDING_DIM];
        for e in embeddings {
            for (s, &v) in sum.iter_mut().zip(e) {
                *s += f64::from(v);
            }
        }
        let images = i64::try_from(embeddings.len()).map_err(|_| StoreError::Internal("too many embeddings".into()))?;
        let pipeline = enroll_pipeline(&sum, images, model_id);
        // Refuses (writes nothing to) a document whose template came from another recognizer.
        let filter =
            doc! {"username": username, "$nor": [{MODEL_FIELD: {"$type": "string", "$ne": model_id}, "embeddings.0": {"$exists": true}}]};
        for _ in 0..3 {
            let op = self.coll.find_one_and_update(filter.clone(), pipeline.clone()).return_document(ReturnDocument::After).into_future();
            if let Some(raw) = self.bounded("enrolling", op).await? {
                return parsed_record(&raw);
            }
            // Nothing matched: say why.
            match self.find_raw(username).await? {
                None => return Err(StoreError::UserNotFound(username.to_owned())),
                Some(raw) => {
                    if let Some(stored) = model_of(&raw).filter(|m| *m != model_id && has_template(&raw)) {
                        return Err(StoreError::ModelMismatch {
                            username: username.to_owned(),
                            stored: stored.to_owned(),
                            ours: model_id.to_owned(),
                        });
                    }
                    // Changed in between (re-created, re-enrolled elsewhere): try again.
                }
            }
        }
        Err(StoreError::Internal(format!("enrolling '{username}': its document kept changing under the update")))
    }

    /// The server answers `ping` within the operation bound.
    async fn ping(&self) -> Result<(), StoreError> {
        let db = self.coll.client().database(&self.database);
        self.bounded("ping", db.run_command(doc! {"ping": 1}).into_future()).await.map(|_| ())
    }

    async fn follow(&self) -> Result<Option<Box<dyn ChangeFeed>>, StoreError> {
        let seed = self.seed.lock().ok().and_then(|mut s| s.take());
        let (source, known, resync) = match seed {
            Some(Seed { stream, poll, known, watermark }) => {
                let source = if poll {
                    Source::Poll { interval: self.opts.poll_interval, watermark, last_full: Instant::now() }
                } else {
                    Source::Stream { stream, token: None }
                };
                (source, known, false)
            }
            // Never loaded: start from a full compare.
            None => (self.initial_source().await?, HashMap::new(), true),
        };
        let mut feed = MongoFeed {
            coll: self.coll.clone(),
            op_timeout: self.opts.op_timeout,
            poll_interval: self.opts.poll_interval,
            source,
            known,
            pending: HashMap::new(),
            resync,
        };
        if let Source::Stream { stream: Some(s), token } = &mut feed.source {
            *token = s.resume_token();
        }
        tracing::info!(how = %feed.describe(), "mongo store: following other replicas' writes");
        Ok(Some(Box::new(feed)))
    }
}

impl MongoStore {
    async fn initial_source(&self) -> Result<Source, StoreError> {
        let poll = Source::Poll { interval: self.opts.poll_interval, watermark: None, last_full: Instant::now() };
        Ok(match self.opts.follow {
            FollowMode::Poll => poll,
            FollowMode::Auto => match self.open_stream().await? {
                Some(s) => Source::Stream { stream: Some(s), token: None },
                None => poll,
            },
        })
    }
}

/// How the feed learns of changes.
enum Source {
    Stream {
        /// `None` after an error, until it is opened again.
        stream: Option<EventStream>,
        /// Where to resume after an outage.
        token: Option<ResumeToken>,
    },
    Poll {
        interval: Duration,
        /// Newest `updated_at` seen (unix ms).
        watermark: Option<i64>,
        last_full: Instant,
    },
}

/// Follows the `users` collection: which documents changed, then their current state.
pub struct MongoFeed {
    coll: Collection<RawDocumentBuf>,
    op_timeout: Duration,
    /// For polling, also when the server stops offering change streams.
    poll_interval: Duration,
    source: Source,
    /// Every document seen, by `_id`: deletions only give an `_id`, and polling compares stamps.
    known: HashMap<IdKey, Entry>,
    /// Documents to read again.
    pending: HashMap<IdKey, Bson>,
    /// Compare every document with `known` (after a lost change stream or a count mismatch).
    resync: bool,
}

#[async_trait::async_trait]
impl ChangeFeed for MongoFeed {
    async fn wait(&mut self) {
        let mut failures: u32 = 0;
        loop {
            if !self.pending.is_empty() {
                return;
            }
            let step = if self.resync { self.resync().await } else { self.next_step().await };
            match step {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(how = %self.describe(), "mongo store: following other replicas again");
                    }
                    failures = 0;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::warn!("mongo store: cannot follow other replicas' writes for now ({e}); retrying");
                    }
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }

    async fn changes(&mut self) -> Result<Vec<Change>, StoreError> {
        let pending: Vec<(IdKey, Bson)> = self.pending.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut changes = Vec::new();
        for chunk in pending.chunks(RESOLVE_CHUNK) {
            match self.resolve(chunk).await {
                Ok(mut c) => {
                    changes.append(&mut c);
                    for (key, _) in chunk {
                        self.pending.remove(key);
                    }
                }
                Err(e) if changes.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(changes)
    }

    fn describe(&self) -> String {
        match &self.source {
            Source::Stream { .. } => "change stream".into(),
            Source::Poll { interval, .. } => format!("polling every {}", fmt_duration(*interval)),
        }
    }
}

impl MongoFeed {
    /// One step of following: the next change stream events, or one poll.
    async fn next_step(&mut self) -> Result<(), StoreError> {
        match &mut self.source {
            Source::Stream { stream, token } => {
                let Some(s) = stream.as_mut() else {
                    return self.reopen().await;
                };
                // One event at a time: the driver's stream must not be left with a poll in
                // flight (reading its resume token then panics), so no draining with
                // `now_or_never`. Events that arrive while the follower reads are buffered.
                match s.next().await {
                    Some(Ok(event)) => {
                        *token = s.resume_token();
                        self.on_event(event);
                        Ok(())
                    }
                    Some(Err(e)) => {
                        *stream = None;
                        Err(store_err("change stream", &e))
                    }
                    None => {
                        // Closed by the server (invalidated): start over.
                        *stream = None;
                        *token = None;
                        self.resync = true;
                        Ok(())
                    }
                }
            }
            Source::Poll { .. } => self.poll().await,
        }
    }

    /// Opens the change stream again, resuming after the last event seen when the server still
    /// has it; otherwise (or when the server no longer offers change streams) compares
    /// everything.
    async fn reopen(&mut self) -> Result<(), StoreError> {
        let Source::Stream { token, .. } = &self.source else { return Ok(()) };
        let resume = token.clone();
        match open_stream(&self.coll, resume.clone()).await {
            Ok(Some((s, t))) => {
                self.source = Source::Stream { stream: Some(s), token: t.or(resume) };
                Ok(())
            }
            Ok(None) => {
                tracing::warn!("mongo store: the server no longer offers change streams; polling instead");
                self.source = Source::Poll { interval: self.poll_interval, watermark: None, last_full: Instant::now() };
                self.resync = true;
                Ok(())
            }
            Err(e) if is_unavailable(&e) => Err(store_err("opening a change stream", &e)),
            Err(e) => {
                if resume.is_some() {
                    tracing::warn!("mongo store: cannot resume the change stream ({}); comparing every user instead", one_line(&e));
                    self.source = Source::Stream { stream: None, token: None };
                    self.resync = true;
                    Ok(())
                } else {
                    Err(store_err("opening a change stream", &e))
                }
            }
        }
    }

    fn on_event(&mut self, event: ChangeStreamEvent<Document>) {
        match event.operation_type {
            OperationType::Insert | OperationType::Update | OperationType::Replace | OperationType::Delete => {
                if let Some(id) = event.document_key.as_ref().and_then(|k| k.get("_id")) {
                    self.pending.insert(key_of_bson(id), id.clone());
                }
            }
            OperationType::Drop | OperationType::Rename | OperationType::DropDatabase | OperationType::Invalidate => {
                if let Source::Stream { stream, token } = &mut self.source {
                    *stream = None;
                    *token = None;
                }
                self.resync = true;
            }
            _ => {}
        }
    }

    /// Compares every document's `_id`, `username` and `updated_at` with what is known; what
    /// differs, is new, is gone or has no stamp is read again. A change stream is opened first,
    /// so that nothing written during the compare is missed.
    async fn resync(&mut self) -> Result<(), StoreError> {
        if let Source::Stream { stream: None, .. } = &self.source {
            match open_stream(&self.coll, None).await {
                Ok(Some((s, t))) => self.source = Source::Stream { stream: Some(s), token: t },
                Ok(None) => self.source = Source::Poll { interval: self.poll_interval, watermark: None, last_full: Instant::now() },
                Err(e) => return Err(store_err("opening a change stream", &e)),
            }
        }
        let projection = doc! {"_id": 1, "username": 1, "updated_at": 1};
        let mut cursor =
            self.coll.find(doc! {}).projection(projection).batch_size(5000).await.map_err(|e| store_err("comparing users", &e))?;
        let mut seen = HashSet::new();
        let mut newest = None;
        while let Some(raw) = cursor.try_next().await.map_err(|e| store_err("comparing users", &e))? {
            let Some((key, entry)) = entry_of(&raw) else { continue };
            newest = newest.max(entry.stamp);
            let same =
                self.known.get(&key).is_some_and(|k| entry.stamp.is_some() && k.stamp == entry.stamp && k.username == entry.username);
            if !same {
                self.pending.insert(key.clone(), entry.id.clone());
            }
            seen.insert(key);
        }
        for (key, entry) in &self.known {
            if !seen.contains(key) {
                self.pending.insert(key.clone(), entry.id.clone());
            }
        }
        if let Source::Poll { watermark, last_full, .. } = &mut self.source {
            *watermark = (*watermark).max(newest);
            *last_full = Instant::now();
        }
        self.resync = false;
        Ok(())
    }

    /// One poll: documents stamped since the newest stamp seen (less an overlap), then a
    /// count compare that catches deletions.
    async fn poll(&mut self) -> Result<(), StoreError> {
        let Source::Poll { interval, watermark, last_full } = &mut self.source else { return Ok(()) };
        tokio::time::sleep(*interval).await;
        if last_full.elapsed() >= POLL_FULL_EVERY {
            self.resync = true;
            return Ok(());
        }
        let filter = match *watermark {
            Some(w) => doc! {"updated_at": {"$gte": bson::DateTime::from_millis(w.saturating_sub(POLL_OVERLAP.as_millis() as i64))}},
            None => doc! {"updated_at": {"$type": "date"}},
        };
        let projection = doc! {"_id": 1, "username": 1, "updated_at": 1};
        let limit = self.op_timeout * 2;
        let found: Vec<RawDocumentBuf> =
            match tokio::time::timeout(limit, async { self.coll.find(filter).projection(projection).await?.try_collect::<Vec<_>>().await })
                .await
            {
                Ok(r) => r.map_err(|e| store_err("polling users", &e))?,
                Err(_) => return Err(StoreError::Unavailable(format!("polling users: no answer within {}", fmt_duration(limit)))),
            };
        let mut newest = *watermark;
        for raw in &found {
            let Some((key, entry)) = entry_of(raw) else { continue };
            newest = newest.max(entry.stamp);
            if !self.known.get(&key).is_some_and(|k| k.stamp == entry.stamp && k.username == entry.username) {
                self.pending.insert(key, entry.id);
            }
        }
        *watermark = newest;
        if self.pending.is_empty() {
            let count = match tokio::time::timeout(limit, self.coll.estimated_document_count().into_future()).await {
                Ok(r) => r.map_err(|e| store_err("counting users", &e))?,
                Err(_) => return Err(StoreError::Unavailable("counting users: no answer".into())),
            };
            if count != self.known.len() as u64 {
                self.resync = true;
            }
        }
        Ok(())
    }

    /// Reads the current documents of `chunk` (by `_id`, and by the names they had, so that a
    /// name deleted and created again under a new `_id` ends up right) and says what the gallery
    /// should hold for every name involved.
    async fn resolve(&mut self, chunk: &[(IdKey, Bson)]) -> Result<Vec<Change>, StoreError> {
        let ids: Vec<Bson> = chunk.iter().map(|(_, id)| id.clone()).collect();
        let old_names: Vec<String> = chunk.iter().filter_map(|(k, _)| self.known.get(k).and_then(|e| e.username.clone())).collect();
        let filter = doc! {"$or": [{"_id": {"$in": ids}}, {"username": {"$in": old_names.clone()}}]};
        let limit = self.op_timeout * 2;
        let docs: Vec<RawDocumentBuf> =
            match tokio::time::timeout(limit, async { self.coll.find(filter).await?.try_collect::<Vec<_>>().await }).await {
                Ok(r) => r.map_err(|e| store_err("reading changed users", &e))?,
                Err(_) => return Err(StoreError::Unavailable(format!("reading changed users: no answer within {}", fmt_duration(limit)))),
            };

        let mut affected: HashSet<String> = old_names.into_iter().collect();
        let mut current: HashMap<String, &RawDocumentBuf> = HashMap::new();
        let mut found = HashSet::new();
        for raw in &docs {
            let Some((key, entry)) = entry_of(raw) else { continue };
            if let Some(name) = &entry.username {
                affected.insert(name.clone());
                current.insert(name.clone(), raw);
            }
            if let Some(Some(old)) = self.known.get(&key).map(|e| e.username.clone())
                && entry.username.as_ref() != Some(&old)
            {
                affected.insert(old);
            }
            if let Source::Poll { watermark, .. } = &mut self.source {
                *watermark = (*watermark).max(entry.stamp);
            }
            found.insert(key.clone());
            self.known.insert(key, entry);
        }
        for (key, _) in chunk {
            if !found.contains(key) {
                self.known.remove(key);
            }
        }
        let mut changes = Vec::with_capacity(affected.len());
        for name in affected {
            match current.get(&name) {
                Some(raw) => match template_of(raw) {
                    Ok(embedding) => changes.push(Change::Upsert(record_of(raw, name, embedding))),
                    Err(why) => {
                        tracing::warn!(username = %name, "mongo store: user '{name}' changed to an unusable template ({why}); not compared");
                        changes.push(Change::Remove(name));
                    }
                },
                None => changes.push(Change::Remove(name)),
            }
        }
        Ok(changes)
    }
}

/// Opens a change stream (resuming after `resume` when given). `Ok(None)`: the server offers
/// none (a standalone server).
async fn open_stream(
    coll: &Collection<RawDocumentBuf>,
    resume: Option<ResumeToken>,
) -> Result<Option<(EventStream, Option<ResumeToken>)>, MongoError> {
    let mut watch = coll.watch().max_await_time(STREAM_AWAIT);
    if let Some(t) = resume {
        watch = watch.start_after(t);
    }
    match watch.await {
        Ok(s) => {
            let s = s.with_type::<ChangeStreamEvent<Document>>();
            let token = s.resume_token();
            Ok(Some((s, token)))
        }
        // 40573: "only supported on replica sets"; 20: IllegalOperation; 115: CommandNotSupported.
        Err(e) if matches!(*e.kind, ErrorKind::Command(ref c) if matches!(c.code, 40573 | 20 | 115)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The aggregation-pipeline update of an enrolment. `new_sum` is the sum of the new
/// (L2-normalised) embeddings, `images` their number. In the server, atomically:
///
/// ```text
/// old  = embeddings, when it is an array of DIM finite numbers (as doubles), else []
/// on   = |old|
/// w    = on > 0 ? max(1, samples as long, or 1 when missing/unreadable) : 0
/// sum  = [ (w > 0 ? old[i] / on * w : 0) + new_sum[i]  for i in 0..DIM ]
/// n    = |sum|
/// embeddings = [ n > 0 ? x / n : 0  for x in sum ]     (doubles: the old service reads them)
/// samples    = w + images                              (a long)
/// model_id   = ours;  updated_at = $$NOW
/// ```
///
/// With a normalised stored template this is exactly [`super::weighted_template`].
pub fn enroll_pipeline(new_sum: &[f64], images: i64, model_id: &str) -> Vec<Document> {
    let dim = i32::try_from(new_sum.len()).unwrap_or(i32::MAX);
    let squares = |input: &str| doc! {"$reduce": {"input": input, "initialValue": 0.0, "in": {"$add": ["$$value", {"$multiply": ["$$this", "$$this"]}]}}};
    let stored = doc! {"$cond": [{"$isArray": "$embeddings"}, "$embeddings", []]};
    let finite = doc! {"$and": [{"$isNumber": "$$x"}, {"$gte": ["$$x", -f64::MAX]}, {"$lte": ["$$x", f64::MAX]}]};
    let new_sum = Bson::Array(new_sum.iter().map(|&v| Bson::Double(v)).collect());
    vec![
        doc! {"$set": {"_facerec_old": {"$cond": {
            "if": {"$and": [
                {"$eq": [{"$size": stored.clone()}, dim]},
                {"$allElementsTrue": [{"$map": {"input": stored, "as": "x", "in": finite}}]},
            ]},
            "then": {"$map": {"input": "$embeddings", "as": "x", "in": {"$toDouble": "$$x"}}},
            "else": [],
        }}}},
        doc! {"$set": {"_facerec_on": {"$sqrt": squares("$_facerec_old")}}},
        doc! {"$set": {"_facerec_w": {"$cond": [
            {"$gt": ["$_facerec_on", 0]},
            {"$max": [1_i64, {"$convert": {"input": "$samples", "to": "long", "onError": 1_i64, "onNull": 1_i64}}]},
            0_i64,
        ]}}},
        doc! {"$set": {"_facerec_sum": {"$map": {"input": {"$range": [0, dim]}, "as": "i", "in": {"$add": [
            {"$cond": [
                {"$gt": ["$_facerec_w", 0]},
                {"$multiply": [{"$divide": [{"$arrayElemAt": ["$_facerec_old", "$$i"]}, "$_facerec_on"]}, "$_facerec_w"]},
                0.0,
            ]},
            {"$arrayElemAt": [{"$literal": new_sum}, "$$i"]},
        ]}}}}},
        doc! {"$set": {"_facerec_n": {"$sqrt": squares("$_facerec_sum")}}},
        doc! {"$set": {
            "embeddings": {"$map": {"input": "$_facerec_sum", "as": "x", "in": {"$cond": [{"$gt": ["$_facerec_n", 0]}, {"$divide": ["$$x", "$_facerec_n"]}, 0.0]}}},
            "samples": {"$add": ["$_facerec_w", images]},
            MODEL_FIELD: {"$literal": model_id},
            "updated_at": "$$NOW",
        }},
        doc! {"$unset": ["_facerec_old", "_facerec_on", "_facerec_w", "_facerec_sum", "_facerec_n"]},
    ]
}

/// Checks what `enroll` is given: a bug upstream must not reach the database.
fn check_new_embeddings(embeddings: &[Vec<f32>]) -> Result<(), StoreError> {
    if embeddings.is_empty() {
        return Err(StoreError::Internal("enroll called with no embeddings".to_owned()));
    }
    for e in embeddings {
        if e.len() != EMBEDDING_DIM {
            return Err(StoreError::Internal(format!("enroll called with a {}-dimensional embedding, not {EMBEDDING_DIM}", e.len())));
        }
        if !e.iter().all(|x| x.is_finite()) {
            return Err(StoreError::Internal("enroll called with non-finite embedding values".to_owned()));
        }
    }
    Ok(())
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

fn key_of_bson(id: &Bson) -> IdKey {
    match id {
        Bson::ObjectId(o) => IdKey::Oid(o.bytes()),
        other => IdKey::Other(format!("{other:?}")),
    }
}

/// A document's `_id` key and what the feed remembers of it.
fn entry_of(raw: &RawDocument) -> Option<(IdKey, Entry)> {
    let id = raw.get("_id").ok().flatten()?;
    let id = Bson::try_from(id.to_raw_bson()).ok()?;
    let entry = Entry { id: id.clone(), username: str_of(raw, "username").map(str::to_owned), stamp: stamp_of(raw) };
    Some((key_of_bson(&id), entry))
}

fn id_text(raw: &RawDocument) -> String {
    raw.get("_id").ok().flatten().and_then(|id| Bson::try_from(id.to_raw_bson()).ok()).map_or_else(|| "?".into(), |b| b.to_string())
}

fn str_of<'a>(raw: &'a RawDocument, key: &str) -> Option<&'a str> {
    match raw.get(key) {
        Ok(Some(RawBsonRef::String(s))) => Some(s),
        _ => None,
    }
}

/// The recognizer of the template, when recorded (a string).
fn model_of(raw: &RawDocument) -> Option<&str> {
    str_of(raw, MODEL_FIELD)
}

/// Whether `embeddings` is a non-empty array (a template, usable or not).
fn has_template(raw: &RawDocument) -> bool {
    matches!(raw.get("embeddings"), Ok(Some(RawBsonRef::Array(a))) if a.into_iter().next().is_some())
}

/// `samples` as stored (missing, negative or not a number: 0, "unknown", which weighs as one image).
fn samples_of(raw: &RawDocument) -> u64 {
    match raw.get("samples") {
        Ok(Some(RawBsonRef::Int32(n))) => u64::try_from(n).unwrap_or(0),
        Ok(Some(RawBsonRef::Int64(n))) => u64::try_from(n).unwrap_or(0),
        Ok(Some(RawBsonRef::Double(n))) if n.is_finite() && n >= 0.0 => n as u64,
        _ => 0,
    }
}

fn stamp_of(raw: &RawDocument) -> Option<i64> {
    match raw.get("updated_at") {
        Ok(Some(RawBsonRef::DateTime(d))) => Some(d.timestamp_millis()),
        _ => None,
    }
}

/// `updated_at` (missing: the epoch, as the embedded store does for legacy rows).
fn updated_at_of(raw: &RawDocument) -> SystemTime {
    stamp_of(raw)
        .and_then(|ms| u64::try_from(ms).ok())
        .and_then(|ms| SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The template: none (missing, null or an empty array) or exactly [`EMBEDDING_DIM`] finite
/// numbers, not all zero, returned L2-normalised; anything else is described in the error.
fn template_of(raw: &RawDocument) -> Result<Vec<f32>, String> {
    let array = match raw.get("embeddings") {
        Ok(None) | Ok(Some(RawBsonRef::Null)) => return Ok(Vec::new()),
        Ok(Some(RawBsonRef::Array(a))) => a,
        Ok(Some(other)) => return Err(format!("`embeddings` is {:?}, not an array", other.element_type())),
        Err(e) => return Err(format!("`embeddings` cannot be read: {e}")),
    };
    let values = numbers_of(array)?;
    if values.is_empty() {
        return Ok(Vec::new());
    }
    if values.len() != EMBEDDING_DIM {
        return Err(format!("`embeddings` has {} numbers, not {EMBEDDING_DIM}", values.len()));
    }
    let norm = values.iter().map(|v| v * v).sum::<f64>().sqrt();
    if !(norm > 0.0 && norm.is_finite()) {
        return Err("`embeddings` is all zeros".to_owned());
    }
    Ok(values.iter().map(|v| (v / norm) as f32).collect())
}

/// The elements of a vector field: finite numbers (doubles, ints, longs or decimals, as other
/// tools write them); anything else is described in the error.
fn numbers_of(array: &RawArray) -> Result<Vec<f64>, String> {
    let mut values = Vec::with_capacity(EMBEDDING_DIM);
    for (i, item) in array.into_iter().enumerate() {
        let v = match item {
            Ok(RawBsonRef::Double(v)) => v,
            Ok(RawBsonRef::Int32(v)) => f64::from(v),
            Ok(RawBsonRef::Int64(v)) => v as f64,
            Ok(RawBsonRef::Decimal128(d)) => d.to_string().parse::<f64>().map_err(|_| format!("element {i} is not a number"))?,
            Ok(other) => return Err(format!("element {i} is {:?}, not a number", other.element_type())),
            Err(e) => return Err(format!("element {i} cannot be read: {e}")),
        };
        if !v.is_finite() {
            return Err(format!("element {i} is not finite"));
        }
        values.push(v);
    }
    Ok(values)
}

fn record_of(raw: &RawDocument, username: String, embedding: Vec<f32>) -> UserRecord {
    UserRecord { username, embedding, samples: samples_of(raw), model_id: model_of(raw).map(str::to_owned), updated_at: updated_at_of(raw) }
}

/// A document facerec just wrote, as a record.
fn parsed_record(raw: &RawDocument) -> Result<UserRecord, StoreError> {
    let username = str_of(raw, "username").ok_or_else(|| StoreError::Internal("the written document has no username".into()))?;
    let embedding = template_of(raw).map_err(|why| StoreError::Internal(format!("user '{username}' as written: {why}")))?;
    Ok(record_of(raw, username.to_owned(), embedding))
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
