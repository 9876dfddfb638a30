//! Face alignment: the similarity transform (rotation, uniform scale, translation) that best
//! maps five detected keypoints onto the ArcFace template, as insightface's
//! `face_align.estimate_norm` computes it with scikit-image's Umeyama estimate, and the
//! bilinear warp (OpenCV's `warpAffine`, border 0) that cuts the aligned crop.

use image::RgbImage;

use super::resample;

/// The standard five-point ArcFace template for a 112x112 crop (insightface `arcface_dst`, float32).
pub const ARCFACE_TEMPLATE: [[f32; 2]; 5] =
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]];

/// A 2x3 affine matrix (row-major), mapping source to destination.
pub type Affine = [[f64; 3]; 2];

/// Least-squares similarity transform from `src` to `dst` (Umeyama 1991, no reflection).
///
/// In 2-D the Umeyama solution equals the closed form for `[a -b; b a]`: with centred
/// points, `a = sum(x.u + y.v) / sum|p|^2`, `b = sum(x.v - y.u) / sum|p|^2`.
/// Returns `None` when the source points coincide.
pub fn similarity_transform(src: &[[f64; 2]], dst: &[[f64; 2]]) -> Option<Affine> {
    let n = src.len().min(dst.len());
    if n < 2 {
        return None;
    }
    let nf = n as f64;
    let mean = |pts: &[[f64; 2]]| {
        let (sx, sy) = pts[..n].iter().fold((0.0, 0.0), |(ax, ay), p| (ax + p[0], ay + p[1]));
        (sx / nf, sy / nf)
    };
    let (msx, msy) = mean(src);
    let (mdx, mdy) = mean(dst);
    let (mut num_a, mut num_b, mut den) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (x, y) = (src[i][0] - msx, src[i][1] - msy);
        let (u, v) = (dst[i][0] - mdx, dst[i][1] - mdy);
        num_a += x * u + y * v;
        num_b += x * v - y * u;
        den += x * x + y * y;
    }
    if den <= f64::EPSILON || !den.is_finite() {
        return None;
    }
    let a = num_a / den;
    let b = num_b / den;
    let tx = mdx - (a * msx - b * msy);
    let ty = mdy - (b * msx + a * msy);
    let m = [[a, -b, tx], [b, a, ty]];
    m.iter().flatten().all(|v| v.is_finite()).then_some(m)
}

/// insightface's `estimate_norm(lmk, image_size)`: the transform from keypoints to the
/// template scaled for `image_size` (a multiple of 112, or of 128 with an 8 px shift).
pub fn estimate_norm(kps: &[[f32; 2]; 5], image_size: u32) -> Option<Affine> {
    let (ratio, diff_x) = if image_size.is_multiple_of(112) {
        (image_size as f32 / 112.0, 0.0f32)
    } else {
        let r = image_size as f32 / 128.0;
        (r, 8.0 * r)
    };
    let dst: Vec<[f64; 2]> = ARCFACE_TEMPLATE.iter().map(|p| [f64::from(p[0] * ratio + diff_x), f64::from(p[1] * ratio)]).collect();
    let src: Vec<[f64; 2]> = kps.iter().map(|p| [f64::from(p[0]), f64::from(p[1])]).collect();
    similarity_transform(&src, &dst)
}

/// insightface's `norm_crop`: the aligned `image_size` x `image_size` crop for `kps`.
/// Degenerate keypoints (all in one point) give an all-black crop.
pub fn norm_crop(img: &RgbImage, kps: &[[f32; 2]; 5], image_size: u32) -> RgbImage {
    match estimate_norm(kps, image_size) {
        Some(m) => resample::warp_affine_linear(img, &m, image_size, image_size),
        None => RgbImage::new(image_size, image_size),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(m: &Affine, p: [f64; 2]) -> [f64; 2] {
        [m[0][0] * p[0] + m[0][1] * p[1] + m[0][2], m[1][0] * p[0] + m[1][1] * p[1] + m[1][2]]
    }

    #[test]
    fn recovers_a_known_similarity() {
        // scale 1.7, rotation 25 degrees, translation (12, -7)
        let (s, t) = (1.7f64, 25f64.to_radians());
        let known = [[s * t.cos(), -s * t.sin(), 12.0], [s * t.sin(), s * t.cos(), -7.0]];
        let src: Vec<[f64; 2]> = ARCFACE_TEMPLATE.iter().map(|p| [f64::from(p[0]), f64::from(p[1])]).collect();
        let dst: Vec<[f64; 2]> = src.iter().map(|&p| apply(&known, p)).collect();
        let m = similarity_transform(&src, &dst).expect("non-degenerate");
        for r in 0..2 {
            for c in 0..3 {
                assert!((m[r][c] - known[r][c]).abs() < 1e-9, "m[{r}][{c}] = {} vs {}", m[r][c], known[r][c]);
            }
        }
    }

    #[test]
    fn matches_scikit_image_umeyama_on_noisy_points() {
        // Reference: insightface's estimate_norm (scikit-image 0.26 Umeyama) on these points as
        // float64. scikit-image mixes in float32 (the template), so agreement is to ~1e-6 px.
        // src = [[100,120],[160,118],[131,150],[108,178],[155,176]]
        let src = [[100.0f32, 120.0], [160.0, 118.0], [131.0, 150.0], [108.0, 178.0], [155.0, 176.0]];
        let m = estimate_norm(&src, 112).expect("non-degenerate");
        let want = [
            [0.653_554_061_933_398, -0.016_348_609_790_637_958, -27.032_576_414_110_14],
            [0.016_348_609_790_637_958, 0.653_554_061_933_397_7, -27.225_041_227_410_586],
        ];
        for r in 0..2 {
            for c in 0..3 {
                assert!((m[r][c] - want[r][c]).abs() < 1e-5, "m[{r}][{c}] = {} vs {}", m[r][c], want[r][c]);
            }
        }
    }

    #[test]
    fn template_maps_to_itself() {
        let m = estimate_norm(&ARCFACE_TEMPLATE, 112).expect("non-degenerate");
        assert!((m[0][0] - 1.0).abs() < 1e-12 && m[0][1].abs() < 1e-12 && m[0][2].abs() < 1e-9);
        let crop = {
            let img = RgbImage::from_fn(112, 112, |x, y| image::Rgb([x as u8, y as u8, 50]));
            norm_crop(&img, &ARCFACE_TEMPLATE, 112)
        };
        assert_eq!(crop.get_pixel(60, 70).0, [60, 70, 50]);
    }

    #[test]
    fn degenerate_points_give_black_crop() {
        let kps = [[5.0f32, 5.0]; 5];
        assert!(estimate_norm(&kps, 112).is_none());
        let img = RgbImage::from_pixel(50, 50, image::Rgb([200, 200, 200]));
        assert!(norm_crop(&img, &kps, 112).as_raw().iter().all(|&v| v == 0));
    }

    #[test]
    fn warp_of_a_shifted_face_moves_pixels() {
        // Keypoints at the template shifted by (+10, +5): the crop at (x, y) reads source (x+10, y+5).
        let kps = ARCFACE_TEMPLATE.map(|p| [p[0] + 10.0, p[1] + 5.0]);
        let img = RgbImage::from_fn(140, 140, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let crop = norm_crop(&img, &kps, 112);
        assert_eq!(crop.get_pixel(30, 40).0, [40, 45, 0]);
    }
}
