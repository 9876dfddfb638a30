//! Keeping both in-memory indexes in step with writes made by other processes on a shared store
//! (several replicas on one MongoDB database): users into the gallery, face records into their
//! index.
//!
//! [`run`] loops: [`ChangeFeed::wait`] until something changed (no lock held), then, holding the
//! same write lock as local writes, [`ChangeFeed::changes`] reads the *current* state of what
//! changed and applies it. Because a local write holds the lock from its store write to its
//! index update, the follower's read-and-apply happens wholly before or wholly after it: it
//! either sees the local write in the store (and applies the same state again) or runs first and
//! the local write then overwrites it with the newer state. The echo of a local write, arriving
//! later through the feed, re-reads the store and applies what is there now, so it can never
//! bring back an older template, a deleted user or a deleted face record.

use std::sync::Arc;

use crate::gallery::{FaceIndex, Gallery};
use crate::store::faces::FaceChange;
use crate::store::{Change, ChangeFeed, Retry, is_ours};

/// Applies one user change: a user with a usable template of our recognizer (or of an unknown
/// one, as for seed documents) is compared; anyone else is not.
pub fn apply_user(gallery: &Gallery, model_id: &str, change: Change) {
    match change {
        Change::Upsert(rec) => {
            let ours = is_ours(rec.model_id.as_deref(), model_id);
            if !(ours && !rec.embedding.is_empty() && gallery.upsert(&rec.username, &rec.embedding)) {
                gallery.remove(&rec.username);
            }
        }
        Change::Remove(name) => {
            gallery.remove(&name);
        }
    }
}

/// Applies one face-record change: a record of our recognizer (or of an unknown one) with a
/// vector of the right length is searchable; anything else is not.
pub fn apply_face(index: &FaceIndex, model_id: &str, change: FaceChange) {
    match change {
        FaceChange::Upsert(rec) => {
            let ours = is_ours(Some(&rec.model_id), model_id);
            if !(ours && index.insert(&rec)) {
                index.remove(&rec.id);
            }
        }
        FaceChange::Remove(id) => index.remove(&id),
    }
}

/// Follows users for ever (the task is dropped with the runtime).
pub async fn users(writes: Arc<tokio::sync::Mutex<()>>, gallery: Arc<Gallery>, model_id: String, feed: Box<dyn ChangeFeed>) {
    run("users", &writes, feed, |c| apply_user(&gallery, &model_id, c)).await
}

/// Follows face records for ever.
pub async fn faces(writes: Arc<tokio::sync::Mutex<()>>, index: Arc<FaceIndex>, model_id: String, feed: Box<dyn ChangeFeed<FaceChange>>) {
    run("face records", &writes, feed, |c| apply_face(&index, &model_id, c)).await
}

/// The loop: wait (no lock), then read and apply under `writes`. Errors while reading are retried
/// with a backoff; the feed keeps what it has not delivered yet.
pub async fn run<C>(what: &str, writes: &tokio::sync::Mutex<()>, mut feed: Box<dyn ChangeFeed<C>>, mut apply: impl FnMut(C)) {
    let mut retry = Retry::default();
    loop {
        feed.wait().await;
        let result = {
            let _w = writes.lock().await;
            feed.changes().await.map(|changes| {
                let n = changes.len();
                changes.into_iter().for_each(&mut apply);
                n
            })
        };
        match result {
            Ok(n) => {
                if retry.after_success() {
                    tracing::info!(what, "follower: reading the store works again");
                }
                if n > 0 {
                    tracing::debug!(what, changes = n, "follower: applied other writers' changes");
                }
            }
            Err(e) => retry.after_failure(|| tracing::warn!(what, "follower: cannot read changes yet ({e}); retrying")).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::faces::FaceRecord;
    use crate::store::{StoreError, UserRecord};
    use std::collections::VecDeque;
    use std::time::{Duration, SystemTime};

    fn rec(name: &str, hot: usize, model: Option<&str>) -> UserRecord {
        let mut embedding = vec![0.0; 4];
        embedding[hot] = 1.0;
        UserRecord { username: name.into(), embedding, samples: 1, model_id: model.map(str::to_owned), updated_at: SystemTime::UNIX_EPOCH }
    }

    fn face(id: &str, hot: usize, model: &str) -> FaceRecord {
        let mut face_vec = vec![0.0; 4];
        face_vec[hot] = 1.0;
        FaceRecord {
            id: id.into(),
            display_name: format!("name of {id}"),
            image_url: String::new(),
            inserted_at: SystemTime::UNIX_EPOCH,
            face_vec,
            model_id: model.into(),
        }
    }

    #[test]
    fn apply_user_compares_only_usable_templates_of_our_recognizer() {
        let g = Gallery::new(4);
        apply_user(&g, "m1", Change::Upsert(rec("ann", 0, Some("m1"))));
        apply_user(&g, "m1", Change::Upsert(rec("bob", 1, None)));
        assert_eq!((g.len(), g.best(&[0.0, 1.0, 0.0, 0.0]).map(|m| m.name)), (2, Some("bob".into())));
        // Re-enrolled by another recognizer elsewhere: no longer compared.
        apply_user(&g, "m1", Change::Upsert(rec("ann", 0, Some("m2"))));
        assert!(!g.contains("ann"));
        // A template-less record (a new user, or one whose template became unusable) and a removal.
        apply_user(&g, "m1", Change::Upsert(UserRecord { embedding: Vec::new(), ..rec("bob", 1, None) }));
        assert!(!g.contains("bob"));
        apply_user(&g, "m1", Change::Upsert(rec("cid", 2, Some("m1"))));
        apply_user(&g, "m1", Change::Remove("cid".into()));
        apply_user(&g, "m1", Change::Remove("nobody".into()));
        assert!(g.is_empty());
        // A template of the wrong length is refused by the gallery: the user is dropped, not kept stale.
        apply_user(&g, "m1", Change::Upsert(rec("dan", 0, None)));
        apply_user(&g, "m1", Change::Upsert(UserRecord { embedding: vec![1.0; 3], ..rec("dan", 0, None) }));
        assert!(!g.contains("dan"));
    }

    #[test]
    fn apply_face_indexes_only_records_of_our_recognizer() {
        let index = FaceIndex::new(4);
        apply_face(&index, "m1", FaceChange::Upsert(face("a", 0, "m1")));
        apply_face(&index, "m1", FaceChange::Upsert(face("b", 1, "")));
        apply_face(&index, "m1", FaceChange::Upsert(face("c", 2, "m2")));
        assert_eq!(index.len(), 2);
        let hits = index.search(&[0.0, 1.0, 0.0, 0.0], 5, 0.5);
        assert_eq!(hits.iter().map(|h| (h.id.as_str(), h.display_name.as_str())).collect::<Vec<_>>(), [("b", "name of b")]);
        apply_face(&index, "m1", FaceChange::Upsert(FaceRecord { face_vec: vec![1.0; 3], ..face("a", 0, "m1") }));
        apply_face(&index, "m1", FaceChange::Remove("b".into()));
        apply_face(&index, "m1", FaceChange::Remove("nobody".into()));
        assert!(index.is_empty());
    }

    /// A feed that hands out scripted batches, notes whether the write lock was held while it
    /// was read, and says when it has nothing left.
    struct Scripted {
        batches: VecDeque<Result<Vec<Change>, StoreError>>,
        gate: Arc<tokio::sync::Mutex<()>>,
        read_under_lock: Arc<std::sync::Mutex<Vec<bool>>>,
        done: Option<tokio::sync::oneshot::Sender<()>>,
    }

    #[async_trait::async_trait]
    impl ChangeFeed for Scripted {
        async fn wait(&mut self) {
            if self.batches.is_empty() {
                if let Some(done) = self.done.take() {
                    let _ = done.send(());
                }
                std::future::pending::<()>().await;
            }
        }
        async fn changes(&mut self) -> Result<Vec<Change>, StoreError> {
            let held = self.gate.try_lock().is_err();
            self.read_under_lock.lock().expect("not poisoned").push(held);
            self.batches.pop_front().unwrap_or(Ok(Vec::new()))
        }
        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    #[tokio::test]
    async fn run_reads_and_applies_under_the_write_lock_and_survives_errors() {
        let gallery = Arc::new(Gallery::new(4));
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let reads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let feed = Scripted {
            batches: VecDeque::from([
                Ok(vec![Change::Upsert(rec("ann", 0, None)), Change::Upsert(rec("bob", 1, Some("m1")))]),
                Err(StoreError::Unavailable("down".into())),
                Ok(vec![Change::Remove("ann".into())]),
            ]),
            gate: Arc::clone(&gate),
            read_under_lock: Arc::clone(&reads),
            done: Some(tx),
        };
        let task = tokio::spawn(users(Arc::clone(&gate), Arc::clone(&gallery), "m1".into(), Box::new(feed)));
        tokio::time::timeout(Duration::from_secs(10), rx).await.expect("the feed is drained").expect("sender kept");
        assert!(!gallery.contains("ann") && gallery.contains("bob"));
        assert_eq!(*reads.lock().expect("not poisoned"), [true, true, true], "every read happens under the write lock");
        task.abort();
    }
}
