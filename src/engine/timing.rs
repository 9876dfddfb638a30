//! Per-request engine timing: how long a request's images waited in the queue and how long
//! they were computed. The HTTP layer opens a [`TimingSink`] around a request ([`scope`]);
//! every [`super::Engine::analyze`] call made inside it records into it. When the scope ends,
//! the request's figures go into the process histograms here, once, where they are measured;
//! the HTTP layer turns the same [`RequestTiming`] into response headers. Knows nothing of HTTP.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::Either;

tokio::task_local! {
    static SINK: TimingSink;
}

/// The engine's share of one request. With several images (a multi-crop `/recognize`,
/// `verify`), the images run concurrently, so both figures are the longest of them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestTiming {
    /// Longest wait between admission and a worker taking the image.
    pub queue: Duration,
    /// Longest time from a worker taking the image to its answer: decode, detect, align and
    /// the recognizer run of its batch.
    pub inference: Duration,
    /// Images the engine computed for this request.
    pub jobs: u32,
}

/// Collects the timing of the engine calls made while it is in scope. Cloning is cheap. It is
/// also the request's share of the engine: the queue takes the jobs of different sinks in turn.
#[derive(Debug, Clone)]
pub struct TimingSink {
    times: Arc<Mutex<Option<RequestTiming>>>,
    share: u64,
}

/// Share ids: one per sink, and one per engine call made outside any sink.
static SHARES: AtomicU64 = AtomicU64::new(1);

impl Default for TimingSink {
    fn default() -> Self {
        TimingSink::new()
    }
}

impl TimingSink {
    pub fn new() -> TimingSink {
        TimingSink { times: Arc::default(), share: SHARES.fetch_add(1, Ordering::Relaxed) }
    }

    /// What was recorded; `None` when the engine computed nothing for this request.
    pub fn get(&self) -> Option<RequestTiming> {
        self.times.lock().map(|g| *g).unwrap_or(None)
    }

    fn record(&self, queue: Duration, inference: Duration) {
        if let Ok(mut g) = self.times.lock() {
            let t = g.get_or_insert_with(RequestTiming::default);
            t.queue = t.queue.max(queue);
            t.inference = t.inference.max(inference);
            t.jobs += 1;
        }
    }
}

/// Runs `f` with `sink` collecting the timing of its engine calls; when `f` finishes and the
/// engine computed anything for it, records the figures into the process metrics (once per
/// request: the values the response headers carry).
pub async fn scope<F: Future>(sink: TimingSink, f: F) -> F::Output {
    let out = SINK.scope(sink.clone(), f).await;
    if let Some(t) = sink.get() {
        crate::metrics::global().engine_request(t.queue, t.inference);
    }
    out
}

/// Wraps `f` so that it records into the current request's sink even when it runs as a
/// task of its own (`tokio::spawn`, `JoinSet::spawn`): task-locals do not follow spawns.
pub fn carry<F: Future>(f: F) -> impl Future<Output = F::Output> {
    match SINK.try_with(TimingSink::clone) {
        Ok(sink) => Either::Left(SINK.scope(sink, f)),
        Err(_) => Either::Right(f),
    }
}

/// The current request's share of the engine (its sink's); a call outside any sink is a share
/// of its own.
pub(crate) fn share() -> u64 {
    SINK.try_with(|s| s.share).unwrap_or_else(|_| SHARES.fetch_add(1, Ordering::Relaxed))
}

/// Records one computed image into the current request's sink, if any.
pub(crate) fn record(queue: Duration, inference: Duration) {
    let _ = SINK.try_with(|s| s.record(queue, inference));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_the_longest_of_concurrent_images_and_follows_spawns() {
        let sink = TimingSink::new();
        scope(sink.clone(), async {
            record(Duration::from_millis(3), Duration::from_millis(10));
            let spawned = tokio::spawn(carry(async { record(Duration::from_millis(5), Duration::from_millis(7)) }));
            spawned.await.unwrap();
            // Without carry, a spawned task has no sink: nothing is recorded, nothing fails.
            tokio::spawn(async { record(Duration::from_secs(9), Duration::from_secs(9)) }).await.unwrap();
        })
        .await;
        let t = sink.get().unwrap();
        assert_eq!((t.queue, t.inference, t.jobs), (Duration::from_millis(5), Duration::from_millis(10), 2));
        assert_eq!(TimingSink::new().get(), None);
        record(Duration::ZERO, Duration::ZERO); // outside any scope: ignored
    }

    fn engine_counts() -> (u64, u64) {
        let text = crate::metrics::global().encode(&[]).expect("encodes");
        let count = |name: &str| -> u64 {
            let prefix = format!("{name}_count ");
            text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        };
        (count("facerec_queue_time_seconds"), count("facerec_inference_time_seconds"))
    }

    #[tokio::test]
    async fn a_scope_that_used_the_engine_feeds_the_histograms_once() {
        // The registry is process-global and other tests may feed it meanwhile: at least one more.
        let before = engine_counts();
        scope(TimingSink::new(), async {
            record(Duration::from_millis(1), Duration::from_millis(2));
            record(Duration::from_millis(1), Duration::from_millis(2));
        })
        .await;
        let after = engine_counts();
        assert!(after.0 > before.0 && after.1 > before.1, "{before:?} -> {after:?}");
    }
}
