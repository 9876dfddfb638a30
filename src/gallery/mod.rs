//! The in-memory gallery: every enrolled template (name -> L2-normalised f32 vector) and the
//! cosine top-k over them (templates and queries are unit vectors, so a dot product).
//! Rebuilt from the store at start; follows each write after the store accepted it.
//!
//! - **Storage.** Rows live in fixed-size chunks of [`CHUNK_ROWS`] contiguous f32 rows (plus
//!   each row's name and 1-bit signature). Every chunk but the last is full; row `r` is in
//!   chunk `r / CHUNK_ROWS`. A published [`Snapshot`] is an immutable list of `Arc` chunks.
//! - **Copy-on-write.** Readers clone the current `Arc<Snapshot>` (the lock is held only for
//!   that clone) and search it without any lock, so a write never blocks a search. Writers
//!   are serialised by a mutex; a write copies the chunk list (one pointer per chunk) and the
//!   one or two chunks it touches (at most 4 MiB at 512-D), then swaps the new snapshot in.
//!   A snapshot taken before a write keeps seeing the old rows.
//! - **Upsert and remove.** A known name keeps its row (overwritten in place in the copied
//!   chunk). Remove moves the last row into the hole (swap-with-last): the matrix stays dense,
//!   no tombstones and no compaction; only the moved row changes position.
//! - **Exact search.** An AVX2+FMA dot product (four 8-lane accumulators; runtime detection,
//!   portable fallback elsewhere) over every row, split across cores above
//!   [`PARALLEL_MIN_ROWS`], top-k kept in a small heap. Ties are broken by row: lower first.
//!   Memory-bound: 2 GB of rows at 1M x 512, so ~100-190 ms on a 2-core machine.
//! - **Fast search** (opt-in, or `auto` from [`AUTO_FAST_MIN_ROWS`] rows): each row also has
//!   a 1-bit signature of its randomly rotated vector (signs after random sign flips and a
//!   Walsh-Hadamard transform: 64 bytes per 512-D row). A query's Hamming distance to every
//!   signature (1/32 of the memory of the rows) picks the `R` best candidates, which are then
//!   scored exactly in f32: returned scores are exact cosines, only recall can suffer (a true
//!   best row whose signature falls outside the `R` best is missed).
//!
//! Files: this one (the gallery, its snapshots and the two searches), `chunk` (row storage and
//! the name index), `simd` (dot kernels), `signature` (signatures and Hamming scans), `topk`
//! (heaps), `parallel` (splitting a scan across cores), `records` (the face records' index),
//! `tests`.

mod chunk;
mod parallel;
mod records;
mod signature;
mod simd;
#[cfg(test)]
mod tests;
mod topk;

use chunk::*;
use parallel::*;
pub use records::{FaceIndex, RecordMatch};
use signature::*;
pub use simd::dot;
use simd::*;
use topk::*;

use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::ops::Range;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

/// Rows per chunk: the most a single write copies (4 MiB of f32 at 512-D).
pub const CHUNK_ROWS: usize = 2048;

/// Galleries at least this large are scanned by every core (below it the thread start costs
/// more than it saves).
pub const PARALLEL_MIN_ROWS: usize = 50_000;

/// `auto` search switches from exact to fast at this many rows.
pub const AUTO_FAST_MIN_ROWS: usize = 200_000;

/// Default shortlist of the fast search (at least 64 per requested hit).
pub const DEFAULT_CANDIDATES: usize = 4096;

/// Names longer than this (bytes) are refused (keeps a chunk's name offsets within u32).
const MAX_NAME_BYTES: usize = 64 * 1024;

/// One search hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    pub name: String,
    pub score: f32,
}

/// How a search scans the gallery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SearchMode {
    /// Every row scored in f32.
    Exact,
    /// Signature shortlist, then exact f32 scores for the shortlist.
    Fast,
    /// Exact below [`AUTO_FAST_MIN_ROWS`] rows, fast from there.
    #[default]
    Auto,
}

impl FromStr for SearchMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SearchMode, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "exact" => Ok(SearchMode::Exact),
            "fast" => Ok(SearchMode::Fast),
            "auto" => Ok(SearchMode::Auto),
            other => Err(format!("'{other}' is not a gallery search mode (exact, fast or auto)")),
        }
    }
}

impl fmt::Display for SearchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SearchMode::Exact => "exact",
            SearchMode::Fast => "fast",
            SearchMode::Auto => "auto",
        })
    }
}

/// Search settings (`GALLERY_SEARCH`, `GALLERY_CANDIDATES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchOptions {
    pub mode: SearchMode,
    /// Shortlist size of the fast search; the shortlist is at least 64 x k.
    pub candidates: usize,
}

impl Default for SearchOptions {
    fn default() -> SearchOptions {
        SearchOptions { mode: SearchMode::Auto, candidates: DEFAULT_CANDIDATES }
    }
}

impl SearchOptions {
    pub fn exact() -> SearchOptions {
        SearchOptions { mode: SearchMode::Exact, ..SearchOptions::default() }
    }

    pub fn fast(candidates: usize) -> SearchOptions {
        SearchOptions { mode: SearchMode::Fast, candidates }
    }

    /// The shortlist for a top-`k` search.
    fn shortlist(&self, k: usize) -> usize {
        self.candidates.max(k.saturating_mul(64)).max(1)
    }

    fn is_fast(&self, rows: usize) -> bool {
        match self.mode {
            SearchMode::Exact => false,
            SearchMode::Fast => true,
            SearchMode::Auto => rows >= AUTO_FAST_MIN_ROWS,
        }
    }
}

/// Templates by name.
pub struct Gallery {
    dim: usize,
    signer: Arc<Signer>,
    options: SearchOptions,
    /// The published rows. Held only to clone or swap the pointer.
    current: RwLock<Arc<Snapshot>>,
    /// Serialises writers; maps names to rows.
    writer: Mutex<NameIndex>,
}

impl fmt::Debug for Gallery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gallery").field("dim", &self.dim).field("len", &self.len()).field("options", &self.options).finish_non_exhaustive()
    }
}

impl Gallery {
    /// An empty gallery for `dim`-dimensional templates.
    pub fn new(dim: usize) -> Gallery {
        let signer = Arc::new(Signer::new(dim));
        let snapshot = Snapshot { dim, words: signer.words, len: 0, chunks: Vec::new(), signer: Arc::clone(&signer) };
        Gallery {
            dim,
            signer,
            options: SearchOptions::default(),
            current: RwLock::new(Arc::new(snapshot)),
            writer: Mutex::new(NameIndex::default()),
        }
    }

    /// A gallery holding `entries` (name, L2-normalised template). Entries of the wrong
    /// length (or with non-finite values) are skipped; a repeated name keeps its last template.
    pub fn from_entries(dim: usize, entries: impl IntoIterator<Item = (String, Vec<f32>)>) -> Gallery {
        let g = Gallery::new(dim);
        g.extend(entries);
        g
    }

    /// The same gallery with these search settings.
    pub fn with_search(mut self, options: SearchOptions) -> Gallery {
        self.options = options;
        self
    }

    pub fn search_options(&self) -> SearchOptions {
        self.options
    }

    /// The rows as they are now; later writes do not change it.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn publish(&self, snapshot: Snapshot) {
        let new = Arc::new(snapshot);
        let old = std::mem::replace(&mut *self.current.write().unwrap_or_else(|p| p.into_inner()), new);
        // The old rows are freed (if no reader holds them) after the lock is released.
        drop(old);
    }

    fn lock_writer(&self) -> MutexGuard<'_, NameIndex> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.snapshot().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    fn accepts(&self, name: &str, template: &[f32]) -> bool {
        self.dim > 0 && template.len() == self.dim && name.len() <= MAX_NAME_BYTES && template.iter().all(|x| x.is_finite())
    }

    /// Adds or replaces `name`'s template. Returns false (and changes nothing) for a
    /// template of the wrong length or with non-finite values.
    pub fn upsert(&self, name: &str, template: &[f32]) -> bool {
        if !self.accepts(name, template) {
            return false;
        }
        let mut sig = vec![0u64; self.signer.words];
        self.signer.sign(template, &mut Vec::new(), &mut sig);
        let mut index = self.lock_writer();
        let snap = self.snapshot();
        let mut chunks = snap.chunks.clone();
        let hash = index.hash(name);
        let len = match index.find(&chunks, hash, name) {
            Some(row) => {
                Arc::make_mut(&mut chunks[row / CHUNK_ROWS]).set(row % CHUNK_ROWS, None, template, &sig);
                snap.len
            }
            None => {
                let row = snap.len;
                let Ok(row32) = u32::try_from(row) else { return false };
                push_row(&mut chunks, self.dim, self.signer.words, name, template, &sig);
                index.insert(hash, row32);
                row + 1
            }
        };
        self.publish(Snapshot { len, chunks, ..snap.empty_like() });
        true
    }

    /// Adds many templates at once with a single publish (the load at start): signatures are
    /// computed on every core. Returns how many entries were accepted.
    pub fn extend(&self, entries: impl IntoIterator<Item = (String, Vec<f32>)>) -> usize {
        let entries = entries.into_iter();
        let mut index = self.lock_writer();
        let snap = self.snapshot();
        let mut chunks = snap.chunks.clone();
        let mut len = snap.len;
        index.reserve(entries.size_hint().0);
        let zero_sig = vec![0u64; self.signer.words];
        let mut first_dirty = usize::MAX;
        let mut dirty_rows = Vec::new();
        let mut accepted = 0;
        for (name, template) in entries {
            if !self.accepts(&name, &template) {
                continue;
            }
            let hash = index.hash(&name);
            let row = match index.find(&chunks, hash, &name) {
                Some(row) => {
                    Arc::make_mut(&mut chunks[row / CHUNK_ROWS]).set(row % CHUNK_ROWS, None, &template, &zero_sig);
                    row
                }
                None => {
                    let Ok(row32) = u32::try_from(len) else { break };
                    push_row(&mut chunks, self.dim, self.signer.words, &name, &template, &zero_sig);
                    index.insert(hash, row32);
                    len += 1;
                    len - 1
                }
            };
            accepted += 1;
            if row < snap.len {
                dirty_rows.push(row);
            } else {
                first_dirty = first_dirty.min(row / CHUNK_ROWS);
            }
        }
        // Signatures: the rows overwritten in old chunks one by one, new chunks on every core.
        let mut buf = Vec::new();
        for row in dirty_rows {
            let chunk = Arc::make_mut(&mut chunks[row / CHUNK_ROWS]);
            let i = row % CHUNK_ROWS;
            let words = self.signer.words;
            let (rows, sigs) = (&chunk.rows[i * self.dim..(i + 1) * self.dim], &mut chunk.sigs[i * words..(i + 1) * words]);
            self.signer.sign(rows, &mut buf, sigs);
        }
        if first_dirty < chunks.len() {
            let tail = &mut chunks[first_dirty..];
            let signer = &*self.signer;
            let parts = split_evenly(tail.len(), if len - snap.len >= PARALLEL_MIN_ROWS / 4 { cores() } else { 1 });
            let mut rest: &mut [Arc<Chunk>] = tail;
            let mut slices = Vec::new();
            for part in &parts {
                let (head, tail) = rest.split_at_mut(part.len());
                slices.push(head);
                rest = tail;
            }
            run_parts(slices, |slice| {
                let mut buf = Vec::new();
                for chunk in slice.iter_mut() {
                    Arc::make_mut(chunk).sign_all(signer, &mut buf);
                }
            });
        }
        self.publish(Snapshot { len, chunks, ..snap.empty_like() });
        accepted
    }

    /// Removes `name`; true if it was there. The last row moves into its place.
    pub fn remove(&self, name: &str) -> bool {
        let mut index = self.lock_writer();
        let snap = self.snapshot();
        let mut chunks = snap.chunks.clone();
        let hash = index.hash(name);
        let Some(row) = index.find(&chunks, hash, name) else { return false };
        index.remove(hash, row);
        let last = snap.len - 1;
        if row != last {
            let (moved_name, moved_row, moved_sig) = {
                let c = &chunks[last / CHUNK_ROWS];
                let i = last % CHUNK_ROWS;
                (c.name(i).to_owned(), c.row(i, self.dim).to_vec(), c.sig(i, self.signer.words).to_vec())
            };
            Arc::make_mut(&mut chunks[row / CHUNK_ROWS]).set(row % CHUNK_ROWS, Some(&moved_name), &moved_row, &moved_sig);
            let moved_hash = index.hash(&moved_name);
            index.relocate(moved_hash, last, row);
        }
        let tail = last / CHUNK_ROWS;
        if last.is_multiple_of(CHUNK_ROWS) {
            chunks.truncate(tail);
        } else {
            Arc::make_mut(&mut chunks[tail]).pop();
        }
        self.publish(Snapshot { len: last, chunks, ..snap.empty_like() });
        true
    }

    /// Whether `name` has a template (asks the writer side: waits for a write in progress).
    /// Every name compared now.
    pub fn names(&self) -> std::collections::HashSet<String> {
        let snap = self.snapshot();
        (0..snap.len()).map(|row| snap.name(row).to_owned()).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        let index = self.lock_writer();
        let snap = self.snapshot();
        index.find(&snap.chunks, index.hash(name), name).is_some()
    }

    /// The `k` most similar templates to `query`, best first (the gallery's search settings).
    pub fn top_k(&self, query: &[f32], k: usize) -> Vec<Match> {
        self.snapshot().search(query, k, self.options)
    }

    /// The most similar template, if any.
    pub fn best(&self, query: &[f32]) -> Option<Match> {
        self.top_k(query, 1).pop()
    }

    /// Bytes held by the rows, signatures, names and name index (capacities, not including
    /// allocator overhead).
    pub fn heap_bytes(&self) -> usize {
        let snap = self.snapshot();
        let chunks: usize = snap.chunks.iter().map(|c| c.heap_bytes()).sum();
        chunks + self.lock_writer().heap_bytes()
    }
}

/// Appends a row to the chunk list (a new chunk when the last is full).
fn push_row(chunks: &mut Vec<Arc<Chunk>>, dim: usize, words: usize, name: &str, row: &[f32], sig: &[u64]) {
    if chunks.last().is_none_or(|c| c.len() == CHUNK_ROWS) {
        chunks.push(Arc::new(Chunk::with_capacity(CHUNK_ROWS, dim, words)));
    }
    if let Some(last) = chunks.last_mut() {
        Arc::make_mut(last).push(name, row, sig);
    }
}

/// The gallery's rows at one moment: immutable, cheap to hold, searched without locks.
pub struct Snapshot {
    dim: usize,
    words: usize,
    len: usize,
    chunks: Vec<Arc<Chunk>>,
    signer: Arc<Signer>,
}

impl Snapshot {
    /// The same shape with no rows (fields to complete with `..`).
    fn empty_like(&self) -> Snapshot {
        Snapshot { dim: self.dim, words: self.words, len: 0, chunks: Vec::new(), signer: Arc::clone(&self.signer) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    fn name(&self, row: usize) -> &str {
        self.chunks[row / CHUNK_ROWS].name(row % CHUNK_ROWS)
    }

    fn row(&self, row: usize) -> &[f32] {
        self.chunks[row / CHUNK_ROWS].row(row % CHUNK_ROWS, self.dim)
    }

    /// The `k` most similar templates to `query`, best first; empty for k = 0, an empty
    /// gallery, a query of the wrong length or with non-finite values.
    pub fn search(&self, query: &[f32], k: usize, options: SearchOptions) -> Vec<Match> {
        self.search_rows(query, k, options, Kernels::detect())
            .into_iter()
            .map(|h| Match { name: self.name(h.row).to_owned(), score: h.score })
            .collect()
    }

    fn search_rows(&self, query: &[f32], k: usize, options: SearchOptions, kernels: Kernels) -> Vec<Hit> {
        if query.len() != self.dim || k == 0 || self.len == 0 || !query.iter().all(|x| x.is_finite()) {
            return Vec::new();
        }
        let k = k.min(self.len);
        let shortlist = options.shortlist(k);
        if options.is_fast(self.len) && shortlist < self.len {
            self.fast(query, k, shortlist, kernels)
        } else {
            self.exact(query, k, kernels)
        }
    }

    fn threads(&self) -> usize {
        if self.len >= PARALLEL_MIN_ROWS { cores() } else { 1 }
    }

    /// Every row scored.
    fn exact(&self, query: &[f32], k: usize, kernels: Kernels) -> Vec<Hit> {
        let parts = split_evenly(self.chunks.len(), self.threads());
        let tops = run_parts(parts, |range| {
            let mut top = TopK::new(k);
            for c in range {
                scan_dots(kernels.dot, &self.chunks[c].rows, self.dim, query, c * CHUNK_ROWS, &mut top);
            }
            top
        });
        let mut all = TopK::new(k);
        for top in tops {
            for hit in top.heap {
                all.merge(hit);
            }
        }
        all.into_sorted()
    }

    /// Signature shortlist of `shortlist` rows, then exact scores for those.
    fn fast(&self, query: &[f32], k: usize, shortlist: usize, kernels: Kernels) -> Vec<Hit> {
        let mut qsig = vec![0u64; self.words];
        self.signer.sign(query, &mut Vec::new(), &mut qsig);
        let parts = split_evenly(self.chunks.len(), self.threads());
        let lists = run_parts(parts, |range| {
            let mut list = Shortlist::new(shortlist);
            for c in range {
                scan_hamming(kernels.popcnt, &self.chunks[c].sigs, &qsig, c * CHUNK_ROWS, &mut list);
            }
            list.finish()
        });
        let mut rows: Vec<(u32, u32)> = lists.into_iter().flatten().collect();
        if rows.len() > shortlist {
            rows.select_nth_unstable(shortlist - 1);
            rows.truncate(shortlist);
        }
        // Rescore in row order (memory order), exactly as the exact scan would.
        rows.sort_unstable_by_key(|&(_, row)| row);
        let mut top = TopK::new(k);
        for (_, row) in rows {
            let row = row as usize;
            top.offer(dot_with(kernels.dot, self.row(row), query), row);
        }
        top.into_sorted()
    }
}
