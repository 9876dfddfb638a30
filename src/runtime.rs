//! The ONNX Runtime environment: which shared library is loaded, which execution provider
//! is actually in use, and how sessions are built. The only module that talks to `ort`'s
//! environment; `face/` asks it for sessions.
//!
//! The library is loaded dynamically (`ort`'s `load-dynamic`): `ORT_DYLIB_PATH` if set,
//! else the copy cached by [`crate::fetch`], fetched from PyPI on first use.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use ort::environment::Environment;
use ort::logging::LogLevel;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};

use crate::fetch::{self, RuntimeFlavor};

/// What the operator asked for (`EXECUTION_PROVIDER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderChoice {
    /// CUDA when this build has it and a GPU answers; otherwise CPU with a warning.
    Auto,
    Cpu,
    /// CUDA or refuse to start.
    Cuda,
}

impl FromStr for ProviderChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            other => Err(format!("unknown execution provider '{other}': expected auto, cpu or cuda")),
        }
    }
}

impl fmt::Display for ProviderChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

/// The execution provider sessions really run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveProvider {
    Cpu,
    Cuda,
}

impl fmt::Display for ActiveProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
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
        "EXECUTION_PROVIDER=cuda, but this build has no CUDA support: rebuild with `cargo build --release --features cuda`, or set EXECUTION_PROVIDER=auto or cpu"
    )]
    CudaNotBuilt,
    #[error(
        "EXECUTION_PROVIDER=cuda, but the CUDA provider could not start: {0}. Check the GPU driver, CUDA 12 and cuDNN 9 libraries, or set EXECUTION_PROVIDER=auto or cpu"
    )]
    CudaUnavailable(String),
    #[error("could not load model {path}: {reason}")]
    Model { path: PathBuf, reason: String },
}

/// Options for [`Runtime::init`].
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub provider: ProviderChoice,
    /// Where the cached ONNX Runtime library lives (the model cache directory).
    pub cache_dir: PathBuf,
    /// `ORT_DYLIB_PATH`, when set.
    pub dylib_path: Option<PathBuf>,
    /// ONNX Runtime intra-op threads per session.
    pub intra_threads: usize,
    /// Whether idle intra-op threads spin after a run (ONNX Runtime's default) or sleep.
    pub intra_spinning: bool,
}

/// The loaded ONNX Runtime and the provider in use. One per process.
pub struct Runtime {
    env: Environment,
    choice: ProviderChoice,
    dylib: PathBuf,
    intra_threads: usize,
    intra_spinning: bool,
    /// Decided by the first session: CUDA is only known to work once a session ran its registration.
    active: Mutex<Option<ActiveProvider>>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("choice", &self.choice)
            .field("dylib", &self.dylib)
            .field("active", &self.active_provider())
            .finish()
    }
}

impl Runtime {
    /// Loads the shared library (fetching it when needed) and creates the environment.
    pub fn init(opts: &RuntimeOptions) -> Result<Runtime, RuntimeError> {
        if opts.provider == ProviderChoice::Cuda && !cfg!(feature = "cuda") {
            return Err(RuntimeError::CudaNotBuilt);
        }
        let flavor = if cfg!(feature = "cuda") && opts.provider != ProviderChoice::Cpu { RuntimeFlavor::Gpu } else { RuntimeFlavor::Cpu };
        let dylib = match &opts.dylib_path {
            Some(p) => p.clone(),
            None => fetch::ensure_runtime(&opts.cache_dir, flavor)?,
        };
        if !dylib.is_file() {
            return Err(RuntimeError::Load { path: dylib, reason: "no such file".into() });
        }
        let builder = ort::init_from(&dylib).map_err(|e| RuntimeError::Load { path: dylib.clone(), reason: e.to_string() })?;
        let env = builder.with_name("facerec").with_telemetry(false).build().map_err(|e| RuntimeError::Ort(e.to_string()))?;
        tracing::info!(library = %dylib.display(), requested = %opts.provider, "ONNX Runtime loaded");
        Ok(Runtime {
            env,
            choice: opts.provider,
            dylib,
            intra_threads: opts.intra_threads.max(1),
            intra_spinning: opts.intra_spinning,
            active: Mutex::new(if opts.provider == ProviderChoice::Cpu || !cfg!(feature = "cuda") {
                Some(ActiveProvider::Cpu)
            } else {
                None
            }),
        })
    }

    /// The library file in use.
    pub fn library_path(&self) -> &Path {
        &self.dylib
    }

    /// The provider sessions run on, once the first session has been built.
    pub fn active_provider(&self) -> Option<ActiveProvider> {
        self.active.lock().map(|g| *g).unwrap_or(None)
    }

    fn base_builder(&self) -> Result<SessionBuilder, RuntimeError> {
        let ort_err = |e: ort::Error<SessionBuilder>| RuntimeError::Ort(e.to_string());
        Session::builder(&self.env)
            .map_err(|e| RuntimeError::Ort(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(ort_err)?
            .with_intra_threads(self.intra_threads)
            .map_err(ort_err)?
            .with_inter_threads(1)
            .map_err(ort_err)?
            // Spinning pool threads of one session take the cores the other session (the
            // detector's and the recognizer's run one after the other) and the HTTP side need:
            // measured, the single-face pipeline at 2 threads went from 30 to 18 ms without it.
            .with_intra_op_spinning(self.intra_spinning)
            .map_err(ort_err)?
            // A recognizer declares its output as {1,512} and answers {N,512} for batches:
            // ONNX Runtime warns on every such run at Warning level.
            .with_log_level(LogLevel::Error)
            .map_err(ort_err)
    }

    /// Builds a session for `path` on the provider in use (deciding it on the first call).
    pub fn load_session(&self, path: &Path) -> Result<Session, RuntimeError> {
        let model_err = |e: String| RuntimeError::Model { path: path.to_path_buf(), reason: e };
        let decided = self.active_provider();
        if decided == Some(ActiveProvider::Cpu) {
            return self.commit_cpu(path);
        }
        match self.commit_cuda(path) {
            Ok(session) => {
                self.set_active(ActiveProvider::Cuda);
                Ok(session)
            }
            Err(reason) if self.choice == ProviderChoice::Auto && decided.is_none() => {
                tracing::warn!(%reason, "CUDA execution provider unavailable: falling back to CPU");
                self.set_active(ActiveProvider::Cpu);
                self.commit_cpu(path)
            }
            Err(reason) if decided == Some(ActiveProvider::Cuda) => Err(model_err(reason)),
            Err(reason) => Err(RuntimeError::CudaUnavailable(reason)),
        }
    }

    fn set_active(&self, p: ActiveProvider) {
        if let Ok(mut g) = self.active.lock() {
            if g.is_none() {
                tracing::info!(provider = %p, "execution provider in use");
            }
            *g = Some(p);
        }
    }

    fn commit_cpu(&self, path: &Path) -> Result<Session, RuntimeError> {
        let model_err = |e: String| RuntimeError::Model { path: path.to_path_buf(), reason: e };
        let mut b = self
            .base_builder()?
            .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(true).build()])
            .map_err(|e| model_err(e.to_string()))?;
        b.commit_from_file(path).map_err(|e| model_err(e.to_string()))
    }

    #[cfg(feature = "cuda")]
    fn commit_cuda(&self, path: &Path) -> Result<Session, String> {
        let mut b = self
            .base_builder()
            .map_err(|e| e.to_string())?
            .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
            .map_err(|e| e.to_string())?;
        b.commit_from_file(path).map_err(|e| e.to_string())
    }

    #[cfg(not(feature = "cuda"))]
    fn commit_cuda(&self, _path: &Path) -> Result<Session, String> {
        Err("this build has no CUDA support (cargo feature `cuda`)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_choice_parses() {
        assert_eq!("auto".parse::<ProviderChoice>(), Ok(ProviderChoice::Auto));
        assert_eq!(" CPU ".parse::<ProviderChoice>(), Ok(ProviderChoice::Cpu));
        assert_eq!("cuda".parse::<ProviderChoice>(), Ok(ProviderChoice::Cuda));
        assert!("tpu".parse::<ProviderChoice>().unwrap_err().contains("auto, cpu or cuda"));
    }
}
