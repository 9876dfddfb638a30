//! Keeping the in-memory gallery in step with writes made by other processes on a shared store
//! (several replicas on one MongoDB database).
//!
//! [`run`] loops: [`ChangeFeed::wait`] until some users changed (no lock held), then, holding
//! the same write lock as the HTTP handlers, [`ChangeFeed::changes`] reads those users' *current*
//! documents and [`apply`] puts them into the gallery. Because a local write holds the lock from
//! its store write to its gallery update, the follower's read-and-apply happens wholly before
//! or wholly after it: the follower either sees the local write in the store (and applies the
//! same template again) or runs first and the local write then overwrites it with the newer
//! state. The echo of a local write, arriving later through the feed, re-reads the store and
//! applies what is there now, so it can never bring back an older template or a deleted user.

use std::sync::Arc;
use std::time::Duration;

use super::{Change, ChangeFeed};
use crate::gallery::Gallery;

/// The lock that serialises "write the store, then the gallery" (`AppState::writes`).
pub trait WriteGate: Send + Sync + 'static {
    fn writes(&self) -> &tokio::sync::Mutex<()>;
}

impl WriteGate for tokio::sync::Mutex<()> {
    fn writes(&self) -> &tokio::sync::Mutex<()> {
        self
    }
}

/// Applies one change: a user with a usable template of our recognizer (or of an unknown one,
/// as for seed documents) is compared; anyone else is not.
pub fn apply(gallery: &Gallery, model_id: &str, change: Change) {
    match change {
        Change::Upsert(rec) => {
            let ours = rec.model_id.as_deref().is_none_or(|m| m == model_id);
            if !(ours && !rec.embedding.is_empty() && gallery.upsert(&rec.username, &rec.embedding)) {
                gallery.remove(&rec.username);
            }
        }
        Change::Remove(name) => {
            gallery.remove(&name);
        }
    }
}

/// Follows `feed` for ever (the task is dropped with the runtime). Errors while reading are
/// retried with a backoff; the feed keeps what it has not delivered yet.
pub async fn run<G: WriteGate + ?Sized>(gate: Arc<G>, gallery: Arc<Gallery>, model_id: String, mut feed: Box<dyn ChangeFeed>) {
    let mut failures: u32 = 0;
    loop {
        feed.wait().await;
        let result = {
            let _w = gate.writes().lock().await;
            feed.changes().await.map(|changes| {
                let n = changes.len();
                for change in changes {
                    apply(&gallery, &model_id, change);
                }
                n
            })
        };
        match result {
            Ok(n) => {
                if failures > 0 {
                    tracing::info!("follower: reading the store works again");
                }
                failures = 0;
                if n > 0 {
                    tracing::debug!(changes = n, users = gallery.len(), "follower: applied other writers' changes");
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!("follower: cannot read changed users yet ({e}); retrying");
                }
                tokio::time::sleep(backoff(failures)).await;
            }
        }
    }
}

/// 250 ms, doubling, at most 5 s.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << failures.saturating_sub(1).min(5))).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreError, UserRecord};
    use std::collections::VecDeque;
    use std::time::SystemTime;

    fn rec(name: &str, hot: usize, model: Option<&str>) -> UserRecord {
        let mut embedding = vec![0.0; 4];
        embedding[hot] = 1.0;
        UserRecord { username: name.into(), embedding, samples: 1, model_id: model.map(str::to_owned), updated_at: SystemTime::UNIX_EPOCH }
    }

    #[test]
    fn apply_compares_only_usable_templates_of_our_recognizer() {
        let g = Gallery::new(4);
        apply(&g, "m1", Change::Upsert(rec("ann", 0, Some("m1"))));
        apply(&g, "m1", Change::Upsert(rec("bob", 1, None)));
        assert_eq!((g.len(), g.best(&[0.0, 1.0, 0.0, 0.0]).map(|m| m.name)), (2, Some("bob".into())));
        // Re-enrolled by another recognizer elsewhere: no longer compared.
        apply(&g, "m1", Change::Upsert(rec("ann", 0, Some("m2"))));
        assert!(!g.contains("ann"));
        // A template-less record (a new user, or one whose template became unusable) and a removal.
        apply(&g, "m1", Change::Upsert(UserRecord { embedding: Vec::new(), ..rec("bob", 1, None) }));
        assert!(!g.contains("bob"));
        apply(&g, "m1", Change::Upsert(rec("cid", 2, Some("m1"))));
        apply(&g, "m1", Change::Remove("cid".into()));
        apply(&g, "m1", Change::Remove("nobody".into()));
        assert!(g.is_empty());
        // A template of the wrong length is refused by the gallery: the user is dropped, not kept stale.
        apply(&g, "m1", Change::Upsert(rec("dan", 0, None)));
        apply(&g, "m1", Change::Upsert(UserRecord { embedding: vec![1.0; 3], ..rec("dan", 0, None) }));
        assert!(!g.contains("dan"));
    }

    /// A feed that hands out scripted batches; `changes` fails once when asked to.
    struct Scripted {
        batches: VecDeque<Result<Vec<Change>, StoreError>>,
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
            self.batches.pop_front().unwrap_or(Ok(Vec::new()))
        }
        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    #[tokio::test]
    async fn run_applies_batches_under_the_write_lock_and_survives_errors() {
        let gallery = Arc::new(Gallery::new(4));
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let feed = Scripted {
            batches: VecDeque::from([
                Ok(vec![Change::Upsert(rec("ann", 0, None)), Change::Upsert(rec("bob", 1, Some("m1")))]),
                Err(StoreError::Unavailable("down".into())),
                Ok(vec![Change::Remove("ann".into())]),
            ]),
            done: Some(tx),
        };
        // Held by a "local write": nothing is applied until it is released.
        let held = gate.clone().lock_owned().await;
        let task = tokio::spawn(run(gate.clone(), gallery.clone(), "m1".into(), Box::new(feed)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(gallery.is_empty());
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), rx).await.expect("the feed is drained").expect("sender kept");
        assert!(!gallery.contains("ann") && gallery.contains("bob"));
        task.abort();
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(40), Duration::from_secs(5));
    }
}
