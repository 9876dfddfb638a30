//! Image bytes in, 8-bit RGB pixels out: format sniffing (JPEG, PNG, WebP, BMP), size
//! limits checked from the header before any pixel buffer is allocated, EXIF orientation,
//! and the same 8-bit conversion OpenCV's `imread` applies (16-bit samples keep their high
//! byte, alpha is dropped, grey is replicated), so pixels match what insightface sees.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

use super::FaceError;
use super::budget::DecodeBudget;

/// Limits applied while decoding. Checked against the header before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted width or height, in pixels.
    pub max_side: u32,
    /// Largest accepted width x height.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        // 40 Mpx covers every camera up to 8K and phone photos; 16384 per side is what
        // JPEG and WebP themselves allow at most for WebP and most encoders.
        Self { max_side: 16_384, max_pixels: 40_000_000 }
    }
}

/// The encodings we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    Jpeg,
    Png,
    Webp,
    Bmp,
}

impl ImageKind {
    /// File extension for this encoding.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Jpeg => "jpg",
            Self::Png => "png",
            Self::Webp => "webp",
            Self::Bmp => "bmp",
        }
    }

    fn from_format(f: ImageFormat) -> Option<Self> {
        match f {
            ImageFormat::Jpeg => Some(Self::Jpeg),
            ImageFormat::Png => Some(Self::Png),
            ImageFormat::WebP => Some(Self::Webp),
            ImageFormat::Bmp => Some(Self::Bmp),
            _ => None,
        }
    }
}

/// The encoding of `bytes` from its signature, when it is one we accept.
pub fn sniff(bytes: &[u8]) -> Option<ImageKind> {
    image::guess_format(bytes).ok().and_then(ImageKind::from_format)
}

/// A decoded image: upright 8-bit RGB.
#[derive(Debug, Clone)]
pub struct DecodedImage {
    pub rgb: RgbImage,
    pub kind: ImageKind,
}

/// Decodes `bytes` to upright 8-bit RGB within `limits` and the default [`DecodeBudget`].
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<DecodedImage, FaceError> {
    decode_within(bytes, limits, &DecodeBudget::default())
}

/// Decodes `bytes` to upright 8-bit RGB within `limits` and `budget`: a JPEG's scans and CPU
/// time are watched while libjpeg decodes ([`super::jpeg`]), a PNG's metadata chunks are
/// dropped unread ([`super::png`]), and the decoded buffer (16-bit and alpha samples count)
/// is checked against the budget from the header, before it is allocated.
pub fn decode_within(bytes: &[u8], limits: &ImageLimits, budget: &DecodeBudget) -> Result<DecodedImage, FaceError> {
    if bytes.is_empty() {
        return Err(FaceError::InvalidImage("empty input: no image bytes".into()));
    }
    let kind = sniff(bytes).ok_or_else(|| FaceError::InvalidImage("not a supported image: expected JPEG, PNG, WebP or BMP".into()))?;
    let stripped = if kind == ImageKind::Png { super::png::strip_metadata(bytes) } else { std::borrow::Cow::Borrowed(bytes) };
    let mut reader = ImageReader::new(Cursor::new(stripped.as_ref()));
    reader.set_format(match kind {
        ImageKind::Jpeg => ImageFormat::Jpeg,
        ImageKind::Png => ImageFormat::Png,
        ImageKind::Webp => ImageFormat::WebP,
        ImageKind::Bmp => ImageFormat::Bmp,
    });
    // No width/height limit for the decoder itself: reading the header allocates nothing in
    // proportion to the claimed size, and [`check_size`] then refuses an oversized claim with
    // the dimensions in the message. `max_alloc` still bounds every allocation made while
    // decoding: the decoded buffer (up to 16-bit RGBA) plus the decoder's working memory.
    let mut lim = Limits::default();
    let max_decoded = limits.max_pixels.saturating_mul(budget.max_decoded_bytes_per_pixel);
    lim.max_alloc = Some(max_decoded.saturating_add(64 << 20));
    reader.limits(lim);
    let mut decoder = reader.into_decoder().map_err(|e| map_image_error(e, limits))?;
    let (w, h) = decoder.dimensions();
    check_size(w, h, limits)?;
    if decoder.total_bytes() > max_decoded {
        return Err(FaceError::TooCostly(format!(
            "{w}x{h} pixels of {:?} need {} MB decoded, more than the {} MB allowed (16-bit and alpha samples count)",
            decoder.color_type(),
            decoder.total_bytes() >> 20,
            max_decoded >> 20
        )));
    }
    // A broken EXIF block must not reject an otherwise fine photo: treat it as upright.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = match kind {
        // The header was read and checked above; the pixels come from libjpeg.
        ImageKind::Jpeg => match super::jpeg::decode_libjpeg(bytes, limits, budget)? {
            Some(rgb) => DynamicImage::ImageRgb8(rgb),
            None => DynamicImage::from_decoder(decoder).map_err(|e| map_image_error(e, limits))?,
        },
        _ => DynamicImage::from_decoder(decoder).map_err(|e| map_image_error(e, limits))?,
    };
    img.apply_orientation(orientation);
    Ok(DecodedImage { rgb: to_rgb8_like_opencv(img), kind })
}

pub(super) fn check_size(w: u32, h: u32, limits: &ImageLimits) -> Result<(), FaceError> {
    if w == 0 || h == 0 {
        return Err(FaceError::InvalidImage(format!("image has no pixels ({w}x{h})")));
    }
    if w > limits.max_side || h > limits.max_side || u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(FaceError::ImageTooLarge { width: w, height: h, max_side: limits.max_side, max_pixels: limits.max_pixels });
    }
    Ok(())
}

fn map_image_error(e: image::ImageError, limits: &ImageLimits) -> FaceError {
    match e {
        image::ImageError::Limits(l) => FaceError::InvalidImage(format!(
            "image needs more memory to decode than allowed ({l}); at most {} px per side and {} px in all",
            limits.max_side, limits.max_pixels
        )),
        other => FaceError::InvalidImage(format!("could not decode image: {other}")),
    }
}

/// OpenCV's IMREAD_COLOR conversion: 16-bit samples are reduced by dropping the low byte
/// (libpng's strip_16), alpha is discarded without compositing, grey is replicated.
fn to_rgb8_like_opencv(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(rgba) => RgbImage::from_fn(w, h, |x, y| {
            let p = rgba.get_pixel(x, y).0;
            image::Rgb([p[0], p[1], p[2]])
        }),
        DynamicImage::ImageLuma8(l) => RgbImage::from_fn(w, h, |x, y| {
            let v = l.get_pixel(x, y).0[0];
            image::Rgb([v, v, v])
        }),
        DynamicImage::ImageLumaA8(l) => RgbImage::from_fn(w, h, |x, y| {
            let v = l.get_pixel(x, y).0[0];
            image::Rgb([v, v, v])
        }),
        DynamicImage::ImageRgb16(p) => RgbImage::from_fn(w, h, |x, y| {
            let s = p.get_pixel(x, y).0;
            image::Rgb([(s[0] >> 8) as u8, (s[1] >> 8) as u8, (s[2] >> 8) as u8])
        }),
        DynamicImage::ImageRgba16(p) => RgbImage::from_fn(w, h, |x, y| {
            let s = p.get_pixel(x, y).0;
            image::Rgb([(s[0] >> 8) as u8, (s[1] >> 8) as u8, (s[2] >> 8) as u8])
        }),
        DynamicImage::ImageLuma16(p) => RgbImage::from_fn(w, h, |x, y| {
            let v = (p.get_pixel(x, y).0[0] >> 8) as u8;
            image::Rgb([v, v, v])
        }),
        DynamicImage::ImageLumaA16(p) => RgbImage::from_fn(w, h, |x, y| {
            let v = (p.get_pixel(x, y).0[0] >> 8) as u8;
            image::Rgb([v, v, v])
        }),
        other => other.to_rgb8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(img: &DynamicImage, fmt: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, fmt).expect("encode test image");
        out.into_inner()
    }

    #[test]
    fn decodes_each_format() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(17, 9, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7])));
        for (fmt, kind) in [
            (ImageFormat::Png, ImageKind::Png),
            (ImageFormat::Bmp, ImageKind::Bmp),
            (ImageFormat::Jpeg, ImageKind::Jpeg),
            (ImageFormat::WebP, ImageKind::Webp),
        ] {
            let bytes = encode(&img, fmt);
            let d = decode(&bytes, &ImageLimits::default()).expect("decodes");
            assert_eq!(d.kind, kind);
            assert_eq!(d.rgb.dimensions(), (17, 9));
            if fmt != ImageFormat::Jpeg {
                assert_eq!(d.rgb.as_raw(), img.to_rgb8().as_raw(), "{fmt:?} is lossless");
            }
        }
    }

    #[test]
    fn sixteen_bit_keeps_high_byte_and_alpha_is_dropped() {
        let img =
            image::ImageBuffer::<image::Rgba<u16>, _>::from_fn(3, 2, |x, _| image::Rgba([0x12ff, 0xab01, (x as u16) << 8 | 0x80, 0x0000]));
        let bytes = encode(&DynamicImage::ImageRgba16(img), ImageFormat::Png);
        let d = decode(&bytes, &ImageLimits::default()).expect("decodes");
        assert_eq!(d.rgb.get_pixel(2, 1).0, [0x12, 0xab, 2]);
    }

    #[test]
    fn rejects_garbage_truncated_and_empty() {
        let lim = ImageLimits::default();
        assert!(matches!(decode(b"", &lim), Err(FaceError::InvalidImage(_))));
        assert!(matches!(decode(b"hello, not an image", &lim), Err(FaceError::InvalidImage(_))));
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, image::Rgb([9, 9, 9])));
        for fmt in [ImageFormat::Png, ImageFormat::Jpeg] {
            let bytes = encode(&img, fmt);
            let cut = &bytes[..bytes.len() / 2];
            assert!(matches!(decode(cut, &lim), Err(FaceError::InvalidImage(_))), "{fmt:?} truncated");
        }
    }

    /// A valid PNG header claiming `w` x `h` pixels, with no pixel data behind it.
    fn png_claiming(w: u32, h: u32) -> Vec<u8> {
        let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(b"IHDR");
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        out.extend_from_slice(&13u32.to_be_bytes());
        out.extend_from_slice(&ihdr);
        out.extend_from_slice(&crc32fast::hash(&ihdr).to_be_bytes());
        // The decoder reads the header chunks up to the first IDAT: give it one (an empty zlib stream).
        let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01";
        out.extend_from_slice(&((idat.len() - 4) as u32).to_be_bytes());
        out.extend_from_slice(idat);
        out.extend_from_slice(&crc32fast::hash(idat).to_be_bytes());
        out
    }

    #[test]
    fn refuses_huge_claims_before_allocating() {
        let bytes = png_claiming(60_000, 60_000);
        assert!(bytes.len() < 64);
        // Cut before its first IDAT, it is refused too (as truncated).
        assert!(matches!(decode(&bytes[..33], &ImageLimits::default()), Err(FaceError::InvalidImage(_))));
        match decode(&bytes, &ImageLimits::default()) {
            Err(FaceError::ImageTooLarge { width: 60_000, height: 60_000, .. }) => {}
            other => panic!("expected image_too_large, got {other:?}"),
        }
        // A real image within the per-side limit but over the pixel budget.
        let lim = ImageLimits { max_side: 60_000, max_pixels: 1_000_000 };
        let big = encode(&DynamicImage::ImageRgb8(RgbImage::new(2000, 1000)), ImageFormat::Png);
        assert!(matches!(decode(&big, &lim), Err(FaceError::ImageTooLarge { width: 2000, height: 1000, .. })));
        let jpeg = encode(&DynamicImage::ImageRgb8(RgbImage::new(1200, 1000)), ImageFormat::Jpeg);
        assert!(matches!(decode(&jpeg, &lim), Err(FaceError::ImageTooLarge { .. })));
    }

    #[test]
    fn zero_sized_is_an_error() {
        assert!(decode(&png_claiming(0, 10), &ImageLimits::default()).is_err());
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 4x2 JPEG with EXIF orientation 6 (rotate 90 clockwise) must come out 2x4.
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 2, image::Rgb([200, 10, 10])));
        let jpeg = encode(&img, ImageFormat::Jpeg);
        let with_exif = insert_exif_orientation(&jpeg, 6);
        let d = decode(&with_exif, &ImageLimits::default()).expect("decodes");
        assert_eq!(d.rgb.dimensions(), (2, 4));
    }

    /// Inserts an APP1 EXIF segment with one Orientation tag right after SOI.
    fn insert_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = Vec::new();
        tiff.extend_from_slice(b"MM\x00\x2a\x00\x00\x00\x08"); // big-endian, IFD at 8
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes()); // count
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
        let mut app1 = b"Exif\x00\x00".to_vec();
        app1.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xff, 0xe1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }
}
