//! What one decode may cost, beyond the pixel limits of [`super::image::ImageLimits`]: a cap on
//! a progressive JPEG's scans, a CPU-time budget checked while libjpeg works, a cap on the
//! decoded buffer (16-bit and alpha samples count), and a cap on the PNG metadata chunks that
//! are kept. Each bounds the work one small input can ask for: a 171 KB progressive JPEG with
//! its last scan repeated 2000 times would otherwise hold a worker for minutes.

use std::time::Duration;

/// Scans a progressive JPEG may hold at most. Encoders write about ten (libjpeg's default
/// script has 10, mozjpeg's optimised ones up to about 20); each scan may revisit every
/// coefficient of the image, so the count bounds the work.
pub const MAX_JPEG_SCANS: u32 = 64;

/// CPU time one decode may take, measured on the decoding thread. A 40 Mpx photo decodes in
/// well under half a second.
pub const MAX_DECODE_CPU: Duration = Duration::from_secs(2);

/// Bytes the decoded buffer may take per allowed pixel: 8-bit RGBA at the pixel limit, so a
/// 16-bit image may have a quarter fewer pixels than an 8-bit one, a 16-bit RGBA one half.
pub const MAX_DECODED_BYTES_PER_PIXEL: u64 = 4;

/// Bytes of an `eXIf` chunk a PNG may carry (kept for its orientation); a larger one is
/// dropped, as are text and ICC chunks of any size (see [`super::png`]).
pub const MAX_PNG_EXIF_BYTES: usize = 64 * 1024;

/// The budget of one decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeBudget {
    pub max_jpeg_scans: u32,
    pub max_cpu: Duration,
    pub max_decoded_bytes_per_pixel: u64,
}

impl Default for DecodeBudget {
    fn default() -> Self {
        Self { max_jpeg_scans: MAX_JPEG_SCANS, max_cpu: MAX_DECODE_CPU, max_decoded_bytes_per_pixel: MAX_DECODED_BYTES_PER_PIXEL }
    }
}

/// CPU time the calling thread has used so far (falls back to zero where the clock is missing,
/// which leaves the other limits in force).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, exclusively borrowed timespec; the call only writes it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_advances_with_work() {
        let start = thread_cpu_time();
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let used = thread_cpu_time().saturating_sub(start);
        assert!(used >= Duration::from_millis(5), "{used:?}");
    }
}
