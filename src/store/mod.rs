//! Durable storage of enrolled users: the `FaceStore` trait and its implementations
//! (embedded SQLite by default; MongoDB when `MONGO_URI` is set, PostgreSQL when `DATABASE_URL`
//! is, each in its own module).
//! The store is the truth; the in-memory gallery is rebuilt from it at start and follows
//! every write after the store has accepted it.

pub mod faces;
pub mod images;
pub mod mongo;
pub mod policy;
pub mod postgres;
pub mod sqlite;

use std::time::SystemTime;

use serde::Serialize;

/// Embedding length of every recognizer we use (ArcFace).
pub const EMBEDDING_DIM: usize = 512;

/// One enrolled user as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    pub username: String,
    /// L2-normalised template (the weighted mean of every enrolled image); empty before the
    /// first enrolment.
    pub embedding: Vec<f32>,
    /// Number of images behind `embedding` (0 before the first enrolment; legacy rows
    /// without a count weigh as one image).
    pub samples: u64,
    /// Recognizer that produced `embedding` (`None` for legacy rows: taken as ours).
    pub model_id: Option<String>,
    pub updated_at: SystemTime,
}

/// What `GET /users` shows of a user: no vectors.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct UserSummary {
    pub username: String,
    pub samples: u64,
    /// Recognizer id of the template, when known.
    pub model_id: Option<String>,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
}

/// Everything loaded at start.
#[derive(Debug, Clone, Default)]
pub struct LoadedUsers {
    /// Users whose template can be compared with `model_id`'s embeddings (legacy rows with
    /// no model id included), or who have no template yet.
    pub users: Vec<UserRecord>,
    /// Users whose template came from another recognizer: kept in the store, not compared.
    pub other_model: usize,
    /// Rows whose embedding has the wrong length or non-finite values: skipped with a warning.
    pub malformed: usize,
}

/// Where [`FaceStore::stream_users`] sends users, in batches.
pub type UserBatches = std::sync::mpsc::SyncSender<Vec<UserRecord>>;

/// The store's kind, as reported by `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Sqlite,
    Mongodb,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("user '{0}' already exists")]
    UserExists(String),
    #[error("user '{0}' not found")]
    UserNotFound(String),
    /// The user's template was made by another recognizer: averaging would mix two spaces.
    #[error("user '{username}' was enrolled with recognizer {stored}, this service runs {ours}")]
    ModelMismatch { username: String, stored: String, ours: String },
    /// The database cannot be reached or refused the operation; nothing was changed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A bug or corrupt data.
    #[error("store error: {0}")]
    Internal(String),
}

/// A user's state as another process (or this one) left it in the store, for the gallery.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The user's current record. The gallery compares it when it has a template made by our
    /// recognizer (or by an unknown one, as at start) and drops the user otherwise.
    Upsert(UserRecord),
    /// The user is gone (or its template can no longer be used).
    Remove(String),
}

/// Writes made to a shared store by anyone (other replicas, the dashboard, this process),
/// for the follower (`service::follow`) to bring into an in-memory index: users' [`Change`]s
/// into the gallery, face records' [`faces::FaceChange`]s into their index.
///
/// Split in two so that the follower can read the current state under the write lock:
/// [`ChangeFeed::wait`] only learns *which* users changed (no lock held); [`ChangeFeed::changes`]
/// then reads their current documents while local writes wait, so a late echo of an older
/// write can never overwrite a newer local one.
#[async_trait::async_trait]
pub trait ChangeFeed<C = Change>: Send {
    /// Waits until some users may have changed. Outages are ridden out inside (reconnecting
    /// with a backoff); it returns only when there is something to read.
    async fn wait(&mut self);

    /// The current state of every user that changed since the last successful call, read now.
    /// On an error nothing is lost: the same users are read again on the next call.
    async fn changes(&mut self) -> Result<Vec<C>, StoreError>;

    /// How it follows: "change stream", "poll".
    fn describe(&self) -> String;
}

/// Durable storage of users. Implementations must make `enroll` atomic: concurrent
/// enrolments of one user all count.
#[async_trait::async_trait]
pub trait FaceStore: Send + Sync + 'static {
    fn kind(&self) -> StoreKind;

    /// Every user, for the gallery at start; `model_id` is the recognizer in use.
    async fn load_users(&self, model_id: &str) -> Result<LoadedUsers, StoreError>;

    /// [`FaceStore::load_users`] in batches sent to `sink` as they are read, so that the load
    /// at start builds the gallery while the store still reads and never holds every
    /// template twice. The answer has the counts and no `users`. The default (MongoDB uses
    /// it) sends what `load_users` gives as one batch, so it does hold every template twice
    /// for a while; the sink must hold at least one batch, so it never blocks.
    async fn stream_users(&self, model_id: &str, sink: UserBatches) -> Result<LoadedUsers, StoreError> {
        let mut loaded = self.load_users(model_id).await?;
        let users = std::mem::take(&mut loaded.users);
        // A receiver that is gone wants nothing more.
        let _ = sink.try_send(users);
        Ok(loaded)
    }

    /// Creates a user with no template. `UserExists` if the name is taken.
    async fn create_user(&self, username: &str) -> Result<UserRecord, StoreError>;

    async fn get_user(&self, username: &str) -> Result<Option<UserRecord>, StoreError>;

    /// Users sorted by name, without vectors.
    async fn list_users(&self) -> Result<Vec<UserSummary>, StoreError>;

    /// Removes a user; `UserNotFound` if absent.
    async fn delete_user(&self, username: &str) -> Result<(), StoreError>;

    /// Folds `embeddings` (L2-normalised, one per image, made by `model_id`) into the
    /// user's template with [`weighted_template`], atomically, and returns the new record.
    /// `UserNotFound` if absent; `ModelMismatch` if the stored template came from another
    /// recognizer.
    async fn enroll(&self, username: &str, embeddings: &[Vec<f32>], model_id: &str) -> Result<UserRecord, StoreError>;

    /// A cheap check that the store answers now, for `/ready`: `Unavailable` when it cannot be
    /// reached or its data is gone. Callers bound it with their own timeout.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Other writers' changes, for a store that several processes share; `None` (the
    /// default) for a store only this process writes (SQLite). Call it after
    /// [`FaceStore::load_users`]: the feed starts where that load started, so nothing written
    /// in between is missed. `held` says which names the gallery holds now (see [`Held`]).
    async fn follow(&self, held: Held) -> Result<Option<Box<dyn ChangeFeed>>, StoreError> {
        let _ = held;
        Ok(None)
    }
}

/// What an in-memory index holds now (user names, or face record ids), asked by a feed when it
/// compares the whole store with what it knows. This process's own writes reach the index
/// without passing through the feed, so an entry written here and deleted elsewhere before the
/// feed saw it is known only to the index; the compare finds it there and removes it.
pub type Held = std::sync::Arc<dyn Fn() -> std::collections::HashSet<String> + Send + Sync>;

pub use crate::civil::rfc3339;
pub use policy::{check_new_embeddings, is_ours, weighted_template};

/// How long a feed or follower waits after `failures` failures in a row: 250 ms, doubling, at
/// most 5 s.
pub fn backoff(failures: u32) -> std::time::Duration {
    use std::time::Duration;
    Duration::from_millis(250u64.saturating_mul(1 << failures.saturating_sub(1).min(5))).min(Duration::from_secs(5))
}

/// The failures in a row of a loop that retries for ever (the feeds, the followers): a warning
/// for the first of a run, then the [`backoff`] wait; a success ends the run.
#[derive(Debug, Default)]
pub struct Retry {
    failures: u32,
}

impl Retry {
    /// After a failure: `warn` runs for the first one of a run, then this waits the backoff.
    pub async fn after_failure(&mut self, warn: impl FnOnce()) {
        self.failures = self.failures.saturating_add(1);
        if self.failures == 1 {
            warn();
        }
        tokio::time::sleep(backoff(self.failures)).await;
    }

    /// After a success: true when it ends a run of failures (time to say it works again).
    pub fn after_success(&mut self) -> bool {
        std::mem::take(&mut self.failures) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        use std::time::Duration;
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(40), Duration::from_secs(5));
    }
}
