//! A `/recognize` body through the handler's parsing: JSON, the `bboxes` entries, each crop's
//! base64, then each crop's image decoding. Every refusal must be a client error (4xx) of the
//! catalogue; an accepted body must give one crop slot per entry.
#![no_main]

use facerec::api::recognize::parse_recognize;
use facerec::face::image::{ImageLimits, decode};
use libfuzzer_sys::fuzz_target;

const MAX_CROPS: usize = 64;
const LIMITS: ImageLimits = ImageLimits { max_side: 2048, max_pixels: 1 << 20 };

fuzz_target!(|data: &[u8]| {
    match parse_recognize(data, MAX_CROPS) {
        Ok(parsed) => {
            let entries = parsed.request.get("bboxes").and_then(|b| b.as_array()).expect("an accepted body has `bboxes`");
            assert_eq!(entries.len(), parsed.crops.len());
            assert!(entries.len() <= MAX_CROPS);
            for crop in parsed.crops {
                match crop {
                    Ok(bytes) => {
                        assert!(!bytes.is_empty(), "an empty crop was accepted");
                        let _ = decode(&bytes, &LIMITS);
                    }
                    Err(e) => assert!(e.code.status().is_client_error(), "entry error {:?} is not a client error", e.code),
                }
            }
        }
        Err(e) => assert!(e.code.status().is_client_error(), "refusal {:?} is not a client error", e.code),
    }
});
