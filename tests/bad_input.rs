//! Bad input, kind by kind, against the real service: built by `serve::build` from real flags
//! (the same path as `facerec serve`), with the real models, a real SQLite file and the real
//! audit writer, called through its router. Every case asserts the status and the catalogue
//! code, that the store (users, face records, gallery) did not change, and that the service
//! still answers a real recognition afterwards. With `--nocapture` it prints a markdown table
//! of every input tried.
//!
//! The limits are set low here (flags), so each is exercised cheaply: body 1 MiB, 8 crops,
//! 4 files, names of 32 characters, images of 4096 px per side and 4 megapixels.

mod support;

use std::io::Cursor;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use clap::Parser;
use facerec::api::AppState;
use facerec::config::ServeConfig;
use facerec::face::FaceError;
use facerec::face::image::{ImageLimits, decode};
use serde_json::{Value, json};
use tower::ServiceExt;

use support::fixture;
use support::models::temp_dir;

const MAX_BODY: usize = 1 << 20;
const MAX_CROPS: usize = 8;
const MAX_FILES: usize = 4;
const MAX_NAME: usize = 32;

// ---------------------------------------------------------------------------------------------
// Largest single allocation per thread: proves an oversized claim is refused before any pixel
// buffer is allocated.

#[global_allocator]
static GLOBAL: support::peak_alloc::PeakAlloc = support::peak_alloc::PeakAlloc;

use support::peak_alloc::peak_alloc;

// ---------------------------------------------------------------------------------------------
// Crafted and real images.

fn encode(img: &image::DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).expect("encode test image");
    out.into_inner()
}

fn plain(w: u32, h: u32, fmt: image::ImageFormat) -> Vec<u8> {
    encode(&image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(w, h, image::Rgb([120, 130, 140]))), fmt)
}

/// A PNG signature and IHDR claiming `w` x `h` RGB pixels, and nothing else (57 bytes).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc32fast::hash(&ihdr).to_be_bytes());
    let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01";
    out.extend_from_slice(&((idat.len() - 4) as u32).to_be_bytes());
    out.extend_from_slice(idat);
    out.extend_from_slice(&crc32fast::hash(idat).to_be_bytes());
    out
}

/// A real 16x16 baseline JPEG whose frame header (SOF0) is patched to claim `w` x `h`.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut jpeg = plain(16, 16, image::ImageFormat::Jpeg);
    let sof = jpeg.windows(2).position(|m| m == [0xff, 0xc0]).expect("a baseline JPEG has SOF0");
    jpeg[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    jpeg
}

/// An extended WebP (VP8X) whose canvas claims `w` x `h`, with a real 1x1 lossless image inside.
fn webp_claiming(w: u32, h: u32) -> Vec<u8> {
    let tiny = plain(1, 1, image::ImageFormat::WebP);
    assert_eq!(&tiny[12..16], b"VP8L", "the image crate writes lossless WebP");
    let vp8l = &tiny[12..];
    let mut vp8x = b"VP8X".to_vec();
    vp8x.extend_from_slice(&10u32.to_le_bytes());
    vp8x.extend_from_slice(&[0, 0, 0, 0]);
    vp8x.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&((4 + vp8x.len() + vp8l.len()) as u32).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(&vp8x);
    out.extend_from_slice(vp8l);
    out
}

/// A BMP file header and BITMAPINFOHEADER claiming `w` x `h` at 24 bits, without pixels.
fn bmp_claiming(w: i32, h: i32) -> Vec<u8> {
    let mut out = b"BM".to_vec();
    out.extend_from_slice(&54u32.to_le_bytes()); // file size (a lie, as an attacker's would be)
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&54u32.to_le_bytes()); // pixel data offset
    out.extend_from_slice(&40u32.to_le_bytes());
    out.extend_from_slice(&w.to_le_bytes());
    out.extend_from_slice(&h.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&24u16.to_le_bytes());
    out.extend_from_slice(&[0; 24]);
    out
}

/// A minimal GIF89a (1x1) and a minimal little-endian TIFF header: formats we do not take.
fn gif() -> Vec<u8> {
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;".to_vec()
}

fn tiff() -> Vec<u8> {
    b"II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00".to_vec()
}

/// Deterministic noise (no face, no format).
fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn oversized_claims_are_refused_from_the_header_in_every_format() {
    let lim = ImageLimits::default();
    let cases: [(&str, Vec<u8>); 4] = [
        ("PNG", png_claiming(60_000, 60_000)),
        ("JPEG", jpeg_claiming(60_000, 60_000)),
        ("WebP", webp_claiming(60_000, 60_000)),
        ("BMP", bmp_claiming(60_000, 60_000)),
    ];
    for (what, bytes) in cases {
        assert!(bytes.len() < 1024, "{what}: a small file ({} bytes)", bytes.len());
        let (result, peak) = peak_alloc(|| decode(&bytes, &lim));
        match result {
            Err(FaceError::ImageTooLarge { width: 60_000, height: 60_000, .. }) => {}
            other => panic!("{what}: expected image_too_large for 60000x60000, got {other:?}"),
        }
        // 60000 x 60000 x 3 bytes would be 10.8 GB; nothing close to a row of it is allocated.
        assert!(peak < 1 << 20, "{what}: largest allocation {peak} bytes");
    }
    // Within the side limit but over the pixel budget: refused the same way.
    let lim = ImageLimits { max_side: 60_000, max_pixels: 40_000_000 };
    let (result, peak) = peak_alloc(|| decode(&png_claiming(20_000, 20_000), &lim));
    assert!(matches!(result, Err(FaceError::ImageTooLarge { .. })), "{result:?}");
    assert!(peak < 1 << 20, "largest allocation {peak} bytes");
}

#[test]
fn limits_default_to_the_documented_values() {
    let cli = Cli::parse_from(["facerec"]);
    let c = &cli.serve;
    assert_eq!(c.max_body_bytes, 128 * 1024 * 1024);
    assert_eq!(
        c.request_limits(),
        facerec::api::RequestLimits { max_crops: 512, max_files: 32, max_name_chars: 128, bytes_in_flight: 256 * 1024 * 1024 }
    );
    assert_eq!(c.request_limits(), facerec::api::RequestLimits::default());
    assert_eq!(c.legacy_status, facerec::api::LegacyStatus::Original);
    assert!(!c.aligned_input && !c.analyzer_options().aligned_input);
    assert_eq!(c.image_limits(), ImageLimits { max_side: 16_384, max_pixels: 40_000_000 });
    for bad in [["--max-crops", "0"], ["--max-image-megapixels", "NaN"], ["--max-image-megapixels", "-1"], ["--max-image-side", "70000"]] {
        assert!(Cli::try_parse_from(["facerec", bad[0], bad[1]]).is_err(), "{bad:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The service.

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeConfig,
}

struct Service {
    state: Arc<AppState>,
    dir: std::path::PathBuf,
}

impl Service {
    async fn call(&self, req: Request<Body>) -> (StatusCode, Value, Vec<u8>) {
        let resp = facerec::api::app(Arc::clone(&self.state), MAX_BODY).oneshot(req).await.expect("infallible");
        let status = resp.status();
        let ct = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body").to_vec();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            assert!(ct.starts_with("application/json"), "{status}: error is not JSON ({ct}): {}", String::from_utf8_lossy(&bytes));
        }
        (status, json, bytes)
    }

    /// What a rejected request must leave as it was.
    async fn snapshot(&self) -> Snapshot {
        let users = self.state.service.list_users().await.expect("users");
        let faces = self.state.service.list_faces(1, 0).await.expect("faces").1;
        Snapshot {
            users: users.iter().map(|u| (u.username.clone(), u.samples)).collect(),
            faces,
            gallery: self.state.service.gallery().len(),
            log_lines: std::fs::read_to_string(self.dir.join("logs.txt")).unwrap_or_default().lines().count(),
            photos: std::fs::read_dir(self.dir.join("photo")).map(|d| d.count()).unwrap_or(0),
        }
    }

    /// A real recognition of alice's fourth photo: the service is up and its models work.
    async fn still_recognises(&self) {
        let (s, v, _) = self.call(post_json("/recognize", &json!({"bboxes": [{"crop": b64(&fixture("img11.jpg"))}]}))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["meta"]["bboxes"][0]["name"], "alice", "{v}");
    }
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    users: Vec<(String, u64)>,
    faces: usize,
    gallery: usize,
    log_lines: usize,
    photos: usize,
}

fn post_json(uri: &str, body: &Value) -> Request<Body> {
    post_raw(uri, "application/json", body.to_string().into_bytes())
}

fn post_raw(uri: &str, content_type: &str, body: Vec<u8>) -> Request<Body> {
    Request::post(uri).header(header::CONTENT_TYPE, content_type).body(Body::from(body)).expect("request")
}

fn req(method: &str, uri: &str) -> Request<Body> {
    Request::builder().method(method).uri(uri).body(Body::empty()).expect("request")
}

/// A body sent in chunks with no Content-Length (as `Transfer-Encoding: chunked` arrives).
fn chunked(uri: &str, content_type: &str, body: Vec<u8>) -> Request<Body> {
    let chunks: Vec<Result<Bytes, std::io::Error>> = body.chunks(64 * 1024).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    Request::post(uri)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .expect("request")
}

const BOUNDARY: &str = "badInputBoundary7MA4YWxk";

/// A multipart body: (field, file name, bytes).
fn form_body(fields: &[(&str, Option<&str>, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, file, bytes) in fields {
        let disposition = match file {
            Some(f) => format!("form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream"),
            None => format!("form-data; name=\"{name}\""),
        };
        body.extend_from_slice(format!("--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n").as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn form(uri: &str, fields: &[(&str, Option<&str>, Vec<u8>)]) -> Request<Body> {
    post_raw(uri, &format!("multipart/form-data; boundary={BOUNDARY}"), form_body(fields))
}

fn enrol(username: &str, files: Vec<(&str, Vec<u8>)>) -> Request<Body> {
    let mut fields = vec![("username", None, username.as_bytes().to_vec())];
    fields.extend(files.into_iter().map(|(name, bytes)| ("files", Some(name), bytes)));
    form("/calculate_average_embedding", &fields)
}

fn text(name: &'static str, value: &str) -> (&'static str, Option<&'static str>, Vec<u8>) {
    (name, None, value.as_bytes().to_vec())
}

fn file(name: &'static str, bytes: Vec<u8>) -> (&'static str, Option<&'static str>, Vec<u8>) {
    (name, Some("upload.bin"), bytes)
}

/// What a case must get.
enum Expect {
    /// The whole request refused with this status and code; nothing changed.
    Refused(StatusCode, &'static str),
    /// One of the original contract's two errors, byte for byte; nothing changed.
    Legacy(StatusCode, &'static str),
    /// `/recognize` answered (200) with this code on its only entry; no user or record changed.
    Entry(&'static str),
}

struct Case {
    input: String,
    request: Request<Body>,
    expect: Expect,
}

fn case(input: impl Into<String>, request: Request<Body>, expect: Expect) -> Case {
    Case { input: input.into(), request, expect }
}

fn recognize_one(crop: Value) -> Request<Body> {
    post_json("/recognize", &json!({"camera": "gate-2", "bboxes": [{"bbox": [0, 0, 10, 10], "crop": crop}]}))
}

fn cases() -> Vec<Case> {
    use Expect::*;
    let bad = StatusCode::BAD_REQUEST;
    let too_large = StatusCode::PAYLOAD_TOO_LARGE;
    let face = fixture("img5.jpg");
    let truncated_jpeg = face[..face.len() / 3].to_vec();
    let one_px = plain(1, 1, image::ImageFormat::Png);
    let big_png = plain(3000, 2000, image::ImageFormat::Png); // 6 Mpx > 4 Mpx
    let wide_png = plain(5000, 10, image::ImageFormat::Png); // 5000 px > 4096 per side
    let huge_json = json!({"bboxes": [{"crop": "A".repeat(MAX_BODY)}]}).to_string().into_bytes();
    let nine = json!({"bboxes": vec![json!({"crop": b64(&face)}); MAX_CROPS + 1]});
    let long_name = "x".repeat(MAX_NAME + 1);
    let mp = format!("multipart/form-data; boundary={BOUNDARY}");
    vec![
        // /recognize: the body as a whole.
        case(
            "/recognize: invalid JSON `{not json`",
            post_raw("/recognize", "application/json", b"{not json".to_vec()),
            Refused(bad, "invalid_json"),
        ),
        case("/recognize: empty body", post_raw("/recognize", "application/json", Vec::new()), Refused(bad, "invalid_json")),
        case(
            "/recognize: body not UTF-8",
            post_raw("/recognize", "application/json", b"{\"bboxes\": [\xff\xfe]}".to_vec()),
            Refused(bad, "invalid_json"),
        ),
        case(
            "/recognize: JSON nested 100000 deep",
            post_raw("/recognize", "application/json", "[".repeat(100_000).into_bytes()),
            Refused(bad, "invalid_json"),
        ),
        case("/recognize: JSON not an object `[1, 2]`", post_json("/recognize", &json!([1, 2])), Refused(bad, "invalid_request")),
        case("/recognize: JSON a string", post_json("/recognize", &json!("hello")), Refused(bad, "invalid_request")),
        case("/recognize: no `bboxes`", post_json("/recognize", &json!({"camera": 1})), Refused(bad, "invalid_request")),
        case(
            "/recognize: `bboxes` not a list",
            post_json("/recognize", &json!({"bboxes": {"crop": "x"}})),
            Refused(bad, "invalid_request"),
        ),
        case(
            "/recognize: `bboxes` entries not objects",
            post_json("/recognize", &json!({"bboxes": [1, "two"]})),
            Refused(bad, "invalid_request"),
        ),
        case(
            format!("/recognize: {} crops (MAX_CROPS {MAX_CROPS})", MAX_CROPS + 1),
            post_json("/recognize", &nine),
            Refused(too_large, "too_many_crops"),
        ),
        case(
            "/recognize: body over MAX_BODY_BYTES (Content-Length)",
            post_raw("/recognize", "application/json", huge_json.clone()),
            Refused(too_large, "payload_too_large"),
        ),
        case(
            "/recognize: body over MAX_BODY_BYTES (chunked, no Content-Length)",
            chunked("/recognize", "application/json", huge_json.clone()),
            Refused(too_large, "payload_too_large"),
        ),
        case(
            "/recognize: JSON array body `[1]`",
            post_raw("/recognize", "application/json", b"[1]".to_vec()),
            Refused(bad, "invalid_request"),
        ),
        case(
            "/recognize: text/plain body (a cross-site simple request)",
            post_raw("/recognize", "text/plain", b"{\"bboxes\": []}".to_vec()),
            Refused(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
        ),
        case(
            "/recognize: no Content-Type",
            Request::post("/recognize").body(Body::from("{\"bboxes\": []}")).expect("request"),
            Refused(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
        ),
        case(
            "/users: form-encoded body",
            post_raw("/users", "application/x-www-form-urlencoded", b"username=x".to_vec()),
            Refused(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
        ),
        case(
            "/api/face/register: a form from another site (auth off)",
            {
                let mut r = form(
                    "/api/face/register",
                    &[("displayName", None, b"Mallory".to_vec()), ("image", Some("m.jpg"), fixture("img12.jpg"))],
                );
                r.headers_mut().insert(header::HOST, "127.0.0.1:8000".parse().expect("host"));
                r.headers_mut().insert(header::ORIGIN, "http://evil.example".parse().expect("origin"));
                r
            },
            Refused(StatusCode::FORBIDDEN, "cross_origin"),
        ),
        // /recognize: one entry's crop (the request is answered, the entry carries the error).
        case(
            "/recognize: entry without `crop`",
            post_json("/recognize", &json!({"bboxes": [{"bbox": [1, 2, 3, 4]}]})),
            Entry("invalid_request"),
        ),
        case("/recognize: `crop` a number", recognize_one(json!(12345)), Entry("invalid_request")),
        case("/recognize: `crop` base64 garbage `***`", recognize_one(json!("*** not base64 ***")), Entry("invalid_base64")),
        case("/recognize: `crop` empty string", recognize_one(json!("")), Entry("invalid_base64")),
        case("/recognize: `crop` valid base64 of random bytes", recognize_one(json!(b64(&noise(4096)))), Entry("invalid_image")),
        case("/recognize: `crop` truncated JPEG", recognize_one(json!(b64(&truncated_jpeg))), Entry("invalid_image")),
        case("/recognize: `crop` GIF (unsupported format)", recognize_one(json!(b64(&gif()))), Entry("invalid_image")),
        case("/recognize: `crop` TIFF (unsupported format)", recognize_one(json!(b64(&tiff()))), Entry("invalid_image")),
        case(
            "/recognize: `crop` PNG header claiming 60000x60000 (57 bytes)",
            recognize_one(json!(b64(&png_claiming(60_000, 60_000)))),
            Entry("image_too_large"),
        ),
        case(
            "/recognize: `crop` JPEG header claiming 60000x60000",
            recognize_one(json!(b64(&jpeg_claiming(60_000, 60_000)))),
            Entry("image_too_large"),
        ),
        case(
            "/recognize: `crop` WebP header claiming 60000x60000",
            recognize_one(json!(b64(&webp_claiming(60_000, 60_000)))),
            Entry("image_too_large"),
        ),
        case(
            "/recognize: `crop` BMP header claiming 60000x60000",
            recognize_one(json!(b64(&bmp_claiming(60_000, 60_000)))),
            Entry("image_too_large"),
        ),
        case("/recognize: `crop` real PNG of 3000x2000 (over 4 Mpx)", recognize_one(json!(b64(&big_png))), Entry("image_too_large")),
        case(
            "/recognize: `crop` real PNG of 5000x10 (over 4096 px per side)",
            recognize_one(json!(b64(&wide_png))),
            Entry("image_too_large"),
        ),
        // Users.
        case("POST /users: empty username", post_json("/users", &json!({"username": ""})), Refused(bad, "invalid_username")),
        case(
            "POST /users: username with a newline",
            post_json("/users", &json!({"username": "eve\nadmin"})),
            Refused(bad, "invalid_username"),
        ),
        case("POST /users: username with NUL", post_json("/users", &json!({"username": "eve\u{0}"})), Refused(bad, "invalid_username")),
        case(
            "POST /users: username with a right-to-left override",
            post_json("/users", &json!({"username": "eve\u{202e}gnp.exe"})),
            Refused(bad, "invalid_username"),
        ),
        case(
            format!("POST /users: username of {} characters (MAX_NAME_CHARS {MAX_NAME})", MAX_NAME + 1),
            post_json("/users", &json!({"username": long_name})),
            Refused(bad, "invalid_username"),
        ),
        case(
            "POST /users: username surrounded by spaces",
            post_json("/users", &json!({"username": " alice "})),
            Refused(bad, "invalid_username"),
        ),
        // Names that display like others (issue 15, item 8): one rule for usernames and displayNames.
        case(
            "POST /users: username with U+2060",
            post_json("/users", &json!({"username": "ali\u{2060}ce"})),
            Refused(bad, "invalid_username"),
        ),
        case(
            "POST /users: username with a soft hyphen",
            post_json("/users", &json!({"username": "ali\u{ad}ce"})),
            Refused(bad, "invalid_username"),
        ),
        case(
            "POST /users: username with a tag character",
            post_json("/users", &json!({"username": "alice\u{e0041}"})),
            Refused(bad, "invalid_username"),
        ),
        case(
            "POST /users: username with U+2028",
            post_json("/users", &json!({"username": "ali\u{2028}ce"})),
            Refused(bad, "invalid_username"),
        ),
        case(
            "POST /users: username with a Cyrillic o",
            post_json("/users", &json!({"username": "b\u{43e}b"})),
            Refused(bad, "invalid_username"),
        ),
        case(
            "POST /users: fullwidth username",
            post_json("/users", &json!({"username": "\u{ff41}lice"})),
            Refused(bad, "invalid_username"),
        ),
        case(
            "POST /users: username with a combining accent (not NFC)",
            post_json("/users", &json!({"username": "Zoe\u{308}"})),
            Refused(bad, "invalid_username"),
        ),
        case(
            "register: displayName with surrounding spaces (no silent trimming)",
            form("/api/face/register", &[text("displayName", " Alice "), file("image", face.clone())]),
            Refused(bad, "invalid_username"),
        ),
        case(
            "register: displayName mixing scripts",
            form("/api/face/register", &[text("displayName", "Ali\u{441}e"), file("image", face.clone())]),
            Refused(bad, "invalid_username"),
        ),
        case("POST /users: username a number", post_json("/users", &json!({"username": 5})), Refused(bad, "invalid_request")),
        case("POST /users: no username", post_json("/users", &json!({})), Refused(bad, "invalid_request")),
        case(
            "POST /users: user that exists",
            post_json("/users", &json!({"username": "alice"})),
            Refused(StatusCode::CONFLICT, "user_exists"),
        ),
        case("DELETE /users/nobody", req("DELETE", "/users/nobody"), Refused(StatusCode::NOT_FOUND, "user_not_found")),
        case("DELETE /users/%FF (path not UTF-8)", req("DELETE", "/users/%FF"), Refused(bad, "invalid_request")),
        // Enrolment.
        case(
            "enrol: unknown user",
            enrol("nobody", vec![("a.jpg", face.clone())]),
            Legacy(StatusCode::NOT_FOUND, r#"{"status":"error","message":"User 'nobody' not found."}"#),
        ),
        case(
            "enrol: no face in any image (1x1 PNG)",
            enrol("bob", vec![("dot.png", one_px.clone())]),
            Legacy(StatusCode::UNPROCESSABLE_ENTITY, r#"{"status":"error","message":"No faces detected in any image."}"#),
        ),
        case(
            "enrol: JSON instead of multipart",
            post_json("/calculate_average_embedding", &json!({"username": "bob"})),
            Refused(bad, "invalid_request"),
        ),
        case(
            "enrol: multipart without boundary",
            post_raw("/calculate_average_embedding", "multipart/form-data", form_body(&[text("username", "bob")])),
            Refused(bad, "invalid_request"),
        ),
        case(
            "enrol: multipart cut short (no closing boundary)",
            post_raw(
                "/calculate_average_embedding",
                &mp,
                form_body(&[text("username", "bob"), file("files", face.clone())])[..2000].to_vec(),
            ),
            Refused(bad, "invalid_request"),
        ),
        case("enrol: no `files` field", form("/calculate_average_embedding", &[text("username", "bob")]), Refused(bad, "invalid_request")),
        case(
            "enrol: no `username` field",
            form("/calculate_average_embedding", &[file("files", face.clone())]),
            Refused(bad, "invalid_request"),
        ),
        case(
            "enrol: username not UTF-8",
            form("/calculate_average_embedding", &[("username", None, b"b\xffb".to_vec()), file("files", face.clone())]),
            Refused(bad, "invalid_username"),
        ),
        case(
            "enrol: path-traversal username `../../etc/passwd` (no such user)",
            enrol("../../etc/passwd", vec![("a.jpg", face.clone())]),
            Legacy(StatusCode::NOT_FOUND, r#"{"status":"error","message":"User '../../etc/passwd' not found."}"#),
        ),
        case(
            "enrol: non-image file (text)",
            enrol("bob", vec![("notes.txt", b"hello, I am not a photo".to_vec())]),
            Refused(bad, "invalid_image"),
        ),
        case("enrol: zero-byte file", enrol("bob", vec![("empty.jpg", Vec::new())]), Refused(bad, "invalid_image")),
        case("enrol: GIF file", enrol("bob", vec![("a.gif", gif())]), Refused(bad, "invalid_image")),
        case(
            "enrol: a good photo and a truncated JPEG",
            enrol("bob", vec![("a.jpg", face.clone()), ("b.jpg", truncated_jpeg.clone())]),
            Refused(bad, "invalid_image"),
        ),
        case(
            "enrol: PNG header claiming 60000x60000",
            enrol("bob", vec![("bomb.png", png_claiming(60_000, 60_000))]),
            Refused(too_large, "image_too_large"),
        ),
        case(
            format!("enrol: {} files (MAX_FILES {MAX_FILES})", MAX_FILES + 1),
            enrol("bob", vec![("a.jpg", face.clone()); MAX_FILES + 1]),
            Refused(too_large, "too_many_files"),
        ),
        case(
            "enrol: body over MAX_BODY_BYTES (chunked)",
            chunked("/calculate_average_embedding", &mp, form_body(&[text("username", "bob"), file("files", noise(MAX_BODY + 10))])),
            Refused(too_large, "payload_too_large"),
        ),
        // The second API.
        case(
            "GET /api/face/<unknown uuid>",
            req("GET", "/api/face/3f6c1a52-9d1e-4b8e-a0a4-0d3b8f1f2c11"),
            Refused(StatusCode::NOT_FOUND, "face_not_found"),
        ),
        case("GET /api/face/not-a-uuid/image", req("GET", "/api/face/not-a-uuid/image"), Refused(StatusCode::NOT_FOUND, "face_not_found")),
        case(
            "DELETE /api/face/<unknown uuid>",
            req("DELETE", "/api/face/00000000-0000-0000-0000-000000000000"),
            Refused(StatusCode::NOT_FOUND, "face_not_found"),
        ),
        case("GET /api/face?limit=0", req("GET", "/api/face?limit=0"), Refused(bad, "invalid_request")),
        case("GET /api/face?limit=-5", req("GET", "/api/face?limit=-5"), Refused(bad, "invalid_request")),
        case("GET /api/face?limit=99999", req("GET", "/api/face?limit=99999"), Refused(bad, "invalid_request")),
        case("GET /api/face?offset=abc", req("GET", "/api/face?offset=abc"), Refused(bad, "invalid_request")),
        case(
            "search: topK=0",
            form("/api/face/search", &[text("topK", "0"), file("image", face.clone())]),
            Refused(bad, "invalid_request"),
        ),
        case(
            "search: topK=-3",
            form("/api/face/search", &[text("topK", "-3"), file("image", face.clone())]),
            Refused(bad, "invalid_request"),
        ),
        case(
            "search: topK=10000000000",
            form("/api/face/search", &[text("topK", "10000000000"), file("image", face.clone())]),
            Refused(bad, "invalid_request"),
        ),
        case(
            "search: threshold=NaN",
            form("/api/face/search", &[text("threshold", "NaN"), file("image", face.clone())]),
            Refused(bad, "invalid_request"),
        ),
        case(
            "search: threshold=7",
            form("/api/face/search", &[text("threshold", "7"), file("image", face.clone())]),
            Refused(bad, "invalid_request"),
        ),
        case("search: no `image`", form("/api/face/search", &[text("topK", "3")]), Refused(bad, "invalid_request")),
        case(
            "verify: threshold=inf",
            form("/api/face/verify", &[text("threshold", "inf"), file("image1", face.clone()), file("image2", face.clone())]),
            Refused(bad, "invalid_request"),
        ),
        case(
            "encode: 1x1 image",
            form("/api/face/encode", &[file("image", one_px.clone())]),
            Refused(StatusCode::UNPROCESSABLE_ENTITY, "no_face_detected"),
        ),
        case("encode: TIFF image", form("/api/face/encode", &[file("image", tiff())]), Refused(bad, "invalid_image")),
        case("register: no `displayName`", form("/api/face/register", &[file("image", face.clone())]), Refused(bad, "invalid_request")),
        case(
            "register: displayName with control characters",
            form("/api/face/register", &[text("displayName", "Al\u{7}ice"), file("image", face.clone())]),
            Refused(bad, "invalid_username"),
        ),
        case(
            "register: displayName too long",
            form("/api/face/register", &[text("displayName", &"y".repeat(MAX_NAME + 1)), file("image", face.clone())]),
            Refused(bad, "invalid_username"),
        ),
        case(
            "register: image is random bytes",
            form("/api/face/register", &[text("displayName", "Alice"), file("image", noise(2048))]),
            Refused(bad, "invalid_image"),
        ),
        // The router itself.
        case("GET /no/such/route", req("GET", "/no/such/route"), Refused(StatusCode::NOT_FOUND, "not_found")),
        case("PUT /recognize (wrong method)", req("PUT", "/recognize"), Refused(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")),
        case(
            "GET /calculate_average_embedding (wrong method)",
            req("GET", "/calculate_average_embedding"),
            Refused(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ),
    ]
}

#[test]
fn every_bad_input_gets_a_catalogue_error_and_changes_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(run_cases());
}

async fn run_cases() {
    let dir = temp_dir("bad-input");
    let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
    let cli = Cli::parse_from([
        "facerec",
        "--database-path",
        &d("data/facerec.db"),
        "--log-file",
        &d("logs.txt"),
        "--photo-dir",
        &d("photo"),
        "--model-cache-dir",
        &support::models::cache_dir().to_string_lossy(),
        "--execution-provider",
        "cpu",
        "--max-body-bytes",
        &MAX_BODY.to_string(),
        "--max-crops",
        &MAX_CROPS.to_string(),
        // Proper statuses, so that every refusal below is a 4xx (the original's HTTP 200 answers,
        // the default, are tested in tests/api.rs).
        "--legacy-status",
        "http",
        "--max-files",
        &MAX_FILES.to_string(),
        "--max-name-chars",
        &MAX_NAME.to_string(),
        "--max-image-side",
        "4096",
        "--max-image-megapixels",
        "4",
    ]);
    let built = facerec::serve::build(&cli.serve).await.expect("the service builds");
    assert_eq!(built.max_body_bytes, MAX_BODY);
    let svc = Service { state: built.state, dir: dir.clone() };

    // Setup: alice enrolled with three photos, bob created without any.
    assert_eq!(svc.call(post_json("/users", &json!({"username": "alice"}))).await.0, StatusCode::CREATED);
    assert_eq!(svc.call(post_json("/users", &json!({"username": "bob"}))).await.0, StatusCode::CREATED);
    let (s, v, _) = svc
        .call(enrol(
            "alice",
            vec![("img5.jpg", fixture("img5.jpg")), ("img6.jpg", fixture("img6.jpg")), ("img10.jpg", fixture("img10.jpg"))],
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    svc.still_recognises().await;

    let mut table = vec!["| input | status | code |".to_owned(), "|---|---|---|".to_owned()];
    let cases = cases();
    let n = cases.len();
    for Case { input, request, expect } in cases {
        let before = svc.snapshot().await;
        let (status, body, raw) = svc.call(request).await;
        let after = svc.snapshot().await;
        let code = match expect {
            Expect::Refused(want_status, want_code) => {
                assert_eq!((status, body["code"].as_str()), (want_status, Some(want_code)), "{input}: {body}");
                assert_eq!(body["status"], "error", "{input}: {body}");
                assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{input}: {body}");
                assert_eq!(after, before, "{input}: a refused request changed something");
                want_code.to_owned()
            }
            Expect::Legacy(want_status, want_body) => {
                assert_eq!((status, String::from_utf8_lossy(&raw).as_ref()), (want_status, want_body), "{input}");
                assert_eq!(after, before, "{input}: a refused request changed something");
                "(legacy body, no code)".to_owned()
            }
            Expect::Entry(want_code) => {
                assert_eq!(status, StatusCode::OK, "{input}: {body}");
                let entry = &body["meta"]["bboxes"][0];
                assert_eq!(entry["error"]["code"].as_str(), Some(want_code), "{input}: {body}");
                assert_eq!(entry["name"], "Unknown 1", "{input}");
                assert_eq!((&after.users, after.faces, after.gallery), (&before.users, before.faces, before.gallery), "{input}");
                format!("`{want_code}` on the entry (the request is answered)")
            }
        };
        svc.still_recognises().await;
        let shown = if code.starts_with('(') || code.starts_with('`') { code } else { format!("`{code}`") };
        table.push(format!("| {} | {} | {shown} |", input.replace('|', "\\|"), status.as_u16()));
    }

    // A path-traversal username is data, never a path: accepted, enrolled, recognised, and its
    // crop lands inside PHOTO_DIR under a safe name.
    let evil = "../../etc/passwd";
    let (s, v, _) = svc.call(post_json("/users", &json!({"username": evil}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v, _) = svc.call(enrol(evil, vec![("img16.jpg", fixture("img16.jpg")), ("img17.jpg", fixture("img17.jpg"))])).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v, _) = svc.call(post_json("/recognize", &json!({"bboxes": [{"crop": b64(&fixture("img17.jpg"))}]}))).await;
    assert_eq!((s, &v["meta"]["bboxes"][0]["name"]), (StatusCode::OK, &json!(evil)), "{v}");
    svc.state.service.audit().shutdown().await.expect("audit flushed");
    let photo_dir = dir.join("photo");
    let outside: Vec<_> =
        walk(&dir).into_iter().filter(|p| !p.starts_with(&photo_dir) && p.extension().is_some_and(|e| e == "jpg")).collect();
    assert!(outside.is_empty(), "crops outside PHOTO_DIR: {outside:?}");
    let names: Vec<String> =
        std::fs::read_dir(&photo_dir).expect("photo dir").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().any(|n| n.starts_with("photo_") && n.contains("etc_passwd") && !n.contains('/')), "{names:?}");
    assert!(!dir.join("etc").exists() && !std::path::Path::new("/etc/passwd_1.jpg").exists());
    table.push(format!("| POST /users, enrol, /recognize as `{evil}` | 201, 200, 200 | accepted: a name is data; crop saved inside PHOTO_DIR as `photo_______etc_passwd_<n>.jpg` |"));

    println!(
        "\n{n} kinds of bad input, each answered with the status and code below; after each the store was unchanged and a real /recognize still named alice.\n"
    );
    println!("{}", table.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
