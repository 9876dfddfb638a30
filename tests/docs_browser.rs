//! The API reference pages render in a real browser with no network: the real `facerec`
//! binary serves `/docs/` (Swagger UI, its assets inside the binary) and `/redoc`, and Debian's
//! headless Chromium loads them with every host name but 127.0.0.1 unresolvable and no proxy.
//! The checks read the DOM after JavaScript ran (`--dump-dom`), not the static HTML. Both pages
//! carry a Content-Security-Policy, and render under it without a single violation.
//!
//! Chromium is required: `scripts/test` installs it (`apt-get install chromium`); set CHROMIUM
//! to use another binary. A missing Chromium fails the test, it is never skipped.

mod support;

use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::browser::{CHROMIUM_FLAGS, chromium};
use support::target_dir;
use support::{Server, TempDir, tail, wait_bounded};

/// Bound on one Chromium run (it takes about 2 s here).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

/// What one headless Chromium run gave.
struct Run {
    stdout: String,
    stderr: String,
}

impl Run {
    /// What the page's Content-Security-Policy refused of the page's own (ReDoc's footer logo
    /// from cdn.redoc.ly being refused is the policy at work, not a failure).
    fn csp_violations(&self) -> Vec<&str> {
        support::browser::csp_violations(&self.stderr)
    }

    /// The page's console messages.
    fn console(&self) -> Vec<&str> {
        support::browser::console_lines(&self.stderr)
    }
}

/// Runs headless Chromium on `url` with `extra` flags, in a fresh profile under `work`;
/// bounded by [`BROWSER_TIMEOUT`]; panics unless it exits successfully.
fn browse(work: &Path, tag: &str, extra: &[&str], url: &str) -> Run {
    let profile = work.join(format!("chromium-profile-{tag}"));
    fs::create_dir_all(&profile).expect("profile folder");
    let out_path = work.join(format!("chromium-{tag}.out"));
    let err_path = work.join(format!("chromium-{tag}.err"));
    let exe = chromium();
    let mut child = Command::new(&exe)
        .args(CHROMIUM_FLAGS)
        // Timers run ahead in virtual time, so the page has rendered when the DOM is dumped.
        .arg("--virtual-time-budget=10000")
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
    let status = wait_bounded(&mut child, BROWSER_TIMEOUT);
    let run = Run { stdout: fs::read_to_string(&out_path).unwrap_or_default(), stderr: tail(&err_path, 20_000) };
    match status {
        Some(s) if s.success() => run,
        Some(s) => panic!("{} {url} exited with {s}; stderr:\n{}", exe.display(), run.stderr),
        None => panic!("{} {url} did not finish within {BROWSER_TIMEOUT:?} (killed); stderr:\n{}", exe.display(), run.stderr),
    }
}

/// The text of an HTML fragment: tags removed, a few entities decoded, zero-width spaces (which
/// Swagger UI inserts into long paths) dropped.
fn visible_text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            '\u{200b}' => {}
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&#39;", "'")
}

/// The operations Swagger UI rendered: for each `opblock`, its method (from the class
/// `opblock-<method>`), the `data-path` of its `opblock-summary-path`, and that element's text.
fn rendered_operations(dom: &str) -> Vec<(String, String, String)> {
    let mut ops = Vec::new();
    let marker = "class=\"opblock opblock-";
    let starts: Vec<usize> = dom.match_indices(marker).map(|(i, _)| i).collect();
    for (k, &start) in starts.iter().enumerate() {
        let block = &dom[start..starts.get(k + 1).copied().unwrap_or(dom.len())];
        let method: String = block[marker.len()..].chars().take_while(|c| c.is_ascii_alphabetic()).collect();
        let Some(p) = block.find("class=\"opblock-summary-path\"") else { continue };
        let summary = &block[p..];
        let Some(d) = summary.find("data-path=\"") else { continue };
        let path: String = summary[d + 11..].chars().take_while(|&c| c != '"').collect();
        // The element's content: up to the closing tag of the summary path span.
        let text_start = summary[d..].find('>').map_or(d, |i| d + i + 1);
        let text_end = summary[text_start..].find("</span></a></span>").map_or(summary.len().min(text_start + 400), |i| text_start + i);
        ops.push((method.to_ascii_uppercase(), visible_text(&path), visible_text(&summary[text_start..text_end]).trim().to_string()));
    }
    ops
}

/// Pixels within `tol` of `rgb`.
fn count_colour(img: &image::RgbImage, rgb: [u8; 3], tol: u8) -> usize {
    img.pixels().filter(|p| p.0.iter().zip(rgb).all(|(&a, b)| a.abs_diff(b) <= tol)).count()
}

/// `src` and `href` values of a static page that point off this server.
fn external_references(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for (i, _) in html.match_indices(attr) {
            let value: String = html[i + attr.len()..].chars().take_while(|&c| c != '"').collect();
            if value.starts_with("http://") || value.starts_with("https://") || value.starts_with("//") {
                out.push(value);
            }
        }
    }
    out
}

#[test]
fn swagger_ui_renders_every_operation_offline() {
    let tmp = TempDir::new("docs");
    let server = Server::start(tmp.path());

    // The static page: everything it loads comes from the binary, and it holds no operation
    // yet (Swagger UI's JavaScript renders them from /openapi.json).
    let page = server.get("/docs/");
    assert_eq!(page.status, 200, "{}", page.text());
    let html = page.text();
    assert!(html.contains("id=\"swagger-ui\""), "{html}");
    assert!(!html.contains("opblock"), "the static page already holds operations: {html}");
    let csp = page.header("content-security-policy").unwrap_or_default().to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self';"), "/docs/ policy: {csp:?}");
    assert_eq!(external_references(&html), Vec::<String>::new(), "/docs/ loads from other hosts");
    for asset in
        ["/docs/swagger-ui-bundle.js", "/docs/swagger-ui-standalone-preset.js", "/docs/swagger-ui.css", "/docs/swagger-initializer.js"]
    {
        let r = server.get(asset);
        assert_eq!(r.status, 200, "{asset}: {}", r.text());
        assert!(!r.body.is_empty(), "{asset} is empty");
    }
    let doc = server.get("/openapi.json").json();
    assert_eq!(doc["info"]["title"], "Face Recognition API");
    // Every operation of the OpenAPI document, as (METHOD, path).
    let mut documented: Vec<(String, String)> = doc["paths"]
        .as_object()
        .expect("openapi.json has paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flat_map(|o| o.keys())
                .filter(|m| ["get", "put", "post", "delete", "patch", "head", "options", "trace"].contains(&m.as_str()))
                .map(move |m| (m.to_ascii_uppercase(), path.clone()))
        })
        .collect();
    documented.sort();

    // The DOM after Swagger UI ran.
    let run = browse(tmp.path(), "swagger-dom", &["--dump-dom"], &server.url("/docs/"));
    let dom = &run.stdout;
    let ops = rendered_operations(dom);
    let context = || format!("rendered operations {ops:?}\nconsole: {:#?}\nDOM: {} bytes", run.console(), dom.len());
    assert!(dom.contains("class=\"swagger-ui"), "Swagger UI did not mount; {}", context());
    assert!(dom.contains("Face Recognition API"), "no API title in the rendered page; {}", context());
    assert!(!dom.contains("Failed to load API definition"), "Swagger UI could not load /openapi.json; {}", context());
    assert_eq!(run.csp_violations(), Vec::<&str>::new(), "the policy blocked part of Swagger UI");
    let expected = [
        ("POST", "/recognize"),
        ("GET", "/metadata"),
        ("POST", "/calculate_average_embedding"),
        ("POST", "/users"),
        ("GET", "/users"),
        ("DELETE", "/users/{username}"),
        ("GET", "/health"),
    ];
    for (method, path) in expected {
        assert!(
            ops.iter().any(|(m, p, text)| m == method && p == path && text == path),
            "no rendered {method} {path} operation block; {}",
            context()
        );
    }
    // One block per documented operation, no more, no fewer.
    let mut rendered: Vec<(String, String)> = ops.iter().map(|(m, p, _)| (m.clone(), p.clone())).collect();
    rendered.sort();
    assert_eq!(rendered, documented, "one rendered block per operation of /openapi.json; {}", context());

    // A screenshot for people (target/docs-screenshot.png), checked for the operation badges:
    // Swagger UI paints POST green (#49cc90), GET blue (#61affe), DELETE red (#f93e3e).
    let shot = target_dir().join("docs-screenshot.png");
    let _ = fs::remove_file(&shot);
    let shot_arg = format!("--screenshot={}", shot.display());
    let run = browse(tmp.path(), "swagger-shot", &[&shot_arg, "--window-size=1280,2000", "--hide-scrollbars"], &server.url("/docs/"));
    let img =
        image::open(&shot).unwrap_or_else(|e| panic!("screenshot {}: {e}; chromium stderr:\n{}", shot.display(), run.stderr)).to_rgb8();
    assert_eq!(img.dimensions(), (1280, 2000));
    for (what, rgb) in [("POST", [0x49, 0xcc, 0x90]), ("GET", [0x61, 0xaf, 0xfe]), ("DELETE", [0xf9, 0x3e, 0x3e])] {
        let n = count_colour(&img, rgb, 8);
        assert!(n > 500, "the screenshot {} shows no {what} badge ({n} pixels of its colour)", shot.display());
    }
    eprintln!("screenshot of /docs/: {}", shot.display());
}

/// ReDoc at /redoc renders the API offline: its script is served by the binary, the page
/// loads nothing from other hosts.
#[test]
fn redoc_renders_offline() {
    let tmp = TempDir::new("redoc");
    let server = Server::start(tmp.path());
    let page = server.get("/redoc");
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(external_references(&page.text()), Vec::<String>::new(), "/redoc loads from other hosts");
    let csp = page.header("content-security-policy").unwrap_or_default().to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self';"), "/redoc policy: {csp:?}");
    let script = server.get("/redoc/redoc.standalone.js");
    assert_eq!(script.status, 200);
    assert!(script.body.len() > 500_000, "ReDoc's bundle is {} bytes", script.body.len());

    let run = browse(tmp.path(), "redoc-dom", &["--dump-dom", "--virtual-time-budget=10000"], &server.url("/redoc"));
    let dom = &run.stdout;
    // ReDoc renders the title as an <h1> in its layout, and one entry per operation in its
    // side menu.
    let title_rendered = dom.match_indices("<h1").any(|(i, _)| {
        let rest = &dom[i..];
        let end = rest.find("</h1>").unwrap_or(rest.len());
        visible_text(&rest[..end]).contains("Face Recognition API")
    });
    assert!(title_rendered, "ReDoc did not render /redoc (no <h1> with the title); console: {:#?}", run.console());
    assert_eq!(run.csp_violations(), Vec::<&str>::new(), "the policy blocked part of ReDoc");
    let text = visible_text(dom);
    for path in ["/recognize", "/calculate_average_embedding", "/api/face/search", "/users/{username}"] {
        assert!(text.contains(path), "ReDoc's page does not show {path}; console: {:#?}", run.console());
    }
}
