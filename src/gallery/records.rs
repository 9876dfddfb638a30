//! Face records of the second API in memory, for search: their vectors in a [`Gallery`] keyed by
//! record id, the display names beside them. The store holds the records; this index follows.

use std::collections::HashMap;
use std::sync::RwLock;

use super::{Gallery, SearchOptions};
use crate::store::faces::FaceRecord;

/// A record close to a query.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordMatch {
    pub id: String,
    pub display_name: String,
    /// Cosine similarity (1 - cosine distance).
    pub score: f32,
}

/// The face records' vectors and names.
#[derive(Debug)]
pub struct FaceIndex {
    vectors: Gallery,
    names: RwLock<HashMap<String, String>>,
}

impl FaceIndex {
    pub fn new(dim: usize) -> FaceIndex {
        FaceIndex { vectors: Gallery::new(dim), names: RwLock::new(HashMap::new()) }
    }

    /// The same index with these gallery search settings.
    pub fn with_search(mut self, options: SearchOptions) -> FaceIndex {
        self.vectors = self.vectors.with_search(options);
        self
    }

    /// Many records at once (the load at start): one gallery publish, not one per record.
    pub fn extend(&self, records: &[FaceRecord]) {
        self.vectors.extend(records.iter().map(|r| (r.id.clone(), r.face_vec.clone())));
        if let Ok(mut n) = self.names.write() {
            n.extend(records.iter().filter(|r| self.vectors.dim() == r.face_vec.len()).map(|r| (r.id.clone(), r.display_name.clone())));
        }
    }

    /// Adds (or replaces) a record; false when its vector has the wrong length (not indexed).
    pub fn insert(&self, r: &FaceRecord) -> bool {
        let indexed = self.vectors.upsert(&r.id, &r.face_vec);
        if indexed && let Ok(mut n) = self.names.write() {
            n.insert(r.id.clone(), r.display_name.clone());
        }
        indexed
    }

    pub fn remove(&self, id: &str) {
        self.vectors.remove(id);
        if let Ok(mut n) = self.names.write() {
            n.remove(id);
        }
    }

    /// Every indexed record id (what a follower starts from).
    pub fn ids(&self) -> std::collections::HashSet<String> {
        self.names.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Records within cosine distance `threshold` of `query`, closest first, at most `k`.
    pub fn search(&self, query: &[f32], k: usize, threshold: f32) -> Vec<RecordMatch> {
        let hits = self.vectors.top_k(query, k);
        let names = self.names.read().unwrap_or_else(|p| p.into_inner());
        hits.into_iter()
            .filter(|m| 1.0 - m.score < threshold)
            .map(|m| RecordMatch { display_name: names.get(&m.name).cloned().unwrap_or_default(), id: m.name, score: m.score })
            .collect()
    }
}
