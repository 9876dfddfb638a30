//! Connection hygiene against the real binary (issue 15, item 3): half-sent headers and silent
//! sockets are closed after HEADER_READ_TIMEOUT, a kept-alive connection after KEEPALIVE_TIMEOUT,
//! a body that stops arriving gets 408; MAX_CONNECTIONS under a low open-file limit never lets
//! the process run out of files, and a normal client is served again once the idle ones are
//! closed; a graceful stop does not wait for idle or half-open connections; hyper's own answers
//! (414, 431) are JSON; an oversized `Expect: 100-continue` gets 413, never `100 Continue`.
//! Every wait has a deadline; timings are asserted with wide margins (a loaded 2-core machine).
//!
//! cargo test --test connections
//! cargo test --test connections -- --ignored --nocapture   (200 slowloris + 2000 idle, 60 s)

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use support::{Server, TempDir};

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("read timeout");
    s
}

/// Reads until the server closes the connection (bounded by the socket's read timeout); returns
/// what came and how long it took.
fn read_to_close(s: &mut TcpStream) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("waiting for the server to close: {e} after {:?}", started.elapsed()),
        }
    }
    (got, started.elapsed())
}

/// Reads one answer framed by Content-Length; returns its head and body.
fn read_answer(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().expect("content-length"))
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return (head, got[end + 4..end + 4 + len].to_vec());
            }
        }
        let n = s.read(&mut buf).expect("reading an answer");
        assert!(n > 0, "closed before a whole answer: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

fn json_body(raw: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(raw);
    let (_, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {text}"));
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[test]
fn half_sent_headers_silent_sockets_and_idle_keep_alive_are_closed_by_their_timeouts() {
    let dir = TempDir::new("conn-timeouts");
    let server = Server::start_with_env(dir.path(), &[("HEADER_READ_TIMEOUT", "2s"), ("KEEPALIVE_TIMEOUT", "4s")]);

    // Slowloris: a request line and one header, then a byte now and then; never the blank line.
    let mut slow = connect(server.port);
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").expect("write");
    let opened = Instant::now();
    slow.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let mut closed_after = None;
    let mut buf = [0u8; 64];
    while opened.elapsed() < Duration::from_secs(60) {
        let _ = slow.write_all(b"X");
        match slow.read(&mut buf) {
            Ok(0) => {
                closed_after = Some(opened.elapsed());
                break;
            }
            Ok(_) => panic!("an answer to half-sent headers"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                closed_after = Some(opened.elapsed());
                break;
            }
        }
    }
    let closed_after = closed_after.expect("the slowloris connection was still open after 60 s");
    assert!(closed_after >= Duration::from_millis(1500), "closed before HEADER_READ_TIMEOUT: {closed_after:?}");

    // A socket that never sends a byte: the same timeout, from its opening.
    let mut silent = connect(server.port);
    let (got, took) = read_to_close(&mut silent);
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(60), "{took:?}");

    // Keep-alive: two requests on one connection, then silence until KEEPALIVE_TIMEOUT.
    let mut kept = connect(server.port);
    for _ in 0..2 {
        kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let (head, _) = read_answer(&mut kept);
        assert!(head.starts_with("http/1.1 200"), "{head}");
    }
    let (rest, idle) = read_to_close(&mut kept);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(idle >= Duration::from_millis(3500), "idle connection closed before KEEPALIVE_TIMEOUT: {idle:?}");
    assert!(idle < Duration::from_secs(60), "{idle:?}");

    let m = server.get("/metrics").text();
    assert!(metric(&m, "facerec_connections_timed_out_total{kind=\"header\"}") >= 2.0, "{m}");
    assert!(metric(&m, "facerec_connections_timed_out_total{kind=\"idle\"}") >= 1.0, "{m}");
    eprintln!("slowloris closed after {closed_after:?}, silent socket after {took:?}, idle keep-alive after {idle:?}");
}

#[test]
fn a_body_that_stops_arriving_gets_408_and_the_connection_closes() {
    let dir = TempDir::new("conn-body");
    let server = Server::start_with_env(dir.path(), &[("BODY_READ_TIMEOUT", "1s")]);
    for (path, content_type, start) in [
        ("/users", "application/json", &b"{\"user"[..]),
        (
            "/api/face/register",
            "multipart/form-data; boundary=XyZ",
            &b"--XyZ\r\nContent-Disposition: form-data; name=\"displayName\"\r\n\r\nAl"[..],
        ),
    ] {
        let mut s = connect(server.port);
        let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n");
        s.write_all(head.as_bytes()).expect("write");
        s.write_all(start).expect("write");
        let (got, took) = read_to_close(&mut s);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408 "), "{path}: {text}");
        assert_eq!(json_body(&got)["code"], "request_timeout", "{path}: {text}");
        assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(60), "{path}: {took:?}");
    }
    // Nothing was created.
    assert_eq!(server.get("/users").json()["count"], 0);
    assert_eq!(server.get("/api/face").json()["total"], 0);
}

#[test]
fn hyper_s_own_refusals_are_json_and_an_oversized_expect_gets_413_not_100() {
    let dir = TempDir::new("conn-hyper");
    let server = Server::start_with_env(dir.path(), &[("MAX_BODY_BYTES", "100000")]);
    let exchange = |raw: Vec<u8>| {
        let mut s = connect(server.port);
        s.write_all(&raw).expect("write");
        read_to_close(&mut s).0
    };
    let big_header = [b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec(), vec![b'a'; 100_000], b"\r\n\r\n".to_vec()].concat();
    let got = exchange(big_header);
    assert!(got.starts_with(b"HTTP/1.1 431 "), "{}", String::from_utf8_lossy(&got));
    assert_eq!(json_body(&got)["code"], "header_too_large");
    let long_uri = [b"GET /".to_vec(), vec![b'a'; 70_000], b" HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()].concat();
    let got = exchange(long_uri);
    assert!(got.starts_with(b"HTTP/1.1 414 "), "{}", String::from_utf8_lossy(&got));
    assert_eq!(json_body(&got)["code"], "uri_too_long");
    let garbage = b"GET /health HTTP/1.1\r\nHost x\r\n\r\n".to_vec();
    let got = exchange(garbage);
    assert!(got.starts_with(b"HTTP/1.1 400 "), "{}", String::from_utf8_lossy(&got));
    assert_eq!(json_body(&got)["code"], "invalid_request");

    // Expect: 100-continue with a length over MAX_BODY_BYTES: 413 straight away.
    for path in ["/recognize", "/api/face/register"] {
        let mut s = connect(server.port);
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 100001\r\n\r\n"
        );
        s.write_all(head.as_bytes()).expect("write");
        let (head, body) = read_answer(&mut s);
        assert!(head.starts_with("http/1.1 413 "), "{path}: {head}");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["code"], "payload_too_large");
    }
    // Within the limit, 100 Continue comes and the request is answered.
    let mut s = connect(server.port);
    let body = br#"{"username": "alice"}"#;
    let head = format!(
        "POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    let (head, _) = read_answer(&mut s);
    assert!(head.starts_with("http/1.1 100 "), "{head}");
    s.write_all(body).expect("write");
    let (head, _) = read_answer(&mut s);
    assert!(head.starts_with("http/1.1 201 "), "{head}");
}

#[test]
fn the_connection_cap_fits_a_low_file_limit_and_the_service_recovers() {
    let dir = TempDir::new("conn-cap");
    // 128 open files: the cap is lowered to 64; 150 silent sockets are more than fit.
    let server = Server::start_limited(dir.path(), &[("MAX_CONNECTIONS", "1000"), ("HEADER_READ_TIMEOUT", "3s")], Some(128));
    let idle: Vec<TcpStream> = (0..150).map(|_| connect(server.port)).collect();
    // Past the cap, connections are answered 503 and closed, or served once the silent ones
    // are closed: never left hanging, never an error of the server's.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut refused = 0;
    let served = loop {
        assert!(Instant::now() < deadline, "no normal client served within 90 s; stderr:\n{}", server.stderr());
        let mut s = connect(server.port);
        let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (got, _) = read_to_close(&mut s);
        let text = String::from_utf8_lossy(&got).into_owned();
        if text.starts_with("HTTP/1.1 200 ") {
            break text;
        }
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 503 "), "{text}");
        if text.starts_with("HTTP/1.1 503 ") {
            assert_eq!(json_body(&got)["code"], "overloaded");
        }
        refused += 1;
        // Not a sleep for synchronisation: a pause between polls of a condition with a deadline.
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(served.contains("\"status\""), "{served}");
    drop(idle);
    let m = server.get("/metrics").text();
    assert!(metric(&m, "facerec_connections_refused_total") >= 1.0, "150 sockets fit under a cap of 64: {m}");
    let err = server.stderr();
    assert!(err.contains("lowered_to=64"), "{err}");
    assert!(!err.contains("Too many open files"), "{err}");
    eprintln!("served after {refused} refused tries");
}

#[test]
fn a_graceful_stop_does_not_wait_for_idle_or_half_open_connections() {
    let dir = TempDir::new("conn-stop");
    let mut server =
        Server::start_with_env(dir.path(), &[("HEADER_READ_TIMEOUT", "60s"), ("KEEPALIVE_TIMEOUT", "60s"), ("SHUTDOWN_TIMEOUT", "30s")]);
    let mut half = connect(server.port);
    half.write_all(b"POST /users HTTP/1.1\r\nHost: x\r\nContent-").expect("write");
    let mut kept = connect(server.port);
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let (head, _) = read_answer(&mut kept);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // Let the server see the half-sent head before the signal: poll its open-connection gauge.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&server.get("/metrics").text(), "facerec_connections_open") < 3.0 {
        assert!(Instant::now() < deadline, "the two connections are not open");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    server.signal("-TERM");
    let status = server.wait_exit(Duration::from_secs(60)).expect("did not stop within 60 s");
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(10), "a graceful stop waited for idle connections: {took:?}");
    let (_, _) = read_to_close(&mut half);
    let (_, _) = read_to_close(&mut kept);
    eprintln!("graceful stop with a half-open and an idle connection: {took:?}");
}

/// 200 slowloris connections (reconnecting when closed) and 2000 silent ones for 60 s, while a
/// normal client asks /health and /users in turn; prints the figures.
#[test]
#[ignore = "a 60 s measurement: cargo test --test connections -- --ignored --nocapture"]
fn measure_slowloris_and_idle_flood() {
    raise_own_file_limit(8192);
    let dir = TempDir::new("conn-flood");
    let server = Server::start(dir.path());
    let port = server.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reopened = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let attacker = {
        let (stop, reopened) = (stop.clone(), reopened.clone());
        std::thread::spawn(move || {
            let open_slow = || {
                let s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
                s.set_nonblocking(true).ok()?;
                let mut s = s;
                s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").ok()?;
                Some(s)
            };
            let open_idle = || TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok().filter(|s| s.set_nonblocking(true).is_ok());
            let closed = |c: &mut TcpStream| {
                let mut buf = [0u8; 16];
                match c.read(&mut buf) {
                    // EOF (closed by the server) or an answer: either way it is done with.
                    Ok(n) => n == 0 || n <= buf.len(),
                    Err(e) => e.kind() != ErrorKind::WouldBlock,
                }
            };
            let mut slow: Vec<Option<TcpStream>> = (0..200).map(|_| open_slow()).collect();
            let mut idle: Vec<Option<TcpStream>> = (0..2000).map(|_| open_idle()).collect();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in slow.iter_mut() {
                    if s.as_mut().is_none_or(|c| c.write_all(b"X").is_err() || closed(c)) {
                        *s = open_slow();
                        reopened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                for s in idle.iter_mut() {
                    if s.as_mut().is_none_or(closed) {
                        *s = open_idle();
                        reopened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            slow.len() + idle.len()
        })
    };
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut failures = 0;
    while started.elapsed() < Duration::from_secs(60) {
        let t = Instant::now();
        match support::request(port, "GET", if latencies.len() % 2 == 0 { "/health" } else { "/users" }, None, b"", Duration::from_secs(30))
        {
            Ok(r) if r.status == 200 => latencies.push(t.elapsed().as_secs_f64() * 1000.0),
            _ => failures += 1,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = attacker.join();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    let m = server.get("/metrics").text();
    let err = server.stderr();
    eprintln!(
        "60 s of 200 slowloris + 2000 idle: normal client {} served, {failures} failed, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         attacker sockets closed by the server and reopened: {}; timed out: header {}, idle {}; refused {}; 'Too many open files' in the log: {}",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
        reopened.load(std::sync::atomic::Ordering::Relaxed),
        metric(&m, "facerec_connections_timed_out_total{kind=\"header\"}"),
        metric(&m, "facerec_connections_timed_out_total{kind=\"idle\"}"),
        metric(&m, "facerec_connections_refused_total"),
        err.contains("Too many open files"),
    );
    assert_eq!(failures, 0);
    assert!(!err.contains("Too many open files"));
}

fn raise_own_file_limit(n: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = (n as libc::rlim_t).min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}
