//! A real MongoDB wire-protocol server for the tests: SecantusDB from PyPI, installed by the
//! harness itself into `target/secantus-venv` (once; a lock file keeps parallel test binaries
//! from racing), started on a free port, stopped and restarted on the same storage path, and
//! killed when the test binary ends (a watchdog thread in the server's own process notices
//! its parent is gone). Also: pymongo from the same venv for raw documents, the real
//! `facerec` binary pointed at a database, and a small HTTP client. Every wait is bounded.

use std::fs::{self, File};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};

use super::{fixture, free_port, manifest_dir, tail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What the harness installs (pymongo: the version SecantusDB 0.7.0b3 resolves to).
pub const REQUIREMENTS: &[&str] = &["SecantusDB==0.7.0b3", "pymongo==4.20.0"];
/// The install (first run only) may download about 60 MB of wheels.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(20);
pub const FACEREC_START_TIMEOUT: Duration = Duration::from_secs(120);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The venv's python, SecantusDB and pymongo installed in it (on first use).
pub fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(install).clone()
}

fn install() -> PathBuf {
    super::venv::install("secantus", REQUIREMENTS, |_| true).join("bin/python")
}

/// Runs `script` with the venv's python (pymongo importable), `input` on stdin; its stdout.
pub fn pymongo(script: &str, input: &str) -> String {
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python starts");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("script input");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                panic!("pymongo script did not finish within 60 s");
            }
        }
    }
    let out = child.wait_with_output().expect("script output");
    assert!(out.status.success(), "pymongo script failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Inserts `docs` (JSON: ints stay ints, floats become doubles) into `db.users`.
pub fn insert_docs(uri: &str, docs: &serde_json::Value) {
    let script = r#"import json, sys, pymongo
d = json.load(sys.stdin)
c = pymongo.MongoClient(d['uri'], serverSelectionTimeoutMS=10000)
c.get_default_database().users.insert_many(d['docs'])
"#;
    pymongo(script, &serde_json::json!({"uri": uri, "docs": docs}).to_string());
}

/// Every document of `db.users` as JSON (dates as `{"$date": ms}`, ints marked `{"$int": n}`
/// so a test can tell them from doubles).
pub fn dump_docs(uri: &str) -> Vec<serde_json::Value> {
    let script = r#"import json, sys, datetime, pymongo
d = json.load(sys.stdin)
c = pymongo.MongoClient(d['uri'], serverSelectionTimeoutMS=10000)
def conv(v):
    if isinstance(v, bool): return v
    if isinstance(v, int): return {'$int': v}
    if isinstance(v, float): return v
    if isinstance(v, datetime.datetime): return {'$date': int(v.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)}
    if isinstance(v, list): return [conv(x) for x in v]
    if isinstance(v, dict): return {k: conv(x) for k, x in v.items()}
    if isinstance(v, str) or v is None: return v
    return str(v)
print(json.dumps([conv(x) for x in c.get_default_database().users.find({}, sort=[('username', 1)])]))
"#;
    let out = pymongo(script, &serde_json::json!({"uri": uri}).to_string());
    serde_json::from_str(&out).expect("dump is JSON")
}

/// A SecantusDB server process.
pub struct Secantus {
    child: Option<Child>,
    pub port: u16,
    pub storage: PathBuf,
    standalone: bool,
    log: PathBuf,
}

/// Runs the server inside a python process that also watches its parent (the test binary)
/// and stops itself when the parent is gone, so no server outlives a test run.
const WRAPPER: &str = r#"import os, signal, sys, threading, time
parent = os.getppid()
def watch():
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
            os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from secantus.cli import main
sys.argv = ['secantusd-py'] + sys.argv[1:]
sys.exit(main())
"#;

impl Secantus {
    /// Starts a server on a free port with its data under `storage`. `standalone`: no
    /// replica-set advertisement, hence no change streams (as a standalone mongod).
    pub fn start(storage: &Path, standalone: bool) -> Secantus {
        fs::create_dir_all(storage).expect("storage dir");
        let mut s =
            Secantus { child: None, port: free_port(), storage: storage.to_path_buf(), standalone, log: storage.with_extension("log") };
        s.spawn();
        s
    }

    /// The one server this test binary shares between its tests (each test uses its own database).
    pub fn shared() -> &'static Secantus {
        static SHARED: OnceLock<Secantus> = OnceLock::new();
        SHARED.get_or_init(|| {
            let storage = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("secantus-shared-{}", std::process::id()));
            let _ = fs::remove_dir_all(&storage);
            Secantus::start(&storage, false)
        })
    }

    fn spawn(&mut self) {
        let log = File::options().create(true).append(true).open(&self.log).expect("server log");
        let mut cmd = Command::new(python());
        cmd.args(["-c", WRAPPER, "--host", "127.0.0.1", "--port", &self.port.to_string(), "--log-level", "WARNING", "--storage-path"])
            .arg(&self.storage);
        if self.standalone {
            cmd.arg("--standalone");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("secantusd starts");
        self.child = Some(child);
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("secantusd exited ({status}); its log:\n{}", tail(&self.log, 4000));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "secantusd did not listen within {SERVER_START_TIMEOUT:?}; log:\n{}", tail(&self.log, 4000));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (SIGTERM, then SIGKILL past the limit); its port stops answering.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + SERVER_STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn uri(&self, db: &str) -> String {
        format!("mongodb://127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Secantus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The real `facerec` binary on a MongoDB database, listening on 127.0.0.1. Killed on drop.
pub struct Facerec {
    child: Option<Child>,
    pub port: u16,
    stderr_path: PathBuf,
}

impl Facerec {
    /// Starts the binary in `dir` with `MONGO_URI=uri` (and `extra` variables) and waits until
    /// /health answers.
    pub fn start(dir: &Path, uri: &str, extra: &[(&str, &str)]) -> Facerec {
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let (child, stderr_path) = Facerec::spawn(dir, uri, port, extra, attempt);
            let mut f = Facerec { child: Some(child), port, stderr_path };
            let deadline = Instant::now() + FACEREC_START_TIMEOUT;
            loop {
                if let Some(status) = f.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    f.child = None;
                    last = format!("facerec exited before it was ready ({status}):\n{}", f.stderr());
                    break;
                }
                if request(port, "GET", "/health", None, b"", Duration::from_secs(5)).is_ok_and(|r| r.status == 200) {
                    return f;
                }
                assert!(Instant::now() < deadline, "facerec did not answer /health within {FACEREC_START_TIMEOUT:?}:\n{}", f.stderr());
                std::thread::sleep(Duration::from_millis(100));
            }
            if !last.contains("cannot listen") {
                break;
            }
        }
        panic!("{last}");
    }

    /// Spawns the binary without waiting (for start-up failure tests).
    pub fn spawn(dir: &Path, uri: &str, port: u16, extra: &[(&str, &str)], attempt: u32) -> (Child, PathBuf) {
        let stderr_path = dir.join(format!("facerec-{port}-{attempt}.stderr"));
        let stderr = File::create(&stderr_path).expect("stderr file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_facerec"));
        cmd.current_dir(dir)
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("MONGO_URI", uri)
            .env("MONGO_OP_TIMEOUT", "1s")
            .env("DATABASE_PATH", dir.join("faces.db"))
            .env("LOG_FILE", dir.join("logs.txt"))
            .env("PHOTO_DIR", dir.join("photo"))
            .env("MODEL_CACHE_DIR", std::env::var_os("MODEL_CACHE_DIR").map_or_else(|| manifest_dir().join("models"), PathBuf::from))
            .env("MODEL_PACK", "buffalo_sc")
            .env("EXECUTION_PROVIDER", "cpu")
            .env("SIM_THRESHOLD", "0.3")
            .env("RUST_LOG", "info,ort=warn,facerec::store=debug")
            .env("INTRA_THREADS", "1");
        for var in [
            "JWT_SECRET_KEY",
            "API_KEYS",
            "DET_SIZE",
            "WORKERS",
            "QUEUE_SIZE",
            "MAX_BODY_BYTES",
            "MONGO_FOLLOW",
            "MONGO_POLL_INTERVAL",
            "MONGO_CONNECT_TIMEOUT",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::from(stderr)).spawn().expect("facerec starts");
        (child, stderr_path)
    }

    pub fn stderr(&self) -> String {
        tail(&self.stderr_path, 20_000)
    }

    pub fn call(&self, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Response {
        request(self.port, method, path, content_type, body, REQUEST_TIMEOUT)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}; facerec stderr:\n{}", self.stderr()))
    }

    pub fn get(&self, path: &str) -> Response {
        self.call("GET", path, None, b"")
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Response {
        self.call("POST", path, Some("application/json"), body.to_string().as_bytes())
    }

    pub fn delete(&self, path: &str) -> Response {
        self.call("DELETE", path, None, b"")
    }

    /// `POST /calculate_average_embedding` with these fixture photos.
    pub fn enrol(&self, username: &str, photos: &[&str]) -> Response {
        let files: Vec<(&str, &str)> = photos.iter().map(|p| ("files", *p)).collect();
        let (ct, body) = Facerec::form(&[("username", username)], &files);
        self.call("POST", "/calculate_average_embedding", Some(&ct), &body)
    }

    /// A multipart body of text fields and fixture photos (`(field, file name)`).
    fn form(texts: &[(&str, &str)], photos: &[(&str, &str)]) -> (String, Vec<u8>) {
        let boundary = "facerec-mongo-test-boundary";
        let mut body = Vec::new();
        for (name, value) in texts {
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
            );
        }
        for (field, file) in photos {
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{file}\"\r\nContent-Type: image/jpeg\r\n\r\n")
                    .as_bytes(),
            );
            body.extend_from_slice(&fixture(file));
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={boundary}"), body)
    }

    /// `POST /api/face/register` of a fixture photo: the new record's id.
    pub fn register(&self, display_name: &str, photo: &str) -> String {
        let (ct, body) = Facerec::form(&[("displayName", display_name)], &[("image", photo)]);
        let r = self.call("POST", "/api/face/register", Some(&ct), &body);
        assert_eq!(r.status, 201, "register: {}", r.text());
        r.json()["id"].as_str().unwrap_or_default().to_owned()
    }

    /// `POST /api/face/search` with a fixture photo: the hits' ids, closest first.
    pub fn search(&self, photo: &str) -> Vec<String> {
        let (ct, body) = Facerec::form(&[("topK", "10")], &[("image", photo)]);
        let r = self.call("POST", "/api/face/search", Some(&ct), &body);
        assert_eq!(r.status, 200, "search: {}", r.text());
        r.json().as_array().map(|hits| hits.iter().filter_map(|h| h["id"].as_str().map(str::to_owned)).collect()).unwrap_or_default()
    }

    /// `POST /recognize` of one photo: (name, similarity).
    pub fn recognize(&self, photo: &str) -> (String, f64) {
        use base64::Engine as _;
        let crop = base64::engine::general_purpose::STANDARD.encode(fixture(photo));
        let r = self.post_json("/recognize", &serde_json::json!({"camera": "test", "bboxes": [{"bbox": [0, 0, 1, 1], "crop": crop}]}));
        assert_eq!(r.status, 200, "recognize: {}", r.text());
        let entry = &r.json()["meta"]["bboxes"][0];
        (entry["name"].as_str().unwrap_or_default().to_owned(), entry["similarity"].as_f64().unwrap_or(f64::NAN))
    }

    /// Graceful stop (SIGTERM, bounded), then kill.
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Facerec {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub use super::{Response, request};
