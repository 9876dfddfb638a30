//! Downloading a pinned wheel with the ordinary pip client.

use super::*;

/// Runs `python -m pip download --no-deps ...` for `pin` into `dir`.
pub(super) fn pip_download(python: &str, pin: &WheelPin<'_>, dir: &Path, ctx: &Context) -> Result<(), FetchError> {
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
    ])
    .args(pin.platform_args)
    .arg(pin.requirement)
    .arg("-d")
    .arg(dir)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    debug!(?cmd, "running pip");
    let output = cmd.output().map_err(|source| FetchError::PythonMissing {
        python: python.into(),
        what: ctx.what,
        source,
        fallback: ctx.fallback.clone(),
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if is_pip_missing(&stderr) {
        return Err(FetchError::PipMissing { python: python.into(), what: ctx.what, fallback: ctx.fallback.clone() });
    }
    let text = if stderr.trim().is_empty() { stdout } else { stderr };
    Err(FetchError::PipFailed {
        python: python.into(),
        requirement: pin.requirement,
        status: output.status,
        output_tail: last_lines(&text, PIP_TAIL_LINES),
        fallback: ctx.fallback.clone(),
    })
}

pub(super) fn is_pip_missing(stderr: &str) -> bool {
    stderr.contains("No module named pip")
}

pub(super) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    lines.get(start..).unwrap_or_default().join("\n")
}
