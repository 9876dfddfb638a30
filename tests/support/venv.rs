//! Python virtual environments for the real servers the tests run (SecantusDB, PostgreSQL from
//! pgserver, moto's S3): created under `target/` on first use, one per server, with pinned
//! requirements from PyPI; a file lock keeps parallel test binaries from installing at once,
//! and a marker file records what was installed.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{run_bounded, target_dir};

/// Bound on one `pip install` (a cold PyPI download on a slow link included).
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(900);

/// `target/<name>-venv` with `requirements` installed in it (once; later calls find the marker).
/// `ready` says whether a venv holds what the caller needs beyond the marker (a binary).
pub fn install(name: &str, requirements: &[&str], ready: impl Fn(&std::path::Path) -> bool) -> PathBuf {
    let venv = target_dir().join(format!("{name}-venv"));
    let python = venv.join("bin/python");
    let marker = venv.join(".facerec-installed");
    let wanted = requirements.join(" ");
    let done = || fs::read_to_string(&marker).is_ok_and(|m| m == wanted) && python.exists() && ready(&venv);
    if done() {
        return venv;
    }
    fs::create_dir_all(target_dir()).expect("target dir");
    let lock_path = target_dir().join(format!("{name}-venv.lock"));
    let lock = File::create(&lock_path).unwrap_or_else(|e| panic!("creating {}: {e}", lock_path.display()));
    let deadline = Instant::now() + INSTALL_TIMEOUT + Duration::from_secs(60);
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("another test binary held {} too long: {e}", lock_path.display()),
        }
    }
    if done() {
        return venv;
    }
    let host_python = std::env::var("FACEREC_PYTHON").unwrap_or_else(|_| "python3".into());
    let log = target_dir().join(format!("{name}-venv-install.log"));
    eprintln!("installing {wanted} into {} (first run only)", venv.display());
    let mut pip_inside = true;
    if !python.exists() {
        let made = Command::new(&host_python).args(["-m", "venv"]).arg(&venv).stdout(Stdio::null()).stderr(Stdio::null()).status();
        if !made.is_ok_and(|s| s.success()) {
            // No ensurepip (Debian without python3-venv): a venv without pip, filled by the
            // interpreter's own pip through --python.
            let _ = fs::remove_dir_all(&venv);
            run_bounded(
                Command::new(&host_python).args(["-m", "venv", "--without-pip"]).arg(&venv),
                Duration::from_secs(120),
                &log,
                "python3 -m venv --without-pip",
            );
            pip_inside = false;
        }
    } else {
        pip_inside = Command::new(&python)
            .args(["-m", "pip", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    }
    let mut pip = if pip_inside {
        let mut c = Command::new(&python);
        c.args(["-m", "pip"]);
        c
    } else {
        let mut c = Command::new(&host_python);
        c.args(["-m", "pip", "--python"]).arg(&python);
        c
    };
    pip.args(["install", "--disable-pip-version-check", "--no-input", "--quiet"]).args(requirements);
    run_bounded(&mut pip, INSTALL_TIMEOUT, &log, &format!("pip install {wanted}"));
    fs::write(&marker, &wanted).expect("install marker");
    assert!(ready(&venv), "{name}-venv lacks what its server needs after `pip install {wanted}`");
    venv
}
