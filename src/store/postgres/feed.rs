//! Following other replicas' writes on PostgreSQL: the triggers of `schema.sql` `NOTIFY` the
//! name of every changed user on `facerec_users` and the id of every changed face record on
//! `facerec_faces` when the writing transaction commits; each feed holds one connection of its
//! own (outside the pool) that `LISTEN`s, so a change reaches every replica within a round trip.
//!
//! Notifications sent while a feed is not listening (at start, between the load and the first
//! `LISTEN`, or while its connection is lost) are never delivered, so after every (re)connection
//! a feed compares the table with what it knows: users by a hash of their whole row, face
//! records by id (they are written once, never updated). `*` (a truncate) asks for a compare too.

use std::collections::{HashMap, HashSet};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::super::faces::FaceChange;
use super::super::{Change, ChangeFeed, Retry, StoreError};
use super::faces::{FACE_COLUMNS, record_of};
use super::users::{USER_COLUMNS, hash_of, user_of};
use super::{FACES_CHANNEL, PgStore, USERS_CHANNEL, pg_err};
use crate::store::Held as KnownIds;

/// What the listening connection hears.
enum Heard {
    Payload(String),
    /// The connection is gone: reconnect and compare.
    Lost,
}

/// One connection that listens on a channel; its messages arrive on `rx`.
struct Listener {
    /// Kept so the connection stays open.
    _client: tokio_postgres::Client,
    rx: mpsc::UnboundedReceiver<Heard>,
}

/// Opens a connection and `LISTEN`s on `channel`, bounded by `limit`.
async fn listen(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    channel: &str,
    limit: std::time::Duration,
) -> Result<Listener, StoreError> {
    let open = async {
        let (client, mut connection) = config.connect(tls.clone()).await.map_err(|e| pg_err("opening the listening connection", &e))?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            loop {
                match messages.next().await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(Heard::Payload(n.payload().to_owned())).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        let _ = tx.send(Heard::Lost);
                        return;
                    }
                }
            }
        });
        client.batch_execute(&format!("listen {channel}")).await.map_err(|e| pg_err("LISTEN", &e))?;
        Ok(Listener { _client: client, rx })
    };
    match tokio::time::timeout(limit, open).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Unavailable(format!("LISTEN {channel}: no answer within {limit:?}"))),
    }
}

/// What both feeds share: the listening connection, and whether to compare next.
struct Channel {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    name: &'static str,
    limit: std::time::Duration,
    listener: Option<Listener>,
    compare: bool,
}

impl Channel {
    /// Listens (again) when not listening; then the next payloads heard, or `None` when a
    /// compare is due (after a (re)connection, a lost connection or a `*`).
    async fn next(&mut self) -> Result<Option<Vec<String>>, StoreError> {
        if self.listener.is_none() {
            self.listener = Some(listen(&self.config, &self.tls, self.name, self.limit).await?);
            self.compare = true;
        }
        if self.compare {
            return Ok(None);
        }
        let Some(listener) = self.listener.as_mut() else { return Ok(None) };
        let mut heard = Vec::new();
        let first = listener.rx.recv().await;
        let mut next = first;
        loop {
            match next {
                Some(Heard::Payload(p)) if p == "*" => self.compare = true,
                Some(Heard::Payload(p)) => heard.push(p),
                Some(Heard::Lost) | None => {
                    self.listener = None;
                    return Err(StoreError::Unavailable(format!("the connection listening on {} was lost", self.name)));
                }
            }
            match listener.rx.try_recv() {
                Ok(h) => next = Some(h),
                Err(_) => break,
            }
        }
        Ok(if self.compare { None } else { Some(heard) })
    }
}

impl PgStore {
    fn channel(&self, name: &'static str) -> Channel {
        // TCP keepalives: a listening connection lost without a reset (a dropped network) is
        // noticed within about a minute rather than the system's two hours.
        let mut config = self.config.clone();
        config.keepalives(true).keepalives_idle(std::time::Duration::from_secs(30));
        Channel { config, tls: self.tls.clone(), name, limit: self.opts.op_timeout * 2, listener: None, compare: true }
    }

    pub(super) fn users_feed(&self, known: Option<HashMap<String, String>>) -> PgUsersFeed {
        PgUsersFeed {
            pool: self.pool.clone(),
            channel: self.channel(USERS_CHANNEL),
            known: known.unwrap_or_default(),
            pending: HashSet::new(),
        }
    }

    pub(super) fn faces_feed(&self, known: KnownIds) -> PgFacesFeed {
        PgFacesFeed {
            pool: self.pool.clone(),
            channel: self.channel(FACES_CHANNEL),
            known,
            delivered: HashSet::new(),
            pending: HashSet::new(),
        }
    }
}

async fn client(pool: &deadpool_postgres::Pool) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(|e| super::pool_err("connecting", e))
}

/// What the two feeds share: a channel whose payloads are keys (names, ids), the keys to read
/// again, and a compare of the whole table after a (re)connection.
trait Follows {
    /// What is followed, for the log.
    const WHAT: &'static str;
    fn parts(&mut self) -> (&mut Channel, &mut HashSet<String>);
    /// Adds to the pending keys every one whose row differs from what was delivered.
    fn compare(&mut self) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
}

/// Waits until a feed has keys to read: heard on its channel, or found by a compare (after a
/// (re)connection); a failure is logged and retried with backoff.
async fn wait_for_pending<F: Follows + Send>(feed: &mut F) {
    let mut retry = Retry::default();
    loop {
        let (channel, pending) = feed.parts();
        if !pending.is_empty() {
            return;
        }
        let step = match channel.next().await {
            Ok(Some(keys)) => {
                pending.extend(keys);
                Ok(())
            }
            Ok(None) => feed.compare().await,
            Err(e) => Err(e),
        };
        match step {
            Ok(()) => {
                retry.after_success();
            }
            Err(e) => {
                retry
                    .after_failure(|| tracing::warn!("postgres store: cannot follow other replicas' {} for now ({e}); retrying", F::WHAT))
                    .await
            }
        }
    }
}

/// Follows `users`.
pub struct PgUsersFeed {
    pool: deadpool_postgres::Pool,
    channel: Channel,
    /// Every user the gallery was given, and the hash of its row then.
    known: HashMap<String, String>,
    /// Names to read again.
    pending: HashSet<String>,
}

#[async_trait::async_trait]
impl ChangeFeed<Change> for PgUsersFeed {
    async fn wait(&mut self) {
        wait_for_pending(self).await
    }

    async fn changes(&mut self) -> Result<Vec<Change>, StoreError> {
        let names: Vec<String> = self.pending.iter().cloned().collect();
        let sql = format!("select {USER_COLUMNS} from users u where u.username = any($1)");
        let rows = client(&self.pool).await?.query(&sql, &[&names]).await.map_err(|e| pg_err("reading changed users", &e))?;
        let mut found = HashMap::new();
        for row in &rows {
            match user_of(row) {
                Ok((record, check)) => {
                    self.known.insert(record.username.clone(), hash_of(row));
                    let change = match check {
                        Ok(()) => Change::Upsert(record),
                        Err(why) => {
                            tracing::warn!(username = %record.username, "postgres store: user '{}' changed to an unusable template ({why}); not compared", record.username);
                            Change::Remove(record.username)
                        }
                    };
                    found.insert(row.get::<_, String>(0), change);
                }
                Err(why) => tracing::warn!("postgres store: a changed user cannot be read: {why}"),
            }
        }
        let mut changes = Vec::with_capacity(names.len());
        for name in names {
            self.pending.remove(&name);
            match found.remove(&name) {
                Some(c) => changes.push(c),
                None => {
                    self.known.remove(&name);
                    changes.push(Change::Remove(name));
                }
            }
        }
        Ok(changes)
    }

    fn describe(&self) -> String {
        format!("LISTEN {}", USERS_CHANNEL)
    }
}

impl Follows for PgUsersFeed {
    const WHAT: &'static str = "users";

    fn parts(&mut self) -> (&mut Channel, &mut HashSet<String>) {
        (&mut self.channel, &mut self.pending)
    }

    /// Every user whose row changed (or appeared, or went) since it was last read.
    async fn compare(&mut self) -> Result<(), StoreError> {
        let rows = client(&self.pool)
            .await?
            .query("select u.username, md5(u::text) from users u where u.username is not null", &[])
            .await
            .map_err(|e| pg_err("comparing users", &e))?;
        let mut present = HashSet::with_capacity(rows.len());
        for row in &rows {
            let (name, hash): (String, String) = (row.get(0), row.get(1));
            if self.known.get(&name) != Some(&hash) {
                self.pending.insert(name.clone());
            }
            present.insert(name);
        }
        self.pending.extend(self.known.keys().filter(|k| !present.contains(*k)).cloned());
        self.channel.compare = false;
        Ok(())
    }
}

/// Follows `faces`.
pub struct PgFacesFeed {
    pool: deadpool_postgres::Pool,
    channel: Channel,
    /// The ids the index holds now, this process's own writes included (asked at every compare).
    known: KnownIds,
    /// Ids whose current state the index has been given.
    delivered: HashSet<String>,
    /// Ids to read again.
    pending: HashSet<String>,
}

#[async_trait::async_trait]
impl ChangeFeed<FaceChange> for PgFacesFeed {
    async fn wait(&mut self) {
        wait_for_pending(self).await
    }

    async fn changes(&mut self) -> Result<Vec<FaceChange>, StoreError> {
        let ids: Vec<String> = self.pending.iter().cloned().collect();
        let sql = format!("select {FACE_COLUMNS} from faces f where f.id::text = any($1)");
        let rows = client(&self.pool).await?.query(&sql, &[&ids]).await.map_err(|e| pg_err("reading changed face records", &e))?;
        let mut found = HashMap::new();
        for row in &rows {
            match record_of(row) {
                Ok((record, Ok(()))) => {
                    found.insert(record.id.clone(), FaceChange::Upsert(record));
                }
                Ok((record, Err(why))) => {
                    tracing::warn!(id = %record.id, "postgres store: face record {} is not searched ({why})", record.id);
                    found.insert(record.id.clone(), FaceChange::Remove(record.id));
                }
                Err(why) => tracing::warn!("postgres store: a changed face record cannot be read: {why}"),
            }
        }
        let mut changes = Vec::with_capacity(ids.len());
        for id in ids {
            self.pending.remove(&id);
            match found.remove(&id) {
                Some(change) => {
                    self.delivered.insert(id);
                    changes.push(change);
                }
                None => {
                    self.delivered.remove(&id);
                    changes.push(FaceChange::Remove(id));
                }
            }
        }
        Ok(changes)
    }

    fn describe(&self) -> String {
        format!("LISTEN {}", FACES_CHANNEL)
    }
}

impl Follows for PgFacesFeed {
    const WHAT: &'static str = "face records";

    fn parts(&mut self) -> (&mut Channel, &mut HashSet<String>) {
        (&mut self.channel, &mut self.pending)
    }

    /// Every record id in the table compared with what the index holds and was given.
    async fn compare(&mut self) -> Result<(), StoreError> {
        let rows =
            client(&self.pool).await?.query("select id::text from faces", &[]).await.map_err(|e| pg_err("comparing face records", &e))?;
        let present: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        // What this process wrote itself reached the index without passing through the feed.
        self.delivered.extend((self.known)());
        self.pending.extend(self.delivered.iter().filter(|id| !present.contains(*id)).cloned());
        self.pending.extend(present.into_iter().filter(|id| !self.delivered.contains(id)));
        self.channel.compare = false;
        Ok(())
    }
}
