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

mod records;
pub use records::{FaceIndex, RecordMatch};

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

/// A run of rows: their vectors, signatures and names.
struct Chunk {
    /// `len x dim` f32, row-major.
    rows: Vec<f32>,
    /// `len x words` signature bits.
    sigs: Vec<u64>,
    /// The names, concatenated; name `i` ends at `name_ends[i]`.
    names: String,
    name_ends: Vec<u32>,
}

impl Clone for Chunk {
    /// A copy for writing: a partly filled chunk gets room for a full one, so appending to
    /// it never reallocates.
    fn clone(&self) -> Chunk {
        let (len, cap) = (self.len().max(1), if self.len() < CHUNK_ROWS { CHUNK_ROWS } else { self.len() });
        let mut c = Chunk {
            rows: Vec::with_capacity(self.rows.len() / len * cap),
            sigs: Vec::with_capacity(self.sigs.len() / len * cap),
            names: String::with_capacity(self.names.len() / len * cap),
            name_ends: Vec::with_capacity(cap),
        };
        c.rows.extend_from_slice(&self.rows);
        c.sigs.extend_from_slice(&self.sigs);
        c.names.push_str(&self.names);
        c.name_ends.extend_from_slice(&self.name_ends);
        c
    }
}

impl Chunk {
    fn with_capacity(rows: usize, dim: usize, words: usize) -> Chunk {
        Chunk {
            rows: Vec::with_capacity(rows * dim),
            sigs: Vec::with_capacity(rows * words),
            names: String::new(),
            name_ends: Vec::with_capacity(rows),
        }
    }

    fn len(&self) -> usize {
        self.name_ends.len()
    }

    fn name_range(&self, i: usize) -> Range<usize> {
        let start = if i == 0 { 0 } else { self.name_ends[i - 1] as usize };
        start..self.name_ends[i] as usize
    }

    fn name(&self, i: usize) -> &str {
        &self.names[self.name_range(i)]
    }

    fn row(&self, i: usize, dim: usize) -> &[f32] {
        &self.rows[i * dim..(i + 1) * dim]
    }

    fn sig(&self, i: usize, words: usize) -> &[u64] {
        &self.sigs[i * words..(i + 1) * words]
    }

    fn push(&mut self, name: &str, row: &[f32], sig: &[u64]) {
        self.rows.extend_from_slice(row);
        self.sigs.extend_from_slice(sig);
        self.names.push_str(name);
        // Within u32: names are at most MAX_NAME_BYTES and a chunk holds CHUNK_ROWS of them.
        self.name_ends.push(self.names.len() as u32);
    }

    /// Overwrites row `i` (and its name, when given).
    fn set(&mut self, i: usize, name: Option<&str>, row: &[f32], sig: &[u64]) {
        let (dim, words) = (row.len(), sig.len());
        self.rows[i * dim..(i + 1) * dim].copy_from_slice(row);
        self.sigs[i * words..(i + 1) * words].copy_from_slice(sig);
        if let Some(name) = name {
            let range = self.name_range(i);
            let old_len = range.len();
            self.names.replace_range(range, name);
            let shift = name.len() as i64 - old_len as i64;
            for end in &mut self.name_ends[i..] {
                *end = (i64::from(*end) + shift) as u32;
            }
        }
    }

    /// Drops the last row.
    fn pop(&mut self) {
        let Some(last) = self.len().checked_sub(1) else { return };
        let start = self.name_range(last).start;
        self.names.truncate(start);
        self.name_ends.pop();
        let (dim, words) = (self.rows.len() / (last + 1), self.sigs.len() / (last + 1));
        self.rows.truncate(last * dim);
        self.sigs.truncate(last * words);
    }

    fn sign_all(&mut self, signer: &Signer, buf: &mut Vec<f32>) {
        let (dim, words) = (signer.dim, signer.words);
        for (row, sig) in self.rows.chunks_exact(dim).zip(self.sigs.chunks_exact_mut(words)) {
            signer.sign(row, buf, sig);
        }
    }

    fn heap_bytes(&self) -> usize {
        self.rows.capacity() * 4 + self.sigs.capacity() * 8 + self.names.capacity() + self.name_ends.capacity() * 4
    }
}

/// 1-bit signatures of randomly rotated vectors: flip signs at random, Walsh-Hadamard
/// transform (zero-padded to a power of two), keep the signs. Two vectors at angle t
/// disagree on about t/pi of the bits whatever the data's distribution.
struct Signer {
    dim: usize,
    padded: usize,
    words: usize,
    flips: Vec<f32>,
}

impl Signer {
    fn new(dim: usize) -> Signer {
        let padded = dim.next_power_of_two();
        // A fixed seed: signatures are never stored, but searches should be reproducible.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let flips = (0..dim)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x & 1 == 0 { 1.0 } else { -1.0 }
            })
            .collect();
        Signer { dim, padded, words: padded.div_ceil(64), flips }
    }

    /// Writes `v`'s signature into `out` (`words` long); `buf` is scratch space.
    fn sign(&self, v: &[f32], buf: &mut Vec<f32>, out: &mut [u64]) {
        buf.clear();
        buf.resize(self.padded, 0.0);
        for (b, (a, s)) in buf.iter_mut().zip(v.iter().zip(&self.flips)) {
            *b = a * s;
        }
        walsh_hadamard(buf);
        for (word, block) in out.iter_mut().zip(buf.chunks(64)) {
            let mut bits = 0u64;
            for (j, &y) in block.iter().enumerate() {
                bits |= u64::from(y > 0.0) << j;
            }
            *word = bits;
        }
    }
}

/// In-place unnormalised Walsh-Hadamard transform of a power-of-two-long vector (the first
/// three levels fused per block of eight; the wider ones vectorise).
fn walsh_hadamard(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    if n >= 8 {
        for block in x.chunks_exact_mut(8) {
            let [a0, a1, a2, a3, a4, a5, a6, a7] = [block[0], block[1], block[2], block[3], block[4], block[5], block[6], block[7]];
            let (b0, b1, b2, b3, b4, b5, b6, b7) = (a0 + a1, a0 - a1, a2 + a3, a2 - a3, a4 + a5, a4 - a5, a6 + a7, a6 - a7);
            let (c0, c1, c2, c3, c4, c5, c6, c7) = (b0 + b2, b1 + b3, b0 - b2, b1 - b3, b4 + b6, b5 + b7, b4 - b6, b5 - b7);
            block.copy_from_slice(&[c0 + c4, c1 + c5, c2 + c6, c3 + c7, c0 - c4, c1 - c5, c2 - c6, c3 - c7]);
        }
        h = 8;
    }
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (p, q) = (*a, *b);
                *a = p + q;
                *b = p - q;
            }
        }
        h *= 2;
    }
}

/// Names to rows, on the writer side only (readers map rows to names through the chunks).
/// Keyed by a keyed 64-bit hash of the name, checked against the chunk's name: 16 bytes per
/// name instead of a second copy of every name. Names whose hashes collide go to `more`.
#[derive(Default)]
struct NameIndex {
    hasher: RandomState,
    first: HashMap<u64, u32, BuildHasherDefault<PreHashed>>,
    more: HashMap<u64, Vec<u32>, BuildHasherDefault<PreHashed>>,
}

impl NameIndex {
    fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(name)
    }

    fn reserve(&mut self, n: usize) {
        self.first.reserve(n);
    }

    fn find(&self, chunks: &[Arc<Chunk>], hash: u64, name: &str) -> Option<usize> {
        let is = |row: u32| chunks[row as usize / CHUNK_ROWS].name(row as usize % CHUNK_ROWS) == name;
        let first = *self.first.get(&hash)?;
        if is(first) {
            return Some(first as usize);
        }
        self.more.get(&hash)?.iter().copied().find(|&r| is(r)).map(|r| r as usize)
    }

    fn insert(&mut self, hash: u64, row: u32) {
        if let Some(&existing) = self.first.get(&hash)
            && existing != row
        {
            self.more.entry(hash).or_default().push(row);
        } else {
            self.first.insert(hash, row);
        }
    }

    fn remove(&mut self, hash: u64, row: usize) {
        if self.first.get(&hash).is_some_and(|&r| r as usize == row) {
            match self.more.get_mut(&hash).and_then(Vec::pop) {
                Some(next) => {
                    self.first.insert(hash, next);
                }
                None => {
                    self.first.remove(&hash);
                }
            }
        }
        if let Some(list) = self.more.get_mut(&hash) {
            list.retain(|&r| r as usize != row);
            if list.is_empty() {
                self.more.remove(&hash);
            }
        }
    }

    /// The name at row `from` now lives at row `to`.
    fn relocate(&mut self, hash: u64, from: usize, to: usize) {
        let to32 = to as u32; // `to` < `from`, which fitted.
        if let Some(r) = self.first.get_mut(&hash)
            && *r as usize == from
        {
            *r = to32;
        } else if let Some(r) = self.more.get_mut(&hash).and_then(|l| l.iter_mut().find(|r| **r as usize == from)) {
            *r = to32;
        }
    }

    fn heap_bytes(&self) -> usize {
        // hashbrown: one (u64, u32) slot (16 bytes) and one control byte per bucket.
        self.first.capacity() * 17 + self.more.capacity() * 33
    }
}

/// A hasher for keys that are already keyed hashes.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A scored row.
#[derive(Debug, Clone, Copy)]
struct Hit {
    score: f32,
    row: usize,
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
struct TopK {
    k: usize,
    heap: BinaryHeap<Hit>,
    /// The worst kept score once `k` are kept (else -inf): most rows stop at this compare.
    floor: f32,
}

impl TopK {
    fn new(k: usize) -> TopK {
        TopK { k, heap: BinaryHeap::with_capacity(k.min(4096) + 1), floor: f32::NEG_INFINITY }
    }

    /// A row seen in increasing row order: an equal score never displaces an earlier row.
    #[inline]
    fn offer(&mut self, score: f32, row: usize) {
        if self.heap.len() == self.k && score <= self.floor {
            return;
        }
        self.merge(Hit { score, row });
    }

    fn merge(&mut self, hit: Hit) {
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
    fn into_sorted(self) -> Vec<Hit> {
        self.heap.into_sorted_vec()
    }
}

/// The `r` rows with the smallest (distance, row) seen, with a bound that rejects most rows
/// at one compare.
struct Shortlist {
    r: usize,
    /// Rows must have a distance below this to enter (rows arrive in increasing order, so a
    /// tie with the kept r-th is worse).
    bound: u32,
    items: Vec<(u32, u32)>,
}

impl Shortlist {
    fn new(r: usize) -> Shortlist {
        Shortlist { r, bound: u32::MAX, items: Vec::with_capacity(2 * r) }
    }

    #[inline]
    fn offer(&mut self, distance: u32, row: usize) {
        if distance < self.bound {
            self.items.push((distance, row as u32));
            if self.items.len() >= 2 * self.r {
                self.shrink();
            }
        }
    }

    fn shrink(&mut self) {
        if self.items.len() > self.r {
            let (_, nth, _) = self.items.select_nth_unstable(self.r - 1);
            self.bound = nth.0;
            self.items.truncate(self.r);
        }
    }

    fn finish(mut self) -> Vec<(u32, u32)> {
        self.shrink();
        self.items
    }
}

/// The dot-product and popcount kernels this CPU runs.
#[derive(Debug, Clone, Copy)]
struct Kernels {
    dot: DotKernel,
    popcnt: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DotKernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Kernels {
    fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
            Kernels {
                dot: if avx2 { DotKernel::Avx2Fma } else { DotKernel::Portable },
                popcnt: std::arch::is_x86_feature_detected!("popcnt"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Kernels { dot: DotKernel::Portable, popcnt: false }
        }
    }

    #[cfg(test)]
    fn portable() -> Kernels {
        Kernels { dot: DotKernel::Portable, popcnt: false }
    }
}

/// The cores this process may use (read once: `available_parallelism` reads cgroup files).
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// `n` items in at most `parts` contiguous, nearly equal, non-empty ranges.
fn split_evenly(n: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts).map(|p| n * p / parts..n * (p + 1) / parts).collect()
}

/// Runs `f` on every part, the first on this thread and the others on scoped threads (or on
/// this thread too when the OS refuses a thread). Results in part order.
fn run_parts<P: Send, T: Send>(parts: Vec<P>, f: impl Fn(P) -> T + Sync) -> Vec<T> {
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

/// Scores every row of `rows` (`dim` wide, the first being row `base`) into `top`.
fn scan_dots(kernel: DotKernel, rows: &[f32], dim: usize, query: &[f32], base: usize, top: &mut TopK) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `DotKernel::Avx2Fma` is only chosen after detecting AVX2 and FMA.
        DotKernel::Avx2Fma => unsafe { scan_dots_avx2(rows, dim, query, base, top) },
        DotKernel::Portable => {
            for (i, row) in rows.chunks_exact(dim).enumerate() {
                top.offer(dot_portable(row, query), base + i);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn scan_dots_avx2(rows: &[f32], dim: usize, query: &[f32], base: usize, top: &mut TopK) {
    for (i, row) in rows.chunks_exact(dim).enumerate() {
        top.offer(dot_avx2(row, query), base + i);
    }
}

fn dot_with(kernel: DotKernel, a: &[f32], b: &[f32]) -> f32 {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `DotKernel::Avx2Fma` is only chosen after detecting AVX2 and FMA.
        DotKernel::Avx2Fma => unsafe { dot_avx2(a, b) },
        DotKernel::Portable => dot_portable(a, b),
    }
}

/// Dot product of the common prefix of `a` and `b` (SIMD where the CPU has it).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(Kernels::detect().dot, a, b)
}

/// Dot product with eight independent accumulators (vectorises well on any target).
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// AVX2+FMA dot product: four 8-lane accumulators (32 floats per step), then 8 at a time,
/// then a scalar tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut s0, mut s1, mut s2, mut s3) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n <= a.len(), b.len(): all four 8-float loads are in bounds;
        // loadu has no alignment requirement.
        unsafe {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), s1);
            s2 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 16)), _mm256_loadu_ps(pb.add(i + 16)), s2);
            s3 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 24)), _mm256_loadu_ps(pb.add(i + 24)), s3);
        }
        i += 32;
    }
    while i + 8 <= n {
        // SAFETY: i + 8 <= n: the 8-float loads are in bounds.
        unsafe {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        }
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_movehdup_ps(q));
    let mut sum = _mm_cvtss_f32(q);
    for j in i..n {
        sum += a[j] * b[j];
    }
    sum
}

/// Hamming distance of every signature in `sigs` (`query.len()` words each, the first being
/// row `base`) to `query`, into `list`.
fn scan_hamming(popcnt: bool, sigs: &[u64], query: &[u64], base: usize, list: &mut Shortlist) {
    #[cfg(target_arch = "x86_64")]
    if popcnt {
        // SAFETY: `popcnt` is only true after detecting the POPCNT instruction.
        unsafe {
            match <&[u64; 8]>::try_from(query) {
                Ok(q) => scan_hamming_popcnt_fixed(sigs, q, base, list),
                Err(_) => scan_hamming_popcnt(sigs, query, base, list),
            }
        }
        return;
    }
    let _ = popcnt;
    match <&[u64; 8]>::try_from(query) {
        Ok(q) => hamming_fixed(sigs, q, base, list),
        Err(_) => hamming_any(sigs, query, base, list),
    }
}

/// 512-bit signatures (512-D templates): the loop fully unrolled.
#[inline(always)]
fn hamming_fixed<const W: usize>(sigs: &[u64], query: &[u64; W], base: usize, list: &mut Shortlist) {
    for (i, s) in sigs.chunks_exact(W).enumerate() {
        let mut d = 0;
        for w in 0..W {
            d += (s[w] ^ query[w]).count_ones();
        }
        list.offer(d, base + i);
    }
}

#[inline(always)]
fn hamming_any(sigs: &[u64], query: &[u64], base: usize, list: &mut Shortlist) {
    for (i, s) in sigs.chunks_exact(query.len()).enumerate() {
        let d = s.iter().zip(query).map(|(a, b)| (a ^ b).count_ones()).sum();
        list.offer(d, base + i);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
fn scan_hamming_popcnt_fixed(sigs: &[u64], query: &[u64; 8], base: usize, list: &mut Shortlist) {
    hamming_fixed(sigs, query, base, list);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
fn scan_hamming_popcnt(sigs: &[u64], query: &[u64], base: usize, list: &mut Shortlist) {
    hamming_any(sigs, query, base, list);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(dim: usize, hot: usize) -> Vec<f32> {
        let mut v = vec![0.0; dim];
        v[hot] = 1.0;
        v
    }

    /// Deterministic pseudo-random unit vectors.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        }

        fn unit(&mut self, dim: usize) -> Vec<f32> {
            let v: Vec<f32> = (0..dim).map(|_| self.next()).collect();
            let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            v.into_iter().map(|a| a / n).collect()
        }
    }

    fn name(i: usize) -> String {
        format!("user-{i}")
    }

    fn random_gallery(n: usize, dim: usize, seed: u64) -> (Gallery, Vec<Vec<f32>>) {
        let mut rng = Rng(seed);
        let rows: Vec<Vec<f32>> = (0..n).map(|_| rng.unit(dim)).collect();
        (Gallery::from_entries(dim, rows.iter().enumerate().map(|(i, v)| (name(i), v.clone()))), rows)
    }

    /// The reference: every row scored in f64, sorted by (score desc, row asc).
    fn naive(rows: &[Vec<f32>], q: &[f32], k: usize) -> Vec<(usize, f64)> {
        if k == 0 || rows.first().is_none_or(|r| r.len() != q.len()) {
            return Vec::new();
        }
        let mut all: Vec<(usize, f64)> =
            rows.iter().enumerate().map(|(i, r)| (i, r.iter().zip(q).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum())).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    fn assert_same(got: &[Hit], want: &[(usize, f64)], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((f64::from(g.score) - w.1).abs() < 1e-5, "{what}: score {i}: {} vs {}", g.score, w.1);
            // The same row unless two rows score within the tolerance of each other.
            let near_tie = want.iter().any(|o| o.0 != w.0 && (o.1 - w.1).abs() < 1e-5);
            assert!(g.row == w.0 || near_tie, "{what}: row {i}: {} vs {}", g.row, w.0);
        }
    }

    fn all_kernels() -> Vec<Kernels> {
        let mut k = vec![Kernels::portable(), Kernels::detect()];
        k.dedup_by(|a, b| a.dot == b.dot && a.popcnt == b.popcnt);
        k
    }

    #[test]
    fn top_k_orders_by_similarity() {
        let g = Gallery::from_entries(
            4,
            [("a".to_string(), unit(4, 0)), ("b".to_string(), unit(4, 1)), ("c".to_string(), vec![0.6, 0.8, 0.0, 0.0])],
        );
        let hits = g.top_k(&[1.0, 0.0, 0.0, 0.0], 2);
        assert_eq!(hits.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["a", "c"]);
        assert!((hits[1].score - 0.6).abs() < 1e-6);
        assert_eq!(g.best(&[0.0, 1.0, 0.0, 0.0]).map(|m| m.name), Some("b".into()));
        assert!(g.top_k(&[1.0, 0.0], 1).is_empty(), "wrong dimension");
        assert!(g.top_k(&[f32::NAN, 0.0, 0.0, 0.0], 1).is_empty(), "non-finite query");
        assert!(Gallery::new(4).best(&unit(4, 0)).is_none());
    }

    #[test]
    fn upsert_replaces_and_remove_keeps_the_rest_intact() {
        let g = Gallery::new(3);
        assert!(g.upsert("a", &unit(3, 0)));
        assert!(g.upsert("b", &unit(3, 1)));
        assert!(g.upsert("c", &unit(3, 2)));
        assert!(!g.upsert("d", &[1.0]), "wrong length refused");
        assert!(!g.upsert("d", &[f32::NAN, 0.0, 0.0]), "non-finite refused");
        assert!(g.upsert("a", &unit(3, 2)));
        assert_eq!(g.len(), 3);
        assert!(g.remove("a"));
        assert!(!g.remove("a"));
        assert!(!g.contains("a") && g.contains("b") && g.contains("c"));
        assert_eq!(g.len(), 2);
        assert_eq!(g.best(&unit(3, 2)).map(|m| m.name), Some("c".into()));
        assert_eq!(g.best(&unit(3, 1)).map(|m| (m.name, m.score)), Some(("b".into(), 1.0)));
        assert!(!Gallery::new(0).upsert("x", &[]), "a zero-dimensional gallery holds nothing");
    }

    #[test]
    fn from_entries_keeps_the_last_template_of_a_repeated_name() {
        let g = Gallery::from_entries(
            3,
            [("a".into(), unit(3, 0)), ("b".into(), unit(3, 1)), ("a".into(), unit(3, 2)), ("c".into(), vec![1.0])],
        );
        assert_eq!(g.len(), 2);
        assert_eq!(g.best(&unit(3, 2)).map(|m| m.name), Some("a".into()));
        assert_eq!(g.top_k(&unit(3, 0), 5).iter().map(|m| m.score).fold(f32::MIN, f32::max), 0.0);
        // The signatures of the overwritten row follow: the fast search finds it too.
        let fast = g.snapshot().search(&unit(3, 2), 1, SearchOptions::fast(1));
        assert_eq!(fast.first().map(|m| m.name.as_str()), Some("a"));
    }

    #[test]
    fn dot_matches_the_naive_sum() {
        for n in [0, 1, 7, 8, 31, 32, 33, 512, 515] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            for k in all_kernels() {
                assert!((f64::from(dot_with(k.dot, &a, &b)) - naive).abs() < 1e-4, "n {n} {k:?}");
            }
            assert!((f64::from(dot(&a, &b)) - naive).abs() < 1e-4);
        }
    }

    #[test]
    fn exact_search_equals_the_naive_scan() {
        for (n, dim) in [(0, 512), (1, 512), (5, 3), (37, 37), (CHUNK_ROWS - 1, 64), (CHUNK_ROWS, 512), (CHUNK_ROWS * 2 + 5, 512)] {
            let (g, rows) = random_gallery(n, dim, 7 + n as u64);
            let snap = g.snapshot();
            let mut rng = Rng(99);
            for _ in 0..3 {
                let q = rng.unit(dim);
                for k in [0, 1, 5, n, n + 3] {
                    let want = naive(&rows, &q, k);
                    for kernels in all_kernels() {
                        let got = snap.search_rows(&q, k, SearchOptions::exact(), kernels);
                        assert_same(&got, &want, &format!("n {n} dim {dim} k {k} {kernels:?}"));
                    }
                    // Public API: same names.
                    let pub_hits = g.top_k(&q, k);
                    assert_eq!(pub_hits.len(), want.len());
                }
            }
            assert!(snap.search_rows(&rng.unit(dim + 1), 3, SearchOptions::exact(), Kernels::detect()).is_empty(), "dim mismatch");
        }
    }

    #[test]
    fn parallel_exact_search_equals_the_naive_scan() {
        let n = PARALLEL_MIN_ROWS + 3 * CHUNK_ROWS + 11;
        let (g, rows) = random_gallery(n, 32, 5);
        let snap = g.snapshot();
        let mut rng = Rng(1234);
        for _ in 0..3 {
            let q = rng.unit(32);
            for k in [1, 10] {
                let want = naive(&rows, &q, k);
                for kernels in all_kernels() {
                    assert_same(&snap.search_rows(&q, k, SearchOptions::exact(), kernels), &want, "parallel");
                }
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_row_in_every_mode() {
        // The same vector under many names, spread over several chunks and threads' parts.
        let n = PARALLEL_MIN_ROWS + 100;
        let v = Rng(3).unit(16);
        let g = Gallery::from_entries(16, (0..n).map(|i| (name(i), v.clone())));
        for options in [SearchOptions::exact(), SearchOptions::fast(100)] {
            let hits = g.snapshot().search(&v, 3, options);
            assert_eq!(hits.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["user-0", "user-1", "user-2"], "{options:?}");
        }
    }

    #[test]
    fn fast_search_returns_exact_scores_and_finds_close_rows() {
        let (dim, n) = (512, 20_000);
        let (g, rows) = random_gallery(n, dim, 11);
        let snap = g.snapshot();
        let mut rng = Rng(77);
        for kernels in all_kernels() {
            // A shortlist as large as the gallery is the exact search.
            let q = rng.unit(dim);
            assert_same(&snap.search_rows(&q, 5, SearchOptions::fast(n), kernels), &naive(&rows, &q, 5), "full shortlist");
            let mut found = 0;
            for t in 0..50 {
                // A query at cosine ~0.7 to row `target`.
                let target = (t * 397) % n;
                let noise = rng.unit(dim);
                let q: Vec<f32> = rows[target].iter().zip(&noise).map(|(a, b)| 0.7 * a + 0.71 * b).collect();
                let norm = q.iter().map(|a| a * a).sum::<f32>().sqrt();
                let q: Vec<f32> = q.iter().map(|a| a / norm).collect();
                let hits = snap.search_rows(&q, 3, SearchOptions::fast(256), kernels);
                assert_eq!(hits.len(), 3);
                for h in &hits {
                    let exact: f64 = rows[h.row].iter().zip(&q).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                    assert!((f64::from(h.score) - exact).abs() < 1e-5, "scores are exact");
                }
                assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
                found += usize::from(hits[0].row == target);
            }
            assert!(found >= 49, "recall@1 at cosine 0.7 with a 256-row shortlist: {found}/50 ({kernels:?})");
        }
        // k = 0, wrong length, empty gallery.
        assert!(snap.search(&rng.unit(dim), 0, SearchOptions::fast(10)).is_empty());
        assert!(snap.search(&rng.unit(dim - 1), 3, SearchOptions::fast(10)).is_empty());
        assert!(Gallery::new(dim).snapshot().search(&rng.unit(dim), 3, SearchOptions::fast(10)).is_empty());
    }

    #[test]
    fn hamming_kernels_agree() {
        let signer = Signer::new(512);
        let mut rng = Rng(5);
        let mut sigs = vec![0u64; 100 * signer.words];
        for s in sigs.chunks_exact_mut(signer.words) {
            signer.sign(&rng.unit(512), &mut Vec::new(), s);
        }
        let mut q = vec![0u64; signer.words];
        signer.sign(&rng.unit(512), &mut Vec::new(), &mut q);
        let lists: Vec<Vec<(u32, u32)>> = all_kernels()
            .iter()
            .map(|k| {
                let mut l = Shortlist::new(1000);
                scan_hamming(k.popcnt, &sigs, &q, 0, &mut l);
                let mut items = l.finish();
                items.sort_unstable();
                items
            })
            .collect();
        assert!(lists.windows(2).all(|w| w[0] == w[1]));
        // The same vector has distance 0; the opposite one all 512 bits.
        let v = rng.unit(512);
        let neg: Vec<f32> = v.iter().map(|a| -a).collect();
        let (mut a, mut b) = (vec![0u64; 8], vec![0u64; 8]);
        signer.sign(&v, &mut Vec::new(), &mut a);
        signer.sign(&neg, &mut Vec::new(), &mut b);
        assert_eq!(a.iter().zip(&b).map(|(x, y)| (x ^ y).count_ones()).sum::<u32>(), 512);
    }

    #[test]
    fn walsh_hadamard_matches_its_definition() {
        // H[i][j] = (-1)^popcount(i & j).
        for n in [1, 2, 4, 8, 16, 64] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin()).collect();
            let mut y = x.clone();
            walsh_hadamard(&mut y);
            for (i, yi) in y.iter().enumerate() {
                let want: f32 = x.iter().enumerate().map(|(j, xj)| if (i & j).count_ones() % 2 == 0 { *xj } else { -*xj }).sum();
                assert!((yi - want).abs() < 1e-4, "n {n} i {i}");
            }
        }
    }

    #[test]
    fn auto_mode_switches_at_the_threshold() {
        let o = SearchOptions::default();
        assert!(!o.is_fast(AUTO_FAST_MIN_ROWS - 1) && o.is_fast(AUTO_FAST_MIN_ROWS));
        assert!(!SearchOptions::exact().is_fast(usize::MAX) && SearchOptions::fast(1).is_fast(1));
        assert_eq!(SearchOptions::fast(10).shortlist(3), 192, "at least 64 per hit");
        assert_eq!("FAST".parse::<SearchMode>(), Ok(SearchMode::Fast));
        assert!("quick".parse::<SearchMode>().is_err());
    }

    #[test]
    fn a_snapshot_keeps_seeing_the_rows_it_was_taken_with() {
        let (g, rows) = random_gallery(CHUNK_ROWS + 10, 8, 21);
        let before = g.snapshot();
        let target = rows[5].clone();
        assert!(g.upsert("user-5", &rows[6]));
        assert!(g.remove("user-7"));
        assert!(g.upsert("new", &target));
        // Old snapshot: unchanged.
        assert_eq!(before.len(), CHUNK_ROWS + 10);
        let old = before.search(&target, 1, SearchOptions::exact());
        assert_eq!((old[0].name.as_str(), (old[0].score - 1.0).abs() < 1e-6), ("user-5", true));
        assert_eq!(before.search(&rows[7], 1, SearchOptions::exact())[0].name, "user-7");
        // The gallery now: user-5 moved, user-7 gone, "new" holds the old vector.
        assert_eq!(g.len(), CHUNK_ROWS + 10);
        let now = g.snapshot().search(&target, 1, SearchOptions::exact());
        assert_eq!(now[0].name, "new");
        assert!(g.snapshot().search(&rows[7], 1, SearchOptions::exact())[0].name != "user-7");
        assert!(!g.contains("user-7") && g.contains("new"));
    }

    #[test]
    fn remove_moves_the_last_row_and_everything_stays_findable() {
        let dim = 16;
        let n = 2 * CHUNK_ROWS + 3;
        let (g, rows) = random_gallery(n, dim, 8);
        let mut alive: Vec<usize> = (0..n).collect();
        let mut rng = Rng(42);
        // Remove a third of the names in a scattered order, across chunk boundaries.
        for step in 0..n / 3 {
            let pick = (rng.next().abs() * alive.len() as f32) as usize % alive.len();
            let i = alive.swap_remove(pick);
            assert!(g.remove(&name(i)), "step {step}");
        }
        assert_eq!(g.len(), alive.len());
        let snap = g.snapshot();
        assert_eq!(snap.chunks.len(), alive.len().div_ceil(CHUNK_ROWS));
        for &i in alive.iter().step_by(7) {
            let hit = snap.search(&rows[i], 1, SearchOptions::exact());
            assert_eq!(hit[0].name, name(i));
            assert!((hit[0].score - 1.0).abs() < 1e-5);
            let fast = snap.search(&rows[i], 1, SearchOptions::fast(64));
            assert_eq!(fast[0].name, name(i), "signatures moved with their rows");
        }
        for &i in &alive {
            assert!(g.remove(&name(i)));
        }
        assert!(g.is_empty() && g.snapshot().chunks.is_empty());
        assert!(g.upsert("again", &rows[0]));
        assert_eq!(g.best(&rows[0]).map(|m| m.name), Some("again".into()));
    }

    #[test]
    fn name_index_survives_hash_collisions() {
        // Every name on one hash: the overflow list carries the rest.
        let mut idx = NameIndex::default();
        let mut chunks = Vec::new();
        for i in 0..5 {
            push_row(&mut chunks, 4, 1, &name(i), &unit(4, i % 4), &[0]);
            idx.insert(7, i as u32);
        }
        for i in 0..5 {
            assert_eq!(idx.find(&chunks, 7, &name(i)), Some(i));
        }
        // Remove user-0 the way `Gallery::remove` does: the last row moves into row 0.
        idx.remove(7, 0);
        Arc::make_mut(&mut chunks[0]).set(0, Some(&name(4)), &unit(4, 0), &[0]);
        Arc::make_mut(&mut chunks[0]).pop();
        idx.relocate(7, 4, 0);
        assert_eq!(idx.find(&chunks, 7, &name(0)), None);
        assert_eq!(idx.find(&chunks, 7, &name(4)), Some(0));
        for i in 1..4 {
            assert_eq!(idx.find(&chunks, 7, &name(i)), Some(i));
        }
        assert_eq!(chunks[0].len(), 4);
        assert_eq!(chunks[0].name(0), "user-4");
        assert_eq!(chunks[0].name(3), "user-3");
    }

    #[test]
    fn concurrent_writers_all_land_and_readers_never_see_torn_rows() {
        let dim = 32;
        let g = Arc::new(Gallery::new(dim));
        let writers = 4;
        let per = 600;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        std::thread::scope(|s| {
            for r in 0..2 {
                let (g, stop) = (Arc::clone(&g), Arc::clone(&stop));
                s.spawn(move || {
                    let mut rng = Rng(1000 + r);
                    let mut seen = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let snap = g.snapshot();
                        let q = rng.unit(dim);
                        let hits = snap.search(&q, 3, SearchOptions::exact());
                        assert!(hits.len() == snap.len().min(3));
                        assert!(hits.iter().all(|h| h.score.abs() <= 1.0 + 1e-5));
                        assert!(snap.len() >= seen, "the gallery only grows here");
                        seen = snap.len();
                    }
                });
            }
            let handles: Vec<_> = (0..writers)
                .map(|w| {
                    let g = Arc::clone(&g);
                    s.spawn(move || {
                        let mut rng = Rng(50 + w as u64);
                        for i in 0..per {
                            let name = format!("w{w}-{i}");
                            assert!(g.upsert(&name, &rng.unit(dim)));
                            if i % 5 == 0 {
                                // An in-place replacement of this writer's own earlier name.
                                assert!(g.upsert(&format!("w{w}-{}", i / 2), &rng.unit(dim)));
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(g.len(), writers * per);
        for w in 0..writers {
            for i in 0..per {
                assert!(g.contains(&format!("w{w}-{i}")));
            }
        }
        // Every row is findable under its own name.
        let snap = g.snapshot();
        for row in (0..snap.len()).step_by(13) {
            let v = snap.row(row).to_vec();
            assert_eq!(snap.search(&v, 1, SearchOptions::exact())[0].name, snap.name(row));
        }
    }
}
