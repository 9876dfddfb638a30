//! The in-memory gallery: every enrolled template in one contiguous N x D f32 matrix, with
//! names beside it, searched by cosine similarity (templates and queries are
//! L2-normalised, so a dot product). Rebuilt from the store at start; follows each write
//! after the store accepted it. Readers share a read lock; a write touches one row.

use std::collections::HashMap;
use std::sync::RwLock;

/// One search hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    pub name: String,
    pub score: f32,
}

#[derive(Debug, Default)]
struct Rows {
    dim: usize,
    names: Vec<String>,
    index: HashMap<String, usize>,
    matrix: Vec<f32>,
}

/// Templates by name.
#[derive(Debug)]
pub struct Gallery {
    rows: RwLock<Rows>,
}

impl Gallery {
    /// An empty gallery for `dim`-dimensional templates.
    pub fn new(dim: usize) -> Gallery {
        Gallery { rows: RwLock::new(Rows { dim, ..Rows::default() }) }
    }

    /// A gallery holding `entries` (name, L2-normalised template). Entries of the wrong
    /// length are skipped; a repeated name keeps its last template.
    pub fn from_entries(dim: usize, entries: impl IntoIterator<Item = (String, Vec<f32>)>) -> Gallery {
        let g = Gallery::new(dim);
        {
            let mut rows = g.write();
            for (name, t) in entries {
                rows.upsert(name, &t);
            }
        }
        g
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Rows> {
        self.rows.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Rows> {
        self.rows.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.read().names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dim(&self) -> usize {
        self.read().dim
    }

    /// Adds or replaces `name`'s template. Returns false (and changes nothing) for a
    /// template of the wrong length.
    pub fn upsert(&self, name: &str, template: &[f32]) -> bool {
        self.write().upsert(name.to_string(), template)
    }

    /// Removes `name`; true if it was there.
    pub fn remove(&self, name: &str) -> bool {
        self.write().remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.read().index.contains_key(name)
    }

    /// The `k` most similar templates to `query`, best first.
    pub fn top_k(&self, query: &[f32], k: usize) -> Vec<Match> {
        let rows = self.read();
        if query.len() != rows.dim || k == 0 || rows.names.is_empty() {
            return Vec::new();
        }
        let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
        for (i, row) in rows.matrix.chunks_exact(rows.dim).enumerate() {
            let s = dot(row, query);
            if best.len() < k || s > best[best.len() - 1].0 {
                let pos = best.partition_point(|&(b, _)| b >= s);
                best.insert(pos, (s, i));
                best.truncate(k);
            }
        }
        best.into_iter().map(|(score, i)| Match { name: rows.names[i].clone(), score }).collect()
    }

    /// The most similar template, if any.
    pub fn best(&self, query: &[f32]) -> Option<Match> {
        self.top_k(query, 1).pop()
    }
}

impl Rows {
    fn upsert(&mut self, name: String, t: &[f32]) -> bool {
        if t.len() != self.dim || self.dim == 0 {
            return false;
        }
        match self.index.get(&name) {
            Some(&i) => self.matrix[i * self.dim..(i + 1) * self.dim].copy_from_slice(t),
            None => {
                self.index.insert(name.clone(), self.names.len());
                self.names.push(name);
                self.matrix.extend_from_slice(t);
            }
        }
        true
    }

    fn remove(&mut self, name: &str) -> bool {
        let Some(i) = self.index.remove(name) else { return false };
        let last = self.names.len() - 1;
        if i != last {
            let (d, moved) = (self.dim, self.names[last].clone());
            self.matrix.copy_within(last * d..(last + 1) * d, i * d);
            self.names.swap(i, last);
            self.index.insert(moved, i);
        }
        self.names.pop();
        self.matrix.truncate(last * self.dim);
        true
    }
}

/// Dot product with eight independent accumulators (vectorises well).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(dim: usize, hot: usize) -> Vec<f32> {
        let mut v = vec![0.0; dim];
        v[hot] = 1.0;
        v
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
        assert!(Gallery::new(4).best(&unit(4, 0)).is_none());
    }

    #[test]
    fn upsert_replaces_and_remove_keeps_the_rest_intact() {
        let g = Gallery::new(3);
        assert!(g.upsert("a", &unit(3, 0)));
        assert!(g.upsert("b", &unit(3, 1)));
        assert!(g.upsert("c", &unit(3, 2)));
        assert!(!g.upsert("d", &[1.0]), "wrong length refused");
        assert!(g.upsert("a", &unit(3, 2)));
        assert_eq!(g.len(), 3);
        assert!(g.remove("a"));
        assert!(!g.remove("a"));
        assert_eq!(g.len(), 2);
        assert_eq!(g.best(&unit(3, 2)).map(|m| m.name), Some("c".into()));
        assert_eq!(g.best(&unit(3, 1)).map(|m| (m.name, m.score)), Some(("b".into(), 1.0)));
    }

    #[test]
    fn dot_matches_the_naive_sum() {
        let a: Vec<f32> = (0..515).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..515).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
        assert!((f64::from(dot(&a, &b)) - naive).abs() < 1e-3);
    }
}
