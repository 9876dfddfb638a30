//! The gallery's tests: every search mode against a naive scan, writes, snapshots, collisions.

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
    let g =
        Gallery::from_entries(3, [("a".into(), unit(3, 0)), ("b".into(), unit(3, 1)), ("a".into(), unit(3, 2)), ("c".into(), vec![1.0])]);
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
