//! The OpenVINO backend: `libopenvino_c` loaded at run time (the `openvino` crate's
//! `runtime-linking`), its CPU plugin reading the same ONNX files through its ONNX
//! frontend. f32 inference precision unless the operator asks otherwise: OpenVINO's default
//! on CPUs with AMX/AVX512-BF16 is bf16, which moves embeddings (cosine min 0.9988 on the
//! shared face set) and was slower here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use openvino::{CompiledModel, Core, DeviceType, ElementType, InferRequest, PartialShape, RwPropertyKey, Shape, Tensor};

use super::{ModelSession, ModelSignature, RuntimeError, RuntimeOptions};
use crate::fetch;

/// OpenVINO's inference precision on CPU (`OPENVINO_PRECISION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Exactly the ONNX model's arithmetic: embeddings match ONNX Runtime's (cosine 1.000000).
    F32,
    /// Faster on CPUs with AMX; changes embeddings a little.
    Bf16,
    F16,
}

impl Precision {
    fn as_ov(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" | "fp16" => Ok(Self::F16),
            other => Err(format!("unknown OpenVINO precision '{other}': expected f32, bf16 or f16")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_ov())
    }
}

/// The loaded OpenVINO core, configured for the CPU. One per process.
pub struct OpenVinoRuntime {
    /// `compile_model` needs the core mutably; it is only used while loading.
    core: Mutex<Core>,
    library: PathBuf,
}

impl fmt::Debug for OpenVinoRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenVinoRuntime").field("library", &self.library).finish()
    }
}

impl OpenVinoRuntime {
    /// Loads `libopenvino_c` (`OPENVINO_LIB_PATH`, else the pinned copy, fetched when
    /// absent) and configures its CPU plugin: one stream, `intra_threads` threads, the
    /// latency hint, the precision asked for. The error says why in one line.
    pub fn init(opts: &RuntimeOptions) -> Result<OpenVinoRuntime, String> {
        let library = match &opts.openvino_path {
            Some(p) if p.is_dir() => p.join(fetch::OPENVINO_C_LIBRARY_FILE),
            Some(p) => p.clone(),
            None => fetch::ensure_openvino(&opts.cache_dir).map_err(|e| e.to_string())?,
        };
        if !library.is_file() {
            return Err(format!("{} is not a file", library.display()));
        }
        openvino_sys::library::load_from(&library)?;
        let mut core = Core::new().map_err(|e| format!("could not start OpenVINO from {}: {e}", library.display()))?;
        let threads = opts.intra_threads.max(1).to_string();
        let cpu = DeviceType::CPU;
        let settings = [
            (RwPropertyKey::HintPerformanceMode, "LATENCY"),
            (RwPropertyKey::NumStreams, "1"),
            (RwPropertyKey::InferenceNumThreads, threads.as_str()),
            (RwPropertyKey::HintInferencePrecision, opts.openvino_precision.as_ov()),
        ];
        for (key, value) in settings {
            core.set_property(&cpu, &key, value).map_err(|e| format!("OpenVINO CPU plugin refused {key:?}={value}: {e}"))?;
        }
        let version = core.versions("CPU").ok().and_then(|v| v.first().map(|(_, v)| v.build_number.clone())).unwrap_or_default();
        tracing::info!(library = %library.display(), %version, precision = %opts.openvino_precision, threads = %threads, "OpenVINO loaded");
        Ok(OpenVinoRuntime { core: Mutex::new(core), library })
    }

    pub fn library_path(&self) -> &Path {
        &self.library
    }

    /// Compiles the ONNX model at `path` for the CPU, its shapes as declared (dynamic
    /// dimensions stay dynamic: measured, static shapes were no faster for these models).
    pub fn load(&self, path: &Path) -> Result<OvSession, RuntimeError> {
        let model_err = |e: String| RuntimeError::Model { path: path.to_path_buf(), reason: e };
        let file = path.to_str().ok_or_else(|| model_err("the path is not UTF-8".into()))?;
        let mut core = self.core.lock().map_err(|_| RuntimeError::OpenVino("core lock poisoned".into()))?;
        let model = core.read_model_from_file(file, "").map_err(|e| model_err(e.to_string()))?;
        let mut compiled = core.compile_model(&model, DeviceType::CPU).map_err(|e| model_err(e.to_string()))?;
        drop(core);
        let ov = |e: openvino::InferenceError| model_err(e.to_string());
        let input = dims(&compiled.get_input_by_index(0).and_then(|n| n.get_partial_shape()).map_err(ov)?);
        let outputs = (0..compiled.get_output_size().map_err(ov)?)
            .map(|i| compiled.get_output_by_index(i).and_then(|n| n.get_partial_shape()).map(|s| dims(&s)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ov)?;
        let request = compiled.create_infer_request().map_err(ov)?;
        Ok(OvSession { _compiled: compiled, request, signature: ModelSignature { input, outputs } })
    }
}

fn dims(shape: &PartialShape) -> Vec<i64> {
    shape.get_dimensions().iter().map(|d| if d.is_dynamic() { -1 } else { d.get_min() }).collect()
}

/// A compiled model and its inference request, behind [`ModelSession`].
pub struct OvSession {
    /// Kept alive for as long as its request.
    _compiled: CompiledModel,
    request: InferRequest,
    signature: ModelSignature,
}

impl ModelSession for OvSession {
    fn signature(&self) -> &ModelSignature {
        &self.signature
    }

    fn run(&mut self, shape: &[usize], input: &[f32]) -> Result<Vec<Vec<f32>>, String> {
        let err = |e: openvino::InferenceError| e.to_string();
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        if dims.iter().product::<i64>() as usize != input.len() {
            return Err(format!("input of {} values for shape {shape:?}", input.len()));
        }
        let mut tensor = Tensor::new(ElementType::F32, &Shape::new(&dims).map_err(err)?).map_err(err)?;
        tensor.get_data_mut::<f32>().map_err(err)?.copy_from_slice(input);
        self.request.set_input_tensor(&tensor).map_err(err)?;
        self.request.infer().map_err(err)?;
        (0..self.signature.outputs.len())
            .map(|i| self.request.get_output_tensor_by_index(i).and_then(|t| t.get_data::<f32>().map(<[f32]>::to_vec)).map_err(err))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_parses() {
        assert_eq!("F32".parse::<Precision>(), Ok(Precision::F32));
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert!("int8".parse::<Precision>().unwrap_err().contains("f32, bf16 or f16"));
    }
}
