//! Faults and privacy controls against the real `facerec` binary: SIGTERM drains the requests in
//! flight and flushes the audit trail before a clean exit; a full disk under logs.txt and an
//! unusable photo folder do not fail recognitions (the failure is logged, and the trail recovers
//! when the disk does); kill -9 at random moments under load leaves a log of whole JSON lines and
//! whole crops, with no counter reused; SAVE_CROPS=false and RETENTION_DAYS.
//!
//! Runs with the cached models in `<crate>/models` (or MODEL_CACHE_DIR), like e2e_binary.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde_json::{Value, json};

use support::{Server, TempDir, fixture, request};

/// The photos the crops are taken from (whole photos: the service finds the most prominent face).
const PHOTOS: &[&str] = &["img5.jpg", "img6.jpg", "img10.jpg", "img11.jpg", "img12.jpg", "img16.jpg", "img17.jpg", "t1.jpg"];
/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(120);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn b64_decode(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).expect("crop in the log is base64")
}

/// A /recognize body with `n` crops starting at photo `first`, tagged with `tag`.
fn recognize_body(tag: &Value, first: usize, n: usize) -> Vec<u8> {
    let bboxes: Vec<Value> =
        (0..n).map(|k| json!({"bbox": [0, 0, 10, 10], "crop": b64(&fixture(PHOTOS[(first + k) % PHOTOS.len()]))})).collect();
    json!({"req": tag, "bboxes": bboxes}).to_string().into_bytes()
}

fn post_recognize(server: &Server, body: &[u8]) -> support::Response {
    server.call("POST", "/recognize", Some("application/json"), body)
}

fn expect_recognized(r: &support::Response, server: &Server) -> Value {
    assert_eq!(r.status, 200, "/recognize: {} {}\nserver stderr:\n{}", r.status, r.text(), server.stderr());
    let answer = r.json();
    assert_eq!(answer["status"], "recognized", "{answer}");
    answer
}

/// Every line of the log, parsed; the log must end with a newline.
fn log_lines(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.is_empty() || text.ends_with('\n'), "the log ends with a whole line: ...{:?}", &text[text.len().saturating_sub(80)..]);
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {:.200}", l))).collect()
}

/// The photo folder's files: name -> bytes (missing folder: empty).
fn photo_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(entries) = fs::read_dir(dir) else { return BTreeMap::new() };
    entries
        .map(|e| {
            let e = e.expect("dir entry");
            (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).expect("photo readable"))
        })
        .collect()
}

/// The counter of `photo_<name>_<n>.<ext>`.
fn counter(name: &str) -> u64 {
    facerec::audit::photo_counter(name).unwrap_or_else(|| panic!("not a photo file name: {name}"))
}

/// Every crop file decodes as an image, and no temporary file is left.
fn assert_crops_decode(files: &BTreeMap<String, Vec<u8>>) {
    for (name, bytes) in files {
        assert!(!name.ends_with(".tmp"), "temporary file left: {name}");
        if name.starts_with("photo_") {
            image::load_from_memory(bytes).unwrap_or_else(|e| panic!("{name} does not decode: {e}"));
        }
    }
}

/// (file name prefix, bytes) of each crop a log line holds: `photo_<safe name>_`.
fn crops_of(line: &Value) -> Vec<(String, Vec<u8>)> {
    line["bboxes"]
        .as_array()
        .expect("bboxes")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("entry name");
            (format!("photo_{}_", facerec::audit::safe_name(name)), b64_decode(e["crop"].as_str().expect("crop")))
        })
        .collect()
}

/// Every crop held by a log line has its file, byte for byte, under its name (each file used once).
fn assert_lines_have_their_crops(lines: &[Value], files: &BTreeMap<String, Vec<u8>>) {
    let mut unused: BTreeSet<&String> = files.keys().filter(|n| n.starts_with("photo_")).collect();
    for line in lines {
        for (prefix, bytes) in crops_of(line) {
            let found = unused.iter().copied().find(|n| n.starts_with(&prefix) && files[*n] == bytes);
            let name = found.unwrap_or_else(|| panic!("no crop file {prefix}<n> for a crop of line {}", line["req"]));
            unused.remove(name);
        }
    }
}

/// The value of an unlabelled gauge in /metrics.
fn gauge(server: &Server, name: &str) -> f64 {
    let text = server.get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// Polls `cond` until it holds; panics with `what` after WAIT.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// WARN lines of the server's stderr that contain `text`.
fn warnings(stderr: &str, text: &str) -> usize {
    stderr.lines().filter(|l| l.contains("WARN") && l.contains(text)).count()
}

/// Reads an HTTP/1.1 answer to EOF (`Connection: close`): status and body.
fn read_answer(stream: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("reading the answer");
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status code");
    (status, raw[end + 4..].to_vec())
}

#[test]
fn sigterm_drains_requests_in_flight_flushes_the_audit_trail_and_exits_0() {
    let tmp = TempDir::new("sigterm");
    let dir = tmp.path();
    let mut server = Server::start_with_env(dir, &[("SHUTDOWN_TIMEOUT", "60s")]);
    const N: usize = 4;
    // Each request is sent but half its body: it is surely in flight when SIGTERM comes.
    let mut streams = Vec::new();
    for i in 0..N {
        let body = recognize_body(&json!(i), i, 6);
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, server.port)).expect("connect");
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        let head = format!(
            "POST /recognize HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        let half = body.len() / 2;
        s.write_all(&body[..half]).unwrap();
        streams.push((s, body, half));
    }
    // The N requests (and this /metrics request) are being answered.
    wait_until("the requests are in flight", || gauge(&server, "facerec_http_requests_in_flight") >= (N + 1) as f64);
    server.signal("-TERM");
    // The listener closes: new connections are refused...
    wait_until("the listener is closed", || TcpStream::connect((Ipv4Addr::LOCALHOST, server.port)).is_err());
    // ...while the requests in flight are read to their end and answered.
    let answers: Vec<_> = streams
        .into_iter()
        .map(|(mut s, body, half)| {
            std::thread::spawn(move || {
                s.write_all(&body[half..]).unwrap();
                read_answer(&mut s)
            })
        })
        .collect();
    for (i, t) in answers.into_iter().enumerate() {
        let (status, body) = t.join().unwrap();
        assert_eq!(status, 200, "request {i}: {}\nserver stderr:\n{}", String::from_utf8_lossy(&body), server.stderr());
        let answer: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["status"], "recognized");
        assert_eq!(answer["meta"]["req"], json!(i));
        assert_eq!(answer["meta"]["bboxes"].as_array().unwrap().len(), 6);
    }
    let status = server.wait_exit(WAIT);
    let stderr = server.stderr();
    assert!(matches!(status, Some(s) if s.success()), "exit status {status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("SIGTERM"), "the signal is logged:\n{stderr}");

    // One whole line per answered recognition; every crop it holds is on disk and decodes.
    let lines = log_lines(&Server::log_path(dir));
    assert_eq!(lines.len(), N, "one line per answered recognition");
    let reqs: BTreeSet<u64> = lines.iter().map(|l| l["req"].as_u64().unwrap()).collect();
    assert_eq!(reqs, (0..N as u64).collect());
    let files = photo_files(&Server::photo_dir(dir));
    assert_eq!(files.len(), N * 6, "{:?}", files.keys());
    assert_crops_decode(&files);
    assert_lines_have_their_crops(&lines, &files);
}

#[test]
fn shutdown_timeout_bounds_the_wait_for_a_request_that_never_ends() {
    let tmp = TempDir::new("stuck");
    let dir = tmp.path();
    let mut server = Server::start_with_env(dir, &[("SHUTDOWN_TIMEOUT", "1s")]);
    expect_recognized(&post_recognize(&server, &recognize_body(&json!("done"), 0, 1)), &server);
    // A client that sends half its body and then nothing.
    let body = recognize_body(&json!("stuck"), 1, 1);
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, server.port)).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!("POST /recognize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body[..body.len() / 2]).unwrap();
    wait_until("the request is in flight", || gauge(&server, "facerec_http_requests_in_flight") >= 2.0);
    server.signal("-TERM");
    let status = server.wait_exit(WAIT);
    let stderr = server.stderr();
    assert!(matches!(status, Some(s) if s.success()), "exit status {status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("SHUTDOWN_TIMEOUT"), "the cut-off is logged:\n{stderr}");
    // The stuck client is disconnected without an answer; the log holds the finished recognition.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let lines = log_lines(&Server::log_path(dir));
    assert_eq!(lines.iter().map(|l| l["req"].clone()).collect::<Vec<_>>(), vec![json!("done")]);
}

#[test]
fn full_disk_under_the_log_is_answered_logged_and_recovers() {
    let tmp = TempDir::new("fulldisk");
    let dir = tmp.path();
    // logs.txt leads to /dev/full: every write fails with ENOSPC.
    let log = Server::log_path(dir);
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    let server = Server::start(dir);
    for i in 0..3 {
        let answer = expect_recognized(&post_recognize(&server, &recognize_body(&json!(i), i, 1)), &server);
        assert_eq!(answer["meta"]["req"], json!(i));
    }
    let stderr = server.stderr();
    assert_eq!(warnings(&stderr, "audit trail failing"), 1, "one warning for the burst:\n{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    // The crops were saved all the same.
    assert_eq!(photo_files(&Server::photo_dir(dir)).len(), 3);
    // The disk comes back: the next recognition is logged.
    fs::remove_file(&log).unwrap();
    expect_recognized(&post_recognize(&server, &recognize_body(&json!("back"), 0, 1)), &server);
    assert!(server.stderr().contains("audit trail writing again"), "{}", server.stderr());
    assert_eq!(log_lines(&log).iter().map(|l| l["req"].clone()).collect::<Vec<_>>(), vec![json!("back")]);
    server.stop();

    // LOG_FILE=/dev/full itself: answered, and a clean stop.
    let tmp = TempDir::new("devfull");
    let server = Server::start_with_env(tmp.path(), &[("LOG_FILE", "/dev/full")]);
    expect_recognized(&post_recognize(&server, &recognize_body(&json!(0), 0, 2)), &server);
    expect_recognized(&post_recognize(&server, &recognize_body(&json!(1), 2, 2)), &server);
    let stderr = server.stop();
    assert_eq!(warnings(&stderr, "audit trail failing"), 1, "{stderr}");
}

#[test]
fn unusable_photo_folder_is_answered_logged_and_recovers() {
    let tmp = TempDir::new("nophoto");
    let dir = tmp.path();
    // PHOTO_DIR is a regular file.
    let photo = Server::photo_dir(dir);
    fs::write(&photo, b"not a folder").unwrap();
    let server = Server::start(dir);
    for i in 0..2 {
        expect_recognized(&post_recognize(&server, &recognize_body(&json!(i), i, 2)), &server);
    }
    let stderr = server.stderr();
    assert_eq!(warnings(&stderr, "audit trail failing"), 1, "one warning for the burst:\n{stderr}");
    // The lines are written (they hold the crops).
    let lines = log_lines(&Server::log_path(dir));
    assert_eq!(lines.len(), 2);
    assert_eq!(fs::read(&photo).unwrap(), b"not a folder", "the file in the way is untouched");
    // The folder comes back: crops are saved again.
    fs::remove_file(&photo).unwrap();
    expect_recognized(&post_recognize(&server, &recognize_body(&json!("back"), 3, 2)), &server);
    assert!(server.stderr().contains("audit trail writing again"), "{}", server.stderr());
    let files = photo_files(&photo);
    assert_eq!(files.len(), 2, "{:?}", files.keys());
    assert_crops_decode(&files);
    let lines = log_lines(&Server::log_path(dir));
    assert_lines_have_their_crops(&lines[2..], &files);
    server.stop();

    // PHOTO_DIR under a regular file.
    let tmp = TempDir::new("underfile");
    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    let under = file.join("photo");
    let server = Server::start_with_env(tmp.path(), &[("PHOTO_DIR", under.to_str().unwrap())]);
    expect_recognized(&post_recognize(&server, &recognize_body(&json!(0), 0, 1)), &server);
    assert_eq!(log_lines(&Server::log_path(tmp.path())).len(), 1);
    let stderr = server.stop();
    assert_eq!(warnings(&stderr, "audit trail failing"), 1, "{stderr}");
}

/// A number that differs from run to run (no crate for randomness needed).
fn random(seed: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(seed);
    h.finish()
}

#[test]
fn kill_9_under_load_leaves_whole_lines_whole_crops_and_no_reused_counter() {
    let tmp = TempDir::new("kill9");
    let dir = tmp.path();
    let log = Server::log_path(dir);
    let photo = Server::photo_dir(dir);
    // As if a crash had happened already: a torn last line and a stale temporary crop.
    fs::create_dir_all(&photo).unwrap();
    fs::write(&log, b"{\"req\":\"before\",\"bboxes\":[]}\n{\"req\":\"torn\",\"bbo").unwrap();
    fs::write(photo.join(".photo_Unknown_1_999.jpg.tmp"), b"\xff\xd8half").unwrap();

    let answered: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut highest_before = 0u64;
    for round in 0..5u64 {
        let server = Server::start(dir);
        if round == 0 {
            // The torn line went to the side file, the log is whole; the temporary file is gone.
            assert_eq!(fs::read_to_string(&log).unwrap(), "{\"req\":\"before\",\"bboxes\":[]}\n");
            assert_eq!(fs::read_to_string(dir.join("logs.txt.torn")).unwrap(), "{\"req\":\"torn\",\"bbo\n");
            assert!(!photo.join(".photo_Unknown_1_999.jpg.tmp").exists());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let port = server.port;
        let clients: Vec<_> = (0..3u64)
            .map(|c| {
                let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
                std::thread::spawn(move || {
                    for seq in 0u64.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let tag = format!("{round}-{c}-{seq}");
                        let body = recognize_body(&json!(tag), (c + seq) as usize, 3);
                        match request(port, "POST", "/recognize", Some("application/json"), &body, WAIT) {
                            Ok(r) if r.status == 200 => answered.lock().unwrap().push(tag),
                            Ok(r) => panic!("/recognize {tag}: {} {}", r.status, r.text()),
                            Err(_) => break, // killed
                        }
                    }
                })
            })
            .collect();
        // Kill at a random moment once the load is flowing.
        let base = answered.lock().unwrap().len();
        wait_until("the load is flowing", || answered.lock().unwrap().len() >= base + 2);
        let delay = Duration::from_millis(random(round) % 700);
        eprintln!("round {round}: kill -9 after {delay:?} more");
        std::thread::sleep(delay);
        let mut server = server;
        server.signal("-KILL");
        let status = server.wait_exit(WAIT);
        assert!(matches!(status, Some(s) if !s.success()), "{status:?}");
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        // The numbers given out in this round all come after those of the rounds before.
        let files = photo_files(&photo);
        let new: Vec<u64> = files.keys().filter(|n| n.starts_with("photo_")).map(|n| counter(n)).filter(|&n| n > highest_before).collect();
        assert!(!new.is_empty(), "round {round} saved crops");
        highest_before = new.iter().copied().max().unwrap_or(highest_before);
    }

    // A last start repairs whatever the last kill tore; then a clean stop.
    let server = Server::start(dir);
    server.stop();
    let lines = log_lines(&log);
    let files = photo_files(&photo);
    assert_crops_decode(&files);
    // Counters are unique across all the runs, and the stale temporary file's 999 was never counted.
    let counters: Vec<u64> = files.keys().filter(|n| n.starts_with("photo_")).map(|n| counter(n)).collect();
    let unique: BTreeSet<u64> = counters.iter().copied().collect();
    assert_eq!(unique.len(), counters.len(), "a counter was used twice: {:?}", files.keys());
    assert!(unique.iter().all(|&n| n < 999), "{unique:?}");
    // Every answered recognition has exactly one line; no line appears twice; each line's crops exist.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for l in &lines {
        *seen.entry(l["req"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    assert!(seen.values().all(|&n| n == 1), "a line was written twice");
    for tag in answered.lock().unwrap().iter() {
        assert!(seen.contains_key(tag), "answered recognition {tag} has no line");
    }
    assert_lines_have_their_crops(&lines[1..], &files);
    eprintln!("{} answered, {} lines, {} crops", answered.lock().unwrap().len(), lines.len(), files.len());
}

#[test]
fn save_crops_false_writes_the_line_and_no_crop() {
    let tmp = TempDir::new("nocrops");
    let dir = tmp.path();
    let server = Server::start_with_env(dir, &[("SAVE_CROPS", "false")]);
    expect_recognized(&post_recognize(&server, &recognize_body(&json!(0), 0, 2)), &server);
    server.stop();
    let lines = log_lines(&Server::log_path(dir));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["bboxes"].as_array().unwrap().len(), 2);
    assert!(!Server::photo_dir(dir).exists(), "no photo folder");
}

fn set_mtime(path: &Path, t: SystemTime) {
    fs::File::options().write(true).open(path).unwrap().set_modified(t).unwrap();
}

fn day_number(t: SystemTime) -> i64 {
    (t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() / 86_400) as i64
}

#[test]
fn retention_removes_old_crops_and_logs_and_keeps_new_ones() {
    let tmp = TempDir::new("retention");
    let dir = tmp.path();
    let photo = Server::photo_dir(dir);
    fs::create_dir_all(&photo).unwrap();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let (old, new) = (photo.join("photo_Unknown_1_7.jpg"), photo.join("photo_Unknown_1_3.jpg"));
    fs::write(&old, fixture("img5.jpg")).unwrap();
    fs::write(&new, fixture("img6.jpg")).unwrap();
    set_mtime(&old, now - day * 10);
    set_mtime(&new, now - day);
    // The log was last written yesterday; a rotated log from long ago lies beside it.
    let log = Server::log_path(dir);
    fs::write(&log, b"{\"req\":\"yesterday\"}\n").unwrap();
    set_mtime(&log, now - day);
    let ancient = dir.join("logs-2000-01-01.txt");
    fs::write(&ancient, b"{}\n").unwrap();

    let server = Server::start_with_env(dir, &[("RETENTION_DAYS", "3")]);
    assert!(!old.exists(), "the crop older than the retention is removed");
    assert!(new.exists(), "the newer crop is kept");
    assert!(!ancient.exists(), "the old rotated log is removed");
    let rotated = dir.join(facerec::audit::rotated_log_name("logs.txt", day_number(now - day), 0));
    assert_eq!(fs::read_to_string(&rotated).unwrap(), "{\"req\":\"yesterday\"}\n", "yesterday's log is rotated and kept");
    // New crops take numbers after the removed one.
    expect_recognized(&post_recognize(&server, &recognize_body(&json!("today"), 0, 1)), &server);
    server.stop();
    let files = photo_files(&photo);
    let counters: BTreeSet<u64> = files.keys().filter(|n| n.starts_with("photo_")).map(|n| counter(n)).collect();
    assert_eq!(counters, BTreeSet::from([3, 8]), "{:?}", files.keys());
    assert_eq!(log_lines(&log).len(), 1);
}
