//! JPEG pixels from libjpeg (libjpeg-turbo's decoder, as forked by mozjpeg), under a budget.
//!
//! libjpeg calls its error manager's `emit_message` for every warning and for every trace
//! message, whatever the trace level (the level only filters what the default hook prints).
//! The hook installed here uses that to watch the decode as it goes:
//! - each start of scan (`JTRC_SOS`) is counted: more than [`DecodeBudget::max_jpeg_scans`]
//!   stops the decode (a progressive JPEG whose scans are repeated makes libjpeg revisit every
//!   coefficient once per scan: minutes of CPU for a 171 KB file);
//! - the thread's CPU time is checked there and between bands of output rows: past
//!   [`DecodeBudget::max_cpu`] the decode stops;
//! - a warning that means the pixels are not what the file describes (data ending early, even
//!   if an EOI marker follows; a corrupt Huffman code; a marker in the middle of the data; an
//!   inconsistent progression) is an error, not a grey band to recognise faces in.
//!
//! Stopping is an unwind out of libjpeg (mozjpeg-sys is built with `unwinding`) to the
//! `catch_unwind` here; the decompressor is destroyed by its `Drop`.

use std::cell::RefCell;
use std::os::raw::c_int;
use std::time::Duration;

use image::RgbImage;

use super::FaceError;
use super::budget::{DecodeBudget, thread_cpu_time};
use super::image::{ImageLimits, check_size};

/// Why the hook stopped libjpeg (the unwind's payload).
enum Stop {
    Invalid(String),
    TooCostly(String),
}

/// What the hook watches, for the decode running on this thread.
struct Watch {
    scans: u32,
    max_scans: u32,
    cpu_start: Duration,
    max_cpu: Duration,
}

thread_local! {
    static WATCH: RefCell<Option<Watch>> = const { RefCell::new(None) };
}

/// Unwinds out of libjpeg with `stop`.
fn stop(stop: Stop) -> ! {
    std::panic::resume_unwind(Box::new(stop))
}

/// Stops the decode when this thread has used more CPU than the budget since it began.
fn check_cpu() {
    let over = WATCH.with(|w| {
        w.borrow().as_ref().and_then(|w| {
            let used = thread_cpu_time().saturating_sub(w.cpu_start);
            (used > w.max_cpu).then_some((used, w.max_cpu))
        })
    });
    if let Some((used, max)) = over {
        stop(Stop::TooCostly(format!(
            "decoding this JPEG took more than {} ms of CPU (stopped at {} ms)",
            max.as_millis(),
            used.as_millis()
        )));
    }
}

/// The warnings that mean the decoded pixels would not be the image the file describes.
fn is_corrupt_data(code: c_int) -> Option<&'static str> {
    use mozjpeg_sys as j;
    let code = u32::try_from(code).ok()?;
    Some(match code {
        c if c == j::JWRN_JPEG_EOF as u32 => "truncated JPEG: the data ends before the image does",
        c if c == j::JWRN_HIT_MARKER as u32 => "corrupt JPEG data: the image data ends early (premature end of data segment)",
        c if c == j::JWRN_HUFF_BAD_CODE as u32 => "corrupt JPEG data: bad Huffman code",
        c if c == j::JWRN_MUST_RESYNC as u32 => "corrupt JPEG data: a restart marker is missing",
        c if c == j::JWRN_NOT_SEQUENTIAL as u32 => "corrupt JPEG data: restart markers out of order",
        c if c == j::JWRN_BOGUS_PROGRESSION as u32 => "corrupt JPEG data: inconsistent progression sequence (a scan repeats)",
        c if c == j::JWRN_TOO_MUCH_DATA as u32 => "corrupt JPEG data: more image data than the frame holds",
        _ => return None,
    })
}

/// libjpeg's message hook: counts scans, checks the CPU budget, and turns corrupt-data
/// warnings into errors; other messages (traces, harmless warnings) are ignored, as OpenCV does.
extern "C-unwind" fn jpeg_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct, level: c_int) {
    // SAFETY: libjpeg calls this hook with `err` pointing at the error manager it was given.
    let code = unsafe { cinfo.err.as_ref() }.map_or(0, |e| e.msg_code);
    if level < 0 {
        if let Some(why) = is_corrupt_data(code) {
            stop(Stop::Invalid(why.into()));
        }
        return;
    }
    if code == mozjpeg_sys::JTRC_SOS as c_int {
        let over = WATCH.with(|w| {
            let mut w = w.borrow_mut();
            let w = w.as_mut()?;
            w.scans += 1;
            (w.scans > w.max_scans).then_some(w.max_scans)
        });
        if let Some(max) = over {
            stop(Stop::TooCostly(format!("the JPEG has more than {max} scans (progressive photos have about ten)")));
        }
        check_cpu();
    }
}

/// libjpeg's fatal-error hook: unwinds (without the panic hook) to the `catch_unwind` below.
extern "C-unwind" fn jpeg_error(cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
    // SAFETY: as above.
    let code = unsafe { cinfo.err.as_ref() }.map_or(0, |e| e.msg_code);
    stop(Stop::Invalid(format!("could not decode JPEG: libjpeg error {code}")))
}

/// Clears the thread's watch when the decode ends, however it ends.
struct WatchGuard;

impl Drop for WatchGuard {
    fn drop(&mut self) {
        WATCH.with(|w| *w.borrow_mut() = None);
    }
}

/// Output rows read between two CPU checks.
const ROWS_PER_CHECK: usize = 64;

/// Decodes a JPEG to RGB with libjpeg (islow IDCT, fancy upsampling: OpenCV's defaults),
/// within `limits` and `budget`. `Ok(None)` for colour spaces libjpeg cannot turn into RGB
/// (CMYK, YCCK). libjpeg reads the header itself: its size is checked against `limits` again
/// before any pixel buffer is allocated, in case it reads a different frame header.
pub fn decode_libjpeg(bytes: &[u8], limits: &ImageLimits, budget: &DecodeBudget) -> Result<Option<RgbImage>, FaceError> {
    let invalid = |m: String| FaceError::InvalidImage(format!("could not decode JPEG: {m}"));
    WATCH.with(|w| {
        *w.borrow_mut() = Some(Watch { scans: 0, max_scans: budget.max_jpeg_scans, cpu_start: thread_cpu_time(), max_cpu: budget.max_cpu })
    });
    let _guard = WatchGuard;
    // Width, height and RGB rows; `None` for a colour space libjpeg cannot turn into RGB.
    type Pixels = Option<(usize, usize, Vec<u8>)>;
    let result = std::panic::catch_unwind(|| -> std::io::Result<Result<Pixels, FaceError>> {
        // SAFETY: a zeroed error manager is what jpeg_std_error expects to fill in.
        let mut err: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
        // SAFETY: `err` is a valid, exclusively borrowed error manager.
        unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
        err.error_exit = Some(jpeg_error);
        err.emit_message = Some(jpeg_message);
        let d = mozjpeg::Decompress::with_err(err).from_mem(bytes)?;
        let side = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        if let Err(e) = check_size(side(d.width()), side(d.height()), limits) {
            return Ok(Err(e));
        }
        if matches!(d.color_space(), mozjpeg_sys::J_COLOR_SPACE::JCS_CMYK | mozjpeg_sys::J_COLOR_SPACE::JCS_YCCK) {
            // Decoded by the image crate, without this hook: its scans are counted from the
            // bytes (FF DA occurs only as a marker in entropy data; an embedded thumbnail's
            // scans count too, which only makes the cap stricter).
            let scans = bytes.windows(2).filter(|w| w == &[0xff, 0xda]).count();
            if scans > budget.max_jpeg_scans as usize {
                return Ok(Err(FaceError::TooCostly(format!(
                    "the JPEG has more than {} scans (progressive photos have about ten)",
                    budget.max_jpeg_scans
                ))));
            }
            return Ok(Ok(None));
        }
        // A progressive JPEG's scans are all read here, before the first row comes out.
        let mut started = d.rgb()?;
        let (w, h) = (started.width(), started.height());
        // Grown band by band, so memory is touched only as far as the decode gets.
        let row = w * 3;
        let mut data = Vec::new();
        data.try_reserve_exact(row * h).map_err(|_| std::io::ErrorKind::OutOfMemory)?;
        let mut y = 0;
        while y < h {
            let n = ROWS_PER_CHECK.min(h - y);
            let start = data.len();
            data.resize(start + n * row, 0u8);
            started.read_scanlines_into::<u8>(&mut data[start..])?;
            check_cpu();
            y += n;
        }
        started.finish()?;
        Ok(Ok(Some((w, h, data))))
    });
    let decoded = match result {
        Ok(Ok(v)) => v?,
        Ok(Err(e)) => return Err(invalid(e.to_string())),
        Err(payload) => {
            return Err(match payload.downcast::<Stop>() {
                Ok(stop) => match *stop {
                    Stop::Invalid(m) => FaceError::InvalidImage(m),
                    Stop::TooCostly(m) => FaceError::TooCostly(m),
                },
                Err(_) => invalid("corrupt data".into()),
            });
        }
    };
    let Some((w, h, data)) = decoded else { return Ok(None) };
    let (w, h) = (u32::try_from(w).map_err(|_| invalid("width".into()))?, u32::try_from(h).map_err(|_| invalid("height".into()))?);
    RgbImage::from_raw(w, h, data).map(Some).ok_or_else(|| invalid("short pixel buffer".into()))
}
