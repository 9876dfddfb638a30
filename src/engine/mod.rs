//! The inference engine: worker threads that own the ONNX Runtime sessions (one
//! [`FaceAnalyzer`] each), fed by a bounded queue ([`queue`]). The async side holds a cheap
//! cloneable [`Engine`] handle and awaits a oneshot reply; inference never runs on tokio's
//! threads. A full queue is refused at once ([`EngineError::Overloaded`]) instead of growing.
//!
//! Micro-batching: a worker takes a job, decodes, detects and aligns it, then takes the
//! jobs queued meanwhile (waiting at most `batch_wait` for more when the queue is empty),
//! up to `batch_size` images or faces, and embeds every aligned crop of them in ONE
//! recognizer run. Detection stays per image. A job whose caller went away (its oneshot
//! closed) is dropped without being computed, before detection and again before the
//! recognizer run. [`Engine::stats`] is a plain snapshot for metrics; [`timing`] hands each
//! request its queue and inference times.

mod queue;
mod supervise;
pub mod timing;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::RgbImage;
use tokio::sync::oneshot;

use crate::face::image::{DecodedImage, ImageKind, ImageLimits, decode};
use crate::face::{AnalyzerOptions, Face, FaceAnalyzer, FaceError, PackFiles, Prepared, StageTimes};
use crate::runtime::{ActiveBackend, ActiveProvider, Runtime};
use queue::{JobQueue, Pushed};
pub use supervise::FaultHooks;
use supervise::{Faults, Slots};

/// Engine sizing.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Worker threads, each with its own sessions.
    pub workers: usize,
    /// Jobs waiting at most; beyond it new work is refused.
    pub queue: usize,
    /// Most images (and most faces) embedded in one recognizer run; 1 turns batching off.
    pub batch_size: usize,
    /// How long a worker holding fewer than `batch_size` images waits for more when the
    /// queue is empty (counted from taking the first). Zero: take only what is queued.
    pub batch_wait: Duration,
    pub analyzer: AnalyzerOptions,
    pub limits: ImageLimits,
    /// How long a caller waits for its job (INFERENCE_TIMEOUT): past it the caller gets
    /// [`EngineError::Timeout`], the job is withdrawn, and a worker still computing it is not
    /// counted as serving (`/ready` says 503) until it is done.
    pub timeout: Duration,
    /// Faults injected into the workers: none, except in tests ([`EngineConfig::with_faults`]).
    pub faults: FaultHooks,
}

impl EngineConfig {
    /// The same, with `faults` injected into the workers (for tests).
    pub fn with_faults(self, faults: FaultHooks) -> EngineConfig {
        EngineConfig { faults, ..self }
    }
}

impl Default for EngineConfig {
    /// The measured defaults for a small CPU machine (see the README's Benchmarks section).
    fn default() -> Self {
        Self {
            workers: 1,
            queue: 256,
            batch_size: 16,
            batch_wait: Duration::ZERO,
            analyzer: AnalyzerOptions::default(),
            limits: ImageLimits::default(),
            timeout: Duration::from_secs(30),
            faults: FaultHooks::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The bytes are not a usable image (invalid, or over the limits).
    #[error(transparent)]
    Image(FaceError),
    /// The queue is full: try again later.
    #[error("the inference queue is full")]
    Overloaded,
    /// The engine stopped (shutdown).
    #[error("the inference engine has stopped")]
    Stopped,
    /// The worker computing the job failed (panicked) and was replaced; the job was lost.
    #[error("the inference worker failed while computing this image and was replaced")]
    WorkerFailed,
    /// The job was not answered within the engine's deadline (INFERENCE_TIMEOUT); withdrawn.
    #[error("inference took longer than {0:?}")]
    Timeout(Duration),
    /// Inference failed: a bug or a broken model.
    #[error("inference failed: {0}")]
    Internal(String),
}

/// What one image gave.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub faces: Vec<Face>,
    pub kind: ImageKind,
    pub width: u32,
    pub height: u32,
    /// Stage times of this image; `embed` is its batch's recognizer run.
    pub times: StageTimes,
    /// Time the job waited in the queue (admission to a worker taking it).
    pub queued: Duration,
    /// Time from a worker taking the job to its answer (decode, detect, align and the
    /// recognizer run of its batch, which may include other images' detection).
    pub inference: Duration,
    /// Images in the recognizer run that embedded this one.
    pub batch_jobs: usize,
    /// The aligned crops of `faces`, in order: only for [`Engine::detect`] (whose faces have no
    /// embedding yet; [`Engine::embed_faces`] embeds the crops the caller picks).
    pub crops: Vec<RgbImage>,
}

/// What a job asks for.
enum Task {
    /// Decode, detect, align and embed every face.
    Analyze(Vec<u8>),
    /// Decode, detect and align; no embedding (the crops come back).
    Detect(Vec<u8>),
    /// Embed crops already aligned to the recognizer's input (batched with the other jobs).
    Embed(Vec<RgbImage>),
}

/// A job's answer and its timing (also for failures, so they can be reported).
struct Reply {
    result: Result<Analysis, EngineError>,
    queued: Duration,
    inference: Duration,
}

struct Job {
    task: Task,
    enqueued: Instant,
    reply: oneshot::Sender<Reply>,
}

/// Facts about the loaded models, for health and stored records.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub model_id: String,
    pub embedding_dim: usize,
    pub provider: ActiveProvider,
    /// The inference library the sessions run on, and why it was chosen.
    pub backend: ActiveBackend,
    pub backend_reason: String,
    pub files: PackFiles,
}

/// A snapshot of the engine's counters, for metrics and readiness. Counters are cumulative
/// since start.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EngineStats {
    pub workers: usize,
    pub queue_capacity: usize,
    pub batch_size: usize,
    /// Jobs waiting now.
    pub queue_depth: usize,
    /// Workers computing a batch now.
    pub busy_workers: usize,
    /// Workers running (fewer than `workers` while one is being replaced after a panic).
    pub live_workers: usize,
    /// Workers able to take work now: running, and not busy past the deadline.
    pub serving_workers: usize,
    /// Workers replaced after a panic.
    pub worker_restarts: u64,
    /// Jobs whose caller stopped waiting at the deadline (503 `inference_timeout`).
    pub jobs_timed_out: u64,
    /// Jobs admitted to the queue.
    pub jobs_accepted: u64,
    /// Jobs refused because the queue was full (429 `overloaded`).
    pub jobs_rejected: u64,
    /// Jobs dropped uncomputed because their caller went away.
    pub jobs_cancelled: u64,
    /// Jobs answered with an analysis.
    pub jobs_done: u64,
    /// Jobs answered with an error (bad image, failed inference).
    pub jobs_failed: u64,
    /// Recognizer runs (micro-batches).
    pub batches: u64,
    /// Faces embedded.
    pub faces: u64,
    /// `batch_histogram[i]`: batches of `i + 1` images (the last bucket: `batch_size` or more).
    pub batch_histogram: Vec<u64>,
    /// Sum over jobs of their queue time.
    pub queue_time: Duration,
    /// Sum over batches of their wall time (decode to last answer): the workers' busy time.
    pub inference_time: Duration,
    /// Part of `inference_time` inside the detector and recognizer sessions.
    pub detector_time: Duration,
    pub recognizer_time: Duration,
}

/// Counters the workers update once per batch.
struct Counters {
    stats: Mutex<EngineStats>,
}

impl Counters {
    fn update(&self, f: impl FnOnce(&mut EngineStats)) {
        let mut g = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }
}

/// What the handles share; dropping the last handle closes the queue and the workers end.
struct Shared {
    queue: Arc<JobQueue<Job>>,
    counters: Arc<Counters>,
    info: ModelInfo,
    slots: Arc<Slots>,
    timeout: Duration,
    /// The worker threads, joined by [`Engine::shutdown`].
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// Handle to the workers. Cloning is cheap.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

/// What a worker needs besides its analyzer.
struct WorkerCtx {
    id: usize,
    queue: Arc<JobQueue<Job>>,
    counters: Arc<Counters>,
    slots: Arc<Slots>,
    faults: Arc<Faults>,
    /// To rebuild the analyzer after a panic.
    runtime: Arc<Runtime>,
    files: PackFiles,
    analyzer: AnalyzerOptions,
    limits: ImageLimits,
    batch_size: usize,
    batch_wait: Duration,
}

impl Engine {
    /// Loads one analyzer per worker (all before returning, so a broken model stops the
    /// start) and starts the workers.
    pub fn start(runtime: Arc<Runtime>, files: PackFiles, cfg: EngineConfig) -> Result<Engine, FaceError> {
        let workers = cfg.workers.max(1);
        let batch_size = cfg.batch_size.max(1);
        let mut analyzers = Vec::with_capacity(workers);
        for _ in 0..workers {
            analyzers.push(FaceAnalyzer::from_files(&runtime, files.clone(), cfg.analyzer)?);
        }
        let first = &analyzers[0];
        let info = ModelInfo {
            model_id: first.model_id().to_string(),
            embedding_dim: first.embedding_dim(),
            provider: runtime.active_provider().unwrap_or(ActiveProvider::Cpu),
            backend: runtime.active_backend().unwrap_or(ActiveBackend::OnnxRuntime),
            backend_reason: runtime.backend_reason(),
            files,
        };
        let queue = Arc::new(JobQueue::new(cfg.queue.max(1)));
        let counters = Arc::new(Counters {
            stats: Mutex::new(EngineStats {
                workers,
                queue_capacity: cfg.queue.max(1),
                batch_size,
                batch_histogram: vec![0; batch_size],
                ..EngineStats::default()
            }),
        });
        let mut threads = Vec::with_capacity(workers);
        let slots = Arc::new(Slots::new(workers));
        let faults = Arc::new(Faults::new(cfg.faults.clone()));
        for (i, analyzer) in analyzers.into_iter().enumerate() {
            let ctx = WorkerCtx {
                id: i,
                queue: Arc::clone(&queue),
                counters: Arc::clone(&counters),
                slots: Arc::clone(&slots),
                faults: Arc::clone(&faults),
                runtime: Arc::clone(&runtime),
                files: info.files.clone(),
                analyzer: cfg.analyzer,
                limits: cfg.limits,
                batch_size,
                batch_wait: cfg.batch_wait,
            };
            let handle = std::thread::Builder::new()
                .name(format!("facerec-infer-{i}"))
                .spawn(move || worker(analyzer, ctx))
                .map_err(|e| FaceError::Model(format!("cannot start inference thread: {e}")))?;
            threads.push(handle);
            counters.update(|s| s.live_workers += 1);
        }
        let timeout = cfg.timeout;
        Ok(Engine { shared: Arc::new(Shared { queue, counters, info, slots, timeout, threads: Mutex::new(threads) }) })
    }

    /// Stops taking work, lets the workers finish what is queued and waits for their threads
    /// to end (their sessions are dropped with them), at most `limit`. Blocking: call it off
    /// the async runtime. A process must not exit while a worker is inside a model: OpenVINO's
    /// and TBB's static destructors then run under it (seen: SIGSEGV on SIGTERM).
    /// Returns whether every worker ended in time.
    pub fn shutdown(&self, limit: Duration) -> bool {
        self.shared.queue.close();
        let threads: Vec<_> = std::mem::take(&mut *self.shared.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = Instant::now() + limit;
        let mut all = true;
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                all = false;
            }
        }
        all
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// A snapshot of the queue and the counters.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.shared.counters.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.queue_depth = self.shared.queue.len();
        s.serving_workers = self.shared.slots.serving(self.shared.timeout);
        s
    }

    /// Decodes `bytes` and finds every face in it, with embeddings. Refused at once with
    /// [`EngineError::Overloaded`] when the queue is full. Dropping the returned future
    /// before it completes withdraws the job: it is not computed. The times go to the
    /// current request's [`timing`] sink.
    pub async fn analyze(&self, bytes: Vec<u8>) -> Result<Analysis, EngineError> {
        self.submit(Task::Analyze(bytes)).await
    }

    /// Decodes `bytes` and finds every face in it, aligned but NOT embedded: the faces'
    /// embeddings are empty and [`Analysis::crops`] holds their aligned crops, for
    /// [`Engine::embed_faces`]. What a video stream runs on every frame.
    pub async fn detect(&self, bytes: Vec<u8>) -> Result<Analysis, EngineError> {
        self.submit(Task::Detect(bytes)).await
    }

    /// The embeddings of crops aligned to the recognizer's input (as [`Engine::detect`] gives
    /// them), in order; batched with the other jobs' faces.
    pub async fn embed_faces(&self, crops: Vec<RgbImage>) -> Result<Vec<Vec<f32>>, EngineError> {
        if crops.is_empty() {
            return Ok(Vec::new());
        }
        let a = self.submit(Task::Embed(crops)).await?;
        Ok(a.faces.into_iter().map(|f| f.embedding).collect())
    }

    async fn submit(&self, task: Task) -> Result<Analysis, EngineError> {
        let (reply, rx) = oneshot::channel();
        match self.shared.queue.push(timing::share(), Job { task, enqueued: Instant::now(), reply }) {
            Pushed::Queued => self.shared.counters.update(|s| s.jobs_accepted += 1),
            Pushed::Full(_) => {
                self.shared.counters.update(|s| s.jobs_rejected += 1);
                return Err(EngineError::Overloaded);
            }
            Pushed::Closed(_) => return Err(EngineError::Stopped),
        }
        match tokio::time::timeout(self.shared.timeout, rx).await {
            Ok(Ok(reply)) => {
                timing::record(reply.queued, reply.inference);
                reply.result
            }
            // The reply channel was dropped unanswered: the worker panicked on this job.
            Ok(Err(_)) => Err(EngineError::WorkerFailed),
            // Dropping `rx` withdraws the job: a worker that has not started it skips it.
            Err(_) => {
                self.shared.counters.update(|s| s.jobs_timed_out += 1);
                Err(EngineError::Timeout(self.shared.timeout))
            }
        }
    }
}

/// Marks a worker gone when its thread ends.
struct LiveGuard(Arc<Counters>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.update(|s| s.live_workers = s.live_workers.saturating_sub(1));
    }
}

/// Counts a worker busy while it computes a batch, however the batch ends (a panic included).
struct BusyGuard<'a>(&'a Counters);

impl<'a> BusyGuard<'a> {
    fn new(c: &'a Counters) -> BusyGuard<'a> {
        c.update(|s| s.busy_workers += 1);
        BusyGuard(c)
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.update(|s| s.busy_workers = s.busy_workers.saturating_sub(1));
    }
}

/// One image between detection and its embeddings.
struct InFlight {
    reply: oneshot::Sender<Reply>,
    taken: Instant,
    queued: Duration,
    kind: ImageKind,
    size: (u32, u32),
    times: StageTimes,
    prepared: Prepared,
}

/// A worker thread: batches until the queue closes, supervised ([`supervise`]): a panic is
/// caught, the analyzer rebuilt, and the worker serves on.
fn worker(analyzer: FaceAnalyzer, ctx: WorkerCtx) {
    let _live = LiveGuard(Arc::clone(&ctx.counters));
    supervise::supervise(
        ctx.id,
        &ctx.slots,
        &ctx.counters,
        analyzer,
        |analyzer, busy| {
            let first = ctx.queue.pop()?;
            busy();
            let _busy = BusyGuard::new(&ctx.counters);
            run_batch(analyzer, &ctx, first);
            Some(())
        },
        || FaceAnalyzer::from_files(&ctx.runtime, ctx.files.clone(), ctx.analyzer),
        || ctx.queue.is_closed(),
    );
}

/// Gathers a micro-batch starting with `first`, detects each image as it is taken, embeds
/// every crop in one recognizer run and answers each job.
fn run_batch(analyzer: &mut FaceAnalyzer, ctx: &WorkerCtx, first: Job) {
    let started = Instant::now();
    let deadline = started + ctx.batch_wait;
    let mut batch: Vec<InFlight> = Vec::new();
    let (mut faces, mut cancelled, mut failed, mut queue_time) = (0usize, 0u64, 0u64, Duration::ZERO);
    let mut detected = 0u64;
    let mut detector_time = Duration::ZERO;
    // Answers are sent after the counters are updated, so a caller that has its answer
    // sees its batch in `stats()`.
    let mut answers: Vec<(oneshot::Sender<Reply>, Reply)> = Vec::new();
    let mut next = Some(first);
    while let Some(job) = next.take() {
        let taken = Instant::now();
        let queued = taken.saturating_duration_since(job.enqueued);
        if job.reply.is_closed() {
            cancelled += 1; // the caller went away: do not compute
        } else {
            queue_time += queued;
            ctx.faults.before_job();
            let mut times = StageTimes::default();
            match start_task(analyzer, job.task, &ctx.limits, &mut times) {
                Ok(Started::Detected(mut a)) => {
                    a.queued = queued;
                    a.inference = taken.elapsed();
                    detector_time += times.detect_model;
                    detected += 1;
                    answers.push((job.reply, Reply { result: Ok(a), queued, inference: taken.elapsed() }));
                }
                Ok(Started::Prepared(kind, size, prepared)) => {
                    faces += prepared.crops.len();
                    detector_time += times.detect_model;
                    batch.push(InFlight { reply: job.reply, taken, queued, kind, size, times, prepared });
                }
                Err(e) => {
                    failed += 1;
                    detector_time += times.detect_model;
                    answers.push((job.reply, Reply { result: Err(e), queued, inference: taken.elapsed() }));
                }
            }
        }
        if batch.len() >= ctx.batch_size || faces >= ctx.batch_size {
            break;
        }
        next = ctx.queue.try_pop();
        if next.is_none() && !batch.is_empty() {
            let now = Instant::now();
            if now < deadline {
                next = ctx.queue.pop_timeout(deadline - now);
            }
        }
    }

    // Callers that went away while the others were detected are not embedded either.
    let before = batch.len();
    batch.retain(|j| !j.reply.is_closed());
    cancelled += (before - batch.len()) as u64;

    let mut embed_times = StageTimes::default();
    let mut crops: Vec<RgbImage> = Vec::with_capacity(faces);
    for j in &mut batch {
        crops.append(&mut j.prepared.crops);
    }
    let embedded = if crops.is_empty() { Ok(Vec::new()) } else { analyzer.embed_aligned(&crops, &mut embed_times) };
    drop(crops);
    let jobs_in_batch = batch.len();
    let (mut done, mut faces_embedded) = (0u64, 0u64);
    match embedded {
        Ok(all) => {
            let mut all = all.into_iter();
            for mut j in batch {
                let n = j.prepared.detections.len();
                let embeddings: Vec<Vec<f32>> = all.by_ref().take(n).collect();
                j.times.embed = embed_times.embed;
                j.times.embed_model = embed_times.embed_model;
                let inference = j.taken.elapsed();
                let result = j.prepared.into_faces(embeddings).map_err(|e| EngineError::Internal(e.to_string())).map(|faces| {
                    faces_embedded += faces.len() as u64;
                    Analysis {
                        faces,
                        kind: j.kind,
                        width: j.size.0,
                        height: j.size.1,
                        times: j.times,
                        queued: j.queued,
                        inference,
                        batch_jobs: jobs_in_batch,
                        crops: Vec::new(),
                    }
                });
                match result {
                    Ok(_) => done += 1,
                    Err(_) => failed += 1,
                }
                answers.push((j.reply, Reply { result, queued: j.queued, inference }));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for j in batch {
                failed += 1;
                let inference = j.taken.elapsed();
                answers.push((j.reply, Reply { result: Err(EngineError::Internal(msg.clone())), queued: j.queued, inference }));
            }
        }
    }
    let wall = started.elapsed();
    ctx.counters.update(|s| {
        s.jobs_done += done + detected;
        s.jobs_failed += failed;
        s.jobs_cancelled += cancelled;
        s.queue_time += queue_time;
        s.inference_time += wall;
        s.detector_time += detector_time;
        s.recognizer_time += embed_times.embed_model;
        s.faces += faces_embedded;
        if jobs_in_batch > 0 {
            s.batches += 1;
            let last = s.batch_histogram.len().saturating_sub(1);
            if let Some(b) = s.batch_histogram.get_mut((jobs_in_batch - 1).min(last)) {
                *b += 1;
            }
        }
    });
    for (reply, answer) in answers {
        let _ = reply.send(answer);
    }
}

/// What a task gave before the recognizer run.
enum Started {
    /// Waits for the batch's recognizer run.
    Prepared(ImageKind, (u32, u32), Prepared),
    /// Detection only: answered at once.
    Detected(Analysis),
}

fn start_task(analyzer: &mut FaceAnalyzer, task: Task, limits: &ImageLimits, times: &mut StageTimes) -> Result<Started, EngineError> {
    match task {
        Task::Analyze(bytes) => prepare(analyzer, &bytes, limits, times).map(|(k, s, p)| Started::Prepared(k, s, p)),
        Task::Detect(bytes) => {
            let (kind, (width, height), prepared) = prepare(analyzer, &bytes, limits, times)?;
            let found_by = prepared.found_by;
            let faces = prepared
                .detections
                .iter()
                .map(|d| Face { bbox: d.bbox, kps: d.kps, det_score: d.score, embedding: Vec::new(), found_by })
                .collect();
            Ok(Started::Detected(Analysis {
                faces,
                kind,
                width,
                height,
                times: *times,
                queued: Duration::ZERO,
                inference: Duration::ZERO,
                batch_jobs: 0,
                crops: prepared.crops,
            }))
        }
        Task::Embed(crops) => {
            let (w, h) = crops.first().map(|c| c.dimensions()).unwrap_or((0, 0));
            let detections = crops
                .iter()
                .map(|c| crate::face::Detection {
                    bbox: [0.0, 0.0, c.width() as f32, c.height() as f32],
                    score: 1.0,
                    kps: crate::face::align::ARCFACE_TEMPLATE,
                })
                .collect();
            Ok(Started::Prepared(ImageKind::Png, (w, h), Prepared { detections, crops, found_by: crate::face::FoundBy::Aligned }))
        }
    }
}

/// Decode, detect and align one image.
fn prepare(
    analyzer: &mut FaceAnalyzer,
    bytes: &[u8],
    limits: &ImageLimits,
    times: &mut StageTimes,
) -> Result<(ImageKind, (u32, u32), Prepared), EngineError> {
    let t = Instant::now();
    let DecodedImage { rgb, kind } = decode(bytes, limits).map_err(EngineError::Image)?;
    times.decode = t.elapsed();
    let prepared = analyzer.prepare(&rgb, times).map_err(|e| match e {
        e @ (FaceError::InvalidImage(_) | FaceError::ImageTooLarge { .. } | FaceError::TooCostly(_)) => EngineError::Image(e),
        other => EngineError::Internal(other.to_string()),
    })?;
    Ok((kind, rgb.dimensions(), prepared))
}
