//! The file-system guards: the cross-process fetch lock, temporary folders and partial files removed on drop, fsync of folders.

use super::*;

pub(super) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{}-{}-{}", std::process::id(), nanos, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Removes entries of `dir` whose name starts with `prefix` (leftovers of a killed fetch).
/// Call only while holding the fetch lock. Best effort.
pub(super) fn remove_stale(dir: &Path, prefix: &str) {
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
pub(super) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        debug!(dir = %dir.display(), error = %e, "could not fsync folder");
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Exclusive lock on `<cache>/.fetch.lock`, released on drop (when the file is closed).
pub(super) struct FetchLock {
    pub(super) _file: File,
}

impl FetchLock {
    pub(super) fn acquire(cache_dir: &Path) -> Result<Self, FetchError> {
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
pub(super) struct TempDir {
    pub(super) path: PathBuf,
}

impl TempDir {
    pub(super) fn create(cache_dir: &Path) -> Result<Self, FetchError> {
        let path = cache_dir.join(format!("{TMP_DIR_PREFIX}{}", unique_suffix()));
        fs::create_dir(&path).map_err(|e| FetchError::io("create temporary download folder", &path, e))?;
        Ok(TempDir { path })
    }

    pub(super) fn path(&self) -> &Path {
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
pub(super) struct PartialFile {
    pub(super) path: PathBuf,
}

impl PartialFile {
    pub(super) fn disarm(self) {
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
