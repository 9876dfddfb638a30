//! Headless Chromium for the browser tests (`docs_browser`, `console_browser`): finding Debian's
//! `chromium`, the flags this machine needs with a network cut off from everything but
//! 127.0.0.1, and [`Browser`], a Chromium driven through the DevTools protocol (a WebSocket to
//! `--remote-debugging-port`) to type, click, upload files, read the DOM and take screenshots.
//! Every wait polls a condition with a deadline; nothing here sleeps to synchronise.

use std::fs::{self, File};
use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};

use super::{tail, wait_bounded};

/// The flags this machine needs, and a network cut off from everything but the service.
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--enable-logging=stderr",
    "--v=0",
];

/// Chromium: $CHROMIUM, else `chromium` or `chromium-browser` on PATH, else /usr/bin/chromium.
pub fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "CHROMIUM={} is not a file", p.display());
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser"] {
        if let Some(found) = std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()) {
            return found;
        }
    }
    let fallback = PathBuf::from("/usr/bin/chromium");
    assert!(
        fallback.is_file(),
        "Chromium is not installed (no chromium or chromium-browser on PATH, CHROMIUM unset): run `scripts/test`, \
         which installs it, or `apt-get install chromium`"
    );
    fallback
}

/// The lines of a Chromium stderr log where its Content-Security-Policy refused something of
/// the page's own (scripts, styles, workers, requests to this server). Loads from other hosts
/// being refused is the policy at work, not a failure.
pub fn csp_violations(stderr: &str) -> Vec<&str> {
    let off_host = |l: &str| (l.contains("'https://") || l.contains("'http://")) && !l.contains("'http://127.0.0.1");
    stderr
        .lines()
        .filter(|l| l.contains("Content Security Policy") || l.contains("Content-Security-Policy"))
        .filter(|l| !off_host(l))
        .collect()
}

/// The page's console messages in a Chromium stderr log (logged as `INFO:CONSOLE`).
pub fn console_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains(":CONSOLE")).collect()
}

/// Bound on one DevTools command (a screenshot of a busy page included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on Chromium's start (its DevTools endpoint answering).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);

/// One headless Chromium with one page, driven over the DevTools protocol. Killed on drop.
pub struct Browser {
    child: Option<Child>,
    ws: WebSocket<TcpStream>,
    next_id: u64,
    stderr_path: PathBuf,
}

impl Browser {
    /// Starts Chromium with [`CHROMIUM_FLAGS`] and `extra`, a fresh profile under `work`, on
    /// about:blank, and connects to its page.
    pub fn launch(work: &Path, tag: &str, extra: &[&str]) -> Browser {
        let profile = work.join(format!("chromium-profile-{tag}"));
        fs::create_dir_all(&profile).expect("profile folder");
        let stderr_path = work.join(format!("chromium-{tag}.err"));
        let exe = chromium();
        let child = Command::new(&exe)
            .args(CHROMIUM_FLAGS)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("--remote-debugging-port=0")
            .args(extra)
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
        let mut child = Some(child);
        // Chromium writes the port it chose into the profile (DevToolsActivePort: port, then path).
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        let ws_url = loop {
            if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                child = None;
                fail_launch(&mut child, &stderr_path, format!("chromium exited at start ({status})"));
            }
            let port = fs::read_to_string(profile.join("DevToolsActivePort"))
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u16>().ok()));
            if let Some(port) = port
                && let Some(url) = page_target(port)
            {
                break url;
            }
            if Instant::now() >= deadline {
                fail_launch(&mut child, &stderr_path, format!("chromium's DevTools page target did not appear within {LAUNCH_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        match connect(&ws_url) {
            Ok(ws) => Browser { child, ws, next_id: 0, stderr_path },
            Err(e) => fail_launch(&mut child, &stderr_path, format!("connecting to {ws_url}: {e}")),
        }
    }

    /// What Chromium wrote on stderr so far (its last 60 kB): console messages, CSP reports.
    pub fn stderr(&self) -> String {
        tail(&self.stderr_path, 60_000)
    }

    /// One DevTools command; its `result` (panics on a protocol error or past the deadline).
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        if let Err(e) = self.ws.send(Message::Text(msg.into())) {
            panic!("DevTools {method}: {e}; chromium stderr:\n{}", self.stderr());
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if v["id"].as_u64() != Some(id) {
                        continue; // an event, or the answer to an earlier command
                    }
                    if let Some(err) = v.get("error") {
                        panic!("DevTools {method} failed: {err}");
                    }
                    return v["result"].clone();
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("DevTools {method}: {e}; chromium stderr:\n{}", self.stderr()),
            }
            if Instant::now() >= deadline {
                panic!("DevTools {method} got no answer within {COMMAND_TIMEOUT:?}; chromium stderr:\n{}", self.stderr());
            }
        }
    }

    /// Evaluates `expr` in the page (promises awaited); its value as JSON. A thrown exception panics.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true}));
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("{expr} threw: {ex}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it gives a truthy value (not false, null, 0, "" or undefined); that
    /// value. Panics past `limit` with the last value, the page's text and its console.
    pub fn wait_for(&mut self, what: &str, expr: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.eval(expr);
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() >= deadline {
                let text = self.eval("document.body ? document.body.innerText : ''");
                let stderr = self.stderr();
                panic!(
                    "{what}: not within {limit:?} (last value {v}); page text:\n{}\nconsole:\n{}",
                    text.as_str().unwrap_or_default(),
                    console_lines(&stderr).join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Opens `url` and waits until the document has loaded.
    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        let expr = format!("location.href.startsWith({}) && document.readyState === 'complete'", json!(url));
        self.wait_for(&format!("loading {url}"), &expr, Duration::from_secs(60));
    }

    /// Clicks the element `selector` (panics when there is none).
    pub fn click(&mut self, selector: &str) {
        let expr = format!(
            "(() => {{ const e = document.querySelector({0}); if (!e) throw new Error('no ' + {0}); e.click(); return true; }})()",
            json!(selector)
        );
        self.eval(&expr);
    }

    /// Focuses the field `selector` and types `text` into it (as the keyboard would insert it).
    pub fn type_into(&mut self, selector: &str, text: &str) {
        let expr = format!(
            "(() => {{ const e = document.querySelector({0}); if (!e) throw new Error('no ' + {0}); e.focus(); e.value = ''; return true; }})()",
            json!(selector)
        );
        self.eval(&expr);
        self.call("Input.insertText", json!({"text": text}));
    }

    /// Chooses `files` in the file input `selector`, as the file dialog would.
    pub fn set_files(&mut self, selector: &str, files: &[PathBuf]) {
        let r = self.call("Runtime.evaluate", json!({"expression": format!("document.querySelector({})", json!(selector))}));
        let Some(object_id) = r["result"]["objectId"].as_str() else { panic!("no element {selector}: {r}") };
        let files: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        self.call("DOM.setFileInputFiles", json!({"files": files, "objectId": object_id}));
    }

    /// Sets the page's viewport (what screenshots show) to `width` x `height` CSS pixels.
    pub fn set_viewport(&mut self, width: u32, height: u32) {
        self.call("Emulation.setDeviceMetricsOverride", json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}));
    }

    /// A PNG screenshot of the viewport, written to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let data = r["data"].as_str().unwrap_or_default();
        let png = base64::engine::general_purpose::STANDARD.decode(data).expect("screenshot is base64");
        fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.ws.close(None);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = wait_bounded(&mut child, Duration::from_secs(10));
        }
    }
}

/// Kills a Chromium that did not start properly and panics with why and its stderr.
fn fail_launch(child: &mut Option<Child>, stderr_path: &Path, why: String) -> ! {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    panic!("{why}; chromium stderr:\n{}", tail(stderr_path, 20_000));
}

/// The WebSocket URL of Chromium's first page target, once its DevTools endpoint lists one.
fn page_target(port: u16) -> Option<String> {
    let targets: Value = serde_json::from_slice(&devtools_get(port, "/json/list").ok()?).ok()?;
    targets.as_array()?.iter().find(|t| t["type"] == "page").and_then(|t| t["webSocketDebuggerUrl"].as_str()).map(str::to_string)
}

/// A GET to Chromium's DevTools HTTP endpoint: the body, read to its Content-Length (the
/// endpoint keeps the connection open, so reading to the end would wait for its timeout).
fn devtools_get(port: u16, path: &str) -> io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(len) = len
                && raw.len() >= end + 4 + len
            {
                return Ok(raw[end + 4..end + 4 + len].to_vec());
            }
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "DevTools answer cut short"));
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// A blocking WebSocket client to `url` (ws://127.0.0.1:PORT/...), reads bounded by a timeout.
fn connect(url: &str) -> Result<WebSocket<TcpStream>, String> {
    let hostport = url.strip_prefix("ws://").and_then(|r| r.split('/').next()).ok_or_else(|| format!("unexpected URL {url}"))?;
    let stream = TcpStream::connect(hostport).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    let (ws, _) = tungstenite::client::client(url, stream).map_err(|e| e.to_string())?;
    // From here on a read returns within a second (WouldBlock), so [`Browser::call`] can keep its deadline.
    ws.get_ref().set_read_timeout(Some(Duration::from_secs(1))).map_err(|e| e.to_string())?;
    Ok(ws)
}
