//! Square JPEG face crops cut from photos: the inputs of `facerec-tools bench recognize` and of
//! the engine tests (what an upstream tracker sends to `/recognize`).

use anyhow::bail;
use image::RgbImage;

use super::image::{ImageLimits, decode};
use super::{FaceAnalyzer, FoundBy, StageTimes};

/// Square JPEG crops of `side` pixels around each face the analyzer finds in `photos` (the
/// face about 60% of the crop, as upstream trackers cut them), kept only when the detector
/// finds the face again in the crop itself (no padded retry needed).
pub fn face_crops(analyzer: &mut FaceAnalyzer, photos: &[Vec<u8>], side: u32) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for bytes in photos {
        let img = decode(bytes, &ImageLimits::default())?.rgb;
        let faces = analyzer.analyze(&img, &mut StageTimes::default())?;
        for f in faces.iter().filter(|f| f.det_score > 0.6) {
            let (w, h) = (f.bbox[2] - f.bbox[0], f.bbox[3] - f.bbox[1]);
            let s = (w.max(h) * 1.6).round().max(48.0) as u32;
            let s = s.min(img.width()).min(img.height());
            let cx = (f.bbox[0] + f.bbox[2]) / 2.0;
            let cy = (f.bbox[1] + f.bbox[3]) / 2.0;
            let x = (cx - s as f32 / 2.0).round().clamp(0.0, (img.width() - s) as f32) as u32;
            let y = (cy - s as f32 / 2.0).round().clamp(0.0, (img.height() - s) as f32) as u32;
            let cut = image::imageops::crop_imm(&img, x, y, s, s).to_image();
            let small = image::imageops::resize(&cut, side, side, image::imageops::FilterType::Triangle);
            let jpeg = encode_jpeg(&small)?;
            let back = decode(&jpeg, &ImageLimits::default())?.rgb;
            let located = analyzer.locate(&back, &mut StageTimes::default())?;
            if located.found_by == FoundBy::Detector && !located.detections.is_empty() {
                out.push(jpeg);
            }
        }
    }
    if out.is_empty() {
        bail!("no usable face crop in the photos");
    }
    Ok(out)
}

fn encode_jpeg(img: &RgbImage) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90).encode_image(img)?;
    Ok(buf)
}
