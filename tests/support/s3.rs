//! moto's S3 server for the tests: PyPI's `moto[server]==5.2.5`, installed by the harness itself
//! into `target/moto-venv` (once; a lock file keeps parallel test binaries from racing, as
//! `pg_support` does), started with `moto_server -H 127.0.0.1 -p PORT` on a free port and
//! stopped on drop (or by [`Moto::stop`], to make the image store fail). Its S3 API is spoken
//! here over plain HTTP (moto checks no signature): buckets made and removed, objects listed and
//! read, as another client of the bucket would. Every wait is bounded; nothing is skipped: a
//! server that cannot be installed or started fails the test.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::mongo::{Response, request};
use super::{TempDir, free_port, tail};

pub const REQUIREMENT: &str = "moto[server]==5.2.5";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `moto_server` of the venv (installed on first use).
pub fn moto_server() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(install).clone()
}

fn install() -> PathBuf {
    super::venv::install("moto", &[REQUIREMENT], |venv| venv.join("bin/moto_server").exists()).join("bin/moto_server")
}

/// A moto S3 server of its own (state in memory); stopped on drop.
pub struct Moto {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
}

impl Moto {
    /// Starts `moto_server` on a free port and waits until it answers S3 requests.
    pub fn start() -> Moto {
        let bin = moto_server();
        let dir = TempDir::new("moto");
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let log = dir.path().join(format!("moto-{port}-{attempt}.log"));
            let out = File::create(&log).expect("moto log");
            let mut child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("log handle"))
                .stderr(out)
                .spawn()
                .expect("moto_server starts");
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if child.try_wait().ok().flatten().is_some() {
                    last = tail(&log, 4000);
                    break;
                }
                if request(port, "GET", "/", None, b"", Duration::from_secs(5)).is_ok_and(|r| r.status == 200) {
                    return Moto { child: Some(child), port, dir };
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("moto_server did not answer within {START_TIMEOUT:?}:\n{}", tail(&log, 4000));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !last.contains("in use") {
                break;
            }
        }
        panic!("moto_server exited at start:\n{last}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The variables a facerec process needs to reach this server (and IMAGE_STORE=`store`).
    pub fn env(&self, store: &str) -> Vec<(String, String)> {
        [
            ("IMAGE_STORE", store.to_owned()),
            ("IMAGE_STORE_TIMEOUT", "10s".to_owned()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    fn call(&self, method: &str, path: &str) -> Response {
        s3_request(self.port, method, path).unwrap_or_else(|e| panic!("moto {method} {path}: {e}")).0
    }

    pub fn create_bucket(&self, bucket: &str) {
        let r = self.call("PUT", &format!("/{bucket}"));
        assert_eq!(r.status, 200, "creating bucket {bucket}: {}", r.text());
    }

    /// Removes a bucket and everything in it.
    pub fn remove_bucket(&self, bucket: &str) {
        for key in self.keys(bucket, "") {
            let r = self.call("DELETE", &format!("/{bucket}/{key}"));
            assert_eq!(r.status, 204, "deleting {key}: {}", r.text());
        }
        let r = self.call("DELETE", &format!("/{bucket}"));
        assert_eq!(r.status, 204, "removing bucket {bucket}: {}", r.text());
    }

    /// The keys under `prefix` (ListObjectsV2, up to 1000), sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let r = self.call("GET", &format!("/{bucket}?list-type=2&max-keys=1000&prefix={prefix}"));
        assert_eq!(r.status, 200, "listing {bucket}: {}", r.text());
        let text = r.text();
        let mut keys: Vec<String> = text.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_owned).collect();
        keys.sort();
        keys
    }

    /// An object's bytes; `None` when absent.
    pub fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let r = self.call("GET", &format!("/{bucket}/{key}"));
        match r.status {
            200 => Some(r.body),
            404 => None,
            s => panic!("reading {key}: {s} {}", r.text()),
        }
    }

    /// An object's Content-Type, as another client reads it (HEAD).
    pub fn content_type(&self, bucket: &str, key: &str) -> Option<String> {
        let (r, content_type) =
            s3_request(self.port, "HEAD", &format!("/{bucket}/{key}")).unwrap_or_else(|e| panic!("moto HEAD {key}: {e}"));
        assert_eq!(r.status, 200, "HEAD {key}");
        content_type
    }

    /// Stops the server (the image store then fails).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One S3 request to moto on reqwest's blocking client: the answer and its Content-Type. moto
/// refuses some unsigned requests (HEAD, DELETE) with 403, so an Authorization header is sent;
/// moto checks no signature.
fn s3_request(port: u16, method: &str, path: &str) -> std::io::Result<(Response, Option<String>)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let failed = |e: reqwest::Error| std::io::Error::other(format!("{method} {path}: {e}"));
    let client = reqwest::blocking::Client::builder().timeout(REQUEST_TIMEOUT).no_proxy().build().map_err(failed)?;
    let auth = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(std::io::Error::other)?;
    let response = client
        .request(method, format!("http://127.0.0.1:{port}{path}"))
        .header("authorization", auth)
        .header("content-length", "0")
        .send()
        .map_err(failed)?;
    let status = response.status().as_u16();
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(|v| v.trim().to_owned());
    Ok((Response { status, headers: Vec::new(), body: response.bytes().map_err(failed)?.to_vec() }, content_type))
}
