//! Faces in, embeddings out: the insightface `FaceAnalysis.get` pipeline in Rust.
//! decode ([`image`]) -> detect ([`detector`], SCRFD) -> align ([`align`]) -> embed
//! ([`recognizer`], ArcFace). Knows nothing of HTTP or databases. A [`FaceAnalyzer`] owns
//! one detector and one recognizer session and is used by one thread at a time.

pub mod align;
pub mod budget;
pub mod crops;
pub mod detector;
pub mod image;
mod jpeg;
pub mod pack;
mod png;
pub mod recognizer;
pub mod resample;

use std::path::Path;
use std::time::{Duration, Instant};

use ::image::RgbImage;
use serde::Serialize;

pub use detector::{DetectOptions, Detection};
pub use pack::PackFiles;
pub use recognizer::{InputNorm, cosine};

use crate::runtime::{Runtime, RuntimeError, Workload};

/// What can go wrong between image bytes and embeddings.
#[derive(Debug, thiserror::Error)]
pub enum FaceError {
    /// The bytes are not an image we can read (unknown format, corrupt, truncated, empty).
    #[error("invalid image: {0}")]
    InvalidImage(String),
    /// The image header declares more pixels than allowed; nothing was decoded.
    #[error("image too large: {width}x{height} pixels (limits: {max_side} px per side, {max_pixels} px in all)")]
    ImageTooLarge { width: u32, height: u32, max_side: u32, max_pixels: u64 },
    /// Decoding would cost more than the budget allows (scans, CPU time, decoded bytes);
    /// nothing more is decoded. Answered like an oversized image (413 `image_too_large`).
    #[error("image too costly to decode: {0}")]
    TooCostly(String),
    /// A model could not run, or answered in an unexpected shape.
    #[error("model error: {0}")]
    Model(String),
    /// The model pack folder is unusable.
    #[error("model pack: {0}")]
    Pack(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Which path found a face (see [`AnalyzerOptions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FoundBy {
    /// The detector, on the image as given.
    Detector,
    /// The detector, on a copy padded by half the image height on every side (tight crops).
    Padded,
    /// No detection: the input has the recognizer's input size and was taken as aligned.
    Aligned,
}

/// One face: where it is, and its embedding.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Face {
    /// x1, y1, x2, y2 in the input image's pixels (may reach outside it a little).
    pub bbox: [f32; 4],
    /// Five keypoints: left eye, right eye, nose, left and right mouth corners.
    pub kps: [[f32; 2]; 5],
    /// Detector confidence (1.0 for an input taken as aligned, which was not detected: never
    /// reported as a score, see [`Face::detected_score`]).
    pub det_score: f32,
    /// L2-normalised embedding.
    pub embedding: Vec<f32>,
    pub found_by: FoundBy,
}

impl Face {
    /// The detector's score, or `None` for an input taken as aligned (nothing was detected).
    pub fn detected_score(&self) -> Option<f32> {
        (self.found_by != FoundBy::Aligned).then_some(self.det_score)
    }

    pub fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]).max(0.0) * (self.bbox[3] - self.bbox[1]).max(0.0)
    }
}

/// Index of the most prominent face: the largest box, then the higher score. What
/// `/api/face/*` embeds: its clients send whole photos, where the subject is the largest face.
pub fn most_prominent(faces: &[Face]) -> Option<usize> {
    (0..faces.len()).max_by(|&a, &b| {
        faces[a].area().total_cmp(&faces[b].area()).then(faces[a].det_score.total_cmp(&faces[b].det_score)).then(b.cmp(&a))
    })
}

/// Index of the face the detector is surest of: the highest score, the earlier face on a tie.
/// insightface's `FaceAnalysis.get` lists faces by score, and the original service took
/// `faces[0]`: the original contract takes this one, so a crop holding several faces is named
/// after the same face as there.
pub fn most_confident(faces: &[Face]) -> Option<usize> {
    (0..faces.len()).max_by(|&a, &b| faces[a].det_score.total_cmp(&faces[b].det_score).then(b.cmp(&a)))
}

/// How the analyzer looks for faces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnalyzerOptions {
    pub detect: DetectOptions,
    /// When the detector finds nothing, retry once on a copy padded by half the image
    /// height on every side, more for detector inputs above 320 (see [`retry_padding`]):
    /// SCRFD misses faces cut tightly by upstream trackers.
    pub pad_retry: bool,
    /// Take an input of exactly the recognizer's size (112x112) as an aligned face, without
    /// detection. Off by default: a plain 112x112 crop (or a grey square) must go through the
    /// detector like any other; only a caller who sends aligned faces turns it on (ALIGNED_INPUT).
    pub aligned_input: bool,
}

impl Default for AnalyzerOptions {
    fn default() -> Self {
        Self { detect: DetectOptions::default(), pad_retry: true, aligned_input: false }
    }
}

impl AnalyzerOptions {
    /// Exactly insightface's `FaceAnalysis.get`: no fallbacks.
    pub fn parity(det_size: u32) -> Self {
        Self {
            detect: DetectOptions { det_size: (det_size, det_size), ..DetectOptions::default() },
            pad_retry: false,
            aligned_input: false,
        }
    }
}

/// Time spent per stage, accumulated over calls.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimes {
    pub decode: Duration,
    pub detect: Duration,
    pub align: Duration,
    pub embed: Duration,
    /// Part of `detect` spent inside ONNX Runtime.
    pub detect_model: Duration,
    /// Part of `embed` spent inside ONNX Runtime.
    pub embed_model: Duration,
}

impl StageTimes {
    pub fn add(&mut self, other: &StageTimes) {
        self.decode += other.decode;
        self.detect += other.detect;
        self.align += other.align;
        self.embed += other.embed;
        self.detect_model += other.detect_model;
        self.embed_model += other.embed_model;
    }

    /// Time outside the models and outside decoding: letterbox, anchor decoding, NMS,
    /// alignment and blob building.
    pub fn pre_post(&self) -> Duration {
        (self.detect + self.align + self.embed).saturating_sub(self.detect_model + self.embed_model)
    }
}

/// Detections and the path that found them.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    pub detections: Vec<Detection>,
    pub found_by: FoundBy,
}

/// Faces located and aligned, waiting for their embeddings (see [`FaceAnalyzer::prepare`]).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// One per face, in the detector's order (score first).
    pub detections: Vec<Detection>,
    /// The aligned crops, one per detection.
    pub crops: Vec<RgbImage>,
    pub found_by: FoundBy,
}

impl Prepared {
    /// Faces, given the embeddings of [`Prepared::crops`] in order.
    pub fn into_faces(self, embeddings: Vec<Vec<f32>>) -> Result<Vec<Face>, FaceError> {
        if embeddings.len() != self.detections.len() {
            return Err(FaceError::Model(format!("{} embeddings for {} faces", embeddings.len(), self.detections.len())));
        }
        let found_by = self.found_by;
        Ok(self
            .detections
            .into_iter()
            .zip(embeddings)
            .map(|(d, embedding)| Face { bbox: d.bbox, kps: d.kps, det_score: d.score, embedding, found_by })
            .collect())
    }
}

/// A detector and a recognizer, ready to analyse images. Not shared between threads:
/// each inference worker owns one.
pub struct FaceAnalyzer {
    detector: detector::Detector,
    recognizer: recognizer::Recognizer,
    files: PackFiles,
    opts: AnalyzerOptions,
}

impl FaceAnalyzer {
    /// Loads the pack in `pack_dir` on `runtime`.
    pub fn load(runtime: &Runtime, pack_dir: &Path, opts: AnalyzerOptions) -> Result<FaceAnalyzer, FaceError> {
        let files = pack::resolve(pack_dir)?;
        Self::from_files(runtime, files, opts)
    }

    /// Loads already-resolved pack files (one resolve, many workers).
    pub fn from_files(runtime: &Runtime, files: PackFiles, opts: AnalyzerOptions) -> Result<FaceAnalyzer, FaceError> {
        // Under INFERENCE_BACKEND=auto the first analyzer decides the backend, timing this
        // pack's own detector (at this input size) and recognizer (one face, and a batch).
        let (w, h) = opts.detect.det_size;
        runtime.decide(&[
            Workload { path: files.detector.clone(), shape: vec![1, 3, h as usize, w as usize] },
            Workload { path: files.recognizer.clone(), shape: vec![1, 3, 112, 112] },
            Workload { path: files.recognizer.clone(), shape: vec![8, 3, 112, 112] },
        ])?;
        let detector = detector::Detector::new(runtime.load_session(&files.detector)?)?;
        let recognizer = recognizer::Recognizer::new(runtime.load_session(&files.recognizer)?, files.recognizer_norm)?;
        Ok(FaceAnalyzer { detector, recognizer, files, opts })
    }

    pub fn files(&self) -> &PackFiles {
        &self.files
    }

    /// The recognizer's id, stored with every embedding it makes.
    pub fn model_id(&self) -> &str {
        &self.files.recognizer_id
    }

    pub fn embedding_dim(&self) -> usize {
        self.recognizer.dim()
    }

    pub fn options(&self) -> &AnalyzerOptions {
        &self.opts
    }

    pub fn set_options(&mut self, opts: AnalyzerOptions) {
        self.opts = opts;
    }

    /// Finds faces, with the fallbacks the options allow.
    pub fn locate(&mut self, img: &RgbImage, times: &mut StageTimes) -> Result<Located, FaceError> {
        let size = self.recognizer.input_size();
        if self.opts.aligned_input && img.dimensions() == (size, size) {
            return Ok(Located { detections: Vec::new(), found_by: FoundBy::Aligned });
        }
        let detections = self.detector.detect(img, &self.opts.detect, &mut times.detect_model)?;
        if !detections.is_empty() || !self.opts.pad_retry {
            return Ok(Located { detections, found_by: FoundBy::Detector });
        }
        let retry = RetryCanvas::new(img, self.detector.input_size(self.opts.detect.det_size));
        let detections = self
            .detector
            .detect(&retry.canvas, &self.opts.detect, &mut times.detect_model)?
            .into_iter()
            .map(|d| retry.to_image(d))
            .collect();
        Ok(Located { detections, found_by: FoundBy::Padded })
    }

    /// Every face in `img` with its embedding, highest detector score first.
    pub fn analyze(&mut self, img: &RgbImage, times: &mut StageTimes) -> Result<Vec<Face>, FaceError> {
        let prepared = self.prepare(img, times)?;
        let embeddings = self.embed_aligned(&prepared.crops, times)?;
        prepared.into_faces(embeddings)
    }

    /// The first half of [`FaceAnalyzer::analyze`]: locate the faces and align each to the
    /// recognizer's input. The crops of several images can then be embedded in one batch
    /// ([`FaceAnalyzer::embed_aligned`]) and handed back with [`Prepared::into_faces`].
    pub fn prepare(&mut self, img: &RgbImage, times: &mut StageTimes) -> Result<Prepared, FaceError> {
        let t = Instant::now();
        let located = self.locate(img, times)?;
        times.detect += t.elapsed();
        if located.found_by == FoundBy::Aligned {
            let (w, h) = (img.width() as f32, img.height() as f32);
            let aligned = Detection { bbox: [0.0, 0.0, w, h], score: 1.0, kps: align::ARCFACE_TEMPLATE };
            return Ok(Prepared { detections: vec![aligned], crops: vec![img.clone()], found_by: FoundBy::Aligned });
        }
        let size = self.recognizer.input_size();
        let t = Instant::now();
        let crops: Vec<RgbImage> = located.detections.iter().map(|d| align::norm_crop(img, &d.kps, size)).collect();
        times.align += t.elapsed();
        Ok(Prepared { detections: located.detections, crops, found_by: located.found_by })
    }

    /// Embeddings of crops that are already aligned to the recognizer's input size.
    pub fn embed_aligned(&mut self, crops: &[RgbImage], times: &mut StageTimes) -> Result<Vec<Vec<f32>>, FaceError> {
        let t = Instant::now();
        let out = self.recognizer.embed(crops, &mut times.embed_model);
        times.embed += t.elapsed();
        out
    }
}

/// Padding for the tight-crop retry: half the image height on every side at a 320 detector
/// input, so the face fills half the padded side (about 160 px of the input, where SCRFD
/// is at ease); larger inputs get proportionally more, so the face reaches the detector at
/// that same size (measured: with only half the height at det 640, most tight crops stay
/// unfound).
pub fn retry_padding(height: u32, det_size: (u32, u32)) -> u32 {
    let side = f64::from(det_size.0.max(det_size.1));
    let factor = ((side / 160.0 - 1.0) / 2.0).max(0.5);
    ((f64::from(height) * factor).round() as u32).max(1)
}

/// The padded copy of the tight-crop retry, and how to map its detections back.
#[derive(Debug, Clone)]
pub struct RetryCanvas {
    pub canvas: RgbImage,
    pub pad: u32,
    /// Image pixels per canvas pixel, per axis (1 unless the image was shrunk first).
    pub scale: (f32, f32),
}

impl RetryCanvas {
    /// `img` padded by [`retry_padding`]. The canvas is letterboxed down to the detector input
    /// anyway, so an image larger than that input is first shrunk to fit it: the detector sees
    /// the same thing, and a faceless 16384 px tall image no longer makes a padded copy of
    /// gigabytes (2441x16384 gave 18825x32768 RGB, 1.85 GB).
    pub fn new(img: &RgbImage, det_size: (u32, u32)) -> RetryCanvas {
        let side = det_size.0.max(det_size.1).max(1);
        let (w, h) = img.dimensions();
        let longest = w.max(h);
        let shrunk = (longest > side).then(|| {
            let f = f64::from(side) / f64::from(longest);
            let (nw, nh) = (((f64::from(w) * f).round() as u32).clamp(1, side), ((f64::from(h) * f).round() as u32).clamp(1, side));
            resample::resize_linear(img, nw, nh)
        });
        let base = shrunk.as_ref().unwrap_or(img);
        let scale = (w as f32 / base.width() as f32, h as f32 / base.height() as f32);
        let pad = retry_padding(base.height(), det_size);
        RetryCanvas { canvas: pad_image(base, pad), pad, scale }
    }

    /// A detection on the canvas, in the image's own coordinates.
    pub fn to_image(&self, d: Detection) -> Detection {
        let mut d = d.shifted(self.pad as f32, self.pad as f32);
        for (i, v) in d.bbox.iter_mut().enumerate() {
            *v *= if i % 2 == 0 { self.scale.0 } else { self.scale.1 };
        }
        for p in &mut d.kps {
            p[0] *= self.scale.0;
            p[1] *= self.scale.1;
        }
        d
    }
}

/// `img` centred on a black canvas with `pad` pixels on every side.
pub fn pad_image(img: &RgbImage, pad: u32) -> RgbImage {
    let mut out = RgbImage::new(img.width() + 2 * pad, img.height() + 2 * pad);
    let (w, ow) = (img.width() as usize * 3, out.width() as usize * 3);
    let src = img.as_raw();
    let dst: &mut [u8] = &mut out;
    for y in 0..img.height() as usize {
        let o = (y + pad as usize) * ow + pad as usize * 3;
        dst[o..o + w].copy_from_slice(&src[y * w..(y + 1) * w]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(bbox: [f32; 4], det_score: f32) -> Face {
        Face { bbox, kps: [[0.0; 2]; 5], det_score, embedding: Vec::new(), found_by: FoundBy::Detector }
    }

    #[test]
    fn most_prominent_is_the_largest_then_the_surest() {
        assert_eq!(most_prominent(&[]), None);
        let faces = [face([0.0, 0.0, 10.0, 10.0], 0.9), face([0.0, 0.0, 20.0, 20.0], 0.6), face([5.0, 5.0, 25.0, 25.0], 0.7)];
        assert_eq!(most_prominent(&faces), Some(2));
    }

    #[test]
    fn most_confident_is_insightfaces_first() {
        assert_eq!(most_confident(&[]), None);
        let faces = [face([0.0, 0.0, 10.0, 10.0], 0.9), face([0.0, 0.0, 20.0, 20.0], 0.6), face([5.0, 5.0, 25.0, 25.0], 0.9)];
        assert_eq!(most_confident(&faces), Some(0), "the highest score; the earlier on a tie");
        assert_eq!(most_prominent(&faces), Some(2), "the largest box");
        assert!(!AnalyzerOptions::default().aligned_input, "no 112x112 shortcut unless asked");
    }

    #[test]
    fn retry_padding_is_half_the_height_at_320_and_grows_with_the_input() {
        assert_eq!(retry_padding(192, (320, 320)), 96);
        assert_eq!(retry_padding(192, (640, 640)), 288);
        assert_eq!(retry_padding(192, (160, 160)), 96);
        assert_eq!(retry_padding(1, (320, 320)), 1);
    }

    #[test]
    fn the_retry_canvas_stays_small_and_maps_back() {
        // A tight crop smaller than the detector input: padded as it is.
        let small = RgbImage::from_pixel(192, 192, ::image::Rgb([9, 8, 7]));
        let r = RetryCanvas::new(&small, (320, 320));
        assert_eq!((r.canvas.dimensions(), r.pad, r.scale), ((384, 384), 96, (1.0, 1.0)));
        // A tall faceless image: shrunk to the input's side before padding.
        let tall = RgbImage::new(2441, 16384);
        let r = RetryCanvas::new(&tall, (320, 320));
        assert!(r.canvas.width() <= 640 && r.canvas.height() <= 640, "{:?}", r.canvas.dimensions());
        let p = r.pad as f32;
        let d = Detection { bbox: [p, p, p + 10.0, p + 20.0], score: 0.9, kps: [[p + 5.0, p + 5.0]; 5] };
        let back = r.to_image(d);
        assert_eq!(back.bbox[0], 0.0);
        assert!((back.bbox[3] - 20.0 * 16384.0 / 320.0).abs() < 1.0, "{:?}", back.bbox);
        assert!((back.kps[0][0] - 5.0 * r.scale.0).abs() < 1e-3);
    }

    #[test]
    fn pad_centres_the_image() {
        let img = RgbImage::from_pixel(3, 2, ::image::Rgb([9, 8, 7]));
        let p = pad_image(&img, 1);
        assert_eq!(p.dimensions(), (5, 4));
        assert_eq!(p.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(p.get_pixel(1, 1).0, [9, 8, 7]);
        assert_eq!(p.get_pixel(3, 2).0, [9, 8, 7]);
        assert_eq!(p.get_pixel(4, 3).0, [0, 0, 0]);
    }
}
