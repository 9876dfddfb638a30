//! The `bench` command: benchmarks that print figures (never timed tests).
//!
//! `bench search`: `/api/face/search` over real HTTP against a gallery of N stored face
//! records (synthetic unit vectors), with a real single-face photo as the query; prints
//! p50/p90/p99 latency and the share of it spent outside inference.
//!
//! `bench gallery`: the in-memory gallery alone at 10k, 100k and 1M synthetic users (build
//! time, resident memory, exact and fast top-k latency, fast recall on planted matches, write
//! latency), then loading 1M users from the embedded SQLite store as `serve` does at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use facerec::api;
use facerec::config::ServeConfig;
use facerec::store::faces::{FaceRecord, FaceRecordStore, StoredImage};
use facerec::store::sqlite::SqliteStore;

/// Options of `bench search`.
#[derive(Debug, Clone)]
pub struct SearchBench {
    /// Stored face records in the gallery.
    pub faces: usize,
    /// The query photo (one face).
    pub image: PathBuf,
    /// Timed requests (after 3 warm-up requests).
    pub runs: usize,
    /// Folder for the database (a fresh one under the system temp dir when unset).
    pub work_dir: Option<PathBuf>,
}

/// A deterministic pseudo-random unit vector (xorshift; no dependency needed).
fn synthetic_vector(seed: u64, dim: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    v.iter_mut().for_each(|a| *a /= n);
    v
}

/// Runs `bench search` with the service configured by `cfg` (its DATABASE_PATH, LOG_FILE
/// and PHOTO_DIR are replaced by ones under the work folder).
pub async fn search(mut cfg: ServeConfig, opts: SearchBench) -> anyhow::Result<()> {
    let dir = opts.work_dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("facerec-bench-search-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    cfg.database_path = dir.join(format!("faces-{}.db", opts.faces));
    cfg.log_file = dir.join("logs.txt");
    cfg.photo_dir = dir.join("photo");
    let query = std::fs::read(&opts.image).with_context(|| format!("reading {}", opts.image.display()))?;

    // Fill the store once (kept between runs in the work folder).
    let store = SqliteStore::open(&cfg.database_path)?;
    let (_, have) = store.list_faces(1, 0).await?;
    if have < opts.faces {
        let started = Instant::now();
        let model_id = probe_model_id(&cfg).await?;
        let image = StoredImage { bytes: vec![0u8; 16], content_type: "application/octet-stream".into() };
        for i in have..opts.faces {
            let id = format!("synthetic-{i:08}");
            let record = FaceRecord {
                image_url: format!("/api/face/{id}/image"),
                id,
                display_name: format!("Synthetic {i}"),
                inserted_at: SystemTime::now(),
                face_vec: synthetic_vector(i as u64 + 1, facerec::store::EMBEDDING_DIM),
                model_id: model_id.clone(),
            };
            store.insert_face(&record, Some(&image)).await?;
        }
        println!("stored {} synthetic face records in {:.1} s", opts.faces - have, started.elapsed().as_secs_f64());
    }
    drop(store);

    let started = Instant::now();
    let service = facerec::serve::build(&cfg).await?;
    println!("service ready with {} face records in {:.1} s", service.state.service.face_index().len(), started.elapsed().as_secs_f64());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = api::app(Arc::clone(&service.state), service.max_body_bytes);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let runs = opts.runs.max(1);
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(30)).no_proxy().build()?;
    let mut samples = Vec::new();
    for i in 0..runs + 3 {
        let s = search_once(&client, addr, &query).await?;
        if i >= 3 {
            samples.push(s);
        }
    }
    server.abort();

    let mut total: Vec<f64> = samples.iter().map(|s| s.0.as_secs_f64() * 1000.0).collect();
    let mut inference: Vec<f64> = samples.iter().map(|s| s.1).collect();
    let mut outside: Vec<f64> = samples.iter().map(|s| s.0.as_secs_f64() * 1000.0 - s.1 - s.2).collect();
    let mut search_ms: Vec<f64> = samples.iter().map(|s| s.3).collect();
    let p = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q).round() as usize]
    };
    let (p50, p90, p99) = (p(&mut total, 0.5), p(&mut total, 0.9), p(&mut total, 0.99));
    let (inf50, out50, srch50) = (p(&mut inference, 0.5), p(&mut outside, 0.5), p(&mut search_ms, 0.5));
    println!(
        "search over HTTP, {} face records, {} runs: p50 {p50:.1} ms, p90 {p90:.1} ms, p99 {p99:.1} ms; inference p50 {inf50:.1} ms; \
outside inference and queue p50 {out50:.1} ms ({:.1}% of p50), of which gallery search p50 {srch50:.2} ms",
        opts.faces,
        runs,
        100.0 * out50 / p50
    );
    println!(
        "{}",
        serde_json::json!({"bench": "search", "faces": opts.faces, "runs": runs, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
            "inference_p50_ms": inf50, "outside_inference_p50_ms": out50, "outside_share": out50 / p50, "gallery_search_p50_ms": srch50})
    );
    Ok(())
}

/// The recognizer id of the configured pack (records must carry it to be searched).
async fn probe_model_id(cfg: &ServeConfig) -> anyhow::Result<String> {
    let models = cfg.models.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let pack_dir = facerec::fetch::ensure_pack(&models.model_cache_dir, &models.model_pack)?;
        Ok(facerec::face::pack::resolve(&pack_dir)?.recognizer_id)
    })
    .await?
}

/// One multipart search (the client keeps no idle connection: a fresh one each time):
/// (wall time, inference ms, queue ms, search ms).
async fn search_once(client: &reqwest::Client, addr: SocketAddr, image: &[u8]) -> anyhow::Result<(Duration, f64, f64, f64)> {
    let boundary = "benchBoundary";
    let mut body =
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n")
            .into_bytes();
    body.extend_from_slice(image);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let started = Instant::now();
    let response = client
        .post(format!("http://{addr}/api/face/search"))
        .header(reqwest::header::CONTENT_TYPE, format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await?;
    let (status, headers) = (response.status(), response.headers().clone());
    let answer = response.bytes().await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(status == reqwest::StatusCode::OK, "search failed: {status} {}", String::from_utf8_lossy(&answer));
    let header = |name: &str| -> f64 { headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0) };
    Ok((elapsed, header("x-inference-time"), header("x-queue-time"), header("x-search-time")))
}

/// Options of `bench gallery`.
#[derive(Debug, Clone)]
pub struct GalleryBench {
    /// Gallery sizes (users).
    pub sizes: Vec<usize>,
    /// Timed queries per size, mode and k.
    pub queries: usize,
    /// Planted queries per similarity level for recall.
    pub recall_queries: usize,
    /// Fast-search shortlist sizes to measure.
    pub candidates: Vec<usize>,
    /// Users in the SQLite load measurement (0: skip it).
    pub store_users: usize,
    /// Folder for the SQLite file (reused between runs).
    pub work_dir: Option<PathBuf>,
}

/// Cosine levels of the planted recall queries.
const PLANTED_LEVELS: [f32; 4] = [0.3, 0.4, 0.5, 0.7];

/// Resident memory of this process in bytes (VmRSS, or VmHWM: the peak), from /proc.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn rss() -> u64 {
    proc_status_bytes("VmRSS:").unwrap_or(0)
}

/// Starts a new peak (VmHWM) measurement; false where the kernel does not allow it.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn user_name(i: usize) -> String {
    format!("user-{i:07}")
}

/// A unit query at cosine `c` to the unit vector `x`: `c x + sqrt(1 - c^2) n`, with `n` a
/// random unit vector orthogonal to `x`.
fn planted_query(x: &[f32], c: f32, seed: u64) -> Vec<f32> {
    let mut n = synthetic_vector(seed, x.len());
    let along: f32 = n.iter().zip(x).map(|(a, b)| a * b).sum();
    n.iter_mut().zip(x).for_each(|(a, b)| *a -= along * b);
    let norm = n.iter().map(|a| a * a).sum::<f32>().sqrt();
    let s = (1.0 - c * c).sqrt();
    x.iter().zip(&n).map(|(a, b)| c * a + s * b / norm).collect()
}

/// Runs `bench gallery`: synthetic galleries of each size (build time, memory, exact and
/// fast top-1/top-5 latency, fast recall@1 on planted queries, write latency), then a load of
/// `store_users` users from the embedded SQLite store the way `serve` does at start.
pub fn gallery(opts: GalleryBench) -> anyhow::Result<()> {
    use facerec::gallery::{CHUNK_ROWS, Gallery, SearchOptions};
    let dim = facerec::store::EMBEDDING_DIM;
    let queries = opts.queries.max(1);
    println!(
        "gallery bench: dim {dim}, {} cores, chunks of {CHUNK_ROWS} rows, {queries} timed queries per figure, {} planted queries per level",
        facerec::config::available_cores(),
        opts.recall_queries
    );
    // `--sizes 0`: only the store load, in a fresh process (as at a real start).
    for &size in opts.sizes.iter().filter(|&&s| s > 0) {
        let before = rss();
        let started = Instant::now();
        let mut generating = Duration::ZERO;
        let g = Gallery::from_entries(
            dim,
            (0..size).map(|i| {
                let t = Instant::now();
                let v = synthetic_vector(i as u64 + 1, dim);
                generating += t.elapsed();
                (user_name(i), v)
            }),
        );
        let total = started.elapsed();
        let grown = rss() as i64 - before as i64;
        let heap = g.heap_bytes();
        println!(
            "size {size}: built in {:.2} s ({:.2} s of it generating the vectors, {:.2} s the gallery); VmRSS +{:.0} MiB ({:.2} GB); \
gallery heap {:.0} MiB (rows {:.0} MiB)",
            total.as_secs_f64(),
            generating.as_secs_f64(),
            (total - generating).as_secs_f64(),
            mib(grown),
            grown as f64 / 1e9,
            mib(heap as i64),
            mib((size * dim * 4) as i64),
        );
        let snap = g.snapshot();
        let timed: Vec<Vec<f32>> = (0..queries).map(|q| synthetic_vector(10_000_000 + q as u64, dim)).collect();
        let mut modes = vec![("exact".to_string(), SearchOptions::exact())];
        modes.extend(opts.candidates.iter().map(|&r| (format!("fast R={r}"), SearchOptions::fast(r))));
        for (label, options) in &modes {
            let mut line = format!("size {size}: {label:>11}:");
            for k in [1, 5] {
                let mut ms: Vec<f64> = timed
                    .iter()
                    .map(|q| {
                        let t = Instant::now();
                        let hits = snap.search(q, k, *options);
                        let e = t.elapsed().as_secs_f64() * 1000.0;
                        std::hint::black_box(hits);
                        e
                    })
                    .collect();
                line += &format!(" top-{k} p50 {:.2} ms p99 {:.2} ms;", percentile(&mut ms, 0.5), percentile(&mut ms, 0.99));
            }
            println!("{}", line.trim_end_matches(';'));
        }
        if opts.recall_queries > 0 {
            for (label, options) in &modes {
                let mut line = format!("size {size}: {label:>11}: recall@1");
                for (li, &c) in PLANTED_LEVELS.iter().enumerate() {
                    let mut hit = 0;
                    for q in 0..opts.recall_queries {
                        let target = (q * 7919 + li * 104_729) % size.max(1);
                        let x = synthetic_vector(target as u64 + 1, dim);
                        let query = planted_query(&x, c, 20_000_000 + (li * 1_000_000 + q) as u64);
                        let best = snap.search(&query, 1, *options);
                        hit += usize::from(best.first().is_some_and(|m| m.name == user_name(target)));
                    }
                    line += &format!(" cos {c}: {:.1}%", 100.0 * hit as f64 / opts.recall_queries as f64);
                    if li + 1 < PLANTED_LEVELS.len() {
                        line.push(',');
                    }
                }
                println!("{line}");
            }
        }
        drop(snap);
        // Writes: each copies the chunk list and one or two chunks.
        if size > 0 {
            let (mut replace, mut insert, mut remove) = (Vec::new(), Vec::new(), Vec::new());
            for w in 0..50usize {
                let i = (w * 7_777) % size;
                let v = synthetic_vector(30_000_000 + w as u64, dim);
                let t = Instant::now();
                g.upsert(&user_name(i), &v);
                replace.push(t.elapsed().as_secs_f64() * 1000.0);
                let t = Instant::now();
                g.upsert(&format!("extra-{w}"), &v);
                insert.push(t.elapsed().as_secs_f64() * 1000.0);
                let t = Instant::now();
                g.remove(&format!("extra-{w}"));
                remove.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            println!(
                "size {size}: writes (50 each): replace p50 {:.2} ms p99 {:.2} ms; new name p50 {:.2} ms p99 {:.2} ms; remove p50 {:.2} ms p99 {:.2} ms",
                percentile(&mut replace, 0.5),
                percentile(&mut replace, 0.99),
                percentile(&mut insert, 0.5),
                percentile(&mut insert, 0.99),
                percentile(&mut remove, 0.5),
                percentile(&mut remove, 0.99)
            );
        }
        drop(g);
    }
    if opts.store_users > 0 {
        store_load(&opts)?;
    }
    Ok(())
}

/// Fills (once; reused) an SQLite file with `store_users` users, then times what `serve`
/// does at start: [`facerec::service::load::gallery`].
fn store_load(opts: &GalleryBench) -> anyhow::Result<()> {
    let dim = facerec::store::EMBEDDING_DIM;
    let n = opts.store_users;
    let model_id = "bench-model";
    let dir = opts.work_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("facerec-bench-gallery"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("users-{n}.db"));
    let have: i64 = {
        // Creates the file with the store's own schema and settings.
        drop(SqliteStore::open(&path)?);
        let conn = rusqlite::Connection::open(&path)?;
        conn.query_row("SELECT count(*) FROM users", [], |r| r.get(0))?
    };
    if usize::try_from(have).ok() != Some(n) {
        let started = Instant::now();
        let mut conn = rusqlite::Connection::open(&path)?;
        conn.pragma_update(None, "synchronous", "OFF")?;
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM users", [])?;
        {
            let mut stmt =
                tx.prepare("INSERT INTO users (username, embedding, samples, model_id, updated_at) VALUES (?1, ?2, 1, ?3, ?4)")?;
            let mut blob = Vec::with_capacity(dim * 4);
            for i in 0..n {
                blob.clear();
                for x in synthetic_vector(i as u64 + 1, dim) {
                    blob.extend_from_slice(&x.to_le_bytes());
                }
                stmt.execute(rusqlite::params![user_name(i), blob, model_id, 1_700_000_000_000i64])?;
            }
        }
        tx.commit()?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
        println!(
            "store: wrote {n} users into {} in {:.1} s (bulk insert, one transaction)",
            path.display(),
            started.elapsed().as_secs_f64()
        );
    }
    let file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let before = rss();
    let peak_reset = reset_peak_rss();
    let started = Instant::now();
    let store = SqliteStore::open(&path)?;
    // As serve::build does: the store streams, the gallery is built meanwhile.
    let (gallery, _) = rt.block_on(facerec::service::load::gallery(&store, model_id, dim))?;
    let users = gallery.len();
    let total = started.elapsed();
    let after = rss();
    let peak = if peak_reset { proc_status_bytes("VmHWM:") } else { None };
    println!(
        "store: loaded {users} users from SQLite ({:.2} GB file, page cache warm) into the gallery in {:.2} s (read and build \
overlapped, as at start); VmRSS +{:.0} MiB after, peak +{}",
        file_bytes as f64 / 1e9,
        total.as_secs_f64(),
        mib(after as i64 - before as i64),
        peak.map_or("n/a".to_string(), |p| format!("{:.0} MiB", mib(p as i64 - before as i64)))
    );
    let probe = synthetic_vector(n as u64 / 2 + 1, dim);
    let hit = gallery.best(&probe).map(|m| m.name).unwrap_or_default();
    let gallery_heap = gallery.heap_bytes();
    drop(gallery);
    println!(
        "store: gallery of {} users holds {:.0} MiB; best match of user {}'s vector: {hit}; VmRSS after dropping the gallery +{:.0} MiB (freed heap the allocator kept)",
        users,
        mib(gallery_heap as i64),
        n / 2,
        mib(rss() as i64 - before as i64)
    );
    println!("store: the file stays at {} for the next run (delete it to free {:.1} GB)", path.display(), file_bytes as f64 / 1e9);
    Ok(())
}
