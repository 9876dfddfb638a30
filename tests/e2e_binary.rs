//! The original service's client, unchanged, against the real `facerec` binary over a real
//! socket: create a user, enrol three photos, recognise a crop of a fourth photo next to a
//! stranger (extra fields echoed), the audit trail (one log line, the crops on disk), the
//! legacy error bodies byte for byte, a restart on the same folder (store and photo counter
//! survive) and a delete. Also: misconfigured credentials stop the start with one line.
//!
//! Runs with the cached models in `<crate>/models` (or MODEL_CACHE_DIR); `scripts/test` runs it.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Cursor;
use std::path::Path;

use base64::Engine as _;
use serde_json::{Value, json};

use support::{Multipart, Response, Server, TempDir, fixture, wait_bounded};

/// The crop of img11.jpg (the fourth photo of alice) around insightface's box, padded by 20%
/// of the box on every side, re-encoded as JPEG; and the box it was cut at (x1, y1, x2, y2).
fn face_crop(name: &str) -> (Vec<u8>, [u32; 4]) {
    let golden: Value = serde_json::from_slice(&fixture("golden_det320.json")).expect("golden_det320.json parses");
    let entry = &golden["images"][name];
    let bbox: Vec<f64> = entry["faces"][0]["bbox"].as_array().expect("golden box").iter().map(|v| v.as_f64().expect("number")).collect();
    let img = image::load_from_memory(&fixture(name)).expect("fixture decodes").to_rgb8();
    assert_eq!((u64::from(img.width()), u64::from(img.height())), (entry["width"].as_u64().unwrap(), entry["height"].as_u64().unwrap()));
    let (w, h) = (bbox[2] - bbox[0], bbox[3] - bbox[1]);
    let x1 = (bbox[0] - 0.2 * w).max(0.0).floor() as u32;
    let y1 = (bbox[1] - 0.2 * h).max(0.0).floor() as u32;
    let x2 = ((bbox[2] + 0.2 * w).ceil() as u32).min(img.width());
    let y2 = ((bbox[3] + 0.2 * h).ceil() as u32).min(img.height());
    let cut = image::imageops::crop_imm(&img, x1, y1, x2 - x1, y2 - y1).to_image();
    let mut jpeg = Vec::new();
    cut.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 92)).expect("JPEG encodes");
    (jpeg, [x1, y1, x2, y2])
}

/// A 200x200 plain grey PNG: no face in it.
fn grey_png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(200, 200, image::Rgb([128, 128, 128]));
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).expect("PNG encodes");
    png
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn enrol_form(username: &str, files: &[(&str, &str, Vec<u8>)]) -> Multipart {
    files.iter().fold(Multipart::new().text("username", username), |form, (file_name, content_type, bytes)| {
        form.file("files", file_name, content_type, bytes)
    })
}

/// The photo folder: file name -> counter, for every `photo_*` file (and nothing else may be there).
fn photos(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(Server::photo_dir(dir)).expect("photo folder exists") {
        let name = e.expect("dir entry").file_name().to_string_lossy().into_owned();
        let counter = name
            .strip_suffix(".jpg")
            .and_then(|stem| stem.rsplit_once('_'))
            .and_then(|(_, n)| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("unexpected file in the photo folder: {name}"));
        out.insert(name, counter);
    }
    out
}

/// The only photo named `photo_<safe name>_<n>.jpg` in `names`, with its counter.
fn photo_of<'a>(names: impl IntoIterator<Item = (&'a String, &'a u64)>, safe_name: &str) -> (String, u64) {
    let prefix = format!("photo_{safe_name}_");
    let found: Vec<(String, u64)> = names
        .into_iter()
        .filter(|(n, _)| {
            n.strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".jpg"))
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|(n, c)| (n.clone(), *c))
        .collect();
    assert_eq!(found.len(), 1, "expected one {prefix}<n>.jpg, found {found:?}");
    found.into_iter().next().unwrap()
}

fn log_lines(dir: &Path) -> Vec<Value> {
    let text = fs::read_to_string(Server::log_path(dir)).expect("logs.txt exists");
    assert!(text.is_empty() || text.ends_with('\n'), "the log ends with a newline: {text:?}");
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))).collect()
}

fn expect_status(r: &Response, status: u16, what: &str, server: &Server) {
    assert_eq!(r.status, status, "{what}: {} {}\nserver stderr:\n{}", r.status, r.text(), server.stderr());
}

/// `POST /recognize` with `request`; checks the status and the echo: the answer's `meta` must be
/// the request with exactly `name` and `similarity` added to each entry. Returns `meta`.
fn recognize(server: &Server, request: &Value) -> Value {
    let r = server.post_json("/recognize", request);
    expect_status(&r, 200, "/recognize", server);
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{:?}", r.headers);
    let answer = r.json();
    assert_eq!(answer["status"], "recognized", "{answer}");
    assert_eq!(answer.as_object().map(|o| o.len()), Some(2), "only status and meta: {answer}");
    let meta = answer["meta"].clone();
    let mut expected = request.clone();
    let entries = meta["bboxes"].as_array().expect("meta.bboxes");
    for (i, want) in expected["bboxes"].as_array_mut().expect("request bboxes").iter_mut().enumerate() {
        let got = &entries[i];
        assert!(got["name"].is_string(), "entry {i} has a name: {got}");
        assert!(got["similarity"].is_number(), "entry {i} has a similarity: {got}");
        want["name"] = got["name"].clone();
        want["similarity"] = got["similarity"].clone();
    }
    assert_eq!(meta, expected, "meta is the request with name and similarity added, every other field unchanged");
    meta
}

#[test]
fn original_client_against_the_real_binary() {
    let tmp = TempDir::new("e2e");
    let dir = tmp.path();
    let server = Server::start(dir);

    // The service starts empty.
    let health = server.get("/health").json();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["users"], 0, "{health}");
    assert_eq!(server.get("/metadata").json(), json!({}));

    // 1. Create alice.
    let r = server.post_json("/users", &json!({"username": "alice"}));
    expect_status(&r, 201, "POST /users", &server);
    assert_eq!(r.json()["username"], "alice");

    // 2. Enrol three photos of alice in one call.
    let form = enrol_form(
        "alice",
        &[
            ("img5.jpg", "image/jpeg", fixture("img5.jpg")),
            ("img6.jpg", "image/jpeg", fixture("img6.jpg")),
            ("img10.jpg", "image/jpeg", fixture("img10.jpg")),
        ],
    );
    let r = server.post_multipart("/calculate_average_embedding", &form);
    expect_status(&r, 200, "enrolment", &server);
    let enrolled = r.json();
    assert_eq!(enrolled["status"], "success", "{enrolled}");
    assert_eq!(enrolled["username"], "alice", "{enrolled}");
    assert_eq!(enrolled["images"], 3, "{enrolled}");
    let embedding: Vec<f64> =
        enrolled["embedding"].as_array().expect("embedding array").iter().map(|v| v.as_f64().expect("number")).collect();
    assert_eq!(embedding.len(), 512);
    let norm = embedding.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "template norm {norm}");

    // 3. The legacy enrolment errors, byte for byte, with HTTP 200 as the original answered them
    // (LEGACY_STATUS=original, the default).
    let r = server.post_multipart("/calculate_average_embedding", &enrol_form("bob", &[("img5.jpg", "image/jpeg", fixture("img5.jpg"))]));
    expect_status(&r, 200, "enrolling an unknown user", &server);
    let want = json!({"status": "error", "message": "User 'bob' not found."});
    assert_eq!(r.json(), want);
    assert_eq!(r.json()["message"].as_str(), Some("User 'bob' not found."));
    assert_eq!(r.text(), r#"{"status":"error","message":"User 'bob' not found."}"#);

    let r = server.post_multipart("/calculate_average_embedding", &enrol_form("alice", &[("grey.png", "image/png", grey_png())]));
    expect_status(&r, 200, "enrolling a photo with no face", &server);
    let want = json!({"status": "error", "message": "No faces detected in any image."});
    assert_eq!(r.json(), want);
    assert_eq!(r.json()["message"].as_str(), Some("No faces detected in any image."));
    assert_eq!(r.text(), r#"{"status":"error","message":"No faces detected in any image."}"#);
    // Nothing of these failed calls reached the audit trail.
    assert!(log_lines(dir).is_empty());
    assert!(photos(dir).is_empty());

    // 4. Recognise a crop of the fourth photo of alice and a stranger, with extra fields.
    let (crop, crop_box) = face_crop("img11.jpg");
    let stranger = fixture("img16.jpg");
    let request = json!({
        "camera": "gate-2",
        "bboxes": [
            {"bbox": crop_box, "crop": b64(&crop), "track_id": 7},
            {"bbox": [0, 0, 740, 418], "crop": b64(&stranger)},
        ],
    });
    let meta = recognize(&server, &request);
    let entries = meta["bboxes"].as_array().unwrap();
    assert_eq!(entries[0]["name"], "alice", "{}", entries[0]["similarity"]);
    let sim0 = entries[0]["similarity"].as_f64().unwrap();
    assert!(sim0 > 0.5, "alice's crop similarity {sim0}");
    assert_eq!(entries[0]["track_id"], 7);
    assert_eq!(entries[1]["name"], "Unknown 1", "{}", entries[1]["similarity"]);
    let sim1 = entries[1]["similarity"].as_f64().unwrap();
    assert!((-1.0..0.3).contains(&sim1), "stranger similarity {sim1}");
    assert_eq!(meta["camera"], "gate-2");
    eprintln!("crop of img11.jpg {crop_box:?}: alice {sim0}; img16.jpg: Unknown 1 {sim1}");

    // 5. The audit trail: one log line equal to meta; the two crops as sent.
    assert_eq!(log_lines(dir), vec![meta.clone()]);
    let saved = photos(dir);
    assert_eq!(saved.len(), 2, "{saved:?}");
    let (alice_file, n) = photo_of(&saved, "alice");
    let (unknown_file, m) = photo_of(&saved, "Unknown 1");
    assert_eq!(fs::read(Server::photo_dir(dir).join(&alice_file)).unwrap(), crop, "{alice_file} holds the crop sent");
    assert_eq!(fs::read(Server::photo_dir(dir).join(&unknown_file)).unwrap(), stranger, "{unknown_file} holds the crop sent");
    assert_ne!(n, m);
    assert_eq!(server.get("/metadata").json(), meta);

    // 6. Restart on the same folder (graceful stop): the store and the photo counter survive.
    let stderr = server.stop();
    assert!(stderr.contains("listening"), "{stderr}");
    let server = Server::start(dir);
    assert_eq!(server.get("/health").json()["users"], 1);
    assert_eq!(server.get("/metadata").json(), json!({}), "metadata is the last answer of this process");
    let again = json!({"bboxes": [{"bbox": crop_box, "crop": b64(&crop)}]});
    let meta2 = recognize(&server, &again);
    assert_eq!(meta2["bboxes"][0]["name"], "alice", "{meta2}");
    assert!(meta2["bboxes"][0]["similarity"].as_f64().unwrap() > 0.5, "{meta2}");
    let after = photos(dir);
    assert_eq!(after.len(), 3, "{after:?}");
    let new: Vec<(&String, &u64)> = after.iter().filter(|(f, _)| !saved.contains_key(*f)).collect();
    let (new_file, k) = photo_of(new, "alice");
    assert!(saved.values().all(|&c| k > c), "new counter {k} ({new_file}) is larger than every previous one {saved:?}");
    assert_eq!(fs::read(Server::photo_dir(dir).join(&new_file)).unwrap(), crop);
    assert_eq!(log_lines(dir), vec![meta.clone(), meta2.clone()]);

    // 7. Delete alice: the same crop is now unknown, and stays so after a restart.
    let r = server.delete("/users/alice");
    expect_status(&r, 200, "DELETE /users/alice", &server);
    assert_eq!(r.json(), json!({"status": "deleted", "username": "alice"}));
    let meta3 = recognize(&server, &again);
    assert_eq!(meta3["bboxes"][0]["name"], "Unknown 1", "{meta3}");
    assert_eq!(server.get("/users").json()["count"], 0);
    server.stop();
    let server = Server::start(dir);
    assert_eq!(server.get("/health").json()["users"], 0);
    let meta4 = recognize(&server, &again);
    assert_eq!(meta4["bboxes"][0]["name"], "Unknown 1", "{meta4}");
    assert_eq!(log_lines(dir).len(), 4);
    server.stop();
}

/// Authentication fails closed: a credential variable set but blank, or a short JWT secret,
/// stops the real binary before it loads anything, with one line naming the variable (and
/// never its value).
#[test]
fn misconfigured_credentials_stop_the_start() {
    let dir = TempDir::new("misconfig");
    let secret = "0123456789abcdef0123456789abcdef";
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("JWT_SECRET_KEY", "")], "JWT_SECRET_KEY is set but empty"),
        (&[("JWT_SECRET_KEY", "   ")], "JWT_SECRET_KEY is set but empty"),
        (&[("JWT_SECRET_KEY", "hunter2")], "JWT_SECRET_KEY is 7 bytes long"),
        (&[("API_KEYS", " , ")], "API_KEYS is set but holds no key"),
        (&[("API_KEYS", "")], "API_KEYS is set but holds no key"),
        (&[("JWT_SECRET_KEY", secret), ("JWT_AUDIENCE", "")], "JWT_AUDIENCE is set but empty"),
        (&[("JWT_ISSUER", "https://id.example")], "JWT_ISSUER is set but JWT_SECRET_KEY is not"),
        (&[("JWT_SECRET_KEY", secret), ("JWT_MAX_LIFETIME", "10y")], "JWT_MAX_LIFETIME"),
    ];
    for (env, expected) in cases {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_facerec"));
        for key in ["JWT_SECRET_KEY", "API_KEYS", "JWT_AUDIENCE", "JWT_ISSUER", "JWT_MAX_LIFETIME"] {
            cmd.env_remove(key);
        }
        let stderr_path = dir.path().join("stderr.log");
        let stderr = fs::File::create(&stderr_path).expect("stderr file");
        let mut child = cmd
            .current_dir(dir.path())
            .env("HOST", "127.0.0.1")
            .env("PORT", support::free_port().to_string())
            .env("MODEL_CACHE_DIR", dir.path().join("no-models"))
            .env("DATABASE_PATH", dir.path().join("facerec.db"))
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn facerec");
        let status = wait_bounded(&mut child, std::time::Duration::from_secs(30)).expect("facerec exits by itself");
        let text = fs::read_to_string(&stderr_path).expect("stderr");
        assert!(!status.success(), "{env:?} must stop the start; stderr:\n{text}");
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{env:?}: one line, got:\n{text}");
        assert!(lines[0].contains(expected), "{env:?}: expected {expected:?} in {:?}", lines[0]);
        assert!(!text.contains("hunter2"), "the secret is never printed: {text}");
        assert!(!dir.path().join("no-models").exists(), "{env:?}: stopped before fetching models");
    }
}
