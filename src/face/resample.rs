//! Bit-exact ports of the two OpenCV resampling kernels the insightface pipeline uses.
//!
//! insightface letterboxes detector input with `cv2.resize(img, (w, h))` (INTER_LINEAR) and
//! aligns face crops with `cv2.warpAffine(img, M, (112, 112), borderValue=0.0)` (INTER_LINEAR,
//! BORDER_CONSTANT). To reproduce its detections and embeddings we must reproduce those pixels
//! exactly; the `image` crate's filters antialias when shrinking and round differently, so they
//! do not match. This module owns both operations for 8-bit, 3-channel interleaved images
//! (channel order is irrelevant: every channel is processed independently).
//!
//! The reference is opencv-python 5.0.0.93 on x86-64 with AVX2; every formula below was
//! checked byte for byte against it (photos, random images, norm_crop matrices).
//!
//! * `resize_linear`: OpenCV's fixed-point bilinear resize. Coefficients are rounded half to
//!   even to 11 bits (scale 2048) from `fx = (float)((dx + 0.5) * scale - 0.5)` with
//!   `scale = 1 / (dsize / ssize)`; x taps are clamped at the borders (weight (2048, 0)), y taps
//!   only have their row index clipped. The horizontal pass produces i32 rows
//!   (`S[x]*a0 + S[x+1]*a1`), the vertical pass is `VResizeLinearVec_32s8u`:
//!   `((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16)`, then `(v + 2) >> 2`. That SIMD formula
//!   covers whole rows, tails included: the scalar `(S0*b0 + S1*b1 + (1 << 21)) >> 22` of older
//!   versions is off by one on some tail bytes. Same-size resize is a copy, and an exact 2x
//!   downscale on both axes is routed by OpenCV to INTER_AREA's fast path,
//!   `(a + b + c + d + 2) >> 2`. Exact 2x upscales and integer ratios take the generic path.
//! * `warp_affine_linear`: OpenCV 5's float kernel (`warpAffineLinearInvoker_8UC3`), not the
//!   fixed-point remap of OpenCV 4. The forward matrix is inverted in f64 and cast to f32. The
//!   vector loop (16 pixels per step on AVX2) maps `x` to `fma(M0, x, (float)(y*M1 + M2))`; the
//!   scalar loop for the rest of a row (`dst_w % 16` pixels) computes `fma(x, M0, y*M1) + M2`
//!   (GCC's contraction of `x*M0 + y*M1 + M2`), which can round differently. Taps outside the
//!   image read the border value 0. Interpolation is `fma(ax, p01 - p00, p00)` on both rows, then
//!   `fma(ay, v1 - v0, v0)`, rounded half to even and saturated.
//!
//! OpenCV picks its SIMD width at run time. Where the width differs from AVX2 (an AVX-512
//! dispatch of the warp kernel would step 32 pixels, so the last 16 columns of a 112-wide crop
//! would take the scalar coordinate formula), its output can differ from ours by 1 on rare bytes.

use image::RgbImage;

const CN: usize = 3;
const COEF_BITS: u32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// `cv2.resize(src, (dst_w, dst_h), interpolation=INTER_LINEAR)` for 8-bit RGB.
pub fn resize_linear(src: &RgbImage, dst_w: u32, dst_h: u32) -> RgbImage {
    let (sw, sh) = src.dimensions();
    if dst_w == 0 || dst_h == 0 || sw == 0 || sh == 0 {
        return RgbImage::new(dst_w, dst_h);
    }
    if (sw, sh) == (dst_w, dst_h) {
        return src.clone();
    }
    let (sw, sh, dw, dh) = (sw as usize, sh as usize, dst_w as usize, dst_h as usize);
    let src = src.as_raw().as_slice();
    let mut out = vec![0u8; dw * dh * CN];
    // OpenCV: inv_scale = dsize/ssize, scale = 1/inv_scale (not ssize/dsize: the rounding differs).
    let scale_x = 1.0 / (dw as f64 / sw as f64);
    let scale_y = 1.0 / (dh as f64 / sh as f64);
    if scale_x == 2.0 && scale_y == 2.0 {
        area_fast_2x(src, sw, &mut out, dw, dh);
    } else {
        resize_generic(src, (sw, sh), &mut out, (dw, dh), (scale_x, scale_y));
    }
    RgbImage::from_raw(dst_w, dst_h, out).expect("buffer sized for the destination")
}

/// INTER_AREA fast path for an exact 2x downscale (`resizeAreaFast_` with `ResizeAreaFastVec`).
fn area_fast_2x(src: &[u8], sw: usize, out: &mut [u8], dw: usize, dh: usize) {
    let sstride = sw * CN;
    for dy in 0..dh {
        let r0 = &src[2 * dy * sstride..][..sstride];
        let r1 = &src[(2 * dy + 1) * sstride..][..sstride];
        let drow = &mut out[dy * dw * CN..][..dw * CN];
        for (dx, d) in drow.chunks_exact_mut(CN).enumerate() {
            let i = dx * 2 * CN;
            for k in 0..CN {
                let sum = u32::from(r0[i + k]) + u32::from(r0[i + CN + k]) + u32::from(r1[i + k]) + u32::from(r1[i + CN + k]);
                d[k] = ((sum + 2) >> 2) as u8;
            }
        }
    }
}

/// One axis of OpenCV's linear coefficient table: (first source index, weights a0/a1).
fn linear_coeffs(dst_len: usize, scale: f64) -> Vec<(isize, i16, i16)> {
    (0..dst_len)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            let f = f - s;
            (s as isize, coef(1.0 - f), coef(f))
        })
        .collect()
}

/// `saturate_cast<short>(c * INTER_RESIZE_COEF_SCALE)`: round half to even, saturate.
fn coef(c: f32) -> i16 {
    (c * COEF_SCALE).round_ties_even().clamp(i16::MIN as f32, i16::MAX as f32) as i16
}

/// OpenCV's generic `resizeGeneric_` with `HResizeLinear` / `VResizeLinear` for 8-bit data.
fn resize_generic(src: &[u8], (sw, sh): (usize, usize), out: &mut [u8], (dw, dh): (usize, usize), (scale_x, scale_y): (f64, f64)) {
    // Horizontal table. As in OpenCV, x coefficients are clamped at the borders (sx < 0 -> 0 with
    // weight (1, 0); sx >= sw - 1 -> sw - 1), and from the first column whose right tap would fall
    // outside (`xmax`) on, the row value is simply `S[sx] * 2048`.
    let mut xmax = dw;
    let xtab: Vec<(usize, i32, i32)> = linear_coeffs(dw, scale_x)
        .into_iter()
        .enumerate()
        .map(|(dx, (sx, a0, a1))| {
            let (mut sx, mut a0, mut a1) = (sx, i32::from(a0), i32::from(a1));
            if sx < 0 {
                (sx, a0, a1) = (0, 1 << COEF_BITS, 0);
            }
            if sx + 1 >= sw as isize {
                xmax = xmax.min(dx);
                if sx >= sw as isize - 1 {
                    (sx, a0, a1) = (sw as isize - 1, 1 << COEF_BITS, 0);
                }
            }
            (sx as usize, a0, a1)
        })
        .collect();
    // Vertical table: no coefficient clamping, only the row indices are clipped.
    let ytab = linear_coeffs(dh, scale_y);

    let hresize = |sy: usize, row: &mut [i32]| {
        let s = &src[sy * sw * CN..][..sw * CN];
        for (dx, (d, &(sx, a0, a1))) in row.chunks_exact_mut(CN).zip(&xtab).enumerate() {
            let p = &s[sx * CN..];
            if dx < xmax {
                for k in 0..CN {
                    d[k] = i32::from(p[k]) * a0 + i32::from(p[k + CN]) * a1;
                }
            } else {
                for k in 0..CN {
                    d[k] = i32::from(p[k]) << COEF_BITS;
                }
            }
        }
    };

    // Two-row ring buffer keyed by source row, like OpenCV's `prev_sy` cache.
    let width = dw * CN;
    let mut rows = [vec![0i32; width], vec![0i32; width]];
    let mut row_src: [Option<usize>; 2] = [None, None];
    let clip = |y: isize| y.clamp(0, sh as isize - 1) as usize;
    for (dy, &(sy, b0, b1)) in ytab.iter().enumerate() {
        let want = [clip(sy), clip(sy + 1)];
        for k in 0..2 {
            if row_src[k] == Some(want[k]) {
                continue;
            }
            if k == 0 && row_src[1] == Some(want[0]) {
                // Sliding down by one source row: the old bottom row becomes the top row.
                rows.swap(0, 1);
                row_src.swap(0, 1);
                continue;
            }
            if k == 1 && row_src[0] == Some(want[1]) {
                // Both taps on the same (clipped) source row.
                let (top, bottom) = rows.split_at_mut(1);
                bottom[0].copy_from_slice(&top[0]);
                row_src[1] = row_src[0];
                continue;
            }
            hresize(want[k], &mut rows[k]);
            row_src[k] = Some(want[k]);
        }
        vresize(&rows[0], &rows[1], b0, b1, &mut out[dy * width..][..width]);
    }
}

/// OpenCV's vertical pass, `VResizeLinearVec_32s8u`: rows shifted right by 4 and packed to i16,
/// `v_mul_hi` with the 16-bit beta coefficients, saturating i16 add, `v_rshr_pack_u<2>`.
///
/// opencv-python 5.0.0.93 applies this formula to every element of the row, including the tail
/// that older versions handled with the scalar `FixedPtCast<int, uchar, 22>`
/// (`(S0*b0 + S1*b1 + (1 << 21)) >> 22`); that one is off by one on some tail bytes.
fn vresize(s0: &[i32], s1: &[i32], b0: i16, b1: i16, dst: &mut [u8]) {
    let (b0, b1) = (i32::from(b0), i32::from(b1));
    for ((d, &v0), &v1) in dst.iter_mut().zip(s0).zip(s1) {
        let t0 = ((v0 >> 4).clamp(-32768, 32767) * b0) >> 16;
        let t1 = ((v1 >> 4).clamp(-32768, 32767) * b1) >> 16;
        let v = (t0 + t1).clamp(-32768, 32767);
        *d = ((v + 2) >> 2).clamp(0, 255) as u8;
    }
}

/// Destination pixels per iteration of OpenCV's vectorised warp loop on AVX2 (`2 * v_float32`);
/// the remainder of each row goes through its scalar loop, which computes coordinates differently.
const WARP_LANES: usize = 16;

/// `cv2.warpAffine(src, m, (dst_w, dst_h), flags=INTER_LINEAR, borderValue=0)`.
///
/// `m` is the forward 2x3 matrix (src -> dst), as insightface passes it; it is inverted here
/// exactly as OpenCV does when `WARP_INVERSE_MAP` is not set. A singular or non-finite matrix
/// yields an all-zero image (OpenCV would instead map every pixel to source (0, 0)).
pub fn warp_affine_linear(src: &RgbImage, m: &[[f64; 3]; 2], dst_w: u32, dst_h: u32) -> RgbImage {
    let mut out = RgbImage::new(dst_w, dst_h);
    let (sw, sh) = src.dimensions();
    if dst_w == 0 || dst_h == 0 || sw == 0 || sh == 0 {
        return out;
    }
    let Some(inv) = invert_affine(m) else {
        return out;
    };
    // warpAffineLinearInvoker_8UC3 works on the inverse matrix cast to f32.
    let mf = inv.map(|v| v as f32);
    let (sw, sh) = (sw as usize, sh as usize);
    let (swf, shf) = (sw as f32, sh as f32);
    let stride = sw * CN;
    let src = src.as_raw().as_slice();
    let dw = dst_w as usize;
    let simd_end = dw / WARP_LANES * WARP_LANES;
    for (y, drow) in out.as_mut().chunks_exact_mut(dw * CN).enumerate() {
        let yf = y as f32;
        // Vector loop: fma(M0, x, (float)(y*M1 + M2)), the row term rounded separately.
        let (vec_x, vec_y) = (yf * mf[1] + mf[2], yf * mf[4] + mf[5]);
        // Scalar loop: `x*M[0] + y*M[1] + M[2]` as GCC contracts it, fma(x, M0, y*M1) + M2.
        let (tail_x, tail_y) = (yf * mf[1], yf * mf[4]);
        for (x, d) in drow.chunks_exact_mut(CN).enumerate() {
            let xf = x as f32;
            let (sx, sy) = if x < simd_end {
                (fma(mf[0], xf, vec_x), fma(mf[3], xf, vec_y))
            } else {
                (fma(xf, mf[0], tail_x) + mf[2], fma(xf, mf[3], tail_y) + mf[5])
            };
            // Coordinates whose 2x2 neighbourhood misses the image (or that are not finite) give
            // the border value, which the buffer already holds. `floor(s) >= -1 && floor(s) < n`
            // is `s >= -1 && s < n`.
            if !(sx >= -1.0 && sx < swf && sy >= -1.0 && sy < shf) {
                continue;
            }
            let (fx, fy) = (floor_small(sx), floor_small(sy));
            let (ax, ay) = (sx - fx, sy - fy);
            let (ix, iy) = (fx as isize, fy as isize);
            if ix >= 0 && iy >= 0 && (ix as usize) + 1 < sw && (iy as usize) + 1 < sh {
                let o = iy as usize * stride + ix as usize * CN;
                let (r0, r1) = (&src[o..o + 2 * CN], &src[o + stride..o + stride + 2 * CN]);
                for k in 0..CN {
                    d[k] = bilinear(ax, ay, [r0[k], r0[k + CN], r1[k], r1[k + CN]]);
                }
            } else {
                let tap = |dx: isize, dy: isize, k: usize| -> u8 {
                    let (tx, ty) = (ix + dx, iy + dy);
                    if tx >= 0 && ty >= 0 && (tx as usize) < sw && (ty as usize) < sh {
                        src[ty as usize * stride + tx as usize * CN + k]
                    } else {
                        0
                    }
                };
                for (k, dk) in d.iter_mut().enumerate() {
                    *dk = bilinear(ax, ay, [tap(0, 0, k), tap(1, 0, k), tap(0, 1, k), tap(1, 1, k)]);
                }
            }
        }
    }
    out
}

/// OpenCV's float bilinear kernel for one channel: fused lerps along x, then along y; the result
/// is rounded half to even and saturated (`v_round` + `v_pack_u`).
#[inline]
fn bilinear(ax: f32, ay: f32, [p00, p01, p10, p11]: [u8; 4]) -> u8 {
    let v0 = lerp_u8(ax, p00, p01);
    let v1 = lerp_u8(ax, p10, p11);
    round_ties_even_small(fma(ay, v1 - v0, v0)).clamp(0.0, 255.0) as u8
}

/// `fma(a, p1 - p0, p0)` for integer endpoints. `a * (p1 - p0)` is exact in f64 (24 + 9 bits),
/// and adding the small integer `p0` either stays exact or (for tiny `a`) cannot land on an f32
/// rounding midpoint, so one rounding of the f64 sum is the fused result (checked against
/// `f32::mul_add` on 1.9e9 random cases, all exponents of `a`).
#[inline]
fn lerp_u8(a: f32, p0: u8, p1: u8) -> f32 {
    let (p0, p1) = (f64::from(p0), f64::from(p1));
    (f64::from(a) * (p1 - p0) + p0) as f32
}

/// `floor` for `-1 <= v < 2^24`, without a libm call (no SSE4.1 in the baseline target).
#[inline]
fn floor_small(v: f32) -> f32 {
    let t = v as i32 as f32; // truncation toward zero
    if t > v { t - 1.0 } else { t }
}

/// Round half to even for `|v| < 2^22` (what `cvRound`/`v_round` do), without a libm call: adding
/// and subtracting 1.5 * 2^23 leaves the value rounded by the FPU's default nearest-even mode.
#[inline]
fn round_ties_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// OpenCV's in-place inversion of a 2x3 affine matrix (imgwarp.cpp, `warpAffine`), in f64.
fn invert_affine(m: &[[f64; 3]; 2]) -> Option<[f64; 6]> {
    let [[m0, m1, m2], [m3, m4, m5]] = *m;
    let det = m0 * m4 - m1 * m3;
    if det == 0.0 || !det.is_finite() {
        return None;
    }
    let d = 1.0 / det;
    let (a11, a22) = (m4 * d, m0 * d);
    let (i0, i1, i3, i4) = (a11, m1 * -d, m3 * -d, a22);
    let b1 = -i0 * m2 - i1 * m5;
    let b2 = -i3 * m2 - i4 * m5;
    let inv = [i0, i1, b1, i3, i4, b2];
    inv.iter().all(|v| v.is_finite()).then_some(inv)
}

/// Single-rounding `a * b + c` in f32 (what `v_fma` is on FMA hardware).
///
/// With the `fma` target feature enabled at compile time this is one instruction. Otherwise: the
/// product of two f32 values is exact in f64, so when the f64 sum is also exact (checked with
/// TwoSum; almost always the case here), one rounding to f32 is the correctly rounded fused
/// result; the rare remaining cases use `mul_add`, a libm call on such targets.
#[inline]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(target_feature = "fma") {
        return a.mul_add(b, c);
    }
    let p = f64::from(a) * f64::from(b);
    let cd = f64::from(c);
    let s = p + cd;
    let bb = s - p;
    let err = (p - (s - bb)) + (cd - bb);
    if err == 0.0 { s as f32 } else { a.mul_add(b, c) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn pattern(w: u32, h: u32, mul: u32, add: u32) -> RgbImage {
        let data = (0..w * h * 3).map(|i| ((i * mul + add) % 256) as u8).collect();
        RgbImage::from_raw(w, h, data).unwrap()
    }

    /// 5x4 source shared by the hard-coded OpenCV cases: byte i = (37 * i + 11) % 256.
    fn src_5x4() -> RgbImage {
        pattern(5, 4, 37, 11)
    }

    #[test]
    fn resize_same_size_is_identity() {
        let src = pattern(13, 7, 29, 3);
        assert_eq!(resize_linear(&src, 13, 7), src);
    }

    #[test]
    fn constant_image_stays_constant_under_resize() {
        let src = RgbImage::from_pixel(37, 23, Rgb([7, 128, 255]));
        for (w, h) in [(100, 61), (12, 5), (37, 1), (1, 23), (74, 46), (18, 11), (1, 1)] {
            let out = resize_linear(&src, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| *p == Rgb([7, 128, 255])), "{w}x{h}");
        }
    }

    #[test]
    fn resize_matches_opencv_shrink_and_enlarge() {
        // cv2.resize(src, (7, 3)) and cv2.resize(src, (2, 6)), opencv-python 5.0.0.93.
        let expected_7x3: [u8; 63] = [
            18, 55, 92, 82, 118, 155, 149, 125, 162, 197, 21, 58, 124, 100, 137, 143, 161, 107, 206, 200, 24, 76, 113, 150, 139, 176, 140,
            145, 182, 128, 42, 79, 116, 121, 158, 195, 145, 127, 164, 136, 45, 82, 133, 170, 207, 196, 111, 124, 202, 87, 93, 99, 136, 173,
            178, 215, 100, 148, 185, 100, 65, 102, 139,
        ];
        let expected_2x6: [u8; 36] = [
            94, 131, 168, 116, 153, 126, 116, 153, 190, 137, 142, 147, 144, 181, 186, 155, 139, 176, 173, 210, 87, 141, 167, 204, 202, 143,
            84, 159, 196, 137, 223, 68, 105, 181, 218, 63,
        ];
        assert_eq!(resize_linear(&src_5x4(), 7, 3).as_raw(), &expected_7x3);
        assert_eq!(resize_linear(&src_5x4(), 2, 6).as_raw(), &expected_2x6);
    }

    #[test]
    fn exact_2x_downscale_matches_opencv_area_path() {
        // cv2.resize(src, (3, 2)) on a 6x4 image (byte i = (53 * i + 7) % 256),
        // opencv-python 5.0.0.93: OpenCV switches to INTER_AREA's fast path here.
        let expected: [u8; 18] = [116, 169, 94, 178, 103, 92, 112, 101, 154, 104, 93, 146, 102, 155, 144, 164, 153, 78];
        assert_eq!(resize_linear(&pattern(6, 4, 53, 7), 3, 2).as_raw(), &expected);
    }

    #[test]
    fn warp_matches_opencv() {
        // cv2.warpAffine(src, M, (5, 4), borderValue=0.0), opencv-python 5.0.0.93; part of the
        // output samples outside the source, so the zero border is exercised.
        let m = [[0.9, -0.5, 1.3], [0.5, 0.9, -0.7]];
        let expected: [u8; 60] = [
            14, 23, 31, 51, 88, 125, 125, 162, 199, 165, 37, 66, 46, 27, 39, 69, 95, 121, 140, 177, 132, 112, 149, 169, 101, 69, 106, 106,
            139, 156, 155, 152, 185, 224, 152, 47, 81, 118, 122, 121, 158, 195, 192, 87, 124, 52, 21, 30, 129, 62, 89, 136, 173, 139, 161,
            198, 165, 55, 58, 94,
        ];
        assert_eq!(warp_affine_linear(&src_5x4(), &m, 5, 4).as_raw(), &expected);
    }

    #[test]
    fn identity_warp_returns_input() {
        let src = pattern(40, 30, 31, 5);
        let id = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        assert_eq!(warp_affine_linear(&src, &id, 40, 30), src);
        // Integer translation: a shifted copy with a zero border.
        let shift = [[1.0, 0.0, 3.0], [0.0, 1.0, -2.0]];
        let out = warp_affine_linear(&src, &shift, 40, 30);
        for (x, y, p) in out.enumerate_pixels() {
            let (sx, sy) = (x as i64 - 3, y as i64 + 2);
            let want = if (0..40).contains(&sx) && (0..30).contains(&sy) { *src.get_pixel(sx as u32, sy as u32) } else { Rgb([0, 0, 0]) };
            assert_eq!(*p, want, "({x}, {y})");
        }
    }

    #[test]
    fn constant_image_stays_constant_under_warp_away_from_borders() {
        let src = RgbImage::from_pixel(300, 200, Rgb([3, 99, 250]));
        let (s, c) = (0.7f64.sin() * 1.3, 0.7f64.cos() * 1.3);
        // Similarity centred on the source so that the whole 112x112 crop lies inside it.
        let m = [[c, -s, 56.0 - (c * 150.0 - s * 100.0)], [s, c, 56.0 - (s * 150.0 + c * 100.0)]];
        let out = warp_affine_linear(&src, &m, 112, 112);
        assert!(out.pixels().all(|p| *p == Rgb([3, 99, 250])));
    }

    #[test]
    fn warp_entirely_outside_gives_zeros() {
        let src = RgbImage::from_pixel(50, 50, Rgb([200, 200, 200]));
        for m in [[[1.0, 0.0, 1000.0], [0.0, 1.0, 0.0]], [[1.0, 0.0, -51.5], [0.0, 1.0, 0.0]], [[0.5, 0.0, 0.0], [0.0, 0.5, -200.0]]] {
            let out = warp_affine_linear(&src, &m, 112, 112);
            assert!(out.as_raw().iter().all(|&v| v == 0), "{m:?}");
        }
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let src = pattern(9, 7, 13, 1);
        let empty = RgbImage::new(0, 0);
        assert_eq!(resize_linear(&src, 0, 5).dimensions(), (0, 5));
        assert_eq!(resize_linear(&src, 5, 0).dimensions(), (5, 0));
        let out = resize_linear(&empty, 4, 3);
        assert_eq!(out.dimensions(), (4, 3));
        assert!(out.as_raw().iter().all(|&v| v == 0));
        assert_eq!(resize_linear(&RgbImage::new(0, 6), 3, 3).dimensions(), (3, 3));
        assert_eq!(resize_linear(&pattern(1, 1, 1, 9), 3, 2).dimensions(), (3, 2));

        let id = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        assert_eq!(warp_affine_linear(&src, &id, 0, 0).dimensions(), (0, 0));
        let out = warp_affine_linear(&empty, &id, 112, 112);
        assert_eq!(out.dimensions(), (112, 112));
        assert!(out.as_raw().iter().all(|&v| v == 0));
        for m in [
            [[0.0; 3]; 2],
            [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]],
            [[f64::NAN, 0.0, 0.0], [0.0, 1.0, 0.0]],
            [[f64::INFINITY, 0.0, 0.0], [0.0, 1.0, 0.0]],
            [[1e-200, 0.0, 0.0], [0.0, 1e-200, 0.0]],
            [[1e-160, 0.0, 0.0], [0.0, 1e-160, 0.0]],
            [[1e200, 0.0, 0.0], [0.0, 1e200, 0.0]],
        ] {
            let out = warp_affine_linear(&src, &m, 16, 16);
            assert!(out.as_raw().iter().all(|&v| v == 0), "{m:?}");
        }
        // Huge but finite coordinates stay on the zero border.
        let out = warp_affine_linear(&src, &[[1e-30, 0.0, 0.0], [0.0, 1e-30, 0.0]], 16, 16);
        assert_eq!(out.as_raw()[0..3], src.as_raw()[0..3]);
        assert!(out.as_raw()[3..].iter().all(|&v| v == 0));
    }
}
