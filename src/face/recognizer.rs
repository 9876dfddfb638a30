//! ArcFace recognition: aligned crops in, L2-normalised embeddings out, in batches
//! (the model takes N x 3 x S x S). Input normalisation follows insightface: (x-127.5)/127.5
//! RGB, or raw 0..255 for models that carry their own Sub/Mul (see `pack`).

use std::time::{Duration, Instant};

use super::FaceError;
use crate::runtime::ModelSession;
use image::RgbImage;

/// Per-channel input normalisation: (x - mean) / std.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputNorm {
    pub mean: f32,
    pub std: f32,
}

impl InputNorm {
    /// The usual ArcFace normalisation.
    pub const ARCFACE: InputNorm = InputNorm { mean: 127.5, std: 127.5 };
    /// Models whose graph normalises its own input.
    pub const RAW: InputNorm = InputNorm { mean: 0.0, std: 1.0 };
}

/// The ArcFace recognizer session.
pub struct Recognizer {
    session: Box<dyn ModelSession>,
    input_size: u32,
    norm: InputNorm,
    dim: usize,
    /// The model's batch dimension when it is fixed (1 for some exports).
    fixed_batch: Option<usize>,
}

impl Recognizer {
    /// Wraps a session whose input is N x 3 x S x S and output N x D.
    pub fn new(session: Box<dyn ModelSession>, norm: InputNorm) -> Result<Recognizer, FaceError> {
        let shape = session.signature().input.clone();
        if shape.len() != 4 || shape[2] != shape[3] || shape[2] < 112 || shape[2] % 16 != 0 {
            return Err(FaceError::Model(format!("not an ArcFace recognizer: input shape {shape:?}")));
        }
        let out = session.signature().outputs.first().cloned().unwrap_or_default();
        let dim = match out.last() {
            Some(&d) if d > 0 => d as usize,
            _ => return Err(FaceError::Model(format!("recognizer output shape {out:?} has no embedding size"))),
        };
        Ok(Recognizer { session, input_size: shape[2] as u32, norm, dim, fixed_batch: (shape[0] > 0).then_some(shape[0] as usize) })
    }

    /// Side of the square aligned crop the model takes (112 for ArcFace).
    pub fn input_size(&self) -> u32 {
        self.input_size
    }

    /// Embedding length (512 for ArcFace).
    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn norm(&self) -> InputNorm {
        self.norm
    }

    /// L2-normalised embeddings of aligned crops, one per crop, in order.
    /// `model_time` grows by the time spent inside ONNX Runtime.
    pub fn embed(&mut self, crops: &[RgbImage], model_time: &mut Duration) -> Result<Vec<Vec<f32>>, FaceError> {
        let mut out = Vec::with_capacity(crops.len());
        let chunk = self.fixed_batch.unwrap_or(usize::MAX).max(1);
        for group in crops.chunks(chunk) {
            out.extend(self.embed_batch(group, model_time)?);
        }
        Ok(out)
    }

    fn embed_batch(&mut self, crops: &[RgbImage], model_time: &mut Duration) -> Result<Vec<Vec<f32>>, FaceError> {
        if crops.is_empty() {
            return Ok(Vec::new());
        }
        let s = self.input_size as usize;
        let blob = to_blob(crops, self.input_size, self.norm)?;
        let n = crops.len();
        let started = Instant::now();
        let outputs = self.session.run(&[n, 3, s, s], &blob).map_err(FaceError::Model)?;
        *model_time += started.elapsed();
        let data = outputs.first().ok_or_else(|| FaceError::Model("recognizer gave no output".into()))?;
        if data.len() != n * self.dim {
            return Err(FaceError::Model(format!("recognizer returned {} values for {n} faces of {}", data.len(), self.dim)));
        }
        Ok(data.chunks_exact(self.dim).map(l2_normalized).collect())
    }
}

/// NCHW f32 blob of RGB crops, each `size` x `size`, normalised with `norm`.
pub fn to_blob(crops: &[RgbImage], size: u32, norm: InputNorm) -> Result<Vec<f32>, FaceError> {
    let plane = (size * size) as usize;
    let mut blob = vec![0.0f32; crops.len() * 3 * plane];
    let inv_std = (1.0 / f64::from(norm.std)) as f32;
    for (i, crop) in crops.iter().enumerate() {
        if crop.dimensions() != (size, size) {
            return Err(FaceError::Model(format!("aligned crop is {:?}, expected {size}x{size}", crop.dimensions())));
        }
        let base = i * 3 * plane;
        for (o, px) in crop.as_raw().chunks_exact(3).enumerate() {
            blob[base + o] = (f32::from(px[0]) - norm.mean) * inv_std;
            blob[base + plane + o] = (f32::from(px[1]) - norm.mean) * inv_std;
            blob[base + 2 * plane + o] = (f32::from(px[2]) - norm.mean) * inv_std;
        }
    }
    Ok(blob)
}

/// `v / |v|`, computed in f64; a zero vector stays zero.
pub fn l2_normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    if norm > 0.0 && norm.is_finite() { v.iter().map(|&x| (f64::from(x) / norm) as f32).collect() } else { vec![0.0; v.len()] }
}

/// Cosine similarity of two embeddings (f64 accumulation).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa > 0.0 && bb > 0.0 { (ab / (aa.sqrt() * bb.sqrt())) as f32 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_is_planar_rgb_normalised() {
        let crop = RgbImage::from_fn(112, 112, |x, _| image::Rgb([255, 0, x as u8]));
        let blob = to_blob(&[crop.clone(), crop], 112, InputNorm::ARCFACE).expect("right size");
        let plane = 112 * 112;
        assert_eq!(blob.len(), 2 * 3 * plane);
        assert_eq!(blob[0], 1.0);
        assert_eq!(blob[plane], -1.0);
        assert!((blob[2 * plane + 5] - (5.0 - 127.5) / 127.5).abs() < 1e-7);
        assert_eq!(blob[3 * plane], 1.0, "second crop starts after three planes");
        assert!(to_blob(&[RgbImage::new(100, 112)], 112, InputNorm::ARCFACE).is_err());
    }

    #[test]
    fn normalise_and_cosine() {
        let v = l2_normalized(&[3.0, 4.0]);
        assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7);
        assert_eq!(l2_normalized(&[0.0, 0.0]), vec![0.0, 0.0]);
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
