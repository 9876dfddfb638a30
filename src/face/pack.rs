//! Model packs: a folder of InsightFace ONNX files. Which file is the detector and which
//! the recognizer is read from each graph's inputs and outputs, as insightface's model zoo
//! does (five or more outputs: SCRFD; a square N x 3 x S x S input with S >= 112 and
//! S % 16 == 0: ArcFace), so `buffalo_sc`, `buffalo_l` or any such pack works unchanged.
//! The graphs are read with a small protobuf walker; no ONNX Runtime session is needed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::FaceError;
use super::recognizer::InputNorm;

/// What a pack folder holds, resolved to files.
#[derive(Debug, Clone, PartialEq)]
pub struct PackFiles {
    pub detector: PathBuf,
    pub recognizer: PathBuf,
    /// Input normalisation the recognizer expects.
    pub recognizer_norm: InputNorm,
    /// `<file stem>@<first 12 hex of sha256>`: stored with every embedding.
    pub recognizer_id: String,
}

/// What we read from one ONNX file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GraphSummary {
    /// Shape of the first true input (initializers excluded); `None` for a symbolic dimension.
    pub input_shape: Vec<Option<i64>>,
    pub inputs: usize,
    pub outputs: usize,
    /// Names of the first eight nodes.
    pub first_node_names: Vec<String>,
}

/// The role insightface would give a model with this graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Detector,
    Recognizer,
    /// Landmark, attribute, swapper or anything else: not used here.
    Other,
}

impl GraphSummary {
    pub fn role(&self) -> Role {
        let s = &self.input_shape;
        if self.outputs >= 5 {
            Role::Detector
        } else if s.len() == 4 && matches!((s[2], s[3]), (Some(192), Some(192)) | (Some(96), Some(96)))
            || (self.inputs == 2 && s.len() == 4 && s[2] == Some(128) && s[3] == Some(128))
        {
            // Landmark (192), attribute (96) and swapper (two inputs, 128) models.
            Role::Other
        } else if s.len() == 4 && s[2].is_some() && s[2] == s[3] && s[2].is_some_and(|v| v >= 112 && v % 16 == 0) {
            Role::Recognizer
        } else {
            Role::Other
        }
    }

    /// insightface's rule: Sub and Mul among the first eight nodes mean the graph
    /// normalises its own input (mxnet-era models), so feed raw 0..255.
    pub fn recognizer_norm(&self) -> InputNorm {
        let sub = self.first_node_names.iter().any(|n| n.starts_with("Sub") || n.starts_with("_minus"));
        let mul = self.first_node_names.iter().any(|n| n.starts_with("Mul") || n.starts_with("_mul"));
        if sub && mul { InputNorm::RAW } else { InputNorm::ARCFACE }
    }
}

/// Resolves the detector and recognizer of the pack in `dir` (files sorted by name; the
/// first of each role wins, like insightface).
pub fn resolve(dir: &Path) -> Result<PackFiles, FaceError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| FaceError::Pack(format!("cannot read model pack folder {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("onnx")) && p.is_file())
        .collect();
    files.sort();
    let (mut detector, mut recognizer) = (None, None);
    for path in files {
        let bytes = std::fs::read(&path).map_err(|e| FaceError::Pack(format!("cannot read {}: {e}", path.display())))?;
        let summary = summarize(&bytes).map_err(|e| FaceError::Pack(format!("{} is not a readable ONNX model: {e}", path.display())))?;
        match summary.role() {
            Role::Detector if detector.is_none() => detector = Some(path),
            Role::Recognizer if recognizer.is_none() => {
                let digest = Sha256::digest(&bytes);
                let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
                let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                recognizer = Some((path, summary.recognizer_norm(), format!("{stem}@{hex}")));
            }
            _ => {}
        }
    }
    let detector =
        detector.ok_or_else(|| FaceError::Pack(format!("no SCRFD detector (an ONNX file with 5+ outputs) in {}", dir.display())))?;
    let (recognizer, recognizer_norm, recognizer_id) = recognizer.ok_or_else(|| {
        FaceError::Pack(format!("no ArcFace recognizer (an ONNX file with an N x 3 x 112 x 112 input) in {}", dir.display()))
    })?;
    Ok(PackFiles { detector, recognizer, recognizer_norm, recognizer_id })
}

/// Reads the parts of an ONNX `ModelProto` that decide a model's role.
pub fn summarize(model: &[u8]) -> Result<GraphSummary, String> {
    let mut graph = None;
    for field in Fields::new(model) {
        let (num, value) = field?;
        if let (7, Value::Bytes(b)) = (num, value) {
            graph = Some(b);
        }
    }
    let graph = graph.ok_or("no graph")?;
    let mut initializers = HashSet::new();
    let mut inputs: Vec<&[u8]> = Vec::new();
    let mut outputs = 0;
    let mut first_node_names = Vec::new();
    for field in Fields::new(graph) {
        match field? {
            (1, Value::Bytes(node)) if first_node_names.len() < 8 => {
                first_node_names.push(string_field(node, 3)?.unwrap_or_default());
            }
            (5, Value::Bytes(tensor)) => {
                if let Some(name) = string_field(tensor, 8)? {
                    initializers.insert(name);
                }
            }
            (11, Value::Bytes(vi)) => inputs.push(vi),
            (12, Value::Bytes(_)) => outputs += 1,
            _ => {}
        }
    }
    let mut true_inputs = Vec::new();
    for vi in inputs {
        if !initializers.contains(&string_field(vi, 1)?.unwrap_or_default()) {
            true_inputs.push(vi);
        }
    }
    let input_shape = match true_inputs.first() {
        Some(vi) => value_info_shape(vi)?,
        None => Vec::new(),
    };
    Ok(GraphSummary { input_shape, inputs: true_inputs.len(), outputs, first_node_names })
}

fn value_info_shape(vi: &[u8]) -> Result<Vec<Option<i64>>, String> {
    let ty = bytes_field(vi, 2)?.unwrap_or_default();
    let tensor = bytes_field(ty, 1)?.unwrap_or_default();
    let shape = bytes_field(tensor, 2)?.unwrap_or_default();
    let mut dims = Vec::new();
    for field in Fields::new(shape) {
        if let (1, Value::Bytes(dim)) = field? {
            let mut v = None;
            for f in Fields::new(dim) {
                if let (1, Value::Varint(x)) = f? {
                    v = Some(x as i64);
                }
            }
            dims.push(v);
        }
    }
    Ok(dims)
}

fn bytes_field(msg: &[u8], num: u64) -> Result<Option<&[u8]>, String> {
    let mut found = None;
    for f in Fields::new(msg) {
        if let (n, Value::Bytes(b)) = f?
            && n == num
        {
            found = Some(b);
        }
    }
    Ok(found)
}

fn string_field(msg: &[u8], num: u64) -> Result<Option<String>, String> {
    Ok(bytes_field(msg, num)?.map(|b| String::from_utf8_lossy(b).into_owned()))
}

/// One protobuf field value.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Iterates the top-level fields of a protobuf message.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields { buf, pos: 0, failed: false }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or("truncated field")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn field(&mut self) -> Result<(u64, Value<'a>), String> {
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok((key >> 3, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), String>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let r = self.field();
        self.failed = r.is_err();
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn field(num: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(num << 3 | 2, &mut out);
        varint(payload.len() as u64, &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn value_info(name: &str, dims: &[Option<i64>]) -> Vec<u8> {
        let mut shape = Vec::new();
        for d in dims {
            let dim = match d {
                Some(v) => {
                    let mut b = vec![1 << 3];
                    varint(*v as u64, &mut b);
                    b
                }
                None => field(2, b"N"),
            };
            shape.extend(field(1, &dim));
        }
        let tensor = [vec![1 << 3, 1], field(2, &shape)].concat();
        [field(1, name.as_bytes()), field(2, &field(1, &tensor))].concat()
    }

    fn model(nodes: &[&str], inputs: &[Vec<u8>], initializers: &[&str], outputs: usize) -> Vec<u8> {
        let mut g = Vec::new();
        for n in nodes {
            g.extend(field(1, &field(3, n.as_bytes())));
        }
        for i in initializers {
            g.extend(field(5, &field(8, i.as_bytes())));
        }
        for i in inputs {
            g.extend(field(11, i));
        }
        for k in 0..outputs {
            g.extend(field(12, &value_info(&format!("out{k}"), &[None])));
        }
        [vec![8, 7], field(7, &g)].concat() // ir_version = 7, graph
    }

    #[test]
    fn recognises_a_recognizer_and_its_normalisation() {
        let m = model(&["Conv_0", "Sub_1", "Mul_2"], &[value_info("data", &[None, Some(3), Some(112), Some(112)])], &[], 1);
        let s = summarize(&m).expect("parses");
        assert_eq!(s.input_shape, vec![None, Some(3), Some(112), Some(112)]);
        assert_eq!(s.role(), Role::Recognizer);
        assert_eq!(s.recognizer_norm(), InputNorm::RAW);
        let m = model(&["Conv_0", "Mul_2"], &[value_info("data", &[Some(1), Some(3), Some(112), Some(112)])], &[], 1);
        assert_eq!(summarize(&m).expect("parses").recognizer_norm(), InputNorm::ARCFACE);
    }

    #[test]
    fn recognises_a_detector_and_skips_initializer_inputs() {
        let inputs = [value_info("weight", &[Some(8)]), value_info("input.1", &[Some(1), Some(3), None, None])];
        let m = model(&["Conv_0"], &inputs, &["weight"], 9);
        let s = summarize(&m).expect("parses");
        assert_eq!(s.inputs, 1);
        assert_eq!(s.input_shape.len(), 4);
        assert_eq!(s.role(), Role::Detector);
    }

    #[test]
    fn landmark_models_are_other() {
        let m = model(&[], &[value_info("data", &[None, Some(3), Some(192), Some(192)])], &[], 1);
        assert_eq!(summarize(&m).expect("parses").role(), Role::Other);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(summarize(&[0xff, 0xff, 0xff]).is_err());
        assert!(summarize(&[0x3a, 0x80]).is_err()); // graph field with truncated length
        assert!(summarize(b"").is_err());
    }
}
