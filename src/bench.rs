//! The `bench` command: benchmarks that print figures (never timed tests).
//!
//! `bench search`: `/api/face/search` over real HTTP against a gallery of N stored face
//! records (synthetic unit vectors), with a real single-face photo as the query; prints
//! p50/p90/p99 latency and the share of it spent outside inference.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use crate::api;
use crate::config::ServeConfig;
use crate::store::faces::{FaceRecord, FaceRecordStore, StoredImage};
use crate::store::sqlite::SqliteStore;

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
                face_vec: synthetic_vector(i as u64 + 1, crate::store::EMBEDDING_DIM),
                model_id: model_id.clone(),
            };
            store.insert_face(&record, &image).await?;
        }
        println!("stored {} synthetic face records in {:.1} s", opts.faces - have, started.elapsed().as_secs_f64());
    }
    drop(store);

    let started = Instant::now();
    let service = crate::serve::build(&cfg).await?;
    println!("service ready with {} face records in {:.1} s", service.state.face_index.len(), started.elapsed().as_secs_f64());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = api::app(Arc::clone(&service.state), service.max_body_bytes);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let runs = opts.runs.max(1);
    let samples = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(Duration, f64, f64, f64)>> {
        let mut out = Vec::new();
        for i in 0..runs + 3 {
            let s = search_once(addr, &query)?;
            if i >= 3 {
                out.push(s);
            }
        }
        Ok(out)
    })
    .await??;
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
        let pack_dir = crate::fetch::ensure_pack(&models.model_cache_dir, &models.model_pack)?;
        Ok(crate::face::pack::resolve(&pack_dir)?.recognizer_id)
    })
    .await?
}

/// One multipart search over a fresh connection: (wall time, inference ms, queue ms, search ms).
fn search_once(addr: SocketAddr, image: &[u8]) -> anyhow::Result<(Duration, f64, f64, f64)> {
    let boundary = "benchBoundary";
    let mut body =
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n")
            .into_bytes();
    body.extend_from_slice(image);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let head = format!(
        "POST /api/face/search HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(head.as_bytes())?;
    s.write_all(&body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&resp);
    anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "search failed: {}", text.lines().next().unwrap_or(""));
    let header = |name: &str| -> f64 {
        text.lines()
            .take_while(|l| !l.is_empty())
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).and_then(|(_, v)| v.trim().parse().ok()))
            .unwrap_or(0.0)
    };
    Ok((elapsed, header("x-inference-time"), header("x-queue-time"), header("x-search-time")))
}
