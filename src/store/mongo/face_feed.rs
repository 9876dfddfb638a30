//! Following the `faces` collection (a child of `mongo`): face records written or deleted by
//! other replicas (or by the other API's own service) reach this replica's index.
//!
//! Records are written once and deleted, never updated, so following them is simpler than
//! following users: the feed knows every record's `_id` and `id` and which ids it has
//! delivered. A change stream (where the server offers one) says which documents were inserted
//! or deleted; without one (a standalone server), or after the stream is lost, a compare of
//! every document's `_id` and `id` with what is known finds the same (a light projection,
//! every `poll_interval` when polling). The changed ids are then read in full under the
//! follower's write lock.

use std::collections::{HashMap, HashSet};

use futures_util::{StreamExt, TryStreamExt};
use mongodb::Collection;
use mongodb::bson::{Bson, Document, RawDocumentBuf, doc};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};

use super::super::faces::{FaceChange, FaceRecord};
use super::face_records::{record_of, record_projection, with_id};
use super::{
    ChangeFeed, EventStream, FollowMode, IdKey, MongoStore, RESOLVE_CHUNK, StoreError, key_of_bson, open_stream, store_err, str_of,
};
use crate::store::Held;
use crate::store::Retry;

impl MongoStore {
    /// The feed of `faces`, starting from the ids the index holds.
    pub(super) fn faces_feed(&self, known: Held) -> MongoFacesFeed {
        MongoFacesFeed {
            coll: self.faces(),
            stream_wanted: self.opts.follow == FollowMode::Auto,
            stream: None,
            poll_interval: self.opts.poll_interval,
            present: HashMap::new(),
            delivered: HashSet::new(),
            known,
            upserts: HashSet::new(),
            removals: HashSet::new(),
            resync: true,
        }
    }
}

/// Follows `faces`.
pub struct MongoFacesFeed {
    coll: Collection<RawDocumentBuf>,
    /// Try a change stream (FOLLOW=auto); false once the server says it has none.
    stream_wanted: bool,
    stream: Option<EventStream>,
    poll_interval: std::time::Duration,
    /// Every record document seen: `_id` -> `id` (a deletion event only gives the `_id`).
    present: HashMap<IdKey, String>,
    /// Ids whose current state the index has been given.
    delivered: HashSet<String>,
    /// The ids the index holds now, this process's own writes included (asked at every compare).
    known: Held,
    /// Ids to read again, and ids gone.
    upserts: HashSet<String>,
    removals: HashSet<String>,
    /// Compare every document with what is known (at start, after a lost stream, when polling).
    resync: bool,
}

#[async_trait::async_trait]
impl ChangeFeed<FaceChange> for MongoFacesFeed {
    async fn wait(&mut self) {
        let mut retry = Retry::default();
        while self.upserts.is_empty() && self.removals.is_empty() {
            let step = if self.resync { self.compare().await } else { self.next_event().await };
            match step {
                Ok(()) => {
                    retry.after_success();
                }
                Err(e) => {
                    retry
                        .after_failure(|| tracing::warn!("mongo store: cannot follow other replicas' face records for now ({e}); retrying"))
                        .await
                }
            }
        }
    }

    async fn changes(&mut self) -> Result<Vec<FaceChange>, StoreError> {
        // Read first: on an error nothing is taken off the lists, and the same ids are read again.
        let wanted: Vec<String> = self.upserts.iter().cloned().collect();
        let mut found = HashMap::new();
        for chunk in wanted.chunks(RESOLVE_CHUNK) {
            found.extend(read(&self.coll, chunk).await?);
        }
        let mut changes = Vec::with_capacity(wanted.len() + self.removals.len());
        for id in self.removals.drain() {
            self.delivered.remove(&id);
            changes.push(FaceChange::Remove(id));
        }
        for id in wanted {
            self.upserts.remove(&id);
            match found.remove(&id) {
                Some(Some(record)) => {
                    self.delivered.insert(id);
                    changes.push(FaceChange::Upsert(record));
                }
                // There, but not searchable: told once, not read again at every compare.
                Some(None) => {
                    self.delivered.insert(id.clone());
                    changes.push(FaceChange::Remove(id));
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
        if self.stream.is_some() { "change stream".into() } else { "compare".into() }
    }
}

impl MongoFacesFeed {
    /// The next change stream event; without a stream, the next compare (after `poll_interval`).
    async fn next_event(&mut self) -> Result<(), StoreError> {
        let Some(stream) = self.stream.as_mut() else {
            tokio::time::sleep(self.poll_interval).await;
            self.resync = true;
            return Ok(());
        };
        match stream.next().await {
            Some(Ok(event)) => {
                self.on_event(event);
                Ok(())
            }
            Some(Err(e)) => {
                self.stream = None;
                self.resync = true;
                Err(store_err("face records' change stream", &e))
            }
            None => {
                self.stream = None;
                self.resync = true;
                Ok(())
            }
        }
    }

    fn on_event(&mut self, event: ChangeStreamEvent<Document>) {
        let key = event.document_key.as_ref().and_then(|k| k.get("_id")).map(key_of_bson);
        match event.operation_type {
            OperationType::Insert | OperationType::Update | OperationType::Replace => {
                let id = event.full_document.as_ref().and_then(|d| d.get_str("id").ok()).map(str::to_owned);
                match (key, id) {
                    (Some(key), Some(id)) => {
                        if let Some(old) = self.present.insert(key, id.clone())
                            && old != id
                        {
                            self.removals.insert(old);
                        }
                        self.removals.remove(&id);
                        self.upserts.insert(id);
                    }
                    // An update without its document: compare everything.
                    _ => self.resync = true,
                }
            }
            OperationType::Delete => match key.and_then(|k| self.present.remove(&k)) {
                Some(id) => {
                    self.upserts.remove(&id);
                    self.removals.insert(id);
                }
                None => self.resync = true,
            },
            OperationType::Drop | OperationType::Rename | OperationType::DropDatabase | OperationType::Invalidate => {
                self.stream = None;
                self.resync = true;
            }
            _ => {}
        }
    }

    /// Compares every record document's `_id` and `id` with what is known. The change stream is
    /// opened first (when wanted), so that nothing written during the compare is missed.
    async fn compare(&mut self) -> Result<(), StoreError> {
        if self.stream_wanted && self.stream.is_none() {
            match open_stream(&self.coll, None).await {
                Ok(Some((s, _))) => self.stream = Some(s),
                Ok(None) => self.stream_wanted = false,
                Err(e) => return Err(store_err("opening the face records' change stream", &e)),
            }
        }
        let held_before = (self.known)();
        let what = "comparing face records";
        let mut cursor =
            self.coll.find(with_id()).projection(doc! {"_id": 1, "id": 1}).batch_size(5000).await.map_err(|e| store_err(what, &e))?;
        let mut present = HashMap::new();
        while let Some(raw) = cursor.try_next().await.map_err(|e| store_err(what, &e))? {
            let (Ok(Some(oid)), Some(id)) = (raw.get("_id"), str_of(&raw, "id")) else { continue };
            let Ok(oid) = Bson::try_from(oid.to_raw_bson()) else { continue };
            present.insert(key_of_bson(&oid), id.to_owned());
        }
        let ids: HashSet<&String> = present.values().collect();
        // What this process wrote itself reached the index without passing through the feed: a
        // record registered here and deleted elsewhere before this compare must still go. Asked
        // before the scan: a record in the index then was in the store then (the store is
        // written first), so not finding it means it was deleted since (ids are never reused).
        self.delivered.extend(held_before);
        for id in &self.delivered {
            if !ids.contains(id) {
                self.removals.insert(id.clone());
            }
        }
        for id in ids {
            if !self.delivered.contains(id) {
                self.upserts.insert(id.clone());
            }
        }
        self.present = present;
        self.resync = false;
        Ok(())
    }
}

/// The current records of `ids` that are still there (`None`: there, but its vector is unusable).
async fn read(coll: &Collection<RawDocumentBuf>, ids: &[String]) -> Result<HashMap<String, Option<FaceRecord>>, StoreError> {
    let what = "reading changed face records";
    let mut cursor = coll.find(doc! {"id": {"$in": ids}}).projection(record_projection()).await.map_err(|e| store_err(what, &e))?;
    let mut found = HashMap::new();
    while let Some(raw) = cursor.try_next().await.map_err(|e| store_err(what, &e))? {
        match record_of(&raw) {
            Some((record, Ok(()))) => {
                found.insert(record.id.clone(), Some(record));
            }
            Some((record, Err(why))) => {
                tracing::warn!(id = %record.id, "mongo store: face record {} has an unusable vector ({why}); not searched", record.id);
                found.insert(record.id, None);
            }
            None => {}
        }
    }
    Ok(found)
}
