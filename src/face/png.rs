//! PNG metadata removed before decoding. A PNG's ancillary chunks are not pixels: text
//! (`tEXt`, `zTXt`, `iTXt`) and colour profiles (`iCCP`) may each hold up to 2 GB and the
//! compressed ones inflate about a thousandfold, so a 1 MB file with an `iCCP` bomb made the
//! decoder allocate some 360 MB. Nothing here reads them (OpenCV's `imread`, whose pixels we
//! match, applies neither profiles nor gamma), so only the chunks that change the pixels or
//! their orientation are kept: every critical chunk, `tRNS` (transparency, for the palette
//! expansion) and `eXIf` up to [`MAX_PNG_EXIF_BYTES`]. The rest is dropped, whatever its size,
//! by walking the chunk lengths: no byte of it is inflated.

use std::borrow::Cow;

use super::budget::MAX_PNG_EXIF_BYTES;

const SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

/// Whether a chunk of this type and data length is kept.
fn keep(kind: &[u8], len: usize) -> bool {
    let critical = kind[0].is_ascii_uppercase();
    critical || kind == b"tRNS" || (kind == b"eXIf" && len <= MAX_PNG_EXIF_BYTES)
}

/// `bytes` without the ancillary chunks that do not change the pixels; borrowed when there
/// were none. A chunk whose length runs past the end is kept with the rest as it is, so the
/// decoder reports the truncation as before.
pub fn strip_metadata(bytes: &[u8]) -> Cow<'_, [u8]> {
    if !bytes.starts_with(SIGNATURE) {
        return Cow::Borrowed(bytes);
    }
    let mut out: Option<Vec<u8>> = None;
    let mut pos = SIGNATURE.len();
    while pos + 8 <= bytes.len() {
        let len = u32::from_be_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]) as usize;
        let kind = &bytes[pos + 4..pos + 8];
        // length, type, data, CRC
        let Some(end) = pos.checked_add(12).and_then(|p| p.checked_add(len)).filter(|&e| e <= bytes.len()) else {
            break;
        };
        if keep(kind, len) {
            if let Some(o) = out.as_mut() {
                o.extend_from_slice(&bytes[pos..end]);
            }
        } else if out.is_none() {
            let mut o = Vec::with_capacity(bytes.len());
            o.extend_from_slice(&bytes[..pos]);
            out = Some(o);
        }
        pos = end;
        if kind == b"IEND" {
            break;
        }
    }
    match out {
        Some(mut o) => {
            o.extend_from_slice(&bytes[pos..]);
            Cow::Owned(o)
        }
        None => Cow::Borrowed(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        c.extend_from_slice(&[0, 0, 0, 0]); // CRC: never read for dropped chunks
        c
    }

    fn png() -> Vec<u8> {
        let img = image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 9]));
        let mut out = Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).expect("encodes");
        out.into_inner()
    }

    /// `png` with `extra` inserted right after IHDR.
    fn with_chunk(png: &[u8], extra: &[u8]) -> Vec<u8> {
        let after_ihdr = 8 + 25;
        [&png[..after_ihdr], extra, &png[after_ihdr..]].concat()
    }

    #[test]
    fn a_plain_png_is_borrowed_unchanged() {
        let p = png();
        assert!(matches!(strip_metadata(&p), Cow::Borrowed(b) if b == p.as_slice()));
    }

    #[test]
    fn text_and_profiles_are_dropped_and_the_pixels_kept() {
        let p = png();
        let mut extra = chunk(b"tEXt", b"Comment\0hello");
        extra.extend(chunk(b"iCCP", &[7; 1000]));
        extra.extend(chunk(b"zTXt", &[1; 300]));
        extra.extend(chunk(b"eXIf", &vec![0; MAX_PNG_EXIF_BYTES + 1]));
        let stripped = strip_metadata(&with_chunk(&p, &extra)).into_owned();
        assert_eq!(stripped, p);
        // A small eXIf chunk and tRNS stay.
        let small = [chunk(b"eXIf", &[0; 16]), chunk(b"tRNS", &[0, 1, 0, 2, 0, 3])].concat();
        let kept = with_chunk(&p, &small);
        assert_eq!(strip_metadata(&kept).as_ref(), kept.as_slice());
    }

    #[test]
    fn a_chunk_running_past_the_end_is_left_to_the_decoder() {
        let p = png();
        let mut cut = with_chunk(&p, &chunk(b"tEXt", b"a\0b"))[..60].to_vec();
        cut.extend_from_slice(&u32::MAX.to_be_bytes());
        let out = strip_metadata(&cut);
        assert!(out.len() < cut.len(), "the tEXt chunk went");
        assert!(out.ends_with(&u32::MAX.to_be_bytes()));
    }
}
