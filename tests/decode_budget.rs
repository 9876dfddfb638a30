//! Decoding under a budget (issue 15, item 1 and the decoder half of item 4): inputs that are
//! small on the wire but would cost seconds of CPU or hundreds of MB are refused fast and with
//! little memory, built here from the real fixtures; real photos still decode.
//!
//! `cargo test --release --test decode_budget -- --nocapture` prints the figures quoted in the
//! README's Hardening section.

mod support;

use std::time::{Duration, Instant};

use facerec::face::FaceError;
use facerec::face::budget::{DecodeBudget, MAX_JPEG_SCANS, thread_cpu_time};
use facerec::face::image::{ImageLimits, decode, decode_within};

// ---------------------------------------------------------------------------------------------
// The largest single allocation (Rust side: the PNG decoder, buffers; libjpeg's own mallocs are
// not seen here).

#[global_allocator]
static GLOBAL: support::peak_alloc::PeakAlloc = support::peak_alloc::PeakAlloc;

/// `f`'s result, its wall time, its CPU time, and the largest single allocation it made.
fn measure<T>(f: impl FnOnce() -> T) -> (T, Duration, Duration, usize) {
    let (t, cpu) = (Instant::now(), thread_cpu_time());
    let (out, peak) = support::peak_alloc::peak_alloc(f);
    (out, t.elapsed(), thread_cpu_time().saturating_sub(cpu), peak)
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

// ---------------------------------------------------------------------------------------------
// JPEG

/// A `side` x `side` grey progressive JPEG (libjpeg's standard progression: 6 scans for grey):
/// the real face of img5.jpg on a flat background, as the issue's bomb was (mostly flat, so
/// each scan takes a few hundred bytes).
fn progressive_grey(side: usize) -> Vec<u8> {
    let face = image::load_from_memory(&fixture("img5.jpg")).expect("fixture decodes").to_luma8();
    let mut grey = vec![128u8; side * side];
    for (y, row) in face.rows().enumerate().take(side) {
        for (x, p) in row.enumerate().take(side) {
            grey[y * side + x] = p.0[0];
        }
    }
    let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_GRAYSCALE);
    c.set_fastest_defaults();
    c.set_size(side, side);
    c.set_quality(85.0);
    c.set_progressive_mode();
    let mut started = c.start_compress(Vec::new()).expect("starts");
    started.write_scanlines(&grey).expect("writes");
    started.finish().expect("finishes")
}

/// Offset of the first SOS marker and of the Huffman tables (DHT) written just before it,
/// found by walking the header's segments by their lengths.
fn first_scan(jpeg: &[u8]) -> (usize, usize) {
    let (mut pos, mut tables) = (2, None);
    loop {
        assert_eq!(jpeg[pos], 0xff, "a marker at {pos}");
        match jpeg[pos + 1] {
            0xda => return (tables.unwrap_or(pos), pos),
            0xc4 => tables = tables.or(Some(pos)),
            _ => tables = None,
        }
        pos += 2 + usize::from(u16::from_be_bytes([jpeg[pos + 2], jpeg[pos + 3]]));
    }
}

fn first_sos(jpeg: &[u8]) -> usize {
    first_scan(jpeg).1
}

/// Offsets of every SOS marker (after the header, FF DA only occurs as a marker: entropy data
/// stuffs every FF with 00).
fn scans(jpeg: &[u8]) -> Vec<usize> {
    let start = first_sos(jpeg);
    (start..jpeg.len() - 1).filter(|&i| jpeg[i] == 0xff && jpeg[i + 1] == 0xda).collect()
}

/// The issue's bomb: `jpeg` with its last scan repeated `times` more times.
fn last_scan_repeated(jpeg: &[u8], times: usize) -> Vec<u8> {
    let last = *scans(jpeg).last().expect("has scans");
    let eoi = jpeg.len() - 2;
    assert_eq!(&jpeg[eoi..], [0xff, 0xd9]);
    let mut out = jpeg[..eoi].to_vec();
    for _ in 0..times {
        out.extend_from_slice(&jpeg[last..eoi]);
    }
    out.extend_from_slice(&[0xff, 0xd9]);
    out
}

/// The end of the scan whose SOS marker is at `sos`: the next marker that is not a restart
/// (entropy data stuffs every FF with 00).
fn scan_end(jpeg: &[u8], sos: usize) -> usize {
    let header = 2 + usize::from(u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]));
    (sos + header..jpeg.len() - 1)
        .find(|&i| jpeg[i] == 0xff && jpeg[i + 1] != 0 && !(0xd0..=0xd7).contains(&jpeg[i + 1]))
        .expect("a marker ends the scan")
}

/// Spectral start and successive-approximation high bit of the scan at `sos`.
fn scan_params(jpeg: &[u8], sos: usize) -> (u8, u8) {
    let n = usize::from(jpeg[sos + 4]);
    let p = sos + 5 + 2 * n;
    (jpeg[p], jpeg[p + 2] >> 4)
}

/// A bomb libjpeg finds nothing wrong with: after the whole progression, its DC scans (the
/// first, then the refinement) played `times` more times. Each pair leaves every DC coefficient
/// complete again, so the next pair is a consistent progression: only the scan count stops it.
fn dc_scans_repeated(jpeg: &[u8], times: usize) -> Vec<u8> {
    let (tables, first) = first_scan(jpeg);
    let all = scans(jpeg);
    let dc_refine = *all.iter().find(|&&s| scan_params(jpeg, s) == (0, 1)).expect("a DC refinement scan");
    assert_eq!(scan_params(jpeg, first), (0, 0), "the progression starts with the DC scan");
    let pair = [&jpeg[tables..scan_end(jpeg, first)], &jpeg[dc_refine..scan_end(jpeg, dc_refine)]].concat();
    let eoi = jpeg.len() - 2;
    let mut out = jpeg[..eoi].to_vec();
    for _ in 0..times {
        out.extend_from_slice(&pair);
    }
    out.extend_from_slice(&[0xff, 0xd9]);
    out
}

#[test]
fn real_photos_decode_within_the_budget_baseline_and_progressive() {
    let lim = ImageLimits::default();
    for name in ["img5.jpg", "img6.jpg", "img10.jpg", "img11.jpg", "img12.jpg", "img16.jpg", "img17.jpg", "t1.jpg", "img5_exif_rotated.jpg"]
    {
        let d = decode(&fixture(name), &lim).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(d.rgb.width() > 0, "{name}");
    }
    let p = progressive_grey(1200);
    let n = scans(&p).len();
    assert!((2..=12).contains(&n), "a standard progression has about ten scans, this one {n}");
    let d = decode(&p, &lim).expect("a progressive photo decodes");
    assert_eq!(d.rgb.dimensions(), (1200, 1200));
}

#[test]
fn the_issues_scan_bomb_is_refused_fast() {
    let p = progressive_grey(6000);
    for times in [500, 2000] {
        let bomb = last_scan_repeated(&p, times);
        let (result, wall, cpu, _) = measure(|| decode(&bomb, &ImageLimits::default()));
        println!("6000x6000 progressive, last scan repeated {times}x: {} KB, refused in {wall:?} ({cpu:?} CPU)", bomb.len() >> 10);
        match result {
            Err(FaceError::InvalidImage(m)) => assert!(m.contains("progression"), "{m}"),
            other => panic!("expected the repeated scan refused, got {other:?}"),
        }
        assert!(cpu < Duration::from_secs(1), "refused after {cpu:?} of CPU");
    }
}

#[test]
fn a_consistent_scan_bomb_is_stopped_by_the_scan_cap() {
    let p = progressive_grey(6000);
    let bomb = dc_scans_repeated(&p, 40);
    assert!(scans(&bomb).len() > MAX_JPEG_SCANS as usize);
    let (result, wall, cpu, _) = measure(|| decode(&bomb, &ImageLimits::default()));
    println!(
        "6000x6000 progressive, DC scans repeated to {} scans: {} KB, refused in {wall:?} ({cpu:?} CPU)",
        scans(&bomb).len(),
        bomb.len() >> 10
    );
    match result {
        Err(FaceError::TooCostly(m)) => assert!(m.contains(&format!("more than {MAX_JPEG_SCANS} scans")), "{m}"),
        other => panic!("expected too costly, got {other:?}"),
    }
    // 64 scans of 36 Mpx: bounded, but more than a real photo's ten.
    assert!(cpu < Duration::from_secs(3), "refused after {cpu:?} of CPU");
    // Just over the cap is refused, just under it decodes.
    let small = progressive_grey(400);
    let per = scans(&small).len() as u32;
    let cap = DecodeBudget { max_jpeg_scans: per + 4, ..DecodeBudget::default() };
    let within = decode_within(&dc_scans_repeated(&small, 2), &ImageLimits::default(), &cap).expect("decodes at the cap");
    assert_eq!(within.rgb.as_raw(), decode(&small, &ImageLimits::default()).expect("decodes").rgb.as_raw(), "same pixels");
    assert!(matches!(decode_within(&dc_scans_repeated(&small, 3), &ImageLimits::default(), &cap), Err(FaceError::TooCostly(_))));
}

#[test]
fn the_cpu_budget_stops_a_long_decode() {
    let p = progressive_grey(6000);
    let tight = DecodeBudget { max_cpu: Duration::from_millis(1), ..DecodeBudget::default() };
    let (result, _, cpu, _) = measure(|| decode_within(&p, &ImageLimits::default(), &tight));
    match result {
        Err(FaceError::TooCostly(m)) => assert!(m.contains("ms of CPU"), "{m}"),
        other => panic!("expected too costly, got {other:?}"),
    }
    assert!(cpu < Duration::from_secs(1), "{cpu:?} of CPU");
    let (ok, wall, cpu, _) = measure(|| decode(&p, &ImageLimits::default()));
    println!("6000x6000 progressive ({} KB), decoded in {wall:?} ({cpu:?} CPU)", p.len() >> 10);
    assert!(ok.is_ok(), "within the default budget: {ok:?}");
}

#[test]
fn a_jpeg_cut_short_is_refused_even_when_it_ends_with_eoi() {
    let lim = ImageLimits::default();
    for name in ["img5.jpg", "img6.jpg"] {
        let full = fixture(name);
        let mut cut = full[..full.len() / 2].to_vec();
        cut.extend_from_slice(&[0xff, 0xd9]);
        match decode(&cut, &lim) {
            Err(FaceError::InvalidImage(m)) => assert!(m.contains("corrupt") || m.contains("truncated"), "{name}: {m}"),
            other => panic!("{name}: expected invalid_image, got {other:?}"),
        }
        // Without the EOI as well.
        assert!(matches!(decode(&full[..full.len() / 2], &lim), Err(FaceError::InvalidImage(_))), "{name}");
    }
}

#[test]
fn a_tiny_jpeg_claiming_40_megapixels_is_refused_fast() {
    // A real 16x16 baseline JPEG whose frame header claims 6400 x 6250 (40 Mpx).
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(16, 16, image::Rgb([120, 130, 140])));
    let mut jpeg = std::io::Cursor::new(Vec::new());
    img.write_to(&mut jpeg, image::ImageFormat::Jpeg).expect("encodes");
    let mut jpeg = jpeg.into_inner();
    let sof = jpeg.windows(2).position(|m| m == [0xff, 0xc0]).expect("SOF0");
    jpeg[sof + 5..sof + 7].copy_from_slice(&6250u16.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&6400u16.to_be_bytes());
    let (result, wall, cpu, _) = measure(|| decode(&jpeg, &ImageLimits::default()));
    println!("{}-byte JPEG claiming 6400x6250: refused in {wall:?} ({cpu:?} CPU)", jpeg.len());
    assert!(matches!(result, Err(FaceError::InvalidImage(_))), "{result:?}");
    assert!(cpu < Duration::from_millis(200), "{cpu:?} of CPU");
}

// ---------------------------------------------------------------------------------------------
// PNG

fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    let mut c = (data.len() as u32).to_be_bytes().to_vec();
    c.extend_from_slice(&body);
    c.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    c
}

/// A zlib stream that inflates to `n` zero bytes (n = 1 + 258 k): one literal, then
/// back-references of 258 bytes at distance 1, in one fixed-Huffman block (13 bits each).
fn zlib_zeros(k: usize) -> (Vec<u8>, usize) {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        fn lsb(&mut self, v: u64, bits: u32) {
            self.acc |= v << self.n;
            self.n += bits;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// A Huffman code: its most significant bit first.
        fn code(&mut self, code: u64, bits: u32) {
            let rev = (0..bits).fold(0, |r, i| r | (((code >> i) & 1) << (bits - 1 - i)));
            self.lsb(rev, bits);
        }
    }
    let mut b = Bits { out: vec![0x78, 0x01], acc: 0, n: 0 };
    b.lsb(1, 1); // BFINAL
    b.lsb(1, 2); // fixed Huffman
    b.code(0b0011_0000, 8); // literal 0
    for _ in 0..k {
        b.code(0b1100_0101, 8); // length 258 (code 285)
        b.code(0, 5); // distance 1
    }
    b.code(0, 7); // end of block
    if b.n > 0 {
        b.out.push(b.acc as u8);
    }
    let n = 1 + 258 * k;
    let adler = ((n % 65521) as u32) << 16 | 1;
    b.out.extend_from_slice(&adler.to_be_bytes());
    (b.out, n)
}

/// `png` with `extra` inserted right after IHDR.
fn with_chunk(png: &[u8], extra: &[u8]) -> Vec<u8> {
    [&png[..33], extra, &png[33..]].concat()
}

fn real_png() -> Vec<u8> {
    fixture("alex-lacamoire.png")
}

#[test]
fn png_metadata_bombs_are_dropped_unread() {
    let png = real_png();
    let clean = decode(&png, &ImageLimits::default()).expect("the fixture decodes");
    let (z, n) = zlib_zeros((256 << 20) / 258 + 1);
    assert!(n >= 256 << 20);
    let mut iccp = b"bomb\0\0".to_vec();
    iccp.extend_from_slice(&z);
    let mut ztxt = b"Comment\0\0".to_vec();
    ztxt.extend_from_slice(&z);
    for (what, extra) in [("iCCP", chunk(b"iCCP", &iccp)), ("zTXt", chunk(b"zTXt", &ztxt))] {
        let bomb = with_chunk(&png, &extra);
        let (result, wall, cpu, peak) = measure(|| decode(&bomb, &ImageLimits::default()));
        println!(
            "PNG with a {what} inflating to {} MiB ({} KB on the wire): {wall:?} ({cpu:?} CPU), largest allocation {} KB",
            n >> 20,
            bomb.len() >> 10,
            peak >> 10
        );
        let d = result.unwrap_or_else(|e| panic!("{what}: the image itself is fine: {e}"));
        assert_eq!(d.rgb.as_raw(), clean.rgb.as_raw(), "{what}: same pixels");
        // The image and a copy of the file; nothing near 256 MiB.
        assert!(peak < bomb.len() + (8 << 20), "{what}: largest allocation {peak} bytes");
        assert!(cpu < Duration::from_secs(1), "{what}: {cpu:?} of CPU");
    }
}

#[test]
fn sixteen_bit_pngs_are_held_to_the_decoded_byte_budget() {
    // 6000 x 6000 16-bit RGBA: 288 MB decoded, over the 160 MB budget (40 Mpx x 4 bytes).
    let mut ihdr = 6000u32.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&6000u32.to_be_bytes());
    ihdr.extend_from_slice(&[16, 6, 0, 0, 0]);
    let (idat, _) = zlib_zeros(1);
    let png = [b"\x89PNG\r\n\x1a\n".to_vec(), chunk(b"IHDR", &ihdr), chunk(b"IDAT", &idat), chunk(b"IEND", &[])].concat();
    let (result, _, cpu, peak) = measure(|| decode(&png, &ImageLimits::default()));
    match result {
        Err(FaceError::TooCostly(m)) => assert!(m.contains("MB decoded"), "{m}"),
        other => panic!("expected too costly, got {other:?}"),
    }
    assert!(peak < 1 << 20, "largest allocation {peak} bytes");
    assert!(cpu < Duration::from_millis(100), "{cpu:?} of CPU");
    // The same pixels in 8-bit RGB (108 MB) are within the budget: refused only as truncated.
    ihdr[8..10].copy_from_slice(&[8, 2]);
    let png = [b"\x89PNG\r\n\x1a\n".to_vec(), chunk(b"IHDR", &ihdr), chunk(b"IDAT", &idat), chunk(b"IEND", &[])].concat();
    assert!(matches!(decode(&png, &ImageLimits::default()), Err(FaceError::InvalidImage(_))));
}

#[test]
fn a_cmyk_scan_bomb_is_refused_before_the_fallback_decoder() {
    // CMYK goes to the image crate's decoder, not libjpeg: its scans are counted from the bytes.
    let side = 64;
    let cmyk: Vec<u8> = (0..side * side).flat_map(|i| [(i % 251) as u8, 40, 200, 10]).collect();
    let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
    c.set_fastest_defaults();
    c.set_size(side, side);
    c.set_progressive_mode();
    let mut started = c.start_compress(Vec::new()).expect("starts");
    started.write_scanlines(&cmyk).expect("writes");
    let jpeg = started.finish().expect("finishes");
    assert!(decode(&jpeg, &ImageLimits::default()).is_ok(), "a CMYK JPEG decodes");
    let bomb = last_scan_repeated(&jpeg, 100);
    match decode(&bomb, &ImageLimits::default()) {
        Err(FaceError::TooCostly(m)) => assert!(m.contains("scans"), "{m}"),
        other => panic!("expected too costly, got {other:?}"),
    }
}

/// Issue 15's first Must-show over HTTP, against the real binary with its defaults: a client
/// posting the 2000-scan bomb to /recognize back to back beside a normal client posting one real
/// crop. Prints the normal client's p50/p99 idle and during the bombs, their ratio, and how fast
/// the bombs were answered (and with what).
/// `cargo test --test decode_budget normal_client_beside -- --ignored --nocapture`
#[test]
#[ignore = "a measurement: prints figures, asserts only that the bombs are refused"]
fn a_normal_client_beside_a_stream_of_scan_bombs() {
    use base64::Engine as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let bomb = last_scan_repeated(&progressive_grey(6000), 2000);
    let dir = support::TempDir::new("bomb-beside");
    let server = support::Server::start(dir.path());
    let port = server.port;
    let normal =
        serde_json::to_vec(&serde_json::json!({"bboxes": [{"crop": b64(&support::fixture("Tom_Hanks_54745.png"))}]})).expect("json");
    let bomb_body = serde_json::to_vec(&serde_json::json!({"bboxes": [{"crop": b64(&bomb)}]})).expect("json");
    let post = |body: &[u8]| {
        let t = Instant::now();
        let r = support::request(port, "POST", "/recognize", Some("application/json"), body, Duration::from_secs(120)).expect("answered");
        (t.elapsed().as_secs_f64() * 1000.0, r)
    };
    let series = |n: usize| {
        let mut ms: Vec<f64> = (0..n)
            .map(|_| post(&normal))
            .map(|(t, r)| {
                assert_eq!(r.status, 200, "{}", r.text());
                t
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        ms
    };
    let pct = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    series(5); // warm-up
    let idle = series(40);
    let stop = AtomicBool::new(false);
    let (loaded, bombs) = std::thread::scope(|s| {
        let bomber = s.spawn(|| {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (t, r) = post(&bomb_body);
                let code = r.json()["meta"]["bboxes"][0]["error"]["code"]
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| r.json()["code"].as_str().map(str::to_owned));
                out.push((t, r.status, code));
            }
            out
        });
        let loaded = series(40);
        stop.store(true, Ordering::Relaxed);
        (loaded, bomber.join().expect("bomber"))
    });
    let mut bomb_ms: Vec<f64> = bombs.iter().map(|b| b.0).collect();
    bomb_ms.sort_by(f64::total_cmp);
    let codes: std::collections::BTreeSet<String> = bombs.iter().map(|b| format!("{} {}", b.1, b.2.as_deref().unwrap_or("-"))).collect();
    println!(
        "MEASURED normal /recognize idle p50={:.1}ms p99={:.1}ms; beside bombs p50={:.1}ms p99={:.1}ms; ratio p50 {:.2}x",
        pct(&idle, 0.5),
        pct(&idle, 0.99),
        pct(&loaded, 0.5),
        pct(&loaded, 0.99),
        pct(&loaded, 0.5) / pct(&idle, 0.5)
    );
    println!(
        "MEASURED {} bombs of {} KB ({} KB of JSON): answered p50={:.0}ms max={:.0}ms; answers: {codes:?}",
        bombs.len(),
        bomb.len() >> 10,
        bomb_body.len() >> 10,
        pct(&bomb_ms, 0.5),
        bomb_ms.last().copied().unwrap_or(f64::NAN)
    );
    assert!(!bombs.is_empty(), "no bomb was sent");
    assert!(bombs.iter().all(|b| b.2.is_some()), "every bomb answered with an error code: {codes:?}");
}
