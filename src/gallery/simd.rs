//! The dot-product kernels (AVX2+FMA where the CPU has it, portable elsewhere) and the exact scan.

use super::*;

/// The dot-product and popcount kernels this CPU runs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Kernels {
    pub(super) dot: DotKernel,
    pub(super) popcnt: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DotKernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Kernels {
    pub(super) fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
            Kernels {
                dot: if avx2 { DotKernel::Avx2Fma } else { DotKernel::Portable },
                popcnt: std::arch::is_x86_feature_detected!("popcnt"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Kernels { dot: DotKernel::Portable, popcnt: false }
        }
    }

    #[cfg(test)]
    pub(super) fn portable() -> Kernels {
        Kernels { dot: DotKernel::Portable, popcnt: false }
    }
}

/// Scores every row of `rows` (`dim` wide, the first being row `base`) into `top`.
pub(super) fn scan_dots(kernel: DotKernel, rows: &[f32], dim: usize, query: &[f32], base: usize, top: &mut TopK) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `DotKernel::Avx2Fma` is only chosen after detecting AVX2 and FMA.
        DotKernel::Avx2Fma => unsafe { scan_dots_avx2(rows, dim, query, base, top) },
        DotKernel::Portable => {
            for (i, row) in rows.chunks_exact(dim).enumerate() {
                top.offer(dot_portable(row, query), base + i);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn scan_dots_avx2(rows: &[f32], dim: usize, query: &[f32], base: usize, top: &mut TopK) {
    for (i, row) in rows.chunks_exact(dim).enumerate() {
        top.offer(dot_avx2(row, query), base + i);
    }
}

pub(super) fn dot_with(kernel: DotKernel, a: &[f32], b: &[f32]) -> f32 {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `DotKernel::Avx2Fma` is only chosen after detecting AVX2 and FMA.
        DotKernel::Avx2Fma => unsafe { dot_avx2(a, b) },
        DotKernel::Portable => dot_portable(a, b),
    }
}

/// Dot product of the common prefix of `a` and `b` (SIMD where the CPU has it).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(Kernels::detect().dot, a, b)
}

/// Dot product with eight independent accumulators (vectorises well on any target).
pub(super) fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// AVX2+FMA dot product: four 8-lane accumulators (32 floats per step), then 8 at a time,
/// then a scalar tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut s0, mut s1, mut s2, mut s3) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n <= a.len(), b.len(): all four 8-float loads are in bounds;
        // loadu has no alignment requirement.
        unsafe {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), s1);
            s2 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 16)), _mm256_loadu_ps(pb.add(i + 16)), s2);
            s3 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 24)), _mm256_loadu_ps(pb.add(i + 24)), s3);
        }
        i += 32;
    }
    while i + 8 <= n {
        // SAFETY: i + 8 <= n: the 8-float loads are in bounds.
        unsafe {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        }
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_movehdup_ps(q));
    let mut sum = _mm_cvtss_f32(q);
    for j in i..n {
        sum += a[j] * b[j];
    }
    sum
}
