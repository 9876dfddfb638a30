//! The recognition audit trail of the original service contract.
//!
//! Every `POST /recognize` appends its enriched JSON answer as one line to an NDJSON log file
//! (default `logs.txt`) and saves each face crop it received in a photo folder (default `photo/`)
//! as `photo_<name>_<counter>.<ext>`.
//!
//! Design:
//! - One background tokio task owns the log file handle and the photo counter; [`AuditHandle`] is a
//!   cheap clone holding the sending side of a bounded `mpsc` channel. The file system work itself
//!   runs on the blocking pool (`spawn_blocking`, one call per batch of queued records), handed the
//!   writer state and handing it back, so there is only ever one writer and the async workers never
//!   block on the disk.
//! - Each record is answered through a `oneshot` once its crops are saved and its line is appended.
//!   A line is serialised compactly (JSON escapes every newline inside strings), `\n` is appended, and
//!   the complete line goes to the log in one `write_all` on a file opened with `O_APPEND`; since one
//!   writer does all the writing, lines never interleave. A failed or short write (full disk) is rolled
//!   back by truncating the log to its length before the write, so a torn line is not left behind.
//! - Durability: a record is acknowledged once its bytes are in the operating system (write + flush;
//!   `std::fs::File::flush` has no user-space buffer to empty): they survive a crash of this process,
//!   not a power cut. There is no fsync per line or per crop; [`AuditHandle::close`] (and the writer's
//!   exit when every handle is dropped) syncs the log file and the photo folder.
//! - Crops are written to a hidden temporary file in the photo folder (`.photo_<name>_<n>.<ext>.tmp`,
//!   created with `create_new`), then published under their final name with a hard link, which, unlike
//!   `rename`, fails instead of replacing an existing file; the temporary name is then removed. A reader
//!   therefore never sees a partial file under a final name, and no existing file is ever overwritten.
//!   On file systems without hard links the publication falls back to `rename` after checking that the
//!   final name is free (only another process could race with that check).
//! - A record is all or nothing, as far as the file system allows: if a crop cannot be saved, the crops
//!   already saved for that record are removed and its line is not written; if the line cannot be
//!   written, its crops are removed. The counters it took are not given back (numbers are never reused).
//! - The counter is one sequence shared by all names, starting after the highest counter among the
//!   existing `photo_*_<n>.<ext>` entries of the photo folder; on an (unexpected) collision the next
//!   number is taken.
//! - Errors are values: they go back to the caller and the writer keeps serving later records. If the
//!   writer has stopped, [`AuditHandle::record`] returns [`AuditError::Stopped`] instead of hanging.
//! - A record whose caller went away (the HTTP request was cancelled after the record was queued) is
//!   still written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot};

/// The log file of the original service.
pub const DEFAULT_LOG_FILE: &str = "logs.txt";
/// The photo folder of the original service.
pub const DEFAULT_PHOTO_DIR: &str = "photo";
/// Records that may wait for the writer before `record` waits for room.
pub const DEFAULT_QUEUE: usize = 1024;

/// Longest name part of a photo file name, in bytes.
const MAX_NAME_BYTES: usize = 64;
/// Longest accepted file extension.
const MAX_EXT_BYTES: usize = 10;
/// Records handed to the blocking pool at once.
const MAX_BATCH: usize = 64;
/// Final names tried for one crop before giving up.
const MAX_COLLISIONS: u32 = 1000;

/// Where the audit trail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The NDJSON log, one line per recognition (default `logs.txt`).
    pub log_file: PathBuf,
    /// The folder receiving the face crops (default `photo/`).
    pub photo_dir: PathBuf,
    /// Capacity of the queue in front of the writer (0 is taken as 1).
    pub queue: usize,
}

impl AuditConfig {
    /// A configuration with the default queue size.
    pub fn new(log_file: impl Into<PathBuf>, photo_dir: impl Into<PathBuf>) -> Self {
        Self { log_file: log_file.into(), photo_dir: photo_dir.into(), queue: DEFAULT_QUEUE }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self::new(DEFAULT_LOG_FILE, DEFAULT_PHOTO_DIR)
    }
}

/// One face crop to save, already encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crop {
    /// The name the face was recognised as (made safe with [`safe_name`] for the file name).
    pub name: String,
    /// The encoded image.
    pub bytes: Vec<u8>,
    /// The file extension without the dot, like "jpg", "png", "webp", "bmp" (1 to 10 ASCII letters or digits).
    pub ext: &'static str,
}

/// One recognition: its log line and its crops.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// The enriched JSON answer, written as one compact line.
    pub line: serde_json::Value,
    /// The crops to save, in order.
    pub crops: Vec<Crop>,
}

/// Why an audit operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit trail: cannot {op} {}: {source}", path.display())]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("audit trail: cannot serialise the log line: {0}")]
    Json(#[from] serde_json::Error),
    #[error("audit trail: invalid file extension {0:?} (1 to 10 ASCII letters or digits)")]
    BadExtension(String),
    #[error("audit trail: the photo counter is exhausted")]
    CounterExhausted,
    #[error("audit trail: no free file name for {0} after {MAX_COLLISIONS} tries")]
    NoFreeName(String),
    #[error("audit trail: the writer has stopped")]
    Stopped,
}

impl AuditError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        AuditError::Io { op, path: path.to_path_buf(), source }
    }

    /// A copy for a second receiver of the same outcome (`io::Error` is not `Clone`).
    fn duplicate(&self) -> Self {
        match self {
            AuditError::Io { op, path, source } => {
                AuditError::Io { op, path: path.clone(), source: io::Error::new(source.kind(), source.to_string()) }
            }
            AuditError::Json(e) => {
                AuditError::Io { op: "serialise", path: PathBuf::new(), source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()) }
            }
            AuditError::BadExtension(ext) => AuditError::BadExtension(ext.clone()),
            AuditError::CounterExhausted => AuditError::CounterExhausted,
            AuditError::NoFreeName(name) => AuditError::NoFreeName(name.clone()),
            AuditError::Stopped => AuditError::Stopped,
        }
    }
}

type RecordAck = oneshot::Sender<Result<Vec<String>, AuditError>>;
type CloseAck = oneshot::Sender<Result<(), AuditError>>;

enum Msg {
    Record(AuditRecord, RecordAck),
    Close(CloseAck),
}

/// The async side of the audit trail: cheap to clone, one per request if need be.
#[derive(Debug, Clone)]
pub struct AuditHandle {
    tx: mpsc::Sender<Msg>,
}

impl AuditHandle {
    /// Starts the writer task (must be called inside a tokio runtime). Creates the photo folder and the
    /// log file's parent folder, opens the log for appending, removes temporary files left by a crash,
    /// and scans the photo folder for the highest existing counter.
    pub async fn start(cfg: AuditConfig) -> Result<AuditHandle, AuditError> {
        let queue = cfg.queue.max(1);
        let writer = tokio::task::spawn_blocking(move || Writer::open(&cfg)).await.map_err(|_| AuditError::Stopped)??;
        tracing::debug!(log = %writer.log_path.display(), photos = %writer.photo_dir.display(), next = writer.next, "audit trail started");
        let (tx, rx) = mpsc::channel(queue);
        tokio::spawn(run(writer, rx));
        Ok(AuditHandle { tx })
    }

    /// Writes the record; resolves when its crops are saved and its line is appended (see the module
    /// notes on durability). Returns the file names given to the crops, in order. Waits for room when
    /// the queue is full. If it fails, nothing of the record is left (crops saved before the failure are
    /// removed). A record queued before its caller is cancelled is still written.
    pub async fn record(&self, rec: AuditRecord) -> Result<Vec<String>, AuditError> {
        let (ack, done) = oneshot::channel();
        self.tx.send(Msg::Record(rec, ack)).await.map_err(|_| AuditError::Stopped)?;
        done.await.map_err(|_| AuditError::Stopped)?
    }

    /// Graceful shutdown through any clone: the writer stops taking records, writes every record already
    /// queued, syncs the log file and the photo folder to disk, and stops. Records sent afterwards, from
    /// any clone, fail with [`AuditError::Stopped`]; so does a second shutdown once the writer is gone.
    pub async fn shutdown(&self) -> Result<(), AuditError> {
        let (ack, done) = oneshot::channel();
        self.tx.send(Msg::Close(ack)).await.map_err(|_| AuditError::Stopped)?;
        done.await.map_err(|_| AuditError::Stopped)?
    }

    /// [`shutdown`](Self::shutdown), consuming this handle.
    pub async fn close(self) -> Result<(), AuditError> {
        self.shutdown().await
    }

    /// Whether the writer has stopped (closed, or gone).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The name made safe for a file name: ASCII letters, digits, `-` and `_` are kept, every other
/// character (space, `/`, `\`, `.`, NUL, control characters, any non-ASCII character) becomes one `_`;
/// the result is cut to 64 bytes, and an empty result becomes `unnamed`. It can never be a path, contain
/// a separator, or start with `.`.
pub fn safe_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len().min(MAX_NAME_BYTES));
    for c in name.chars().take(MAX_NAME_BYTES) {
        out.push(if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' });
    }
    if out.is_empty() { "unnamed".to_owned() } else { out }
}

/// The counter of a photo file name `photo_<name>_<counter>.<ext>`: the last `_`-separated number before
/// the extension (`photo_Unknown_1_17.jpg` -> 17). `None` for any other name.
pub fn photo_counter(file_name: &str) -> Option<u64> {
    let rest = file_name.strip_prefix("photo_")?;
    let (stem, ext) = rest.rsplit_once('.')?;
    if ext.is_empty() {
        return None;
    }
    let (_name, digits) = stem.rsplit_once('_')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn check_ext(ext: &str) -> Result<(), AuditError> {
    if ext.is_empty() || ext.len() > MAX_EXT_BYTES || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(AuditError::BadExtension(ext.to_owned()));
    }
    Ok(())
}

fn is_temp_name(file_name: &str) -> bool {
    file_name.starts_with(".photo_") && file_name.ends_with(".tmp")
}

/// The writer's state, moved into the blocking pool for each batch and back.
struct Writer {
    log: File,
    log_path: PathBuf,
    photo_dir: PathBuf,
    next: u64,
}

impl Writer {
    fn open(cfg: &AuditConfig) -> Result<Writer, AuditError> {
        let photo_dir = cfg.photo_dir.clone();
        fs::create_dir_all(&photo_dir).map_err(|e| AuditError::io("create the photo folder", &photo_dir, e))?;
        if let Some(parent) = cfg.log_file.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| AuditError::io("create the log folder", parent, e))?;
        }
        let log = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&cfg.log_file)
            .map_err(|e| AuditError::io("open the log file", &cfg.log_file, e))?;
        let highest = scan_photo_dir(&photo_dir)?;
        let next = highest.checked_add(1).ok_or(AuditError::CounterExhausted)?;
        Ok(Writer { log, log_path: cfg.log_file.clone(), photo_dir, next })
    }

    fn write_record(&mut self, rec: AuditRecord) -> Result<Vec<String>, AuditError> {
        let mut line = serde_json::to_vec(&rec.line)?;
        line.push(b'\n');
        let mut names = Vec::with_capacity(rec.crops.len());
        let mut saved = Vec::with_capacity(rec.crops.len());
        for crop in &rec.crops {
            match self.save_crop(crop) {
                Ok((name, path)) => {
                    names.push(name);
                    saved.push(path);
                }
                Err(e) => {
                    remove_all(&saved);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.append(&line) {
            remove_all(&saved);
            return Err(e);
        }
        Ok(names)
    }

    /// Appends one complete line in one `write_all`; on failure, truncates what may have been written.
    fn append(&mut self, line: &[u8]) -> Result<(), AuditError> {
        let before = self.log.metadata().map(|m| m.len()).ok();
        let written = self.log.write_all(line).and_then(|()| self.log.flush());
        if let Err(e) = written {
            if let Some(len) = before
                && let Err(te) = self.log.set_len(len)
            {
                tracing::warn!(log = %self.log_path.display(), error = %te, "could not remove a partly written audit line");
            }
            return Err(AuditError::io("append to", &self.log_path, e));
        }
        Ok(())
    }

    /// Saves one crop under the next free counter; returns its file name and path.
    fn save_crop(&mut self, crop: &Crop) -> Result<(String, PathBuf), AuditError> {
        check_ext(crop.ext)?;
        let name = safe_name(&crop.name);
        for _ in 0..MAX_COLLISIONS {
            let n = self.next;
            self.next = n.checked_add(1).ok_or(AuditError::CounterExhausted)?;
            let file_name = format!("photo_{name}_{n}.{}", crop.ext);
            let final_path = self.photo_dir.join(&file_name);
            let tmp_path = self.photo_dir.join(format!(".{file_name}.tmp"));
            self.write_temp(&tmp_path, &crop.bytes).map_err(|e| AuditError::io("write", &tmp_path, e))?;
            match publish(&tmp_path, &final_path) {
                Ok(()) => return Ok((file_name, final_path)),
                Err(e) => {
                    let _ = fs::remove_file(&tmp_path);
                    if e.kind() != io::ErrorKind::AlreadyExists {
                        return Err(AuditError::io("save", &final_path, e));
                    }
                    tracing::warn!(path = %final_path.display(), "audit photo name already taken; using the next counter");
                }
            }
        }
        Err(AuditError::NoFreeName(name))
    }

    /// Writes the bytes to a new temporary file; recreates the photo folder if it was removed.
    fn write_temp(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let create = || OpenOptions::new().write(true).create_new(true).open(path);
        let mut file = match create() {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&self.photo_dir)?;
                create()?
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // A stale temporary file of ours (the counter never repeats within a run).
                fs::remove_file(path)?;
                create()?
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = file.write_all(bytes).and_then(|()| file.flush()) {
            drop(file);
            let _ = fs::remove_file(path);
            return Err(e);
        }
        Ok(())
    }

    /// Syncs the log file and the photo folder to disk.
    fn sync(&mut self) -> Result<(), AuditError> {
        self.log.sync_all().map_err(|e| AuditError::io("sync", &self.log_path, e))?;
        // Directory fsync makes the new names durable; not every platform allows opening a folder.
        if let Ok(dir) = File::open(&self.photo_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// Gives the temporary file its final name without ever replacing an existing file.
fn publish(tmp: &Path, final_path: &Path) -> io::Result<()> {
    match fs::hard_link(tmp, final_path) {
        Ok(()) => {
            if let Err(e) = fs::remove_file(tmp) {
                tracing::warn!(path = %tmp.display(), error = %e, "could not remove a temporary audit photo");
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
        Err(link_err) => {
            // No hard links here (some network or FAT file systems): rename, after checking the name is free.
            match fs::symlink_metadata(final_path) {
                Ok(_) => Err(io::Error::new(io::ErrorKind::AlreadyExists, "file exists")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(tmp, final_path).map_err(|_| link_err),
                Err(e) => Err(e),
            }
        }
    }
}

fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        if let Err(e) = fs::remove_file(p) {
            tracing::warn!(path = %p.display(), error = %e, "could not remove the photo of a failed audit record");
        }
    }
}

/// The highest photo counter in the folder (0 when none); removes temporary files left by a crash.
fn scan_photo_dir(dir: &Path) -> Result<u64, AuditError> {
    let entries = fs::read_dir(dir).map_err(|e| AuditError::io("read the photo folder", dir, e))?;
    let mut highest = 0u64;
    for entry in entries {
        let entry = entry.map_err(|e| AuditError::io("read the photo folder", dir, e))?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else { continue };
        if let Some(n) = photo_counter(file_name) {
            highest = highest.max(n);
        } else if is_temp_name(file_name) {
            let path = entry.path();
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a stale temporary audit photo");
            }
        }
    }
    Ok(highest)
}

/// The writer task: takes batches of queued messages and writes them on the blocking pool.
async fn run(mut writer: Writer, mut rx: mpsc::Receiver<Msg>) {
    let mut closers: Vec<CloseAck> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut records = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(rec, ack) => records.push((rec, ack)),
                Msg::Close(ack) => {
                    // No new records from now on; those already queued are still written.
                    rx.close();
                    closers.push(ack);
                }
            }
            if records.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if records.is_empty() {
            continue;
        }
        let done = tokio::task::spawn_blocking(move || {
            for (rec, ack) in records {
                let _ = ack.send(writer.write_record(rec));
            }
            writer
        })
        .await;
        match done {
            Ok(w) => writer = w,
            Err(e) => {
                // Only a panic gets here; pending and later callers get `Stopped`.
                tracing::error!(error = %e, "the audit writer failed");
                return;
            }
        }
    }
    let synced = match tokio::task::spawn_blocking(move || writer.sync()).await {
        Ok(r) => r,
        Err(_) => Err(AuditError::Stopped),
    };
    if let Err(e) = &synced {
        tracing::warn!(error = %e, "audit trail: final sync failed");
    }
    for ack in closers {
        let _ = ack.send(synced.as_ref().map(|_| ()).map_err(AuditError::duplicate));
    }
    tracing::debug!("audit trail stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::{BTreeSet, HashMap};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// A fresh folder under the system temporary folder, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static SEQ: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            let dir = std::env::temp_dir().join(format!(
                "facerec-audit-{tag}-{}-{nanos}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn cfg(&self) -> AuditConfig {
            AuditConfig { log_file: self.0.join("logs.txt"), photo_dir: self.0.join("photo"), queue: 16 }
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn crop(name: &str, bytes: &[u8], ext: &'static str) -> Crop {
        Crop { name: name.to_owned(), bytes: bytes.to_vec(), ext }
    }

    fn log_lines(cfg: &AuditConfig) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(&cfg.log_file).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "the log ends with a complete line");
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn photo_files(cfg: &AuditConfig) -> BTreeSet<String> {
        fs::read_dir(&cfg.photo_dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
    }

    /// Bounds every await on the writer, so that a hang fails the test instead of blocking it.
    async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), fut).await.expect("the audit writer did not answer")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn one_record_writes_one_line_and_one_crop() {
        let tmp = TempDir::new("one");
        let cfg = tmp.cfg();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        let line = json!({"faces": [{"name": "Unknown 1", "score": 0.5, "text": "multi\nline \"quoted\""}], "time": 12});
        let names =
            within(audit.record(AuditRecord { line: line.clone(), crops: vec![crop("Unknown 1", b"\xff\xd8jpeg", "jpg")] })).await.unwrap();
        assert_eq!(names, vec!["photo_Unknown_1_1.jpg".to_owned()]);
        // The line and the file exist as soon as `record` has answered.
        assert_eq!(log_lines(&cfg), vec![line.clone()]);
        assert_eq!(fs::read_to_string(&cfg.log_file).unwrap().lines().count(), 1);
        assert_eq!(photo_files(&cfg), BTreeSet::from(["photo_Unknown_1_1.jpg".to_owned()]));
        assert_eq!(fs::read(cfg.photo_dir.join("photo_Unknown_1_1.jpg")).unwrap(), b"\xff\xd8jpeg");
        within(audit.close()).await.unwrap();
        assert_eq!(log_lines(&cfg), vec![line]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn several_crops_in_one_record_are_numbered_in_order() {
        let tmp = TempDir::new("multi");
        let cfg = tmp.cfg();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        let rec =
            AuditRecord { line: json!({"n": 3}), crops: vec![crop("b", b"1", "png"), crop("a", b"2", "jpg"), crop("../x", b"3", "webp")] };
        let names = within(audit.record(rec)).await.unwrap();
        assert_eq!(names, vec!["photo_b_1.png", "photo_a_2.jpg", "photo____x_3.webp"]);
        let none = within(audit.record(AuditRecord { line: json!({"n": 0}), crops: vec![] })).await.unwrap();
        assert!(none.is_empty());
        assert_eq!(log_lines(&cfg), vec![json!({"n": 3}), json!({"n": 0})]);
        assert_eq!(fs::read(cfg.photo_dir.join("photo____x_3.webp")).unwrap(), b"3");
        within(audit.close()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_records_never_interleave() {
        let tmp = TempDir::new("many");
        let cfg = tmp.cfg();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        let pad = "x".repeat(20_000);
        let expected: Vec<serde_json::Value> =
            (0..200).map(|i| json!({"id": i, "name": format!("Unknown_{}", i % 7), "pad": format!("{i}{pad}")})).collect();
        let mut tasks = Vec::new();
        for (i, line) in expected.iter().cloned().enumerate() {
            let audit = audit.clone();
            tasks.push(tokio::spawn(async move {
                let bytes = format!("image {i}").into_bytes();
                let names = audit.record(AuditRecord { line, crops: vec![crop(&format!("Unknown_{}", i % 7), &bytes, "jpg")] }).await;
                (i, names)
            }));
        }
        let mut counters = BTreeSet::new();
        let mut given = BTreeSet::new();
        for t in tasks {
            let (i, names) = within(t).await.unwrap();
            let names = names.unwrap();
            assert_eq!(names.len(), 1);
            let name = &names[0];
            assert!(name.starts_with(&format!("photo_Unknown_{}_", i % 7)), "{name}");
            assert_eq!(fs::read(cfg.photo_dir.join(name)).unwrap(), format!("image {i}").into_bytes());
            assert!(counters.insert(photo_counter(name).unwrap()), "counter of {name} used twice");
            given.insert(name.clone());
        }
        assert_eq!(counters, (1..=200).collect::<BTreeSet<u64>>());

        let text = fs::read_to_string(&cfg.log_file).unwrap();
        assert_eq!(text.lines().count(), 200);
        assert!(text.ends_with('\n'));
        let mut by_id: HashMap<u64, serde_json::Value> = HashMap::new();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let id = v["id"].as_u64().unwrap();
            assert_eq!(v, expected[id as usize]);
            assert!(by_id.insert(id, v).is_none(), "line {id} written twice");
        }
        assert_eq!(by_id.len(), 200);
        // 200 distinct files under their final names, no temporary file left.
        assert_eq!(photo_files(&cfg), given);
        assert_eq!(given.len(), 200);
        within(audit.close()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn counter_continues_across_restarts() {
        let tmp = TempDir::new("restart");
        let cfg = tmp.cfg();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        for i in 0..3 {
            let names = within(audit.record(AuditRecord { line: json!({"i": i}), crops: vec![crop("Ann", b"a", "jpg")] })).await.unwrap();
            assert_eq!(names, vec![format!("photo_Ann_{}.jpg", i + 1)]);
        }
        within(audit.close()).await.unwrap();

        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        let names = within(audit.record(AuditRecord { line: json!({"i": 3}), crops: vec![crop("Bob", b"b", "png")] })).await.unwrap();
        assert_eq!(names, vec!["photo_Bob_4.png"]);
        within(audit.close()).await.unwrap();
        // The log was appended to, not replaced.
        assert_eq!(log_lines(&cfg), (0..4).map(|i| json!({"i": i})).collect::<Vec<_>>());

        // Names with underscores and digits of their own, foreign files and a stale temporary file.
        for f in ["photo_Unknown_1_17.jpg", "photo_a_b_9.png", "photo_99.jpg", "notes_1000.txt", "photo_x_.jpg", ".photo_c_500.jpg.tmp"] {
            fs::write(cfg.photo_dir.join(f), b"old").unwrap();
        }
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        let names = within(audit.record(AuditRecord { line: json!({"i": 4}), crops: vec![crop("Unknown 1", b"c", "jpg")] })).await.unwrap();
        assert_eq!(names, vec!["photo_Unknown_1_18.jpg"]);
        assert_eq!(fs::read(cfg.photo_dir.join("photo_Unknown_1_17.jpg")).unwrap(), b"old");
        assert!(!cfg.photo_dir.join(".photo_c_500.jpg.tmp").exists(), "stale temporary file removed at start");
        within(audit.close()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn existing_file_is_never_overwritten() {
        let tmp = TempDir::new("collide");
        let cfg = tmp.cfg();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        // Appears after the scan: the writer's next number is taken by someone else.
        fs::write(cfg.photo_dir.join("photo_a_1.jpg"), b"theirs").unwrap();
        let names = within(audit.record(AuditRecord { line: json!({}), crops: vec![crop("a", b"ours", "jpg")] })).await.unwrap();
        assert_eq!(names, vec!["photo_a_2.jpg"]);
        assert_eq!(fs::read(cfg.photo_dir.join("photo_a_1.jpg")).unwrap(), b"theirs");
        assert_eq!(fs::read(cfg.photo_dir.join("photo_a_2.jpg")).unwrap(), b"ours");
        assert_eq!(photo_files(&cfg).len(), 2);
        within(audit.close()).await.unwrap();
    }

    #[test]
    fn safe_names() {
        assert_eq!(safe_name("Unknown 1"), "Unknown_1");
        assert_eq!(safe_name("../../etc/passwd"), "______etc_passwd");
        assert_eq!(safe_name("a/b\\c"), "a_b_c");
        assert_eq!(safe_name(".."), "__");
        assert_eq!(safe_name("."), "_");
        assert_eq!(safe_name(""), "unnamed");
        assert_eq!(safe_name("José"), "Jos_");
        assert_eq!(safe_name("a\0b\nc\td"), "a_b_c_d");
        assert_eq!(safe_name("Ann-Marie_2"), "Ann-Marie_2");
        let long: String = "é".repeat(150) + &"x".repeat(150);
        assert_eq!(long.chars().count(), 300);
        let cut = safe_name(&long);
        assert_eq!(cut, "_".repeat(64));
        assert_eq!(safe_name(&"y".repeat(300)), "y".repeat(64));
        for s in ["../../etc/passwd", "a/b\\c", "..", "", "José", &long, ".hidden", "/", "C:\\x"] {
            let n = safe_name(s);
            assert!(!n.is_empty() && n.len() <= 64);
            assert!(!n.starts_with('.'));
            assert!(n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{n}");
            assert_eq!(Path::new(&n).components().count(), 1);
        }
    }

    #[test]
    fn photo_counters() {
        assert_eq!(photo_counter("photo_Unknown_1_17.jpg"), Some(17));
        assert_eq!(photo_counter("photo_a_b_9.png"), Some(9));
        assert_eq!(photo_counter("photo_Ann_3.webp"), Some(3));
        assert_eq!(photo_counter("photo__5.jpg"), Some(5));
        assert_eq!(photo_counter("photo_99.jpg"), None);
        assert_eq!(photo_counter("photo_x_.jpg"), None);
        assert_eq!(photo_counter("photo_x_5"), None);
        assert_eq!(photo_counter("photo_x_5."), None);
        assert_eq!(photo_counter("photo_x_-5.jpg"), None);
        assert_eq!(photo_counter("photo_x_5a.jpg"), None);
        assert_eq!(photo_counter(".photo_x_5.jpg.tmp"), None);
        assert_eq!(photo_counter("image_x_5.jpg"), None);
        assert_eq!(photo_counter("photo_x_99999999999999999999999.jpg"), None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn unwritable_photo_folder_is_an_error_not_a_hang() {
        let tmp = TempDir::new("unwritable");
        let cfg = tmp.cfg();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        // The photo folder becomes a regular file: every crop path now has a regular file as parent.
        fs::remove_dir(&cfg.photo_dir).unwrap();
        fs::write(&cfg.photo_dir, b"not a folder").unwrap();
        for i in 0..2 {
            let rec = AuditRecord { line: json!({"failed": i}), crops: vec![crop("a", b"x", "jpg")] };
            let err = within(audit.record(rec)).await.unwrap_err();
            assert!(matches!(err, AuditError::Io { .. }), "{err}");
        }
        // A failed record leaves no line; the writer keeps serving.
        let names = within(audit.record(AuditRecord { line: json!({"ok": 1}), crops: vec![] })).await.unwrap();
        assert!(names.is_empty());
        assert_eq!(log_lines(&cfg), vec![json!({"ok": 1})]);
        // Once the folder is back (here: removed, and recreated by the writer), crops are saved again,
        // with numbers after those the failed records took.
        fs::remove_file(&cfg.photo_dir).unwrap();
        let names = within(audit.record(AuditRecord { line: json!({"ok": 2}), crops: vec![crop("a", b"y", "jpg")] })).await.unwrap();
        assert_eq!(names, vec!["photo_a_3.jpg"]);
        assert_eq!(fs::read(cfg.photo_dir.join("photo_a_3.jpg")).unwrap(), b"y");
        within(audit.close()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn failed_crop_removes_the_record_crops_already_saved() {
        let tmp = TempDir::new("partial");
        let cfg = tmp.cfg();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        let rec = AuditRecord { line: json!({"x": 1}), crops: vec![crop("a", b"1", "jpg"), crop("b", b"2", "j.pg")] };
        let err = within(audit.record(rec)).await.unwrap_err();
        assert!(matches!(err, AuditError::BadExtension(ref e) if e == "j.pg"), "{err}");
        assert!(photo_files(&cfg).is_empty());
        assert!(log_lines(&cfg).is_empty());
        within(audit.close()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn start_fails_when_the_photo_folder_cannot_be_made() {
        let tmp = TempDir::new("badstart");
        let file = tmp.0.join("file");
        fs::write(&file, b"").unwrap();
        let cfg = AuditConfig { log_file: tmp.0.join("logs.txt"), photo_dir: file.join("photo"), queue: 4 };
        let err = within(AuditHandle::start(cfg)).await.unwrap_err();
        assert!(matches!(err, AuditError::Io { .. }), "{err}");
        let cfg = AuditConfig { log_file: file.join("logs.txt"), photo_dir: tmp.0.join("photo"), queue: 4 };
        assert!(within(AuditHandle::start(cfg)).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn close_writes_queued_records_then_refuses_new_ones() {
        let tmp = TempDir::new("close");
        let cfg = AuditConfig { queue: 0, ..tmp.cfg() };
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let audit = audit.clone();
            tasks.push(tokio::spawn(async move { audit.record(AuditRecord { line: json!({"i": i}), crops: vec![] }).await }));
        }
        // Let some of them queue before closing from another clone.
        tokio::task::yield_now().await;
        let closer = audit.clone();
        within(closer.close()).await.unwrap();
        let mut written = 0;
        for t in tasks {
            match within(t).await.unwrap() {
                Ok(_) => written += 1,
                Err(e) => assert!(matches!(e, AuditError::Stopped), "{e}"),
            }
        }
        // Every record that was accepted is in the log.
        assert_eq!(log_lines(&cfg).len(), written);
        assert!(audit.is_closed());
        let err = within(audit.record(AuditRecord { line: json!({}), crops: vec![] })).await.unwrap_err();
        assert!(matches!(err, AuditError::Stopped));
        assert!(matches!(within(audit.shutdown()).await, Err(AuditError::Stopped)));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn dropping_every_handle_stops_the_writer() {
        let tmp = TempDir::new("drop");
        let cfg = tmp.cfg();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        within(audit.record(AuditRecord { line: json!({"a": 1}), crops: vec![crop("z", b"z", "bmp")] })).await.unwrap();
        drop(audit);
        // The log file is not locked or lost: a new writer continues the sequence.
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        let names = within(audit.record(AuditRecord { line: json!({"a": 2}), crops: vec![crop("z", b"z", "bmp")] })).await.unwrap();
        assert_eq!(names, vec!["photo_z_2.bmp"]);
        assert_eq!(log_lines(&cfg), vec![json!({"a": 1}), json!({"a": 2})]);
        within(audit.close()).await.unwrap();
    }
}
