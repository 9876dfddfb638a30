//! The inference engine: worker threads that own the ONNX Runtime sessions (one
//! [`FaceAnalyzer`] each), fed by a bounded queue. The async side holds a cheap cloneable
//! [`Engine`] handle and awaits a oneshot reply; inference never runs on tokio's threads.
//! A full queue is refused at once ([`EngineError::Overloaded`]) instead of growing.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::face::image::{DecodedImage, ImageKind, ImageLimits, decode};
use crate::face::{AnalyzerOptions, Face, FaceAnalyzer, FaceError, PackFiles, StageTimes};
use crate::runtime::{ActiveProvider, Runtime};

/// Engine sizing.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Worker threads, each with its own sessions.
    pub workers: usize,
    /// Jobs waiting at most; beyond it new work is refused.
    pub queue: usize,
    pub analyzer: AnalyzerOptions,
    pub limits: ImageLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The bytes are not a usable image (invalid, or over the limits).
    #[error(transparent)]
    Image(FaceError),
    /// The queue is full: try again later.
    #[error("the inference queue is full")]
    Overloaded,
    /// The engine stopped (shutdown or a worker died).
    #[error("the inference engine has stopped")]
    Stopped,
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
    pub times: StageTimes,
    /// Time the job waited in the queue.
    pub queued: Duration,
}

enum Job {
    Analyze { bytes: Vec<u8>, enqueued: Instant, reply: oneshot::Sender<Result<Analysis, EngineError>> },
}

/// Facts about the loaded models, for health and stored records.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub model_id: String,
    pub embedding_dim: usize,
    pub provider: ActiveProvider,
    pub files: PackFiles,
}

/// Handle to the workers. Cloning is cheap.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    info: Arc<ModelInfo>,
}

impl Engine {
    /// Loads one analyzer per worker (all before returning, so a broken model stops the
    /// start) and starts the workers.
    pub fn start(runtime: Arc<Runtime>, files: PackFiles, cfg: EngineConfig) -> Result<Engine, FaceError> {
        let workers = cfg.workers.max(1);
        let mut analyzers = Vec::with_capacity(workers);
        for _ in 0..workers {
            analyzers.push(FaceAnalyzer::from_files(&runtime, files.clone(), cfg.analyzer)?);
        }
        let first = &analyzers[0];
        let info = Arc::new(ModelInfo {
            model_id: first.model_id().to_string(),
            embedding_dim: first.embedding_dim(),
            provider: runtime.active_provider().unwrap_or(ActiveProvider::Cpu),
            files,
        });
        let (tx, rx) = mpsc::sync_channel::<Job>(cfg.queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for (i, analyzer) in analyzers.into_iter().enumerate() {
            let rx = Arc::clone(&rx);
            let limits = cfg.limits;
            let runtime = Arc::clone(&runtime);
            std::thread::Builder::new()
                .name(format!("facerec-infer-{i}"))
                .spawn(move || worker(analyzer, rx, limits, runtime))
                .map_err(|e| FaceError::Model(format!("cannot start inference thread: {e}")))?;
        }
        Ok(Engine { tx, info })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Decodes `bytes` and finds every face in it, with embeddings.
    pub async fn analyze(&self, bytes: Vec<u8>) -> Result<Analysis, EngineError> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job::Analyze { bytes, enqueued: Instant::now(), reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(EngineError::Overloaded),
            Err(TrySendError::Disconnected(_)) => return Err(EngineError::Stopped),
        }
        rx.await.unwrap_or(Err(EngineError::Stopped))
    }
}

fn worker(mut analyzer: FaceAnalyzer, rx: Arc<Mutex<Receiver<Job>>>, limits: ImageLimits, _runtime: Arc<Runtime>) {
    loop {
        // Hold the lock only while taking a job.
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        let Ok(job) = job else { return };
        match job {
            Job::Analyze { bytes, enqueued, reply } => {
                if reply.is_closed() {
                    continue; // the client went away: do not compute
                }
                let queued = enqueued.elapsed();
                let result = run_one(&mut analyzer, &bytes, &limits, queued);
                let _ = reply.send(result);
            }
        }
    }
}

fn run_one(analyzer: &mut FaceAnalyzer, bytes: &[u8], limits: &ImageLimits, queued: Duration) -> Result<Analysis, EngineError> {
    let mut times = StageTimes::default();
    let t = Instant::now();
    let DecodedImage { rgb, kind } = decode(bytes, limits).map_err(EngineError::Image)?;
    times.decode = t.elapsed();
    let faces = analyzer.analyze(&rgb, &mut times).map_err(|e| match e {
        e @ (FaceError::InvalidImage(_) | FaceError::ImageTooLarge { .. }) => EngineError::Image(e),
        other => EngineError::Internal(other.to_string()),
    })?;
    Ok(Analysis { faces, kind, width: rgb.width(), height: rgb.height(), times, queued })
}
