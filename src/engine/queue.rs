//! The bounded job queue between the async handles and the worker threads: many producers
//! that never block (a full queue refuses at once), many consumers that block, take without
//! waiting, or wait a bounded time. A mutex, a condition variable and a ring buffer; the
//! depth is known at any moment (for metrics).
//!
//! Fair share: every item belongs to a share (one request); the queue keeps one lane per share
//! and hands items out from the lanes in turn, so a request of 64 crops does not make a
//! one-crop request behind it wait for all 64 (five of them: 320 crops, about 10 s).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What [`JobQueue::push`] did.
pub enum Pushed<T> {
    Queued,
    /// At capacity: the item is handed back.
    Full(T),
    /// Closed: the item is handed back.
    Closed(T),
}

struct State<T> {
    /// Lanes with items, in the order they are served next.
    lanes: VecDeque<(u64, VecDeque<T>)>,
    len: usize,
    closed: bool,
}

impl<T> State<T> {
    fn take(&mut self) -> Option<T> {
        let (share, mut lane) = self.lanes.pop_front()?;
        let item = lane.pop_front();
        if !lane.is_empty() {
            self.lanes.push_back((share, lane));
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }
}

pub struct JobQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
}

impl<T> JobQueue<T> {
    pub fn new(capacity: usize) -> JobQueue<T> {
        let capacity = capacity.max(1);
        JobQueue { state: Mutex::new(State { lanes: VecDeque::new(), len: 0, closed: false }), ready: Condvar::new(), capacity }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `item` to `share`'s lane unless the queue is full or closed; never blocks on space.
    pub fn push(&self, share: u64, item: T) -> Pushed<T> {
        let mut s = self.lock();
        if s.closed {
            return Pushed::Closed(item);
        }
        // At capacity, a share with nothing queued still gets its first item in (up to twice the
        // capacity): heavy requests filling the queue do not shut a light one out.
        let queued = s.lanes.iter().any(|(id, _)| *id == share);
        if s.len >= self.capacity && (queued || s.len >= 2 * self.capacity) {
            return Pushed::Full(item);
        }
        match s.lanes.iter_mut().find(|(id, _)| *id == share) {
            Some((_, lane)) => lane.push_back(item),
            None => s.lanes.push_back((share, VecDeque::from([item]))),
        }
        s.len += 1;
        drop(s);
        self.ready.notify_one();
        Pushed::Queued
    }

    /// The next item (lanes in turn, each in order), waiting for one; `None` once the queue is closed and empty.
    pub fn pop(&self) -> Option<T> {
        let mut s = self.lock();
        loop {
            if let Some(item) = s.take() {
                return Some(item);
            }
            if s.closed {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The next item if there is one now.
    pub fn try_pop(&self) -> Option<T> {
        self.lock().take()
    }

    /// The next item, waiting at most `timeout` for one.
    pub fn pop_timeout(&self, timeout: Duration) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if let Some(item) = s.take() {
                return Some(item);
            }
            let now = Instant::now();
            if s.closed || now >= deadline {
                return None;
            }
            s = self.ready.wait_timeout(s, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Items waiting now.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether [`JobQueue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Refuses new items; consumers drain what is left, then get `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_beyond_capacity_and_after_close() {
        let q = JobQueue::new(2);
        assert!(matches!(q.push(0, 1), Pushed::Queued));
        assert!(matches!(q.push(0, 2), Pushed::Queued));
        assert!(matches!(q.push(0, 3), Pushed::Full(3)));
        assert_eq!(q.len(), 2);
        assert_eq!(q.try_pop(), Some(1));
        assert!(matches!(q.push(0, 4), Pushed::Queued));
        q.close();
        assert!(matches!(q.push(0, 5), Pushed::Closed(5)));
        assert_eq!(q.pop(), Some(2), "what was queued is still handed out");
        assert_eq!(q.pop_timeout(Duration::from_millis(1)), Some(4));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn a_waiting_consumer_gets_an_item_pushed_later() {
        let q = std::sync::Arc::new(JobQueue::new(4));
        let q2 = std::sync::Arc::clone(&q);
        let consumer = std::thread::spawn(move || q2.pop());
        assert!(matches!(q.push(0, 7), Pushed::Queued));
        assert_eq!(consumer.join().unwrap(), Some(7));
        assert_eq!(q.pop_timeout(Duration::from_millis(2)), None);
    }

    #[test]
    fn shares_are_served_in_turn_each_in_order() {
        let q = JobQueue::new(100);
        for i in 0..5 {
            assert!(matches!(q.push(1, 10 + i), Pushed::Queued));
        }
        assert!(matches!(q.push(2, 20), Pushed::Queued));
        assert!(matches!(q.push(3, 30), Pushed::Queued));
        assert!(matches!(q.push(2, 21), Pushed::Queued));
        assert_eq!(q.len(), 8);
        let order: Vec<i32> = std::iter::from_fn(|| q.try_pop()).collect();
        assert_eq!(order, vec![10, 20, 30, 11, 21, 12, 13, 14]);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn a_full_queue_still_admits_a_new_shares_first_item() {
        let q = JobQueue::new(2);
        assert!(matches!(q.push(1, 1), Pushed::Queued));
        assert!(matches!(q.push(1, 2), Pushed::Queued));
        assert!(matches!(q.push(1, 3), Pushed::Full(3)), "the heavy share is at capacity");
        assert!(matches!(q.push(2, 4), Pushed::Queued), "a light share's first item gets in");
        assert!(matches!(q.push(2, 5), Pushed::Full(5)), "but not its second");
        assert!(matches!(q.push(3, 6), Pushed::Queued));
        assert!(matches!(q.push(4, 7), Pushed::Full(7)), "never past twice the capacity");
        assert_eq!(q.len(), 4);
    }
}
