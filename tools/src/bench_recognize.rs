//! `bench recognize`: the inference engine's figures in one run.
//!
//! 1. The raw models in-process, with the service's thread settings: the detector on a
//!    192x192 face crop, the recognizer on one face and in batches of 8/16/32, and the raw
//!    pipeline (decode, detect, align, embed) one face at a time and in batches.
//! 2. The service: the `facerec` binary started as a child (`serve`) on a free port with a temporary
//!    SQLite store, log and photo folder, a few enrolled users; `POST /recognize` with one
//!    real 192x192 face crop per request (the original contract's JSON body), driven at 1,
//!    4, 16 and 64 keep-alive connections ([`load`]).
//! 3. Per level: requests/s, p50, p99, answers by status (429 apart), and the ratios to the
//!    raw figures. `--soak N`: 64 connections for N seconds, the server's VmRSS every 5 s.

pub mod load;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use facerec::face::crops::face_crops;
use image::RgbImage;

use facerec::config::{ServeConfig, analyzer_options};
use facerec::face::image::{ImageLimits, decode};
use facerec::face::{FaceAnalyzer, StageTimes};
use facerec::runtime::{ActiveBackend, BackendChoice, Runtime, RuntimeOptions};
use load::{LevelReport, Target};

/// Options of `bench recognize`.
#[derive(Debug, Clone)]
pub struct RecognizeBench {
    /// Seconds measured per connection level (after a warm-up of a tenth of it, at least 1 s).
    pub seconds: u64,
    /// Connection levels.
    pub levels: Vec<usize>,
    /// When set: only the soak, 64 connections for this many seconds, VmRSS every 5 s.
    pub soak: Option<u64>,
    /// Folder with the photos the crops are cut from.
    pub fixtures: PathBuf,
}

/// Side of the face crops sent to /recognize.
pub const CROP_SIDE: u32 = 192;

/// The photos crops are cut from, and the users enrolled (one photo each).
const PHOTOS: &[&str] = &["img5.jpg", "img6.jpg", "img10.jpg", "img11.jpg", "img12.jpg", "img16.jpg", "img17.jpg", "t1.jpg"];
const ENROL: &[(&str, &str)] = &[("id01", "img5.jpg"), ("id02", "img12.jpg"), ("id05", "img16.jpg")];

/// The raw models' figures.
#[derive(Debug, Clone, Default)]
pub struct RawFigures {
    /// Detector session run on a 192x192 crop at the configured det size (ms).
    pub detector_model_ms: f64,
    /// The same with letterbox, anchor decoding and NMS (ms).
    pub detector_full_ms: f64,
    /// Recognizer session, one face (ms).
    pub recognizer_one_ms: f64,
    /// (batch, ms per face).
    pub recognizer_batched: Vec<(usize, f64)>,
    /// Decode + detect + align + embed, one face at a time (ms per face).
    pub pipeline_single_ms: f64,
    /// The same, recognizer batched by `batch` (ms per face).
    pub pipeline_batched_ms: f64,
    pub batch: usize,
}

impl RawFigures {
    pub fn single_fps(&self) -> f64 {
        1000.0 / self.pipeline_single_ms
    }
    pub fn batched_fps(&self) -> f64 {
        1000.0 / self.pipeline_batched_ms
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Times the raw models, `analyzer` on the crops (JPEG bytes).
pub fn raw_figures(analyzer: &mut FaceAnalyzer, crops: &[Vec<u8>], batch: usize, budget: Duration) -> anyhow::Result<RawFigures> {
    let limits = ImageLimits::default();
    let images: Vec<RgbImage> = crops.iter().map(|c| decode(c, &limits).map(|d| d.rgb)).collect::<Result<_, _>>()?;
    let aligned: Vec<RgbImage> = images
        .iter()
        .map(|img| analyzer.prepare(img, &mut StageTimes::default()).map(|p| p.crops.into_iter().next()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    anyhow::ensure!(!aligned.is_empty(), "no face in the crops");
    // Warm-up: first runs allocate.
    for img in images.iter().take(4) {
        analyzer.analyze(img, &mut StageTimes::default())?;
    }
    let mut f = RawFigures { batch, ..RawFigures::default() };

    let runs = 200;
    let mut t = StageTimes::default();
    let started = Instant::now();
    for i in 0..runs {
        analyzer.locate(&images[i % images.len()], &mut t)?;
    }
    f.detector_full_ms = ms(started.elapsed()) / runs as f64;
    f.detector_model_ms = ms(t.detect_model) / runs as f64;

    let mut t = StageTimes::default();
    for i in 0..100 {
        analyzer.embed_aligned(std::slice::from_ref(&aligned[i % aligned.len()]), &mut t)?;
    }
    f.recognizer_one_ms = ms(t.embed_model) / 100.0;
    for n in [8usize, 16, 32] {
        let group: Vec<RgbImage> = aligned.iter().cycle().take(n).cloned().collect();
        analyzer.embed_aligned(&group, &mut StageTimes::default())?;
        let reps = (320 / n).max(5);
        let mut t = StageTimes::default();
        for _ in 0..reps {
            analyzer.embed_aligned(&group, &mut t)?;
        }
        f.recognizer_batched.push((n, ms(t.embed_model) / (reps * n) as f64));
    }

    // The pipeline, from JPEG bytes, for about `budget` each.
    let (mut faces, started) = (0usize, Instant::now());
    while started.elapsed() < budget {
        let img = decode(&crops[faces % crops.len()], &limits)?.rgb;
        analyzer.analyze(&img, &mut StageTimes::default())?;
        faces += 1;
    }
    f.pipeline_single_ms = ms(started.elapsed()) / faces as f64;
    let (mut faces, mut next, started) = (0usize, 0usize, Instant::now());
    while started.elapsed() < budget {
        let mut prepared = Vec::with_capacity(batch);
        for _ in 0..batch {
            let img = decode(&crops[next % crops.len()], &limits)?.rgb;
            next += 1;
            prepared.push(analyzer.prepare(&img, &mut StageTimes::default())?);
        }
        let mut all: Vec<RgbImage> = Vec::new();
        for p in &mut prepared {
            all.append(&mut p.crops);
        }
        analyzer.embed_aligned(&all, &mut StageTimes::default())?;
        faces += all.len();
    }
    f.pipeline_batched_ms = ms(started.elapsed()) / faces as f64;
    Ok(f)
}

/// The service under test: a child process, killed on drop.
struct Service {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Service {
    /// Starts `facerec serve` with `cfg`'s engine and model settings on a free port, its
    /// store, log and photos in a fresh temporary folder; waits until /health answers.
    fn start(cfg: &ServeConfig) -> anyhow::Result<Service> {
        let dir = std::env::temp_dir().join(format!("facerec-bench-recognize-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let exe = facerec_binary()?;
        let m = &cfg.models;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--database-path")
            .arg(dir.join("facerec.db"))
            .arg("--log-file")
            .arg(dir.join("logs.txt"))
            .arg("--photo-dir")
            .arg(dir.join("photo"))
            .args(["--det-size", &cfg.det_size.to_string()])
            .args(["--workers", &cfg.workers.to_string(), "--queue-size", &cfg.queue_size.to_string()])
            .args(["--batch-size", &cfg.batch_size.to_string(), "--batch-wait-us", &cfg.batch_wait_us.to_string()])
            .args(["--model-pack", &m.model_pack])
            .arg("--model-cache-dir")
            .arg(&m.model_cache_dir)
            .args(["--execution-provider", &m.execution_provider.to_string(), "--intra-threads", &m.intra_threads.to_string()])
            .args(["--intra-spinning", &m.intra_spinning.to_string()])
            .args(["--inference-backend", &m.inference_backend.to_string(), "--openvino-precision", &m.openvino_precision.to_string()])
            .env_remove("MONGO_URI")
            .env_remove("JWT_SECRET_KEY")
            .env_remove("API_KEYS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log"))?);
        if let Some(p) = &m.ort_dylib_path {
            cmd.arg("--ort-dylib-path").arg(p);
        }
        if let Some(p) = &m.openvino_lib_path {
            cmd.arg("--openvino-lib-path").arg(p);
        }
        let child = cmd.spawn().context("starting the service")?;
        let mut service = Service { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), dir };
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = http(service.addr, "GET", "/health", None, &[]) {
                return Ok(service);
            }
            if let Some(status) = service.child.try_wait()? {
                let log = std::fs::read_to_string(service.dir.join("server.log")).unwrap_or_default();
                bail!("the service exited ({status}) before answering:\n{}", tail(&log, 2000));
            }
            if started.elapsed() > Duration::from_secs(180) {
                bail!("the service did not answer /health within 180 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// "backend openvino (auto: ...)", from /health.
    fn backend(&self) -> String {
        let health =
            http(self.addr, "GET", "/health", None, &[]).ok().and_then(|(_, b)| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let field = |k: &str| health.as_ref().and_then(|h| h.get(k)).and_then(|v| v.as_str()).unwrap_or("?").to_owned();
        format!("backend {} ({})", field("inference_backend"), field("backend_reason"))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the service (kB).
    fn rss_kb(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

/// The service binary: FACEREC_BIN, else `facerec` beside this binary (the same target folder:
/// `cargo build --release` at the root builds it).
fn facerec_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FACEREC_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().context("locating this binary")?;
    let exe = me.with_file_name(format!("facerec{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        exe.is_file(),
        "no service binary at {}: build it (cargo build, with the same profile) or set FACEREC_BIN",
        exe.display()
    );
    Ok(exe)
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
    &s[start..]
}

/// One request (setup and probes only, not the measured load): (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let client =
        reqwest::blocking::Client::builder().connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(60)).no_proxy().build()?;
    let mut request = client.request(reqwest::Method::from_bytes(method.as_bytes())?, format!("http://{addr}{path}")).body(body.to_vec());
    if let Some(c) = content_type {
        request = request.header(reqwest::header::CONTENT_TYPE, c);
    }
    let response = request.send()?;
    let status = response.status().as_u16();
    Ok((status, response.bytes()?.to_vec()))
}

/// Creates the users and enrols one photo each.
fn enrol(addr: SocketAddr, fixtures: &Path) -> anyhow::Result<()> {
    for (user, photo) in ENROL {
        let (status, body) = http(addr, "POST", "/users", Some("application/json"), format!("{{\"username\": \"{user}\"}}").as_bytes())?;
        anyhow::ensure!(status == 200 || status == 201, "creating {user}: {status} {}", String::from_utf8_lossy(&body));
        let image = std::fs::read(fixtures.join(photo)).with_context(|| format!("reading {photo}"))?;
        let b = "benchBoundary7";
        let mut form = format!("--{b}\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\n{user}\r\n").into_bytes();
        form.extend(
            format!("--{b}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{photo}\"\r\nContent-Type: image/jpeg\r\n\r\n")
                .bytes(),
        );
        form.extend(&image);
        form.extend(format!("\r\n--{b}--\r\n").bytes());
        let (status, body) =
            http(addr, "POST", "/calculate_average_embedding", Some(&format!("multipart/form-data; boundary={b}")), &form)?;
        anyhow::ensure!(status == 200, "enrolling {user}: {status} {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

/// `/recognize` bodies, one crop each.
fn recognize_bodies(crops: &[Vec<u8>]) -> Vec<Vec<u8>> {
    crops
        .iter()
        .map(|c| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(c);
            serde_json::to_vec(&serde_json::json!({
                "camera": "bench",
                "bboxes": [{"bbox": [0, 0, CROP_SIDE, CROP_SIDE], "crop": b64}]
            }))
            .unwrap_or_default()
        })
        .collect()
}

/// Runs the benchmark and prints its figures.
pub fn run(cfg: ServeConfig, opts: RecognizeBench) -> anyhow::Result<()> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let photos: Vec<Vec<u8>> =
        PHOTOS.iter().map(|p| std::fs::read(opts.fixtures.join(p)).with_context(|| format!("reading {p}"))).collect::<Result<_, _>>()?;
    let runtime_options = cfg.models.runtime_options(usize::from(cfg.workers));
    let threads = runtime_options.intra_threads;
    let pack_dir = facerec::fetch::ensure_pack(&cfg.models.model_cache_dir, &cfg.models.model_pack)?;
    // The raw models on each backend, one after the other (each its own runtime: ONNX
    // Runtime's environment exists once per process, OpenVINO's core beside it).
    let mut raws: Vec<(ActiveBackend, RawFigures)> = Vec::new();
    let mut crops = Vec::new();
    for backend in [BackendChoice::OnnxRuntime, BackendChoice::OpenVino] {
        let runtime = match Runtime::init(&RuntimeOptions { backend, ..runtime_options.clone() }) {
            Ok(r) => r,
            Err(e) => {
                println!("raw models on {backend}: unavailable ({e})");
                continue;
            }
        };
        let mut analyzer = FaceAnalyzer::load(&runtime, &pack_dir, analyzer_options(cfg.det_size))?;
        if crops.is_empty() {
            crops = face_crops(&mut analyzer, &photos, CROP_SIDE)?;
            println!(
                "bench recognize: {} face crops of {CROP_SIDE}x{CROP_SIDE} from {} photos; det {}; workers {}, threads {threads}, batch {}, wait {} us, queue {}",
                crops.len(),
                PHOTOS.len(),
                cfg.det_size,
                cfg.workers,
                cfg.batch_size,
                cfg.batch_wait_us,
                cfg.queue_size
            );
        }
        if opts.soak.is_some() {
            break;
        }
        let raw = raw_figures(&mut analyzer, &crops, usize::from(cfg.batch_size).max(8), Duration::from_secs(4))?;
        print_raw(&backend.to_string(), threads, cfg.det_size, &raw);
        if let Some(b) = runtime.active_backend() {
            raws.push((b, raw));
        }
    }
    let Some(best) = raws.iter().map(|(_, r)| r.clone()).min_by(|a, b| a.pipeline_batched_ms.total_cmp(&b.pipeline_batched_ms)) else {
        if opts.soak.is_none() {
            bail!("no backend could run the models");
        }
        return soak_only(&cfg, &opts, &crops);
    };
    let raw = best;
    let service = Service::start(&cfg)?;
    enrol(service.addr, &opts.fixtures)?;
    let target = Target { addr: service.addr, path: "/recognize".into(), bodies: recognize_bodies(&crops) };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    println!(
        "service: pid {}, {} users enrolled, POST /recognize with one crop per request; {}",
        service.pid(),
        ENROL.len(),
        service.backend()
    );
    let warm = Duration::from_secs((opts.seconds / 10).max(1));
    let mut reports: Vec<LevelReport> = Vec::new();
    for &conns in &opts.levels {
        let report = rt.block_on(load::drive(&target, conns, warm, Duration::from_secs(opts.seconds)))?;
        println!("{}", report.line());
        reports.push(report);
    }
    println!("against the faster backend's raw models measured above:");
    for r in &reports {
        println!(
            "  {:>3} conn: {:.1} req/s = {:.0}% of raw batched ({:.1} faces/s), {:.0}% of raw single ({:.1} faces/s)",
            r.connections,
            r.rps(),
            100.0 * r.rps() / raw.batched_fps(),
            raw.batched_fps(),
            100.0 * r.rps() / raw.single_fps(),
            raw.single_fps()
        );
    }
    if let Some(one) = reports.iter().find(|r| r.connections == 1) {
        println!(
            "  p50 at 1 connection {:.2} ms - raw single-face pipeline {:.2} ms = {:+.2} ms",
            one.p50(),
            raw.pipeline_single_ms,
            one.p50() - raw.pipeline_single_ms
        );
    }
    let summary = serde_json::json!({
        "bench": "recognize",
        "raw": raws.iter().map(|(b, raw)| serde_json::json!({"backend": b.to_string(),
            "detector_model_ms": raw.detector_model_ms, "detector_full_ms": raw.detector_full_ms,
            "recognizer_one_ms": raw.recognizer_one_ms, "recognizer_batched_ms_per_face": raw.recognizer_batched,
            "pipeline_single_ms": raw.pipeline_single_ms, "pipeline_batched_ms": raw.pipeline_batched_ms, "batch": raw.batch})).collect::<Vec<_>>(),
        "levels": reports.iter().map(LevelReport::json).collect::<Vec<_>>(),
    });
    println!("{summary}");
    print_metrics(service.addr);
    Ok(())
}

fn print_raw(backend: &str, threads: usize, det_size: u32, raw: &RawFigures) {
    println!("raw models on {backend} (in-process, {threads} threads, one session pair):");
    println!(
        "  detector on a {CROP_SIDE}x{CROP_SIDE} crop at det {det_size}: {:.2} ms in the model, {:.2} ms with letterbox and NMS",
        raw.detector_model_ms, raw.detector_full_ms
    );
    let batched: Vec<String> = raw.recognizer_batched.iter().map(|(n, m)| format!("batch {n}: {m:.2} ms/face")).collect();
    println!("  recognizer: one face {:.2} ms; {}", raw.recognizer_one_ms, batched.join("; "));
    println!(
        "  pipeline (decode+detect+align+embed): single {:.2} ms/face = {:.1} faces/s; batched by {} {:.2} ms/face = {:.1} faces/s",
        raw.pipeline_single_ms,
        raw.single_fps(),
        raw.batch,
        raw.pipeline_batched_ms,
        raw.batched_fps()
    );
}

/// `--soak N` only: the service under 64 connections, no raw figures.
fn soak_only(cfg: &ServeConfig, opts: &RecognizeBench, crops: &[Vec<u8>]) -> anyhow::Result<()> {
    let service = Service::start(cfg)?;
    enrol(service.addr, &opts.fixtures)?;
    let target = Target { addr: service.addr, path: "/recognize".into(), bodies: recognize_bodies(crops) };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    println!("service: pid {}, {} users enrolled; {}", service.pid(), ENROL.len(), service.backend());
    soak(&rt, &service, &target, opts.soak.unwrap_or(60))
}

/// The service's own `/metrics` after the load, histogram buckets left out.
fn print_metrics(addr: SocketAddr) {
    match http(addr, "GET", "/metrics", None, &[]) {
        Ok((200, body)) => {
            println!("GET /metrics after the load (histogram buckets left out):");
            for line in String::from_utf8_lossy(&body).lines().filter(|l| !l.contains("_bucket{") && !l.starts_with('#')) {
                println!("  {line}");
            }
        }
        Ok((status, _)) => println!("GET /metrics answered {status}"),
        Err(e) => println!("GET /metrics failed: {e:#}"),
    }
}

/// 64 connections for `secs`, the service's VmRSS every 5 s.
fn soak(rt: &tokio::runtime::Runtime, service: &Service, target: &Target, secs: u64) -> anyhow::Result<()> {
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut samples: Vec<(u64, u64)> = vec![(0, service.rss_kb().unwrap_or(0))];
    let started = Instant::now();
    let report = rt.block_on(async {
        let load = tokio::spawn({
            let target = target.clone();
            async move { load::drive(&target, 64, Duration::ZERO, Duration::from_secs(secs)).await }
        });
        while Instant::now() < stop {
            tokio::time::sleep(Duration::from_secs(5).min(stop.saturating_duration_since(Instant::now()))).await;
            samples.push((started.elapsed().as_secs(), service.rss_kb().unwrap_or(0)));
        }
        load.await?
    })?;
    println!("{}", report.line());
    let series: Vec<String> = samples.iter().map(|(t, kb)| format!("{t}s {:.1}", *kb as f64 / 1024.0)).collect();
    println!("VmRSS (MiB) every 5 s: {}", series.join(", "));
    // After the first 30 s (allocators and caches settle), the drift.
    let settled: Vec<u64> = samples.iter().filter(|(t, _)| *t >= 30).map(|s| s.1).collect();
    if let (Some(first), Some(last), Some(max)) = (settled.first(), settled.last(), settled.iter().max()) {
        println!(
            "from 30 s to the end: {:.1} -> {:.1} MiB ({:+.1} MiB), peak {:.1} MiB",
            *first as f64 / 1024.0,
            *last as f64 / 1024.0,
            (*last as f64 - *first as f64) / 1024.0,
            *max as f64 / 1024.0
        );
    }
    println!("{}", serde_json::json!({"bench": "recognize-soak", "seconds": secs, "level": report.json(), "rss_kb": samples}));
    print_metrics(service.addr);
    Ok(())
}
