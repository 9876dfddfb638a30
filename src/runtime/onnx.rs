//! The ONNX Runtime backend: which shared library is loaded, which execution provider
//! is actually in use, and how sessions are built. The only module that talks to `ort`.
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
use ort::value::TensorRef;

use super::{ModelSession, ModelSignature, RuntimeError, RuntimeOptions};
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

/// The loaded ONNX Runtime and the provider in use. One per process.
pub struct OnnxRuntime {
    env: Environment,
    choice: ProviderChoice,
    dylib: PathBuf,
    intra_threads: usize,
    intra_spinning: bool,
    /// Decided by the first session: CUDA is only known to work once a session ran its registration.
    active: Mutex<Option<ActiveProvider>>,
}

impl fmt::Debug for OnnxRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnnxRuntime")
            .field("choice", &self.choice)
            .field("dylib", &self.dylib)
            .field("active", &self.active_provider())
            .finish()
    }
}

impl OnnxRuntime {
    /// Loads the shared library (fetching it when needed) and creates the environment.
    pub fn init(opts: &RuntimeOptions) -> Result<OnnxRuntime, RuntimeError> {
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
        Ok(OnnxRuntime {
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
    pub fn load_session(&self, path: &Path) -> Result<OrtSession, RuntimeError> {
        let session = self.load_ort_session(path)?;
        Ok(OrtSession::new(session))
    }

    fn load_ort_session(&self, path: &Path) -> Result<Session, RuntimeError> {
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

/// An ONNX Runtime session behind [`ModelSession`].
pub struct OrtSession {
    session: Session,
    signature: ModelSignature,
}

impl OrtSession {
    fn new(session: Session) -> OrtSession {
        let shape = |d: Option<&[i64]>| d.map(<[i64]>::to_vec).unwrap_or_default();
        let input = shape(session.inputs().first().and_then(|i| i.dtype().tensor_shape().map(|s| &**s)));
        let outputs = session.outputs().iter().map(|o| shape(o.dtype().tensor_shape().map(|s| &**s))).collect();
        OrtSession { session, signature: ModelSignature { input, outputs } }
    }
}

impl ModelSession for OrtSession {
    fn signature(&self) -> &ModelSignature {
        &self.signature
    }

    fn run(&mut self, shape: &[usize], input: &[f32]) -> Result<Vec<Vec<f32>>, String> {
        let tensor = TensorRef::from_array_view((shape.to_vec(), input)).map_err(|e| e.to_string())?;
        let outputs = self.session.run(ort::inputs![tensor]).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(outputs.len());
        for (_, value) in outputs.iter() {
            let (_, data) = value.try_extract_tensor::<f32>().map_err(|e| e.to_string())?;
            out.push(data.to_vec());
        }
        Ok(out)
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
