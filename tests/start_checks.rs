//! What the real binary decides at start (issue 15, items 5, 6, 8): misconfigured credentials
//! stop it with one clear line and a non-zero exit; with no credentials it listens on the
//! loopback whatever HOST says, unless ALLOW_OPEN_ACCESS; the database, the audit log and the
//! photo folder are created readable by their owner only.
//!
//! cargo test --test start_checks

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Server, TempDir, wait_bounded};

/// Runs `facerec serve` with `env` (and nothing inherited that would change the outcome);
/// returns its exit status and stderr once it exits (bounded).
fn start_failing(env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let dir = TempDir::new("start-fail");
    let err_path = dir.path().join("stderr.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_facerec"));
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("MONGO_") || k.starts_with("JWT_") || k == "API_KEYS" || k == "DATABASE_URL" {
            cmd.env_remove(&key);
        }
    }
    let mut child = cmd
        .current_dir(dir.path())
        .env("HOST", "127.0.0.1")
        .env("PORT", support::free_port().to_string())
        .env("MODEL_CACHE_DIR", support::model_cache_dir())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn facerec");
    let status = wait_bounded(&mut child, Duration::from_secs(120)).expect("facerec did not stop within 120 s");
    (status, std::fs::read_to_string(&err_path).unwrap_or_default())
}

#[test]
fn misconfigured_credentials_stop_the_start_with_one_line() {
    for (env, says) in [
        (vec![("JWT_SECRET_KEY", "")], "JWT_SECRET_KEY is set but empty"),
        (vec![("JWT_SECRET_KEY", "   ")], "JWT_SECRET_KEY is set but empty"),
        (vec![("JWT_SECRET_KEY", "x")], "JWT_SECRET_KEY is 1 bytes long"),
        (vec![("JWT_SECRET_KEY", "0123456789abcdef0123456789abcde")], "JWT_SECRET_KEY is 31 bytes long"),
        (vec![("API_KEYS", " , ")], "API_KEYS is set but holds no key"),
        (vec![("API_KEYS", "")], "API_KEYS is set but holds no key"),
    ] {
        let (status, err) = start_failing(&env);
        assert!(!status.success(), "{env:?} started: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains(says)).collect();
        assert_eq!(lines.len(), 1, "{env:?}: one line saying `{says}` in:\n{err}");
        assert!(!err.contains("listening"), "{env:?}: it listened:\n{err}");
    }
}

/// The address the server said it listens on.
fn listening_on(server: &Server) -> String {
    let err = server.stderr();
    err.lines()
        .find_map(|l| l.split_once("listening addr=").map(|(_, a)| a.trim().to_owned()))
        .unwrap_or_else(|| panic!("no `listening` line in:\n{err}"))
}

#[test]
fn an_open_service_listens_on_the_loopback_unless_open_access_is_allowed() {
    let dir = TempDir::new("start-open");
    let server = Server::start_with_env(dir.path(), &[("HOST", "0.0.0.0")]);
    assert_eq!(listening_on(&server), format!("127.0.0.1:{}", server.port));
    assert!(server.stderr().contains("NO CREDENTIALS CONFIGURED: listening on the loopback only"), "{}", server.stderr());
    drop(server);

    let dir = TempDir::new("start-allowed");
    let server = Server::start_with_env(dir.path(), &[("HOST", "0.0.0.0"), ("ALLOW_OPEN_ACCESS", "true")]);
    assert_eq!(listening_on(&server), format!("0.0.0.0:{}", server.port));
    assert!(server.stderr().contains("ALLOW_OPEN_ACCESS: NO CREDENTIALS"), "{}", server.stderr());
    drop(server);

    let dir = TempDir::new("start-keys");
    let server = Server::start_with_env(dir.path(), &[("HOST", "0.0.0.0"), ("API_KEYS", "k1")]);
    assert_eq!(listening_on(&server), format!("0.0.0.0:{}", server.port));
    assert_eq!(server.get("/users").status, 401);
}

#[test]
fn data_files_and_folders_are_private_to_their_owner() {
    let dir = TempDir::new("start-modes");
    let server = Server::start(dir.path());
    let crop = support::fixture("img12.jpg");
    let body = serde_json::json!({"bboxes": [{"bbox": [0, 0, 10, 10], "crop": base64_encode(&crop)}]});
    let r = server.post_json("/recognize", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    // The audit writer works in the background: wait (bounded) for the crop to be written.
    let photo = Server::photo_dir(dir.path());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let crop_file = loop {
        if let Some(f) = std::fs::read_dir(&photo).ok().and_then(|mut d| d.find_map(|e| e.ok().map(|e| e.path()))) {
            break f;
        }
        assert!(std::time::Instant::now() < deadline, "no crop written in {}", photo.display());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(mode(&Server::log_path(dir.path())), 0o600, "logs.txt");
    assert_eq!(mode(&Server::db_path(dir.path())), 0o600, "facerec.db");
    assert_eq!(mode(&photo), 0o700, "photo/");
    if crop_file.is_dir() {
        assert_eq!(mode(&crop_file), 0o700, "{}", crop_file.display());
    } else {
        assert_eq!(mode(&crop_file), 0o600, "{}", crop_file.display());
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
