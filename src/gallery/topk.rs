//! Keeping the best: a scored row, the top-k heap and the Hamming shortlist.

use super::*;

/// A scored row.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hit {
    pub(super) score: f32,
    pub(super) row: usize,
}

/// Orders hits worst first (lower score, then higher row), so a max-heap's top is the worst.
impl Ord for Hit {
    fn cmp(&self, other: &Hit) -> std::cmp::Ordering {
        other.score.total_cmp(&self.score).then(self.row.cmp(&other.row))
    }
}

impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Hit) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Hit {
    fn eq(&self, other: &Hit) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Hit {}

/// The best `k` hits seen.
pub(super) struct TopK {
    pub(super) k: usize,
    pub(super) heap: BinaryHeap<Hit>,
    /// The worst kept score once `k` are kept (else -inf): most rows stop at this compare.
    pub(super) floor: f32,
}

impl TopK {
    pub(super) fn new(k: usize) -> TopK {
        TopK { k, heap: BinaryHeap::with_capacity(k.min(4096) + 1), floor: f32::NEG_INFINITY }
    }

    /// A row seen in increasing row order: an equal score never displaces an earlier row.
    #[inline]
    pub(super) fn offer(&mut self, score: f32, row: usize) {
        if self.heap.len() == self.k && score <= self.floor {
            return;
        }
        self.merge(Hit { score, row });
    }

    pub(super) fn merge(&mut self, hit: Hit) {
        if self.heap.len() < self.k {
            self.heap.push(hit);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if hit < *worst {
                *worst = hit;
            } else {
                return;
            }
        }
        if self.heap.len() == self.k {
            self.floor = self.heap.peek().map_or(f32::NEG_INFINITY, |h| h.score);
        }
    }

    /// Best first.
    pub(super) fn into_sorted(self) -> Vec<Hit> {
        self.heap.into_sorted_vec()
    }
}

/// The `r` rows with the smallest (distance, row) seen, with a bound that rejects most rows
/// at one compare.
pub(super) struct Shortlist {
    pub(super) r: usize,
    /// Rows must have a distance below this to enter (rows arrive in increasing order, so a
    /// tie with the kept r-th is worse).
    pub(super) bound: u32,
    pub(super) items: Vec<(u32, u32)>,
}

impl Shortlist {
    pub(super) fn new(r: usize) -> Shortlist {
        Shortlist { r, bound: u32::MAX, items: Vec::with_capacity(2 * r) }
    }

    #[inline]
    pub(super) fn offer(&mut self, distance: u32, row: usize) {
        if distance < self.bound {
            self.items.push((distance, row as u32));
            if self.items.len() >= 2 * self.r {
                self.shrink();
            }
        }
    }

    pub(super) fn shrink(&mut self) {
        if self.items.len() > self.r {
            let (_, nth, _) = self.items.select_nth_unstable(self.r - 1);
            self.bound = nth.0;
            self.items.truncate(self.r);
        }
    }

    pub(super) fn finish(mut self) -> Vec<(u32, u32)> {
        self.shrink();
        self.items
    }
}
