//! SCRFD face detection, step for step as insightface's `SCRFD.detect`: letterbox into the
//! input size anchored top-left (OpenCV's linear resize), (x-127.5)/128 RGB, anchor-centre
//! decoding of the score, box and keypoint tensors of each stride (read by position), score
//! threshold, then greedy NMS with insightface's "+1" areas. All arithmetic in f32 like numpy.

use std::time::{Duration, Instant};

use super::{FaceError, resample};
use crate::runtime::ModelSession;
use image::RgbImage;

/// One detected face, in the coordinates of the image given to [`Detector::detect`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// x1, y1, x2, y2.
    pub bbox: [f32; 4],
    pub score: f32,
    /// Left eye, right eye, nose, left mouth corner, right mouth corner.
    pub kps: [[f32; 2]; 5],
}

impl Detection {
    pub fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]).max(0.0) * (self.bbox[3] - self.bbox[1]).max(0.0)
    }

    /// The same face in a frame shifted by (-dx, -dy).
    pub fn shifted(mut self, dx: f32, dy: f32) -> Detection {
        self.bbox[0] -= dx;
        self.bbox[1] -= dy;
        self.bbox[2] -= dx;
        self.bbox[3] -= dy;
        for p in &mut self.kps {
            p[0] -= dx;
            p[1] -= dy;
        }
        self
    }
}

/// How SCRFD's outputs are laid out, read from the model's output count (as insightface does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrfdLayout {
    pub strides: &'static [u32],
    pub num_anchors: usize,
    pub use_kps: bool,
}

impl ScrfdLayout {
    /// Layout for a model with `outputs` output tensors; `None` when it is no SCRFD.
    pub fn from_output_count(outputs: usize) -> Option<ScrfdLayout> {
        match outputs {
            6 => Some(ScrfdLayout { strides: &[8, 16, 32], num_anchors: 2, use_kps: false }),
            9 => Some(ScrfdLayout { strides: &[8, 16, 32], num_anchors: 2, use_kps: true }),
            10 => Some(ScrfdLayout { strides: &[8, 16, 32, 64, 128], num_anchors: 1, use_kps: false }),
            15 => Some(ScrfdLayout { strides: &[8, 16, 32, 64, 128], num_anchors: 1, use_kps: true }),
            _ => None,
        }
    }
}

/// Detection thresholds (insightface's defaults: 0.5 and 0.4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectOptions {
    /// Input size (width, height) when the model's input is dynamic.
    pub det_size: (u32, u32),
    pub score_threshold: f32,
    pub nms_threshold: f32,
}

impl Default for DetectOptions {
    fn default() -> Self {
        Self { det_size: (640, 640), score_threshold: 0.5, nms_threshold: 0.4 }
    }
}

/// The SCRFD detector session.
pub struct Detector {
    session: Box<dyn ModelSession>,
    layout: ScrfdLayout,
    /// Input (width, height) fixed by the model, when it is not dynamic.
    fixed_size: Option<(u32, u32)>,
}

impl Detector {
    /// Wraps a session whose outputs are SCRFD's.
    pub fn new(session: Box<dyn ModelSession>) -> Result<Detector, FaceError> {
        let sig = session.signature();
        let layout = ScrfdLayout::from_output_count(sig.outputs.len())
            .ok_or_else(|| FaceError::Model(format!("not an SCRFD detector: {} outputs", sig.outputs.len())))?;
        let d = &sig.input;
        let fixed_size = (d.len() == 4 && d[2] > 0 && d[3] > 0).then(|| (d[3] as u32, d[2] as u32));
        Ok(Detector { session, layout, fixed_size })
    }

    pub fn layout(&self) -> ScrfdLayout {
        self.layout
    }

    /// The input size actually used for `requested`: the model's own when it is fixed.
    pub fn input_size(&self, requested: (u32, u32)) -> (u32, u32) {
        self.fixed_size.unwrap_or(requested)
    }

    /// Faces in `img`, highest score first.
    /// `model_time` grows by the time spent inside ONNX Runtime.
    pub fn detect(&mut self, img: &RgbImage, opts: &DetectOptions, model_time: &mut Duration) -> Result<Vec<Detection>, FaceError> {
        let (det_w, det_h) = self.input_size(opts.det_size);
        let lb = letterbox(img, det_w, det_h)?;
        let started = Instant::now();
        let outputs = self.session.run(&[1, 3, det_h as usize, det_w as usize], &lb.blob).map_err(FaceError::Model)?;
        *model_time += started.elapsed();
        let fmc = self.layout.strides.len();
        let mut dets = Vec::new();
        for (idx, &stride) in self.layout.strides.iter().enumerate() {
            let output =
                |i: usize| outputs.get(i).map(Vec::as_slice).ok_or_else(|| FaceError::Model(format!("detector output {i} missing")));
            let (scores, boxes) = (output(idx)?, output(idx + fmc)?);
            let kps = if self.layout.use_kps { Some(output(idx + 2 * fmc)?) } else { None };
            let grid = StrideGrid { stride, width: det_w / stride, height: det_h / stride, num_anchors: self.layout.num_anchors };
            decode_stride(&grid, scores, boxes, kps, opts.score_threshold, &mut dets)?;
        }
        let inv = lb.det_scale;
        for d in &mut dets {
            for v in &mut d.bbox {
                *v /= inv;
            }
            for p in &mut d.kps {
                p[0] /= inv;
                p[1] /= inv;
            }
        }
        Ok(nms(dets, opts.nms_threshold))
    }
}

/// The detector's input: an NCHW f32 blob and the scale from image to blob coordinates.
#[derive(Debug, Clone)]
pub struct Letterboxed {
    pub blob: Vec<f32>,
    pub det_scale: f32,
    pub new_size: (u32, u32),
}

/// The size insightface resizes an image of `w` x `h` to inside a `det_w` x `det_h` input,
/// and the scale (new height / old height), both computed in f64 like Python.
pub fn letterbox_size(w: u32, h: u32, det_w: u32, det_h: u32) -> (u32, u32, f64) {
    let im_ratio = f64::from(h) / f64::from(w);
    let model_ratio = f64::from(det_h) / f64::from(det_w);
    let (new_w, new_h) = if im_ratio > model_ratio {
        let nh = det_h;
        ((f64::from(nh) / im_ratio) as u32, nh)
    } else {
        let nw = det_w;
        (nw, (f64::from(nw) * im_ratio) as u32)
    };
    // An extreme aspect ratio can round a side to 0; OpenCV would refuse, we keep one pixel.
    let (new_w, new_h) = (new_w.clamp(1, det_w), new_h.clamp(1, det_h));
    (new_w, new_h, f64::from(new_h) / f64::from(h))
}

/// Resizes `img` into the top-left corner of a zeroed `det_w` x `det_h` canvas and
/// normalises to (x - 127.5) / 128, RGB, NCHW.
pub fn letterbox(img: &RgbImage, det_w: u32, det_h: u32) -> Result<Letterboxed, FaceError> {
    if img.width() == 0 || img.height() == 0 {
        return Err(FaceError::InvalidImage("image has no pixels".into()));
    }
    if det_w < 32 || det_h < 32 || !det_w.is_multiple_of(32) || !det_h.is_multiple_of(32) {
        return Err(FaceError::Model(format!("detector input {det_w}x{det_h} must be a multiple of 32")));
    }
    let (new_w, new_h, det_scale) = letterbox_size(img.width(), img.height(), det_w, det_h);
    let resized = resample::resize_linear(img, new_w, new_h);
    let plane = (det_w * det_h) as usize;
    let pad = (0.0f32 - 127.5) / 128.0;
    let mut blob = vec![pad; 3 * plane];
    let src = resized.as_raw();
    let (nw, dw) = (new_w as usize, det_w as usize);
    for y in 0..new_h as usize {
        let row = &src[y * nw * 3..(y + 1) * nw * 3];
        for (x, px) in row.chunks_exact(3).enumerate() {
            let o = y * dw + x;
            blob[o] = (f32::from(px[0]) - 127.5) / 128.0;
            blob[plane + o] = (f32::from(px[1]) - 127.5) / 128.0;
            blob[2 * plane + o] = (f32::from(px[2]) - 127.5) / 128.0;
        }
    }
    Ok(Letterboxed { blob, det_scale: det_scale as f32, new_size: (new_w, new_h) })
}

/// The anchor grid of one stride.
#[derive(Debug, Clone, Copy)]
pub struct StrideGrid {
    pub stride: u32,
    pub width: u32,
    pub height: u32,
    pub num_anchors: usize,
}

/// Decodes one stride's tensors (flattened; `scores` K*A, `boxes` K*A*4, `kps` K*A*10) into
/// detections in blob coordinates, keeping scores >= `threshold`.
pub fn decode_stride(
    grid: &StrideGrid,
    scores: &[f32],
    boxes: &[f32],
    kps: Option<&[f32]>,
    threshold: f32,
    out: &mut Vec<Detection>,
) -> Result<(), FaceError> {
    let n = (grid.width * grid.height) as usize * grid.num_anchors;
    let bad = |what: &str, got: usize, want: usize| {
        FaceError::Model(format!("detector stride {}: {what} has {got} values, expected {want}", grid.stride))
    };
    if scores.len() != n {
        return Err(bad("scores", scores.len(), n));
    }
    if boxes.len() != n * 4 {
        return Err(bad("boxes", boxes.len(), n * 4));
    }
    if let Some(k) = kps
        && k.len() != n * 10
    {
        return Err(bad("keypoints", k.len(), n * 10));
    }
    let s = grid.stride as f32;
    for (i, &score) in scores.iter().enumerate() {
        if score < threshold {
            continue;
        }
        let cell = i / grid.num_anchors;
        let cx = (cell % grid.width as usize) as f32 * s;
        let cy = (cell / grid.width as usize) as f32 * s;
        let b = &boxes[i * 4..i * 4 + 4];
        let bbox = [cx - b[0] * s, cy - b[1] * s, cx + b[2] * s, cy + b[3] * s];
        let mut points = [[0.0f32; 2]; 5];
        if let Some(k) = kps {
            let k = &k[i * 10..i * 10 + 10];
            for (j, p) in points.iter_mut().enumerate() {
                *p = [cx + k[2 * j] * s, cy + k[2 * j + 1] * s];
            }
        }
        out.push(Detection { bbox, score, kps: points });
    }
    Ok(())
}

/// Greedy non-maximum suppression as insightface does it (areas with "+1", overlap over
/// union, keep while overlap <= `threshold`). Returns the kept detections, best first.
pub fn nms(mut dets: Vec<Detection>, threshold: f32) -> Vec<Detection> {
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let area = |d: &Detection| (d.bbox[2] - d.bbox[0] + 1.0) * (d.bbox[3] - d.bbox[1] + 1.0);
    let mut suppressed = vec![false; dets.len()];
    let mut keep = Vec::new();
    for i in 0..dets.len() {
        if suppressed[i] {
            continue;
        }
        let a = dets[i];
        keep.push(a);
        let area_a = area(&a);
        for j in i + 1..dets.len() {
            if suppressed[j] {
                continue;
            }
            let b = &dets[j];
            let w = (a.bbox[2].min(b.bbox[2]) - a.bbox[0].max(b.bbox[0]) + 1.0).max(0.0);
            let h = (a.bbox[3].min(b.bbox[3]) - a.bbox[1].max(b.bbox[1]) + 1.0).max(0.0);
            let inter = w * h;
            let ovr = inter / (area_a + area(b) - inter);
            // numpy keeps `ovr <= thresh`; NaN (degenerate boxes) is suppressed there too.
            if ovr.is_nan() || ovr > threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// Intersection over union of two x1,y1,x2,y2 boxes (no "+1"), for evaluation.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(bbox: [f32; 4], score: f32) -> Detection {
        Detection { bbox, score, kps: [[0.0; 2]; 5] }
    }

    #[test]
    fn letterbox_sizes_match_insightface() {
        // Values from insightface's SCRFD.detect for these shapes.
        assert_eq!(letterbox_size(2280, 1588, 640, 640), (640, 445, 445.0 / 1588.0));
        assert_eq!(letterbox_size(1382, 1868, 640, 640), (473, 640, 640.0 / 1868.0));
        assert_eq!(letterbox_size(112, 112, 320, 320), (320, 320, 320.0 / 112.0));
        assert_eq!(letterbox_size(10_000, 1, 320, 320).0, 320);
        assert_eq!(letterbox_size(10_000, 1, 320, 320).1, 1);
    }

    #[test]
    fn anchors_decode_with_two_anchors_per_cell() {
        // 2x3 grid at stride 8, two anchors per cell: index 7 is cell 3 = (x 0, y 1).
        let grid = StrideGrid { stride: 8, width: 3, height: 2, num_anchors: 2 };
        let n = 12;
        let mut scores = vec![0.1f32; n];
        scores[7] = 0.9;
        scores[10] = 0.5; // exactly at the threshold: kept
        let mut boxes = vec![0.0f32; n * 4];
        boxes[7 * 4..7 * 4 + 4].copy_from_slice(&[1.0, 0.5, 2.0, 1.5]);
        let mut kps = vec![0.0f32; n * 10];
        kps[7 * 10..7 * 10 + 2].copy_from_slice(&[-0.25, 0.25]);
        let mut out = Vec::new();
        decode_stride(&grid, &scores, &boxes, Some(&kps), 0.5, &mut out).expect("shapes are right");
        assert_eq!(out.len(), 2);
        let d = out[0];
        assert_eq!(d.score, 0.9);
        // centre (0, 8): x1 = 0 - 8, y1 = 8 - 4, x2 = 0 + 16, y2 = 8 + 12
        assert_eq!(d.bbox, [-8.0, 4.0, 16.0, 20.0]);
        assert_eq!(d.kps[0], [-2.0, 10.0]);
        assert_eq!(d.kps[1], [0.0, 8.0]);
        // index 10 is cell 5 = (x 2, y 1): centre (16, 8)
        assert_eq!(out[1].bbox, [16.0, 8.0, 16.0, 8.0]);
    }

    #[test]
    fn decode_rejects_wrong_shapes() {
        let grid = StrideGrid { stride: 8, width: 2, height: 2, num_anchors: 2 };
        let mut out = Vec::new();
        assert!(decode_stride(&grid, &[0.0; 7], &[0.0; 32], None, 0.5, &mut out).is_err());
        assert!(decode_stride(&grid, &[0.0; 8], &[0.0; 31], None, 0.5, &mut out).is_err());
        assert!(decode_stride(&grid, &[0.0; 8], &[0.0; 32], Some(&[0.0; 79]), 0.5, &mut out).is_err());
    }

    #[test]
    fn nms_keeps_best_and_suppresses_overlaps_over_threshold() {
        let dets = vec![
            det([0.0, 0.0, 9.0, 9.0], 0.8),         // area 100 with +1
            det([0.0, 0.0, 9.0, 9.0], 0.9),         // same box, better score: kept first
            det([5.0, 0.0, 14.0, 9.0], 0.7),        // overlap 50 / 150 = 0.333 <= 0.4: kept
            det([100.0, 100.0, 110.0, 110.0], 0.6), // far away: kept
            det([2.0, 0.0, 11.0, 9.0], 0.65),       // overlap 80 / 120 = 0.667 with the best: gone
        ];
        let kept = nms(dets, 0.4);
        let scores: Vec<f32> = kept.iter().map(|d| d.score).collect();
        assert_eq!(scores, vec![0.9, 0.7, 0.6]);
    }

    #[test]
    fn iou_of_known_boxes() {
        assert!((iou(&[0.0, 0.0, 10.0, 10.0], &[5.0, 0.0, 15.0, 10.0]) - 50.0 / 150.0).abs() < 1e-6);
        assert_eq!(iou(&[0.0, 0.0, 1.0, 1.0], &[2.0, 2.0, 3.0, 3.0]), 0.0);
    }

    #[test]
    fn letterbox_pads_with_normalised_zero() {
        let img = RgbImage::from_pixel(64, 32, image::Rgb([255, 0, 128]));
        let lb = letterbox(&img, 64, 64).expect("letterbox");
        assert_eq!(lb.new_size, (64, 32));
        let plane = 64 * 64;
        assert_eq!(lb.blob[0], (255.0 - 127.5) / 128.0);
        assert_eq!(lb.blob[plane], -127.5 / 128.0);
        assert_eq!(lb.blob[2 * plane], 0.5 / 128.0);
        // Row 40 is below the image: padding.
        assert_eq!(lb.blob[40 * 64], -127.5 / 128.0);
        assert!(letterbox(&img, 60, 64).is_err());
    }
}
