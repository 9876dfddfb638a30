//! Memory and disk budgets (issue 15, item 4), against the real binary: what a /recognize body
//! leaves in logs.txt (no undecodable crop, no line over LOG_MAX_LINE_BYTES) and the budget of
//! request bytes in flight (REQUEST_BYTES_IN_FLIGHT: 429 `overloaded` before a body is read).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::{Server, TempDir, fixture};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn log_lines(server: &Server) -> Vec<Value> {
    let text = std::fs::read_to_string(Server::log_path(&server.dir)).expect("logs.txt");
    text.lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok())).unwrap_or_else(|| panic!("{name} in {text}"))
}

#[test]
fn undecodable_crops_and_long_lines_stay_out_of_the_log() {
    let dir = TempDir::new("budget-log");
    let server = Server::start_with_env(dir.path(), &[("LOG_MAX_LINE_BYTES", "65536")]);
    let small = b64(&fixture("Tom_Hanks_54745.png"));
    let garbage = "QUFB".repeat(20_000); // base64 of 60 000 bytes that are no image
    let r = server.post_json("/recognize", &json!({"camera": "gate", "bboxes": [{"crop": small}, {"crop": garbage}]}));
    assert_eq!(r.status, 200, "{}", r.text());
    // The answer still echoes the request (as the original did); only the log leaves it out.
    assert_eq!(r.json()["meta"]["bboxes"][1]["crop"].as_str().map(str::len), Some(garbage.len()));
    let lines = log_lines(&server);
    assert_eq!(lines.len(), 1);
    let entries = &lines[0]["bboxes"];
    assert_eq!(entries[0]["crop"].as_str(), Some(small.as_str()), "a real crop is carried whole under the cap");
    assert_eq!(entries[1]["crop"], Value::Null, "{}", lines[0]);
    let omitted = entries[1]["crop_omitted"].as_str().unwrap_or_default();
    assert!(omitted.contains("80000 characters"), "{omitted}");
    assert!(entries[1]["error"]["code"].is_string(), "{}", lines[0]);

    // A crop of 184 000 base64 characters: over the 64 KiB cap the line names its file instead.
    let big = b64(&fixture("img10.jpg"));
    let r = server.post_json("/recognize", &json!({"camera": "gate", "bboxes": [{"crop": big}]}));
    assert_eq!(r.status, 200, "{}", r.text());
    let raw = std::fs::read_to_string(Server::log_path(&server.dir)).expect("logs.txt");
    assert!(raw.lines().all(|l| l.len() < 65536), "every line under LOG_MAX_LINE_BYTES");
    let lines = log_lines(&server);
    let entry = &lines[1]["bboxes"][0];
    assert_eq!(entry["crop"], Value::Null, "{}", lines[1]);
    let file = entry["crop_file"].as_str().expect("crop_file");
    let saved = std::fs::read(Server::photo_dir(&server.dir).join(file)).expect("the crop file");
    assert_eq!(saved, fixture("img10.jpg"), "the file holds the crop the line left out");
    assert_eq!(lines[1]["camera"], "gate");
    assert!(entry["name"].is_string() && entry["similarity"].is_number(), "{entry}");

    // The client's own field too long: a summary, saying how long the line was.
    let r = server.post_json("/recognize", &json!({"note": "x".repeat(100_000), "bboxes": [{"crop": small}]}));
    assert_eq!(r.status, 200, "{}", r.text());
    let lines = log_lines(&server);
    assert!(lines[2].get("note").is_none(), "{}", lines[2]);
    assert!(lines[2]["line_cut"]["bytes"].as_u64().is_some_and(|n| n > 100_000), "{}", lines[2]);
    assert!(lines[2]["bboxes"][0]["crop_file"].is_string(), "{}", lines[2]);
}

/// Sends the headers of a POST declaring `len` body bytes and `sent` of them; the connection is
/// held open by the returned stream.
fn half_sent(port: u16, len: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let head = format!("POST /recognize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n");
    s.write_all(head.as_bytes()).expect("headers");
    s.write_all(&vec![b' '; sent]).expect("part of the body");
    s
}

#[test]
fn bodies_past_the_budget_get_429_before_they_are_read() {
    let dir = TempDir::new("budget-flight");
    let mib = 1024 * 1024;
    let server = Server::start_with_env(dir.path(), &[("MAX_BODY_BYTES", "1048576"), ("REQUEST_BYTES_IN_FLIGHT", "2097152")]);
    let in_flight = || metric(&server.get("/metrics").text(), "facerec_http_request_body_bytes_in_flight");
    // Two slow clients declaring 1 MiB each hold the whole budget.
    let first = half_sent(server.port, mib, 1000);
    let second = half_sent(server.port, mib, 1000);
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_flight() < (2 * mib) as f64 {
        assert!(Instant::now() < deadline, "the two bodies are never counted: {}", in_flight());
        std::thread::yield_now();
    }
    // A third body is refused at once, a request without a body is still served.
    let small = json!({"bboxes": [{"crop": b64(&fixture("Tom_Hanks_54745.png"))}]});
    let r = server.post_json("/recognize", &small);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["code"], "overloaded");
    assert!(r.json()["message"].as_str().is_some_and(|m| m.contains("REQUEST_BYTES_IN_FLIGHT")), "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(server.get("/health").status, 200);
    // A client that goes away gives its bytes back; the next body is taken.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_flight() > mib as f64 {
        assert!(Instant::now() < deadline, "a closed connection still holds its bytes: {}", in_flight());
        std::thread::yield_now();
    }
    let r = server.post_json("/recognize", &small);
    assert_eq!(r.status, 200, "{}", r.text());
    // The slow client that stays is answered once it sends the rest (not JSON: 400, not 429).
    let mut second = second;
    second.write_all(&vec![b' '; mib - 1000]).expect("the rest");
    let mut head = [0u8; 12];
    second.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    second.read_exact(&mut head).expect("an answer");
    assert_eq!(&head, b"HTTP/1.1 400", "{}", String::from_utf8_lossy(&head));
}

/// POSTs `body` while a second thread reads the answer: a 429 comes before the body is read,
/// and the server closes the connection without reading the rest, so writing may fail.
fn post_reading_early(port: u16, body: &[u8]) -> u16 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return 0 };
    let Ok(mut reader) = s.try_clone() else { return 0 };
    let _ = reader.set_read_timeout(Some(Duration::from_secs(600)));
    let read = std::thread::spawn(move || {
        let mut head = [0u8; 12];
        reader.read_exact(&mut head).ok().and_then(|_| std::str::from_utf8(&head[9..12]).ok()?.parse::<u16>().ok()).unwrap_or(0)
    });
    let head = format!(
        "POST /recognize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).is_ok() {
        for chunk in body.chunks(256 * 1024) {
            if s.write_all(chunk).is_err() {
                break;
            }
        }
    }
    read.join().unwrap_or(0)
}

/// 32 connections each sending a 20 MB /recognize body of real crops at once, with a budget
/// of 64 MiB: the server's peak resident memory (VmHWM) and how many were answered 429.
#[test]
#[ignore = "a measurement that prints figures (about a minute)"]
fn thirty_two_twenty_megabyte_bodies() {
    let dir = TempDir::new("budget-32");
    let server = Server::start_with_env(
        dir.path(),
        &[("MAX_BODY_BYTES", "33554432"), ("REQUEST_BYTES_IN_FLIGHT", "67108864"), ("SAVE_CROPS", "false")],
    );
    let idle = support::request(server.port, "GET", "/health", None, b"", Duration::from_secs(10)).map(|r| r.status);
    assert_eq!(idle.ok(), Some(200));
    let idle_rss = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).expect("status");
    let idle_rss = idle_rss.lines().find_map(|l| l.strip_prefix("VmRSS:")).map(|v| v.trim().to_owned()).unwrap_or_default();
    let crop = b64(&fixture("img10.jpg"));
    let n = 20_000_000 / (crop.len() + 16);
    let body = serde_json::to_vec(&json!({"bboxes": vec![json!({"crop": crop}); n]})).expect("body");
    let port = server.port;
    let started = Instant::now();
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|_| {
                let body = &body;
                s.spawn(move || post_reading_early(port, body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).expect("status");
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).map(|v| v.trim().to_owned()).unwrap_or_default();
    let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).map(|v| v.trim().to_owned()).unwrap_or_default();
    let count = |c: u16| statuses.iter().filter(|&&s| s == c).count();
    eprintln!(
        "32 bodies of {} MB ({n} crops each) in {:.1}s: {} answered 200, {} answered 429, {} other; server RSS idle {idle_rss}, peak {hwm}, after {rss}",
        body.len() / 1_000_000,
        started.elapsed().as_secs_f64(),
        count(200),
        count(429),
        32 - count(200) - count(429)
    );
    assert_eq!(count(200) + count(429), 32, "{statuses:?}");
}

/// Fair share in the engine: five clients sending 64-crop bodies back to back, and a one-crop
/// client: its median latency against its idle median (the issue measured 10 s before the queue
/// took requests in turn).
#[test]
#[ignore = "a measurement that prints figures (about a minute)"]
fn a_one_crop_client_beside_five_heavy_ones() {
    let dir = TempDir::new("budget-fair");
    let server = Server::start(dir.path());
    let crop = b64(&fixture("Tom_Hanks_54745.png"));
    let one = json!({"bboxes": [{"crop": crop}]});
    let heavy = serde_json::to_vec(&json!({"bboxes": vec![json!({"crop": crop}); 64]})).expect("body");
    let median = |server: &Server, n: usize| {
        let mut ms: Vec<f64> = (0..n)
            .map(|_| {
                let t = Instant::now();
                let r = server.post_json("/recognize", &one);
                assert_eq!(r.status, 200, "the light client is never refused: {}", r.text());
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        (ms[n / 2], ms[n - 1])
    };
    let (idle, idle_max) = median(&server, 15);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let port = server.port;
    let (busy, busy_max, heavy_done) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..5)
            .map(|_| {
                let (heavy, stop) = (&heavy, &stop);
                s.spawn(move || {
                    let mut done = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = support::request(port, "POST", "/recognize", Some("application/json"), heavy, Duration::from_secs(300));
                        if r.is_ok_and(|r| r.status == 200) {
                            done += 1;
                        }
                    }
                    done
                })
            })
            .collect();
        // Once every heavy client has a body in the engine.
        let deadline = Instant::now() + Duration::from_secs(60);
        while metric(&server.get("/metrics").text(), "facerec_engine_queue_depth") < 64.0 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        let (m, max) = median(&server, 15);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (m, max, workers.into_iter().map(|w| w.join().unwrap_or(0)).sum::<u32>())
    });
    eprintln!(
        "one-crop /recognize: idle p50 {idle:.0} ms (max {idle_max:.0}); beside five 64-crop clients p50 {busy:.0} ms (max {busy_max:.0}), {:.1}x; {heavy_done} heavy bodies answered meanwhile",
        busy / idle
    );
}
