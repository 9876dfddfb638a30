//! The bounded job queue between the async handles and the worker threads: many producers
//! that never block (a full queue refuses at once), many consumers that block, take without
//! waiting, or wait a bounded time. A mutex, a condition variable and a ring buffer; the
//! depth is known at any moment (for metrics).

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
    items: VecDeque<T>,
    closed: bool,
}

pub struct JobQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
}

impl<T> JobQueue<T> {
    pub fn new(capacity: usize) -> JobQueue<T> {
        let capacity = capacity.max(1);
        JobQueue { state: Mutex::new(State { items: VecDeque::with_capacity(capacity), closed: false }), ready: Condvar::new(), capacity }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `item` unless the queue is full or closed; never blocks on space.
    pub fn push(&self, item: T) -> Pushed<T> {
        let mut s = self.lock();
        if s.closed {
            return Pushed::Closed(item);
        }
        if s.items.len() >= self.capacity {
            return Pushed::Full(item);
        }
        s.items.push_back(item);
        drop(s);
        self.ready.notify_one();
        Pushed::Queued
    }

    /// The oldest item, waiting for one; `None` once the queue is closed and empty.
    pub fn pop(&self) -> Option<T> {
        let mut s = self.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
                return Some(item);
            }
            if s.closed {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The oldest item if there is one now.
    pub fn try_pop(&self) -> Option<T> {
        self.lock().items.pop_front()
    }

    /// The oldest item, waiting at most `timeout` for one.
    pub fn pop_timeout(&self, timeout: Duration) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
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
        self.lock().items.len()
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
        assert!(matches!(q.push(1), Pushed::Queued));
        assert!(matches!(q.push(2), Pushed::Queued));
        assert!(matches!(q.push(3), Pushed::Full(3)));
        assert_eq!(q.len(), 2);
        assert_eq!(q.try_pop(), Some(1));
        assert!(matches!(q.push(4), Pushed::Queued));
        q.close();
        assert!(matches!(q.push(5), Pushed::Closed(5)));
        assert_eq!(q.pop(), Some(2), "what was queued is still handed out");
        assert_eq!(q.pop_timeout(Duration::from_millis(1)), Some(4));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn a_waiting_consumer_gets_an_item_pushed_later() {
        let q = std::sync::Arc::new(JobQueue::new(4));
        let q2 = std::sync::Arc::clone(&q);
        let consumer = std::thread::spawn(move || q2.pop());
        assert!(matches!(q.push(7), Pushed::Queued));
        assert_eq!(consumer.join().unwrap(), Some(7));
        assert_eq!(q.pop_timeout(Duration::from_millis(2)), None);
    }
}
