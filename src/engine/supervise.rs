//! Supervision of the inference workers: each batch runs under `catch_unwind`; a worker that
//! panics has its analyzer (its model sessions) rebuilt and goes on serving, counted in
//! `worker_restarts`. The jobs of the batch it was computing lose their reply channel, so their
//! callers get [`super::EngineError::WorkerFailed`] (500 `internal`) at once instead of
//! hanging. Each worker's state is kept in a [`Slots`] table: a worker busy past the engine's
//! deadline, or being replaced, is not serving, and `/ready` says 503 until one is again.
//!
//! [`FaultHooks`] inject a panic or a stall on the Nth computed job, for tests: they are set
//! with [`super::EngineConfig::with_faults`], never from configuration.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Counters;
use crate::face::{FaceAnalyzer, FaceError};

/// Faults to inject into the workers (tests only; the default injects none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultHooks {
    /// Panic while computing the Nth job (counted from 1 across workers).
    pub panic_on_job: Option<u64>,
    /// Stall this long before computing the Nth job.
    pub stall_on_job: Option<(u64, Duration)>,
}

impl FaultHooks {
    /// A panic inside the worker on the `n`th computed job.
    pub fn panic_on(n: u64) -> FaultHooks {
        FaultHooks { panic_on_job: Some(n), ..FaultHooks::default() }
    }

    /// A stall of `d` before the `n`th computed job.
    pub fn stall_on(n: u64, d: Duration) -> FaultHooks {
        FaultHooks { stall_on_job: Some((n, d)), ..FaultHooks::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.panic_on_job.is_none() && self.stall_on_job.is_none()
    }
}

/// Counts computed jobs and fires the hooks.
pub(super) struct Faults {
    hooks: FaultHooks,
    jobs: AtomicU64,
}

impl Faults {
    pub(super) fn new(hooks: FaultHooks) -> Faults {
        Faults { hooks, jobs: AtomicU64::new(0) }
    }

    /// Called by a worker before it computes a job.
    pub(super) fn before_job(&self) {
        if self.hooks.is_empty() {
            return;
        }
        let n = self.jobs.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some((at, d)) = self.hooks.stall_on_job
            && at == n
        {
            tracing::warn!(job = n, stall = ?d, "injected fault: the inference worker stalls");
            std::thread::sleep(d);
        }
        if self.hooks.panic_on_job == Some(n) {
            panic!("injected fault: the inference worker panics on job {n}");
        }
    }
}

/// What one worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Idle,
    Busy(Instant),
    Replacing,
    Gone,
}

/// The workers' states, for readiness.
pub(super) struct Slots {
    slots: Mutex<Vec<Slot>>,
}

impl Slots {
    pub(super) fn new(workers: usize) -> Slots {
        Slots { slots: Mutex::new(vec![Slot::Idle; workers]) }
    }

    fn set(&self, i: usize, s: Slot) {
        let mut g = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = g.get_mut(i) {
            *slot = s;
        }
    }

    /// Workers idle, or busy for less than `deadline`.
    pub(super) fn serving(&self, deadline: Duration) -> usize {
        let g = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        g.iter()
            .filter(|s| match s {
                Slot::Idle => true,
                Slot::Busy(since) => since.elapsed() < deadline,
                Slot::Replacing | Slot::Gone => false,
            })
            .count()
    }
}

/// Runs worker `id`: `next_batch` takes and computes one batch (calling `busy` once it holds
/// a job) or returns `None` once the queue is closed and drained. It runs under
/// `catch_unwind`; after a panic the worker counts as not live while its analyzer is rebuilt
/// with `rebuild` (retried every second while that fails, until `closed`), then serves on.
pub(super) fn supervise(
    id: usize,
    slots: &Slots,
    counters: &Counters,
    mut analyzer: FaceAnalyzer,
    mut next_batch: impl FnMut(&mut FaceAnalyzer, &dyn Fn()) -> Option<()>,
    rebuild: impl Fn() -> Result<FaceAnalyzer, FaceError>,
    closed: impl Fn() -> bool,
) {
    loop {
        let busy = || slots.set(id, Slot::Busy(Instant::now()));
        match catch_unwind(AssertUnwindSafe(|| next_batch(&mut analyzer, &busy))) {
            Ok(Some(())) => slots.set(id, Slot::Idle),
            Ok(None) => break,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic")
                    .to_owned();
                tracing::error!(worker = id, panic = %why, "inference worker panicked: its jobs failed; replacing it");
                slots.set(id, Slot::Replacing);
                counters.update(|s| {
                    s.worker_restarts += 1;
                    s.live_workers = s.live_workers.saturating_sub(1);
                });
                loop {
                    match rebuild() {
                        Ok(fresh) => {
                            analyzer = fresh;
                            break;
                        }
                        Err(e) if !closed() => {
                            tracing::error!(worker = id, error = %e, "cannot rebuild the inference worker; retrying in 1 s");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                        Err(_) => break,
                    }
                }
                // Counted live again (also when the queue closed before a rebuild: the thread's
                // end is then counted by its live guard).
                counters.update(|s| s.live_workers += 1);
                if closed() {
                    break;
                }
                tracing::info!(worker = id, "inference worker replaced");
                slots.set(id, Slot::Idle);
            }
        }
    }
    slots.set(id, Slot::Gone);
}
