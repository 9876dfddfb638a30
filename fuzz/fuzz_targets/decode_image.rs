//! Image bytes through what the engine does before ONNX Runtime: decode within the limits
//! (format sniffing, header checks, EXIF orientation, 8-bit conversion), then the detector's
//! letterbox and the tight-crop retry's padded canvas. Any panic, overflow or allocation past
//! libFuzzer's limit is a finding.
#![no_main]

use facerec::face::RetryCanvas;
use facerec::face::detector::letterbox;
use facerec::face::image::{ImageLimits, decode};
use libfuzzer_sys::fuzz_target;

/// Small limits keep each run fast; the header checks are the same at any size.
const LIMITS: ImageLimits = ImageLimits { max_side: 2048, max_pixels: 1 << 20 };

fuzz_target!(|data: &[u8]| {
    let Ok(img) = decode(data, &LIMITS) else { return };
    let (w, h) = img.rgb.dimensions();
    assert!(w >= 1 && h >= 1, "decoded an empty image");
    assert!(w <= LIMITS.max_side && h <= LIMITS.max_side && u64::from(w) * u64::from(h) <= LIMITS.max_pixels, "limits not applied");
    assert_eq!(img.rgb.as_raw().len(), w as usize * h as usize * 3);
    for det in [(320, 320), (640, 640)] {
        let lb = letterbox(&img.rgb, det.0, det.1).expect("a decoded image letterboxes");
        assert_eq!(lb.blob.len(), 3 * det.0 as usize * det.1 as usize);
        assert!(lb.det_scale.is_finite() && lb.det_scale > 0.0);
        assert!(lb.blob.iter().all(|v| v.is_finite() && (-1.0..=1.0).contains(v)));
    }
    let retry = RetryCanvas::new(&img.rgb, (320, 320));
    assert!(retry.canvas.width() <= 3 * 320 && retry.canvas.height() <= 3 * 320, "retry canvas {:?}", retry.canvas.dimensions());
    letterbox(&retry.canvas, 320, 320).expect("a padded image letterboxes");
});
