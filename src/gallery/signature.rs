//! 1-bit signatures of randomly rotated vectors, and the Hamming scans over them that pick the
//! fast search's candidates.

use super::*;

/// 1-bit signatures of randomly rotated vectors: flip signs at random, Walsh-Hadamard
/// transform (zero-padded to a power of two), keep the signs. Two vectors at angle t
/// disagree on about t/pi of the bits whatever the data's distribution.
pub(super) struct Signer {
    pub(super) dim: usize,
    pub(super) padded: usize,
    pub(super) words: usize,
    pub(super) flips: Vec<f32>,
}

impl Signer {
    pub(super) fn new(dim: usize) -> Signer {
        let padded = dim.next_power_of_two();
        // A fixed seed: signatures are never stored, but searches should be reproducible.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let flips = (0..dim)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x & 1 == 0 { 1.0 } else { -1.0 }
            })
            .collect();
        Signer { dim, padded, words: padded.div_ceil(64), flips }
    }

    /// Writes `v`'s signature into `out` (`words` long); `buf` is scratch space.
    pub(super) fn sign(&self, v: &[f32], buf: &mut Vec<f32>, out: &mut [u64]) {
        buf.clear();
        buf.resize(self.padded, 0.0);
        for (b, (a, s)) in buf.iter_mut().zip(v.iter().zip(&self.flips)) {
            *b = a * s;
        }
        walsh_hadamard(buf);
        for (word, block) in out.iter_mut().zip(buf.chunks(64)) {
            let mut bits = 0u64;
            for (j, &y) in block.iter().enumerate() {
                bits |= u64::from(y > 0.0) << j;
            }
            *word = bits;
        }
    }
}

/// In-place unnormalised Walsh-Hadamard transform of a power-of-two-long vector (the first
/// three levels fused per block of eight; the wider ones vectorise).
pub(super) fn walsh_hadamard(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    if n >= 8 {
        for block in x.chunks_exact_mut(8) {
            let [a0, a1, a2, a3, a4, a5, a6, a7] = [block[0], block[1], block[2], block[3], block[4], block[5], block[6], block[7]];
            let (b0, b1, b2, b3, b4, b5, b6, b7) = (a0 + a1, a0 - a1, a2 + a3, a2 - a3, a4 + a5, a4 - a5, a6 + a7, a6 - a7);
            let (c0, c1, c2, c3, c4, c5, c6, c7) = (b0 + b2, b1 + b3, b0 - b2, b1 - b3, b4 + b6, b5 + b7, b4 - b6, b5 - b7);
            block.copy_from_slice(&[c0 + c4, c1 + c5, c2 + c6, c3 + c7, c0 - c4, c1 - c5, c2 - c6, c3 - c7]);
        }
        h = 8;
    }
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (p, q) = (*a, *b);
                *a = p + q;
                *b = p - q;
            }
        }
        h *= 2;
    }
}

/// Hamming distance of every signature in `sigs` (`query.len()` words each, the first being
/// row `base`) to `query`, into `list`.
pub(super) fn scan_hamming(popcnt: bool, sigs: &[u64], query: &[u64], base: usize, list: &mut Shortlist) {
    #[cfg(target_arch = "x86_64")]
    if popcnt {
        // SAFETY: `popcnt` is only true after detecting the POPCNT instruction.
        unsafe {
            match <&[u64; 8]>::try_from(query) {
                Ok(q) => scan_hamming_popcnt_fixed(sigs, q, base, list),
                Err(_) => scan_hamming_popcnt(sigs, query, base, list),
            }
        }
        return;
    }
    let _ = popcnt;
    match <&[u64; 8]>::try_from(query) {
        Ok(q) => hamming_fixed(sigs, q, base, list),
        Err(_) => hamming_any(sigs, query, base, list),
    }
}

/// 512-bit signatures (512-D templates): the loop fully unrolled.
#[inline(always)]
pub(super) fn hamming_fixed<const W: usize>(sigs: &[u64], query: &[u64; W], base: usize, list: &mut Shortlist) {
    for (i, s) in sigs.chunks_exact(W).enumerate() {
        let mut d = 0;
        for w in 0..W {
            d += (s[w] ^ query[w]).count_ones();
        }
        list.offer(d, base + i);
    }
}

#[inline(always)]
pub(super) fn hamming_any(sigs: &[u64], query: &[u64], base: usize, list: &mut Shortlist) {
    for (i, s) in sigs.chunks_exact(query.len()).enumerate() {
        let d = s.iter().zip(query).map(|(a, b)| (a ^ b).count_ones()).sum();
        list.offer(d, base + i);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
pub(super) fn scan_hamming_popcnt_fixed(sigs: &[u64], query: &[u64; 8], base: usize, list: &mut Shortlist) {
    hamming_fixed(sigs, query, base, list);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
pub(super) fn scan_hamming_popcnt(sigs: &[u64], query: &[u64], base: usize, list: &mut Shortlist) {
    hamming_any(sigs, query, base, list);
}
