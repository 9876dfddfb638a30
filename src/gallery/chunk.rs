//! Storage of the gallery's rows: chunks of contiguous vectors with their names and
//! signatures, and the writer's name -> row index.

use super::*;

/// A run of rows: their vectors, signatures and names.
pub(super) struct Chunk {
    /// `len x dim` f32, row-major.
    pub(super) rows: Vec<f32>,
    /// `len x words` signature bits.
    pub(super) sigs: Vec<u64>,
    /// The names, concatenated; name `i` ends at `name_ends[i]`.
    pub(super) names: String,
    pub(super) name_ends: Vec<u32>,
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
    pub(super) fn with_capacity(rows: usize, dim: usize, words: usize) -> Chunk {
        Chunk {
            rows: Vec::with_capacity(rows * dim),
            sigs: Vec::with_capacity(rows * words),
            names: String::new(),
            name_ends: Vec::with_capacity(rows),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.name_ends.len()
    }

    pub(super) fn name_range(&self, i: usize) -> Range<usize> {
        let start = if i == 0 { 0 } else { self.name_ends[i - 1] as usize };
        start..self.name_ends[i] as usize
    }

    pub(super) fn name(&self, i: usize) -> &str {
        &self.names[self.name_range(i)]
    }

    pub(super) fn row(&self, i: usize, dim: usize) -> &[f32] {
        &self.rows[i * dim..(i + 1) * dim]
    }

    pub(super) fn sig(&self, i: usize, words: usize) -> &[u64] {
        &self.sigs[i * words..(i + 1) * words]
    }

    pub(super) fn push(&mut self, name: &str, row: &[f32], sig: &[u64]) {
        self.rows.extend_from_slice(row);
        self.sigs.extend_from_slice(sig);
        self.names.push_str(name);
        // Within u32: names are at most MAX_NAME_BYTES and a chunk holds CHUNK_ROWS of them.
        self.name_ends.push(self.names.len() as u32);
    }

    /// Overwrites row `i` (and its name, when given).
    pub(super) fn set(&mut self, i: usize, name: Option<&str>, row: &[f32], sig: &[u64]) {
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
    pub(super) fn pop(&mut self) {
        let Some(last) = self.len().checked_sub(1) else { return };
        let start = self.name_range(last).start;
        self.names.truncate(start);
        self.name_ends.pop();
        let (dim, words) = (self.rows.len() / (last + 1), self.sigs.len() / (last + 1));
        self.rows.truncate(last * dim);
        self.sigs.truncate(last * words);
    }

    pub(super) fn sign_all(&mut self, signer: &Signer, buf: &mut Vec<f32>) {
        let (dim, words) = (signer.dim, signer.words);
        for (row, sig) in self.rows.chunks_exact(dim).zip(self.sigs.chunks_exact_mut(words)) {
            signer.sign(row, buf, sig);
        }
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.rows.capacity() * 4 + self.sigs.capacity() * 8 + self.names.capacity() + self.name_ends.capacity() * 4
    }
}

/// Names to rows, on the writer side only (readers map rows to names through the chunks).
/// Keyed by a keyed 64-bit hash of the name, checked against the chunk's name: 16 bytes per
/// name instead of a second copy of every name. Names whose hashes collide go to `more`.
#[derive(Default)]
pub(super) struct NameIndex {
    pub(super) hasher: RandomState,
    pub(super) first: HashMap<u64, u32, BuildHasherDefault<PreHashed>>,
    pub(super) more: HashMap<u64, Vec<u32>, BuildHasherDefault<PreHashed>>,
}

impl NameIndex {
    pub(super) fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(name)
    }

    pub(super) fn reserve(&mut self, n: usize) {
        self.first.reserve(n);
    }

    pub(super) fn find(&self, chunks: &[Arc<Chunk>], hash: u64, name: &str) -> Option<usize> {
        let is = |row: u32| chunks[row as usize / CHUNK_ROWS].name(row as usize % CHUNK_ROWS) == name;
        let first = *self.first.get(&hash)?;
        if is(first) {
            return Some(first as usize);
        }
        self.more.get(&hash)?.iter().copied().find(|&r| is(r)).map(|r| r as usize)
    }

    pub(super) fn insert(&mut self, hash: u64, row: u32) {
        if let Some(&existing) = self.first.get(&hash)
            && existing != row
        {
            self.more.entry(hash).or_default().push(row);
        } else {
            self.first.insert(hash, row);
        }
    }

    pub(super) fn remove(&mut self, hash: u64, row: usize) {
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
    pub(super) fn relocate(&mut self, hash: u64, from: usize, to: usize) {
        let to32 = to as u32; // `to` < `from`, which fitted.
        if let Some(r) = self.first.get_mut(&hash)
            && *r as usize == from
        {
            *r = to32;
        } else if let Some(r) = self.more.get_mut(&hash).and_then(|l| l.iter_mut().find(|r| **r as usize == from)) {
            *r = to32;
        }
    }

    pub(super) fn heap_bytes(&self) -> usize {
        // hashbrown: one (u64, u32) slot (16 bytes) and one control byte per bucket.
        self.first.capacity() * 17 + self.more.capacity() * 33
    }
}

/// A hasher for keys that are already keyed hashes.
#[derive(Default)]
pub(super) struct PreHashed(pub(super) u64);

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
