//! The inference runtime: which backend runs the models (ONNX Runtime or OpenVINO), on
//! which execution provider, and how model sessions are built. `face/` asks it for
//! [`ModelSession`]s and never sees either library: the model files, the pre- and
//! post-processing and the parity rules are the same on both.
//!
//! - [`onnx`]: ONNX Runtime through `ort` (CPU, and CUDA with the `cuda` feature).
//! - [`openvino`]: OpenVINO's CPU plugin through the `openvino` crate (f32 unless asked).
//! - [`probe`]: `INFERENCE_BACKEND=auto` times both on the pack's own models at start.
//!
//! Both libraries are loaded at run time from pinned copies that [`crate::fetch`] takes
//! from PyPI (or from `ORT_DYLIB_PATH` / `OPENVINO_LIB_PATH`).

pub mod onnx;
pub mod openvino;
pub mod probe;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

pub use onnx::{ActiveProvider, ProviderChoice};
pub use openvino::Precision;

use crate::fetch;

/// Which inference library the operator asked for (`INFERENCE_BACKEND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// The faster of the two on this machine, measured at start ([`probe`]); ONNX Runtime
    /// when OpenVINO cannot be loaded, or when CUDA is in use.
    Auto,
    OnnxRuntime,
    /// OpenVINO or refuse to start.
    OpenVino,
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "onnxruntime" | "ort" | "onnx" => Ok(Self::OnnxRuntime),
            "openvino" | "ov" => Ok(Self::OpenVino),
            other => Err(format!("unknown inference backend '{other}': expected auto, onnxruntime or openvino")),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::OnnxRuntime => "onnxruntime",
            Self::OpenVino => "openvino",
        })
    }
}

/// The backend sessions really run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ActiveBackend {
    OnnxRuntime,
    OpenVino,
}

impl fmt::Display for ActiveBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OnnxRuntime => "onnxruntime",
            Self::OpenVino => "openvino",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    #[error(
        "could not load ONNX Runtime from {path}: {reason}. Point ORT_DYLIB_PATH at a libonnxruntime.so of version 1.31, or unset it to use the cached copy"
    )]
    Load { path: PathBuf, reason: String },
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error(
        "INFERENCE_BACKEND=openvino, but OpenVINO could not be loaded: {0}. Point OPENVINO_LIB_PATH at the libopenvino_c.so of OpenVINO 2026.4 (with its CPU plugin and ONNX frontend beside it), unset it to use the cached copy, or set INFERENCE_BACKEND=auto or onnxruntime"
    )]
    OpenVinoUnavailable(String),
    #[error("OpenVINO: {0}")]
    OpenVino(String),
    #[error(
        "EXECUTION_PROVIDER=cuda, but this build has no CUDA support: rebuild with `cargo build --release --features cuda`, or set EXECUTION_PROVIDER=auto or cpu"
    )]
    CudaNotBuilt,
    #[error(
        "EXECUTION_PROVIDER=cuda, but the CUDA provider could not start: {0}. Check the GPU driver, CUDA 12 and cuDNN 9 libraries, or set EXECUTION_PROVIDER=auto or cpu"
    )]
    CudaUnavailable(String),
    #[error("INFERENCE_BACKEND=openvino with EXECUTION_PROVIDER=cuda: CUDA runs on ONNX Runtime only; set one of them to auto")]
    CudaNeedsOnnxRuntime,
    #[error("could not load model {path}: {reason}")]
    Model { path: PathBuf, reason: String },
}

/// Options for [`Runtime::init`].
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub backend: BackendChoice,
    pub provider: ProviderChoice,
    /// Where the cached libraries live (the model cache directory).
    pub cache_dir: PathBuf,
    /// `ORT_DYLIB_PATH`, when set.
    pub dylib_path: Option<PathBuf>,
    /// `OPENVINO_LIB_PATH`, when set: the `libopenvino_c` file or its folder.
    pub openvino_path: Option<PathBuf>,
    /// OpenVINO's inference precision (f32 unless asked: bf16 moves embeddings).
    pub openvino_precision: Precision,
    /// Threads per session, on either backend.
    pub intra_threads: usize,
    /// Whether idle ONNX Runtime threads spin after a run (its default) or sleep.
    pub intra_spinning: bool,
}

impl RuntimeOptions {
    /// CPU on ONNX Runtime, `threads` per session, the cache in `cache_dir`: for tests and tools.
    pub fn cpu(cache_dir: impl Into<PathBuf>, backend: BackendChoice, threads: usize) -> RuntimeOptions {
        RuntimeOptions {
            backend,
            provider: ProviderChoice::Cpu,
            cache_dir: cache_dir.into(),
            dylib_path: None,
            openvino_path: None,
            openvino_precision: Precision::F32,
            intra_threads: threads,
            intra_spinning: false,
        }
    }
}

/// Shapes a model declares for its first input and for each output (-1: any size).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelSignature {
    pub input: Vec<i64>,
    pub outputs: Vec<Vec<i64>>,
}

/// One loaded model, run by one thread at a time: an f32 NCHW tensor in, every output
/// out (flattened, in the model's order). Implemented by both backends.
pub trait ModelSession: Send {
    fn signature(&self) -> &ModelSignature;
    /// Runs the model on `input` of `shape`; returns every output, in order.
    fn run(&mut self, shape: &[usize], input: &[f32]) -> Result<Vec<Vec<f32>>, String>;
}

/// A model the [`probe`] times: its file and an input shape to run it on.
#[derive(Debug, Clone)]
pub struct Workload {
    pub path: PathBuf,
    pub shape: Vec<usize>,
}

/// The loaded backends and the one in use. One per process.
pub struct Runtime {
    onnx: Option<onnx::OnnxRuntime>,
    openvino: Option<openvino::OpenVinoRuntime>,
    choice: BackendChoice,
    /// Decided at init, or by the first [`Runtime::decide`] under `auto`.
    active: Mutex<Option<ActiveBackend>>,
    /// Why the backend in use was chosen, for the start-up log and `/health`.
    reason: Mutex<String>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime").field("choice", &self.choice).field("active", &self.active_backend()).finish()
    }
}

impl Runtime {
    /// Loads the libraries the choice needs (fetching them when needed).
    ///
    /// `onnxruntime` loads ONNX Runtime only; `openvino` loads OpenVINO or fails; `auto`
    /// loads ONNX Runtime and tries OpenVINO (one warning when it cannot), then decides on
    /// the first [`Runtime::decide`]. CUDA keeps ONNX Runtime.
    pub fn init(opts: &RuntimeOptions) -> Result<Runtime, RuntimeError> {
        let cuda_wanted = cfg!(feature = "cuda") && opts.provider != ProviderChoice::Cpu;
        if opts.backend == BackendChoice::OpenVino && opts.provider == ProviderChoice::Cuda {
            return Err(RuntimeError::CudaNeedsOnnxRuntime);
        }
        let (onnx, openvino, active, reason) = match opts.backend {
            BackendChoice::OnnxRuntime => {
                (Some(onnx::OnnxRuntime::init(opts)?), None, Some(ActiveBackend::OnnxRuntime), "INFERENCE_BACKEND=onnxruntime".to_owned())
            }
            BackendChoice::OpenVino => {
                let ov = openvino::OpenVinoRuntime::init(opts).map_err(RuntimeError::OpenVinoUnavailable)?;
                (None, Some(ov), Some(ActiveBackend::OpenVino), "INFERENCE_BACKEND=openvino".to_owned())
            }
            BackendChoice::Auto if cuda_wanted => {
                (Some(onnx::OnnxRuntime::init(opts)?), None, Some(ActiveBackend::OnnxRuntime), "auto: CUDA runs on ONNX Runtime".to_owned())
            }
            BackendChoice::Auto => {
                let ort = onnx::OnnxRuntime::init(opts)?;
                match openvino::OpenVinoRuntime::init(opts) {
                    Ok(ov) => (Some(ort), Some(ov), None, String::new()),
                    Err(e) => {
                        tracing::warn!(reason = %e, "OpenVINO unavailable: INFERENCE_BACKEND=auto falls back to ONNX Runtime");
                        (Some(ort), None, Some(ActiveBackend::OnnxRuntime), format!("auto: OpenVINO unavailable ({e})"))
                    }
                }
            }
        };
        let rt = Runtime { onnx, openvino, choice: opts.backend, active: Mutex::new(active), reason: Mutex::new(reason) };
        if let Some(b) = active {
            tracing::info!(backend = %b, reason = %rt.backend_reason(), "inference backend in use");
        }
        Ok(rt)
    }

    /// The backend in use, once decided.
    pub fn active_backend(&self) -> Option<ActiveBackend> {
        self.active.lock().map(|g| *g).unwrap_or(None)
    }

    /// Why that backend was chosen ("auto: openvino 9.8 ms against onnxruntime 17.1 ms ...").
    pub fn backend_reason(&self) -> String {
        self.reason.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// The execution provider in use (always CPU on OpenVINO).
    pub fn active_provider(&self) -> Option<ActiveProvider> {
        match self.active_backend() {
            Some(ActiveBackend::OpenVino) => Some(ActiveProvider::Cpu),
            _ => self.onnx.as_ref().and_then(|o| o.active_provider()),
        }
    }

    /// The ONNX Runtime library file, when ONNX Runtime is loaded.
    pub fn library_path(&self) -> Option<&Path> {
        self.onnx.as_ref().map(|o| o.library_path())
    }

    /// Under `auto`, with both backends loaded, times `workloads` on each ([`probe`]) and
    /// keeps the faster; otherwise does nothing. Idempotent: the first call decides.
    pub fn decide(&self, workloads: &[Workload]) -> Result<ActiveBackend, RuntimeError> {
        if let Some(b) = self.active_backend() {
            return Ok(b);
        }
        let (Some(ort), Some(ov)) = (&self.onnx, &self.openvino) else {
            return Err(RuntimeError::Ort("no inference backend loaded".into()));
        };
        let outcome = probe::compare(ort, ov, workloads);
        let mut guard = self.active.lock().map_err(|_| RuntimeError::Ort("runtime lock poisoned".into()))?;
        if let Some(b) = *guard {
            return Ok(b);
        }
        *guard = Some(outcome.winner);
        if let Ok(mut r) = self.reason.lock() {
            *r = outcome.reason.clone();
        }
        tracing::info!(backend = %outcome.winner, reason = %outcome.reason, "inference backend in use");
        Ok(outcome.winner)
    }

    /// Builds a session for the model at `path` on the backend in use. Under `auto`, call
    /// [`Runtime::decide`] first; an undecided runtime loads on ONNX Runtime.
    pub fn load_session(&self, path: &Path) -> Result<Box<dyn ModelSession>, RuntimeError> {
        match (self.active_backend(), &self.onnx, &self.openvino) {
            (Some(ActiveBackend::OpenVino), _, Some(ov)) => Ok(Box::new(ov.load(path)?)),
            (_, Some(ort), _) => Ok(Box::new(ort.load_session(path)?)),
            (_, None, Some(ov)) => Ok(Box::new(ov.load(path)?)),
            (_, None, None) => Err(RuntimeError::Ort("no inference backend loaded".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_choice_parses() {
        assert_eq!("auto".parse::<BackendChoice>(), Ok(BackendChoice::Auto));
        assert_eq!(" OpenVINO ".parse::<BackendChoice>(), Ok(BackendChoice::OpenVino));
        assert_eq!("onnxruntime".parse::<BackendChoice>(), Ok(BackendChoice::OnnxRuntime));
        assert!("tensorrt".parse::<BackendChoice>().unwrap_err().contains("auto, onnxruntime or openvino"));
    }
}
