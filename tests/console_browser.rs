//! The web console at `/console` in a real browser: the real `facerec` binary with an API key
//! required, and Debian's headless Chromium driven over the DevTools protocol
//! (tests/browser_support) with a fake camera that plays a video made by `ffmpeg` from real
//! photos (deepface id01, tests/fixtures/SOURCES.md). The operator types the key, creates a
//! user, enrols two uploaded photos and sees the sample count; registers and searches a face
//! record; opens Live and sees the person's name drawn over the camera; and finds that
//! recognition, with its crop, in Activity. A screenshot of each step is written to
//! `target/console-screenshots/` (the paths are printed). Every wait polls the page with a
//! deadline.
//!
//! Chromium and ffmpeg are required: `scripts/test` installs both (`apt-get`); set CHROMIUM or
//! FFMPEG to use other binaries. A missing one fails the test, it is never skipped.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::browser::{Browser, console_lines, csp_violations};
use support::target_dir;
use support::{REQUEST_TIMEOUT, Server, TempDir, fixture_path, request_with_headers, wait_bounded};

const API_KEY: &str = "console-test-key-5d2c";
/// Bound on a step that waits for inference (enrolment, search, the stream), on a loaded 2-core machine.
const INFERENCE_WAIT: Duration = Duration::from_secs(180);
/// Bound on a step that only waits for the page (a tab, a list).
const PAGE_WAIT: Duration = Duration::from_secs(60);

/// ffmpeg: $FFMPEG, else `ffmpeg` on PATH.
fn ffmpeg() -> PathBuf {
    if let Some(p) = std::env::var_os("FFMPEG").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "FFMPEG={} is not a file", p.display());
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("ffmpeg")).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("ffmpeg is not installed (not on PATH, FFMPEG unset): run `scripts/test`, which installs it, or `apt-get install ffmpeg`")
    })
}

/// A Y4M video for Chromium's fake camera: each photo for 1.5 s at 10 frames/s, letterboxed
/// into 640x480 (Chromium loops it).
fn fake_camera_video(work: &Path, photos: &[&str]) -> PathBuf {
    let out = work.join("camera.y4m");
    let fit = "scale=640:480:force_original_aspect_ratio=decrease,pad=640:480:(ow-iw)/2:(oh-ih)/2,setsar=1,fps=10";
    let mut cmd = Command::new(ffmpeg());
    cmd.args(["-nostdin", "-v", "error", "-y"]);
    let mut graph = String::new();
    for (i, photo) in photos.iter().enumerate() {
        cmd.args(["-loop", "1", "-framerate", "10", "-t", "1.5", "-i"]).arg(fixture_path(photo));
        graph.push_str(&format!("[{i}:v]{fit}[v{i}];"));
    }
    for i in 0..photos.len() {
        graph.push_str(&format!("[v{i}]"));
    }
    graph.push_str(&format!("concat=n={}:v=1:a=0,format=yuv420p", photos.len()));
    let err_path = work.join("ffmpeg.err");
    let mut child = cmd
        .args(["-filter_complex", &graph, "-f", "yuv4mpegpipe"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err_path).expect("ffmpeg stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("starting ffmpeg: {e}"));
    let status = wait_bounded(&mut child, Duration::from_secs(120));
    let err = fs::read_to_string(&err_path).unwrap_or_default();
    assert!(matches!(status, Some(s) if s.success()), "ffmpeg gave {status:?}: {err}");
    let header = fs::read(&out).map(|b| b[..b.len().min(64)].to_vec()).unwrap_or_default();
    assert!(header.starts_with(b"YUV4MPEG2 W640 H480"), "not a 640x480 Y4M: {:?}", String::from_utf8_lossy(&header));
    out
}

/// A protected GET with the key.
fn get_with_key(server: &Server, path: &str) -> serde_json::Value {
    let r = request_with_headers(server.port, "GET", path, &[("X-API-Key", API_KEY)], None, b"", REQUEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.json()
}

/// Writes a screenshot of the page as `name` in the screenshot folder; its path.
fn shot(browser: &mut Browser, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    browser.screenshot(&path);
    let img = image::open(&path).unwrap_or_else(|e| panic!("screenshot {}: {e}", path.display()));
    assert_eq!((img.width(), img.height()), (1280, 1000), "{}", path.display());
    eprintln!("screenshot: {}", path.display());
    path
}

/// Shows a tab and waits until its module ran.
fn open_tab(browser: &mut Browser, tab: &str) {
    browser.click(&format!("#tabs button[data-tab={tab}]"));
    browser.wait_for(
        &format!("the {tab} tab"),
        &format!("document.body.dataset.tab === '{tab}' && !document.getElementById('tab-{tab}').hidden"),
        PAGE_WAIT,
    );
}

#[test]
fn console_enrols_names_the_live_camera_and_lists_activity() {
    let tmp = TempDir::new("console");
    let server = Server::start_with_env(tmp.path(), &[("API_KEYS", API_KEY)]);
    // The page is public; the data is not.
    let page = server.get("/console");
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(server.get("/users").status, 401);

    let shots = target_dir().join("console-screenshots");
    let _ = fs::remove_dir_all(&shots);
    fs::create_dir_all(&shots).expect("screenshot folder");
    // The camera shows the person enrolled below, from two other photos of her.
    let video = fake_camera_video(tmp.path(), &["img10.jpg", "img11.jpg"]);
    let camera = format!("--use-file-for-fake-video-capture={}", video.display());
    let mut b = Browser::launch(
        tmp.path(),
        "console",
        &[
            "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream",
            &camera,
            "--autoplay-policy=no-user-gesture-required",
            "--window-size=1280,1000",
            "--hide-scrollbars",
        ],
    );

    b.set_viewport(1280, 1000);
    // The page asks for the key; it is typed in and kept in session storage only.
    b.navigate(&server.url("/console"));
    b.wait_for("the login form", "document.body.dataset.auth === 'needed' && !document.getElementById('login').hidden", PAGE_WAIT);
    shot(&mut b, &shots, "0-login.png");
    b.type_into("#login-secret", API_KEY);
    b.click("#login-save");
    b.wait_for(
        "the People tab after the key",
        "document.body.dataset.auth === 'given' && document.body.dataset.tab === 'people'",
        PAGE_WAIT,
    );
    let stored = b.eval("sessionStorage.getItem('facerec.console.credential')");
    assert!(stored.as_str().is_some_and(|s| s.contains(API_KEY)), "session storage holds {stored}");
    assert_eq!(b.eval("localStorage.length"), serde_json::json!(0), "the key must not reach local storage");

    // People: create a user, enrol two uploaded photos, see the sample count.
    b.type_into("#people-new-name", "alice");
    b.click("#people-create button[type=submit]");
    let samples = "document.querySelector('#people-table tr[data-user=\"alice\"] .samples')?.dataset.samples";
    b.wait_for("alice listed with no sample", &format!("{samples} === '0'"), PAGE_WAIT);
    b.set_files("#enrol-files", &[fixture_path("img5.jpg"), fixture_path("img6.jpg")]);
    b.click("#enrol-submit");
    b.wait_for("alice's two samples", &format!("{samples} === '2'"), INFERENCE_WAIT);
    let users = get_with_key(&server, "/users");
    assert_eq!(users["users"][0]["username"], "alice", "{users}");
    assert_eq!(users["users"][0]["samples"], 2, "{users}");
    shot(&mut b, &shots, "1-people.png");

    // Faces: register a record, search by another photo of her, see the score.
    open_tab(&mut b, "faces");
    b.type_into("#faces-name", "Alice Martin");
    b.set_files("#faces-image", &[fixture_path("img6.jpg")]);
    b.click("#faces-register button[type=submit]");
    b.wait_for("the record listed", "document.querySelector('#faces-table')?.dataset.total === '1'", INFERENCE_WAIT);
    b.set_files("#faces-query", &[fixture_path("img11.jpg")]);
    b.click("#faces-search button[type=submit]");
    let hit = b.wait_for(
        "a search hit",
        "(() => { const li = document.querySelector('#faces-hits li'); return li ? [li.querySelector('.name').textContent, Number(li.dataset.score)] : null; })()",
        INFERENCE_WAIT,
    );
    assert_eq!(hit[0], "Alice Martin", "{hit}");
    let score = hit[1].as_f64().unwrap_or(-1.0);
    assert!((0.4..=1.0).contains(&score), "score {score} for another photo of the same person");
    eprintln!("Faces: img11.jpg searched against img6.jpg's record: score {score:.3}");
    b.wait_for("the record's thumbnail", "document.querySelector('#faces-table img')?.naturalWidth > 0", PAGE_WAIT);
    shot(&mut b, &shots, "2-faces.png");

    // Live: the fake camera through /api/stream, recorded to the audit trail; her name drawn.
    open_tab(&mut b, "live");
    b.click("#live-log");
    b.click("#live-start");
    b.wait_for("alice named in Live", "document.getElementById('live-names').dataset.names.split('|').includes('alice')", INFERENCE_WAIT);
    // The box and label are on the canvas over the video: count its label-green pixels.
    let green = b.eval(
        "(() => { const c = document.getElementById('live-overlay'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
         let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] === 0x2e && d[i + 1] === 0xcc && d[i + 2] === 0x71) n++; return n; })()",
    );
    assert!(green.as_u64().unwrap_or(0) > 500, "the overlay holds {green} pixels of the known-face colour");
    let stats = b.eval("JSON.stringify(document.getElementById('live-stats').dataset)");
    let stats: serde_json::Value = serde_json::from_str(stats.as_str().unwrap_or("{}")).unwrap_or_default();
    let answered: u64 = stats["answered"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(answered >= 1 && stats["dropped"].is_string(), "Live shows sent/answered/dropped: {stats}");
    let text = b.eval("document.getElementById('live-stats').textContent");
    eprintln!("Live: {}", text.as_str().unwrap_or_default());
    shot(&mut b, &shots, "3-live.png");
    b.click("#live-stop");

    // Activity: the stream's recognition of alice, with its crop. The audit writer runs in the
    // background: wait until the server lists it, then open the tab.
    let deadline = std::time::Instant::now() + INFERENCE_WAIT;
    loop {
        let page = get_with_key(&server, "/recognitions?limit=20");
        let logged = page["items"].as_array().into_iter().flatten().any(|i| {
            i["source"] == "stream"
                && i["faces"].as_array().into_iter().flatten().any(|f| f["name"] == "alice" && f["crop_url"].is_string())
        });
        if logged {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no stream recognition of alice in /recognitions: {page}");
        std::thread::sleep(Duration::from_millis(200));
    }
    open_tab(&mut b, "activity");
    let width = b.wait_for(
        "alice's crop in Activity",
        "(() => { const f = [...document.querySelectorAll('#activity-list li[data-source=stream] figure')].find(f => f.dataset.name === 'alice'); \
         const img = f && f.querySelector('img'); return img && img.complete && img.src.startsWith('blob:') ? img.naturalWidth : 0; })()",
        PAGE_WAIT,
    );
    assert_eq!(width, serde_json::json!(112), "the stream's crop is the aligned 112x112 face");
    shot(&mut b, &shots, "4-activity.png");

    let stderr = b.stderr();
    assert_eq!(csp_violations(&stderr), Vec::<&str>::new(), "the console's policy blocked part of the console");
    let errors: Vec<&str> = console_lines(&stderr).into_iter().filter(|l| l.contains("Uncaught")).collect();
    assert_eq!(errors, Vec::<&str>::new(), "the console threw");
    eprintln!("screenshots of the console: {}", shots.display());
}

/// The page and its files are served from the binary, public, with their policy; the data they
/// call is not public.
#[test]
fn console_files_are_public_and_self_contained() {
    let tmp = TempDir::new("console-files");
    let server = Server::start_with_env(tmp.path(), &[("API_KEYS", API_KEY)]);
    let page = server.get("/console");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap_or_default().starts_with("text/html"));
    let csp = page.header("content-security-policy").unwrap_or_default().to_owned();
    for part in ["default-src 'none'", "script-src 'self';", "img-src 'self' blob: data:", "connect-src 'self'"] {
        assert!(csp.contains(part), "/console policy {csp:?} lacks {part:?}");
    }
    let html = page.text();
    for (file, kind) in [("console.css", "text/css"), ("main.js", "text/javascript"), ("live.js", "text/javascript")] {
        let r = server.get(&format!("/console/{file}"));
        assert_eq!(r.status, 200, "{file}");
        assert!(r.header("content-type").unwrap_or_default().starts_with(kind), "{file}: {:?}", r.header("content-type"));
        assert!(r.header("content-security-policy").is_some(), "{file} has no policy");
    }
    assert!(html.contains("/console/main.js") && html.contains("/console/console.css"), "{html}");
    assert_eq!(server.get("/console/nope.js").status, 404);
    assert_eq!(server.get("/recognitions").status, 401);
    assert!(server.get("/").text().contains("href=\"/console\""), "the landing page links the console");
}
