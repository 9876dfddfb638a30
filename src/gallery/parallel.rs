//! Splitting a scan across the cores this process may use.

use super::*;

/// The cores this process may use (read once: `available_parallelism` reads cgroup files).
pub(super) fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// `n` items in at most `parts` contiguous, nearly equal, non-empty ranges.
pub(super) fn split_evenly(n: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts).map(|p| n * p / parts..n * (p + 1) / parts).collect()
}

/// Runs `f` on every part, the first on this thread and the others on scoped threads (or on
/// this thread too when the OS refuses a thread). Results in part order.
pub(super) fn run_parts<P: Send, T: Send>(parts: Vec<P>, f: impl Fn(P) -> T + Sync) -> Vec<T> {
    if parts.len() <= 1 {
        return parts.into_iter().map(&f).collect();
    }
    enum Job<H, P> {
        Thread(H),
        Here(P),
    }
    let take = |slot: &Mutex<Option<P>>| slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    let f = &f;
    std::thread::scope(|s| {
        let mut parts = parts.into_iter();
        let first = parts.next();
        let mut jobs = Vec::new();
        for part in parts {
            // The part stays reachable here in case the thread cannot be started.
            let slot = Arc::new(Mutex::new(Some(part)));
            let theirs = Arc::clone(&slot);
            match std::thread::Builder::new().name("gallery-scan".into()).spawn_scoped(s, move || take(&theirs).map(f)) {
                Ok(handle) => jobs.push(Job::Thread(handle)),
                Err(_) => jobs.extend(take(&slot).map(Job::Here)),
            }
        }
        let mut out: Vec<T> = first.into_iter().map(f).collect();
        for job in jobs {
            match job {
                Job::Thread(handle) => match handle.join() {
                    Ok(result) => out.extend(result),
                    Err(panic) => std::panic::resume_unwind(panic),
                },
                Job::Here(part) => out.push(f(part)),
            }
        }
        out
    })
}
