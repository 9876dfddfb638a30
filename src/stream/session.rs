//! One stream's plumbing, apart from the socket: the one-slot mailbox between the reader and the
//! processor (a newer frame replaces an unprocessed one, which is counted as dropped, so a slow
//! consumer never grows a queue), the frame-rate limit, and the hub that counts open streams
//! against STREAM_MAX_STREAMS.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Holds at most one item: the newest. Many writers, one reader.
#[derive(Debug)]
pub struct Mailbox<T> {
    slot: Mutex<Option<T>>,
    ready: Notify,
    closed: AtomicBool,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox { slot: Mutex::new(None), ready: Notify::new(), closed: AtomicBool::new(false) }
    }
}

impl<T> Mailbox<T> {
    pub fn new() -> Mailbox<T> {
        Mailbox::default()
    }

    /// Puts `item` in the slot; returns the unprocessed item it replaced (dropped), if any.
    pub fn put(&self, item: T) -> Option<T> {
        let old = self.slot.lock().unwrap_or_else(|p| p.into_inner()).replace(item);
        self.ready.notify_one();
        old
    }

    /// The newest item, waiting for one; `None` once closed (what was left is discarded).
    pub async fn take(&self) -> Option<T> {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            if let Some(item) = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Some(item);
            }
            self.ready.notified().await;
        }
    }

    /// Ends [`Mailbox::take`]; returns whether an item was left unprocessed.
    pub fn close(&self) -> bool {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).take().is_some()
    }
}

/// A token bucket: `rate` frames a second, bursts of up to one second's worth.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(rate: u32) -> RateLimit {
        let rate = f64::from(rate.max(1));
        RateLimit { rate, tokens: rate, last: Instant::now() }
    }

    /// Takes one token at `now`; `false` when the client is over the rate.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts the streams open in this process.
#[derive(Debug)]
pub struct StreamHub {
    open: AtomicUsize,
    max: usize,
}

/// A stream's place in the hub, given back on drop.
#[derive(Debug)]
pub struct Slot<'a>(&'a StreamHub);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl StreamHub {
    pub fn new(max: usize) -> StreamHub {
        StreamHub { open: AtomicUsize::new(0), max: max.max(1) }
    }

    /// A place for one more stream, unless `max` are open.
    pub fn enter(&self) -> Option<Slot<'_>> {
        self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1)).ok().map(|_| Slot(self))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// Milliseconds, for answers.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_mailbox_keeps_the_newest() {
        let m = Mailbox::new();
        assert_eq!(m.put(1), None);
        assert_eq!(m.put(2), Some(1), "the unprocessed one is handed back as dropped");
        assert_eq!(m.take().await, Some(2));
        let m = std::sync::Arc::new(m);
        let m2 = std::sync::Arc::clone(&m);
        let waiter = tokio::spawn(async move { m2.take().await });
        m.put(3);
        assert_eq!(waiter.await.unwrap(), Some(3));
        m.put(4);
        assert!(m.close(), "4 was left");
        assert_eq!(m.take().await, None);
    }

    #[test]
    fn rate_limit_allows_a_second_of_burst_then_the_rate() {
        let mut r = RateLimit::new(10);
        let t0 = Instant::now();
        assert!((0..10).all(|_| r.allow(t0)));
        assert!(!r.allow(t0));
        assert!(r.allow(t0 + Duration::from_millis(100)));
        assert!(!r.allow(t0 + Duration::from_millis(110)));
    }

    #[test]
    fn the_hub_counts_and_refuses_past_max() {
        let hub = StreamHub::new(2);
        let a = hub.enter().unwrap();
        let _b = hub.enter().unwrap();
        assert!(hub.enter().is_none());
        drop(a);
        assert_eq!(hub.open(), 1);
        assert!(hub.enter().is_some());
    }
}
