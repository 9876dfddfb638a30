//! The recognition audit trail of the original service contract.
//!
//! Every `POST /recognize` appends its enriched JSON answer as one line to an NDJSON log file
//! (default `logs.txt`) and saves each face crop it received in a photo folder (default `photo/`)
//! as `photo_<name>_<counter>.<ext>` (the name kept readable, only what is unsafe in a file name replaced:
//! [`safe_name`]; the extension that of the real image format).
//!
//! Design:
//! - One background tokio task owns the log file handle and the photo counter; [`AuditHandle`] is a
//!   cheap clone holding the sending side of a bounded `mpsc` channel. The file system work itself
//!   runs on the blocking pool (`spawn_blocking`, one call per batch of queued records), handed the
//!   writer state and handing it back, so there is only ever one writer and the async workers never
//!   block on the disk.
//! - Each record is answered through a `oneshot` once its crops are saved and its line is appended.
//!   A line is serialised compactly (JSON escapes every newline inside strings), `\n` is appended, and
//!   the complete line goes to the log in one `write` on a file opened with `O_APPEND`; since one
//!   writer does all the writing, lines never interleave. A failed or short write (full disk) is rolled
//!   back by truncating the log to its length before the write, so a torn line is not left behind.
//! - Crash safety (kill -9 at any moment): a process killed inside that one `write` can still leave a
//!   torn last line. Whenever the log is opened (at start, and when it is reopened after a failure),
//!   a last line without its `\n` is moved to a side file `<log>.torn` (appended, synced, one fragment
//!   per line) and cut off the log, which therefore stays valid NDJSON; nothing is thrown away. Such a
//!   line belonged to a recognition that was never answered (the answer waits for the line).
//! - Durability: a record is acknowledged once its bytes are in the operating system: they survive a
//!   crash of this process, not a power cut. There is no fsync per line or per crop; [`AuditHandle::close`]
//!   (and the writer's exit when every handle is dropped) syncs the log file and the photo folder.
//! - Crops are written to a hidden temporary file in the photo folder (`.photo_<name>_<n>.<ext>.tmp`,
//!   created with `create_new`), then published under their final name with a hard link, which, unlike
//!   `rename`, fails instead of replacing an existing file; the temporary name is then removed. A reader
//!   therefore never sees a partial file under a final name, and no existing file is ever overwritten.
//!   On file systems without hard links the publication falls back to `rename` after checking that the
//!   final name is free (only another process could race with that check). Temporary files left by a
//!   crash are removed when the folder is first scanned and never counted.
//! - Faults never fail a recognition: crops are saved first, then the line is written. A crop that
//!   cannot be saved stops the saving of that record's other crops, but its line is still written (the
//!   line holds every crop itself, base64, so nothing is lost); crops saved for a record whose line
//!   cannot be written stay where they are. Either way [`AuditHandle::record`] returns the first error,
//!   [`AuditHandle::failures`] counts the record, and a warning is logged at the start of a run of
//!   failures (then at most once a minute while it lasts; an `info` line when writing works again).
//!   The log is reopened at the next record after a failed write, the photo folder is recreated when
//!   missing, so the trail recovers by itself once the disk does. An unusable log or photo folder at
//!   start is a warning and a failure, not a refusal to start.
//! - The counter is one sequence shared by all names, starting after the highest counter among the
//!   existing `photo_*_<n>.<ext>` entries of the photo folder (and after the number kept in
//!   `.photo_counter`, written before the retention sweep removes crops, so that numbers are never
//!   reused); on an (unexpected) collision the next number is taken. Numbers taken by failed crops are
//!   not given back.
//! - Privacy: with `save_crops` off no crop is written (and no photo folder is created); the line is.
//!   With a retention of N days, a sweep at start and every hour removes crops whose modification time
//!   is more than N days old, and the log rotates at the first write of each UTC day into
//!   `<stem>-YYYY-MM-DD.<ext>` (the day of its last write; `.1`, `.2`... before the extension if the
//!   name is taken, never replacing a file); rotated logs whose day ended more than N days ago are
//!   removed, and so is the side file of torn lines once it is that old. A line therefore lives between
//!   N and N+1 days. Retention 0 keeps everything in one log, as the original did.
//! - Errors are values: they go back to the caller and the writer keeps serving later records. If the
//!   writer has stopped, [`AuditHandle::record`] returns [`AuditError::Stopped`] instead of hanging.
//! - A record whose caller went away (the HTTP request was cancelled after the record was queued) is
//!   still written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use crate::civil::{civil_from_days, days_from_civil};

/// The log file of the original service.
pub const DEFAULT_LOG_FILE: &str = "logs.txt";
/// The photo folder of the original service.
pub const DEFAULT_PHOTO_DIR: &str = "photo";
/// Records that may wait for the writer before `record` waits for room.
pub const DEFAULT_QUEUE: usize = 1024;
/// The file in the photo folder that keeps the highest counter given out, once crops are removed.
pub const COUNTER_FILE: &str = ".photo_counter";
/// How often the retention sweep runs (besides at start).
pub const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Longest name part of a photo file name, in bytes.
const MAX_NAME_BYTES: usize = 128;
/// Longest accepted file extension.
const MAX_EXT_BYTES: usize = 10;
/// Records handed to the blocking pool at once.
const MAX_BATCH: usize = 64;
/// Final names tried for one crop (or one rotated log) before giving up.
const MAX_COLLISIONS: u32 = 1000;
/// While failures go on, a warning at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);
const SECS_PER_DAY: u64 = 86_400;

/// Where the audit trail goes, and what it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The NDJSON log, one line per recognition (default `logs.txt`).
    pub log_file: PathBuf,
    /// The folder receiving the face crops (default `photo/`).
    pub photo_dir: PathBuf,
    /// Capacity of the queue in front of the writer (0 is taken as 1).
    pub queue: usize,
    /// Whether crops are saved (default true, as the original); the line is written either way.
    pub save_crops: bool,
    /// Days after which crops and rotated logs are removed; 0 keeps everything (the default).
    pub retention_days: u32,
}

impl AuditConfig {
    /// A configuration with the default queue size, crops saved and kept forever.
    pub fn new(log_file: impl Into<PathBuf>, photo_dir: impl Into<PathBuf>) -> Self {
        Self { log_file: log_file.into(), photo_dir: photo_dir.into(), queue: DEFAULT_QUEUE, save_crops: true, retention_days: 0 }
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
    /// The writer panicked on this record; it reopens the log and goes on with the next.
    #[error("audit trail: the writer failed on this record ({0}) and goes on with the next")]
    Panicked(String),
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
            AuditError::Panicked(why) => AuditError::Panicked(why.clone()),
        }
    }
}

type RecordAck = oneshot::Sender<Result<Vec<String>, AuditError>>;
type CloseAck = oneshot::Sender<Result<(), AuditError>>;

enum Msg {
    Record(AuditRecord, RecordAck),
    Close(CloseAck),
}

/// What the writer does in one turn on the blocking pool.
enum Job {
    Record(AuditRecord, RecordAck),
    Sweep,
}

/// The async side of the audit trail: cheap to clone, one per request if need be.
#[derive(Debug, Clone)]
pub struct AuditHandle {
    tx: mpsc::Sender<Msg>,
    failures: Arc<AtomicU64>,
}

impl AuditHandle {
    /// Starts the writer task (must be called inside a tokio runtime). Opens the log for appending
    /// (creating its folder, repairing a torn last line), creates and scans the photo folder (removing
    /// temporary files left by a crash) and runs the retention sweep. A log or photo folder that cannot
    /// be used is warned about and counted, not fatal: the writer tries again at each record.
    pub async fn start(cfg: AuditConfig) -> Result<AuditHandle, AuditError> {
        Self::start_with_fault(cfg, None).await
    }

    /// [`AuditHandle::start`], with the writer made to panic on its `panic_on_record`th record:
    /// a fault for tests of its supervision (the record fails with [`AuditError::Panicked`], is
    /// counted, and the writer goes on).
    pub async fn start_with_fault(cfg: AuditConfig, panic_on_record: Option<u64>) -> Result<AuditHandle, AuditError> {
        let queue = cfg.queue.max(1);
        let failures = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&failures);
        let mut writer =
            tokio::task::spawn_blocking(move || Writer::open(&cfg, counted, SystemTime::now())).await.map_err(|_| AuditError::Stopped)?;
        writer.panic_on_record = panic_on_record;
        tracing::debug!(log = %writer.log_path.display(), photos = %writer.photo_dir.display(), next = writer.next, "audit trail started");
        let (tx, rx) = mpsc::channel(queue);
        tokio::spawn(run(writer, rx));
        Ok(AuditHandle { tx, failures })
    }

    /// Writes the record; resolves when its crops are saved and its line is appended (see the module
    /// notes on durability). Returns the file names given to the crops, in order. Waits for room when
    /// the queue is full. On a disk fault the rest of the record is still written as far as it can be
    /// (see the module notes), the first error is returned and [`failures`](Self::failures) counts it.
    /// A record queued before its caller is cancelled is still written.
    pub async fn record(&self, rec: AuditRecord) -> Result<Vec<String>, AuditError> {
        let (ack, done) = oneshot::channel();
        self.tx.send(Msg::Record(rec, ack)).await.map_err(|_| AuditError::Stopped)?;
        done.await.map_err(|_| AuditError::Stopped)?
    }

    /// Audit operations that failed since start: records not written in full (a crop not saved, a line
    /// not appended), an unusable log or photo folder at start, a failed rotation or sweep. One atomic load.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
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

/// The name made safe for a file name, and still readable: only what is unsafe in a file name is
/// replaced by `_`: path separators (`/`, `\\`), control characters, invisible format characters
/// (bidirectional overrides and isolates, zero-width characters, the byte-order mark, line and
/// paragraph separators), the characters Windows reserves (`< > : " | ? *`) and leading dots. Spaces,
/// punctuation and letters of any script stay (`Unknown 1`, `José`). The result is cut to
/// [`MAX_NAME_BYTES`] bytes at a character boundary, so the whole file name stays far below 255
/// bytes; an empty result becomes `unnamed`. It can never be a path, contain a separator, or start
/// with `.`.
pub fn safe_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len().min(MAX_NAME_BYTES));
    let mut leading = true;
    for c in name.chars() {
        let unsafe_char = matches!(c, '/' | '\\' | '<' | '>' | ':' | '"' | '|' | '?' | '*')
            || c.is_control()
            || is_invisible_format(c)
            || (leading && c == '.');
        leading &= c == '.';
        let c = if unsafe_char { '_' } else { c };
        if out.len() + c.len_utf8() > MAX_NAME_BYTES {
            break;
        }
        out.push(c);
    }
    if out.is_empty() { "unnamed".to_owned() } else { out }
}

/// Characters that change how text around them is shown without showing themselves (Unicode's
/// format characters in common use, and the line and paragraph separators).
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{ad}' | '\u{61c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
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

/// The name a log rotated on `day` (days since 1970-01-01, UTC) gets: `logs.txt` -> `logs-2024-05-01.txt`,
/// `logs-2024-05-01.1.txt` for `n` = 1, `audit` -> `audit-2024-05-01`.
pub fn rotated_log_name(log_file_name: &str, day: i64, n: u32) -> String {
    let (stem, ext) = split_ext(log_file_name);
    let (y, m, d) = civil_from_days(day);
    let seq = if n == 0 { String::new() } else { format!(".{n}") };
    let ext = ext.map(|e| format!(".{e}")).unwrap_or_default();
    format!("{stem}-{y:04}-{m:02}-{d:02}{seq}{ext}")
}

/// The day of a rotated log's name (the inverse of [`rotated_log_name`]); `None` for any other name.
pub fn rotated_log_day(log_file_name: &str, file_name: &str) -> Option<i64> {
    let (stem, ext) = split_ext(log_file_name);
    let rest = file_name.strip_prefix(stem)?.strip_prefix('-')?;
    let rest = match ext {
        Some(e) => rest.strip_suffix(e)?.strip_suffix('.')?,
        None => rest,
    };
    let (date, seq) = (rest.get(..10)?, rest.get(10..)?);
    if !seq.is_empty() {
        let digits = seq.strip_prefix('.')?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    let b = date.as_bytes();
    if b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |s: &str| -> Option<u32> { if s.bytes().all(|c| c.is_ascii_digit()) { s.parse().ok() } else { None } };
    let (y, m, d) = (num(date.get(..4)?)?, num(date.get(5..7)?)?, num(date.get(8..10)?)?);
    let day = days_from_civil(i64::from(y), m, d);
    (civil_from_days(day) == (i64::from(y), m, d)).then_some(day)
}

fn split_ext(file_name: &str) -> (&str, Option<&str>) {
    match file_name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && !ext.is_empty() => (stem, Some(ext)),
        _ => (file_name, None),
    }
}

/// Days since 1970-01-01 (UTC) of a time; times before 1970 count down from -1.
fn day_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs() / SECS_PER_DAY).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs().div_ceil(SECS_PER_DAY)).unwrap_or(i64::MAX),
    }
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

/// The side file that receives torn last lines of the log: `<log>.torn`.
fn torn_path(log_path: &Path) -> PathBuf {
    let mut name = log_path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".torn");
    log_path.with_file_name(name)
}

/// The writer's state, moved into the blocking pool for each batch and back.
struct Writer {
    /// The open log; `None` after a failed write (or open): reopened at the next record.
    log: Option<File>,
    log_path: PathBuf,
    photo_dir: PathBuf,
    save_crops: bool,
    retention_days: u32,
    /// The next photo counter; trusted once `scanned`.
    next: u64,
    /// Whether the photo folder has been scanned for the highest counter.
    scanned: bool,
    /// The UTC day of the lines in the current log (rotation, with a retention).
    log_day: i64,
    failures: Arc<AtomicU64>,
    /// Failures since the last success.
    burst: u64,
    last_warn: Option<Instant>,
    /// Records taken, and the one to panic on (a fault for tests).
    records: u64,
    panic_on_record: Option<u64>,
}

impl Writer {
    fn open(cfg: &AuditConfig, failures: Arc<AtomicU64>, now: SystemTime) -> Writer {
        let mut w = Writer {
            log: None,
            log_path: cfg.log_file.clone(),
            photo_dir: cfg.photo_dir.clone(),
            save_crops: cfg.save_crops,
            retention_days: cfg.retention_days,
            next: 1,
            scanned: false,
            log_day: day_of(now),
            failures,
            burst: 0,
            last_warn: None,
            records: 0,
            panic_on_record: None,
        };
        match open_log(&w.log_path) {
            Ok((file, last_write)) => {
                w.log = Some(file);
                if let Some(day) = last_write {
                    w.log_day = day;
                }
            }
            Err(e) => w.failed(&e),
        }
        // Without crops no folder is made; one already there is still scanned (stale temporary files).
        if (w.save_crops || w.photo_dir.is_dir())
            && let Err(e) = w.scan(w.save_crops)
        {
            w.failed(&e);
        }
        w.sweep(now);
        w
    }

    /// Writes one record, counting and reporting a failure. A panic is caught here (the
    /// supervision of the writer): it is a counted failure of this record; the log is reopened
    /// (its torn tail repaired) and the photo folder rescanned before the next.
    fn write_record(&mut self, rec: AuditRecord) -> Result<Vec<String>, AuditError> {
        let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.try_write_record(rec))) {
            Ok(r) => r,
            Err(panic) => {
                self.log = None;
                self.scanned = false;
                let why = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()));
                Err(AuditError::Panicked(why.unwrap_or_else(|| "a panic".into())))
            }
        };
        match &result {
            Ok(_) => self.succeeded(),
            Err(e) => self.failed(e),
        }
        result
    }

    fn try_write_record(&mut self, rec: AuditRecord) -> Result<Vec<String>, AuditError> {
        self.records += 1;
        if self.panic_on_record == Some(self.records) {
            panic!("injected fault: the audit writer panics on record {}", self.records);
        }
        let mut line = serde_json::to_vec(&rec.line)?;
        line.push(b'\n');
        let mut names = Vec::with_capacity(rec.crops.len());
        let mut crop_error = None;
        if self.save_crops {
            for crop in &rec.crops {
                match self.save_crop(crop) {
                    Ok(name) => names.push(name),
                    Err(e) => {
                        crop_error = Some(e);
                        break;
                    }
                }
            }
        }
        self.append(&line)?;
        match crop_error {
            Some(e) => Err(e),
            None => Ok(names),
        }
    }

    /// The start of a run of failures is a warning, then one a minute at most while it lasts.
    fn failed(&mut self, e: &AuditError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.burst += 1;
        if self.burst == 1 || self.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            tracing::warn!(
                error = %e,
                failed_in_a_row = self.burst,
                "audit trail failing: recognitions are still answered, what cannot be written is counted (warned again at most once a minute)"
            );
            self.last_warn = Some(Instant::now());
        } else {
            tracing::debug!(error = %e, failed_in_a_row = self.burst, "audit trail failing");
        }
    }

    fn succeeded(&mut self) {
        if self.burst > 0 {
            tracing::info!(failed_in_a_row = self.burst, "audit trail writing again");
            self.burst = 0;
            self.last_warn = None;
        }
    }

    /// Appends one complete line in one write; on failure, truncates what may have been written and
    /// drops the handle (reopened at the next record).
    fn append(&mut self, line: &[u8]) -> Result<(), AuditError> {
        if self.log.is_none() {
            let (file, _) = open_log(&self.log_path)?;
            self.log = Some(file);
        }
        let Some(log) = self.log.as_mut() else { return Err(AuditError::Stopped) };
        // Only a regular file can be rolled back (a device such as /dev/full has no length).
        let before = log.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
        if let Err(e) = log.write_all(line) {
            if let Some(len) = before
                && let Err(te) = log.set_len(len)
            {
                tracing::warn!(log = %self.log_path.display(), error = %te, "could not remove a partly written audit line (cut off at the next open)");
            }
            self.log = None;
            return Err(AuditError::io("append to", &self.log_path, e));
        }
        Ok(())
    }

    /// Finds the highest counter in the photo folder (creating the folder if asked) and moves the
    /// counter past it; removes temporary files left by a crash.
    fn scan(&mut self, create: bool) -> Result<(), AuditError> {
        if create {
            fs::create_dir_all(&self.photo_dir).map_err(|e| AuditError::io("create the photo folder", &self.photo_dir, e))?;
        }
        let highest = scan_photo_dir(&self.photo_dir)?.max(read_counter_file(&self.photo_dir));
        let floor = highest.checked_add(1).ok_or(AuditError::CounterExhausted)?;
        self.next = self.next.max(floor);
        self.scanned = true;
        Ok(())
    }

    /// Saves one crop under the next free counter; returns its file name.
    fn save_crop(&mut self, crop: &Crop) -> Result<String, AuditError> {
        check_ext(crop.ext)?;
        if !self.scanned {
            self.scan(true)?;
        }
        let name = safe_name(&crop.name);
        for _ in 0..MAX_COLLISIONS {
            let n = self.next;
            self.next = n.checked_add(1).ok_or(AuditError::CounterExhausted)?;
            let file_name = format!("photo_{name}_{n}.{}", crop.ext);
            let final_path = self.photo_dir.join(&file_name);
            let tmp_path = self.photo_dir.join(format!(".{file_name}.tmp"));
            self.write_temp(&tmp_path, &crop.bytes).map_err(|e| AuditError::io("write", &tmp_path, e))?;
            match publish(&tmp_path, &final_path) {
                Ok(()) => return Ok(file_name),
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
        if let Err(e) = file.write_all(bytes) {
            drop(file);
            let _ = fs::remove_file(path);
            return Err(e);
        }
        Ok(())
    }

    /// With a retention: rotates the log when its day is over. Counted and warned on failure.
    fn rotate(&mut self, now: SystemTime) {
        if let Err(e) = self.rotate_if_due(day_of(now)) {
            self.failed(&e);
        }
    }

    fn rotate_if_due(&mut self, today: i64) -> Result<(), AuditError> {
        if self.retention_days == 0 || today <= self.log_day {
            return Ok(());
        }
        let meta = match fs::metadata(&self.log_path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.log_day = today;
                return Ok(());
            }
            Err(e) => return Err(AuditError::io("read the metadata of", &self.log_path, e)),
        };
        let file_name = self.log_path.file_name().and_then(|n| n.to_str());
        let (true, Some(file_name)) = (meta.is_file() && meta.len() > 0, file_name) else {
            // Nothing to rotate (empty, a device, or a name that is not UTF-8).
            self.log_day = today;
            return Ok(());
        };
        for n in 0..MAX_COLLISIONS {
            let target = self.log_path.with_file_name(rotated_log_name(file_name, self.log_day, n));
            match fs::symlink_metadata(&target) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(AuditError::io("check", &target, e)),
            }
            // One writer: the name checked free stays free.
            fs::rename(&self.log_path, &target).map_err(|e| AuditError::io("rotate", &self.log_path, e))?;
            self.log = None;
            tracing::info!(from = %self.log_path.display(), to = %target.display(), "audit log rotated");
            self.log_day = today;
            return Ok(());
        }
        Err(AuditError::NoFreeName(file_name.to_owned()))
    }

    /// With a retention: rotates the log if due, removes crops and rotated logs older than the retention.
    fn sweep(&mut self, now: SystemTime) {
        if self.retention_days == 0 {
            return;
        }
        self.rotate(now);
        let keep = Duration::from_secs(u64::from(self.retention_days) * SECS_PER_DAY);
        let Some(cutoff) = now.checked_sub(keep) else { return };
        let crops = match self.remove_old_crops(cutoff) {
            Ok(n) => n,
            Err(e) => {
                self.failed(&e);
                0
            }
        };
        let logs = match self.remove_old_logs(day_of(now) - i64::from(self.retention_days), cutoff) {
            Ok(n) => n,
            Err(e) => {
                self.failed(&e);
                0
            }
        };
        if crops + logs > 0 {
            tracing::info!(crops, logs, retention_days = self.retention_days, "retention: removed old audit files");
        }
    }

    /// Removes `photo_*` files last modified before `cutoff`, after saving the counter (numbers are never
    /// reused once their files are gone). Returns how many were removed.
    fn remove_old_crops(&mut self, cutoff: SystemTime) -> Result<usize, AuditError> {
        let dir = self.photo_dir.clone();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(AuditError::io("read the photo folder", &dir, e)),
        };
        let mut old = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| AuditError::io("read the photo folder", &dir, e))?;
            let name = entry.file_name();
            if name.to_str().and_then(photo_counter).is_none() {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() && meta.modified().is_ok_and(|t| t < cutoff) {
                old.push(entry.path());
            }
        }
        if old.is_empty() {
            return Ok(0);
        }
        if !self.scanned {
            self.scan(false)?;
        }
        write_counter_file(&dir, self.next.saturating_sub(1)).map_err(|e| AuditError::io("save the counter in", &dir, e))?;
        let mut removed = 0;
        for path in old {
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "retention: could not remove an old crop"),
            }
        }
        Ok(removed)
    }

    /// Removes rotated logs of days before `oldest_kept` and a side file of torn lines older than `cutoff`.
    fn remove_old_logs(&mut self, oldest_kept: i64, cutoff: SystemTime) -> Result<usize, AuditError> {
        let Some(log_name) = self.log_path.file_name().and_then(|n| n.to_str()) else { return Ok(0) };
        let log_name = log_name.to_owned();
        let dir = match self.log_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(AuditError::io("read the log folder", &dir, e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| AuditError::io("read the log folder", &dir, e))?;
            let Some(day) = entry.file_name().to_str().and_then(|n| rotated_log_day(&log_name, n)) else { continue };
            if day < oldest_kept && entry.file_type().is_ok_and(|t| t.is_file()) {
                match fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!(path = %entry.path().display(), error = %e, "retention: could not remove an old log"),
                }
            }
        }
        let torn = torn_path(&self.log_path);
        if fs::metadata(&torn).is_ok_and(|m| m.is_file() && m.modified().is_ok_and(|t| t < cutoff)) && fs::remove_file(&torn).is_ok() {
            removed += 1;
        }
        Ok(removed)
    }

    /// Syncs the log file and the photo folder to disk.
    fn sync(&mut self) -> Result<(), AuditError> {
        if let Some(log) = &self.log
            && log.metadata().is_ok_and(|m| m.is_file())
        {
            log.sync_all().map_err(|e| AuditError::io("sync", &self.log_path, e))?;
        }
        // Directory fsync makes the new names durable; not every platform allows opening a folder.
        if let Ok(dir) = File::open(&self.photo_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// Opens the log for appending (creating it and its folder), cuts off a torn last line; returns the
/// file and, when it already held lines, the UTC day of its last write.
fn open_log(path: &Path) -> Result<(File, Option<i64>), AuditError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| AuditError::io("create the log folder", parent, e))?;
    }
    let file =
        OpenOptions::new().read(true).append(true).create(true).open(path).map_err(|e| AuditError::io("open the log file", path, e))?;
    let meta = file.metadata().map_err(|e| AuditError::io("read the metadata of", path, e))?;
    if !meta.is_file() || meta.len() == 0 {
        return Ok((file, None));
    }
    repair_torn_tail(&file, path, meta.len())?;
    Ok((file, meta.modified().ok().map(day_of)))
}

/// A log whose last byte is not `\n` ends in a torn line (a crash inside a write): the bytes after
/// the last `\n` are appended to `<log>.torn` (with a `\n`), synced, then cut off the log.
fn repair_torn_tail(file: &File, path: &Path, len: u64) -> Result<(), AuditError> {
    let read_err = |e| AuditError::io("read", path, e);
    let mut reader = file;
    let mut last = [0u8; 1];
    reader.seek(SeekFrom::Start(len - 1)).and_then(|_| reader.read_exact(&mut last)).map_err(read_err)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // The start of the torn line: after the last '\n', searched backwards in chunks.
    let mut keep = 0;
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let buf = &mut chunk[..(end - start) as usize];
        reader.seek(SeekFrom::Start(start)).and_then(|_| reader.read_exact(buf)).map_err(read_err)?;
        if let Some(p) = buf.iter().rposition(|&b| b == b'\n') {
            keep = start + p as u64 + 1;
            break;
        }
        end = start;
    }
    let side = torn_path(path);
    let mut out = OpenOptions::new().append(true).create(true).open(&side).map_err(|e| AuditError::io("open", &side, e))?;
    reader.seek(SeekFrom::Start(keep)).map_err(read_err)?;
    let copied = io::copy(&mut reader.take(len - keep), &mut out)
        .and_then(|n| out.write_all(b"\n").map(|()| n))
        .and_then(|n| out.sync_all().map(|()| n))
        .map_err(|e| AuditError::io("write", &side, e))?;
    file.set_len(keep).and_then(|()| file.sync_all()).map_err(|e| AuditError::io("cut the torn line off", path, e))?;
    tracing::warn!(
        log = %path.display(),
        side_file = %side.display(),
        bytes = copied,
        "the audit log ended in a torn line (a crash inside a write): moved it to the side file, the log is whole again"
    );
    Ok(())
}

/// The number kept in the counter file (0 when there is none or it is unreadable).
fn read_counter_file(dir: &Path) -> u64 {
    let path = dir.join(COUNTER_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(path = %path.display(), "the photo counter file is not a number; ignored");
            0
        }),
        Err(_) => 0,
    }
}

/// Saves the highest counter given out (temporary file, then rename over the old one).
fn write_counter_file(dir: &Path, highest: u64) -> io::Result<()> {
    if read_counter_file(dir) >= highest {
        return Ok(());
    }
    let tmp = dir.join(format!("{COUNTER_FILE}.new"));
    let mut f = File::create(&tmp)?;
    f.write_all(format!("{highest}\n").as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(COUNTER_FILE))
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

/// Resolves at the next retention sweep; never without a retention.
async fn next_sweep(sweeps: &mut Option<tokio::time::Interval>) {
    match sweeps {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// The writer task: takes batches of queued messages (and the hourly sweep) and runs them on the
/// blocking pool.
async fn run(mut writer: Writer, mut rx: mpsc::Receiver<Msg>) {
    let mut closers: Vec<CloseAck> = Vec::new();
    let mut sweeps = (writer.retention_days > 0).then(|| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + SWEEP_EVERY, SWEEP_EVERY);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    loop {
        let mut jobs = Vec::new();
        let mut next = tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => Some(m),
                None => break,
            },
            () = next_sweep(&mut sweeps) => {
                jobs.push(Job::Sweep);
                rx.try_recv().ok()
            }
        };
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(rec, ack) => jobs.push(Job::Record(rec, ack)),
                Msg::Close(ack) => {
                    // No new records from now on; those already queued are still written.
                    rx.close();
                    closers.push(ack);
                }
            }
            if jobs.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if jobs.is_empty() {
            continue;
        }
        let done = tokio::task::spawn_blocking(move || {
            writer.rotate(SystemTime::now());
            for job in jobs {
                match job {
                    Job::Record(rec, ack) => {
                        let _ = ack.send(writer.write_record(rec));
                    }
                    Job::Sweep => {
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.sweep(SystemTime::now()))).is_err() {
                            writer.failed(&AuditError::Panicked("retention sweep".into()));
                        }
                    }
                }
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
            AuditConfig { queue: 16, ..AuditConfig::new(self.0.join("logs.txt"), self.0.join("photo")) }
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
        assert_eq!(names, vec!["photo_Unknown 1_1.jpg".to_owned()]);
        // The line and the file exist as soon as `record` has answered.
        assert_eq!(log_lines(&cfg), vec![line.clone()]);
        assert_eq!(fs::read_to_string(&cfg.log_file).unwrap().lines().count(), 1);
        assert_eq!(photo_files(&cfg), BTreeSet::from(["photo_Unknown 1_1.jpg".to_owned()]));
        assert_eq!(fs::read(cfg.photo_dir.join("photo_Unknown 1_1.jpg")).unwrap(), b"\xff\xd8jpeg");
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
        assert_eq!(names, vec!["photo_Unknown 1_18.jpg"]);
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
        assert_eq!(safe_name("Unknown 1"), "Unknown 1", "spaces stay, as the original wrote them");
        assert_eq!(safe_name("José"), "José", "letters of any script stay");
        assert_eq!(safe_name("李小龍"), "李小龍");
        assert_eq!(safe_name("Ann-Marie_2"), "Ann-Marie_2");
        assert_eq!(safe_name("J.R. Smith"), "J.R. Smith", "dots inside stay");
        assert_eq!(safe_name("../../etc/passwd"), "___.._etc_passwd");
        assert_eq!(safe_name("a/b\\c"), "a_b_c");
        assert_eq!(safe_name(".."), "__");
        assert_eq!(safe_name("."), "_");
        assert_eq!(safe_name(".hidden"), "_hidden");
        assert_eq!(safe_name(""), "unnamed");
        assert_eq!(safe_name("a\0b\nc\td"), "a_b_c_d");
        assert_eq!(safe_name("a\u{202e}b\u{200b}c\u{feff}"), "a_b_c_");
        assert_eq!(safe_name("C:\\x<y>|z?*\""), "C__x_y__z___");
        let long: String = "é".repeat(150) + &"x".repeat(150);
        let cut = safe_name(&long);
        assert_eq!(cut, "é".repeat(64), "cut at a character boundary");
        assert_eq!(safe_name(&"y".repeat(300)), "y".repeat(128));
        for s in ["../../etc/passwd", "a/b\\c", "..", "", "José", &long, ".hidden", "/", "C:\\x", "...", "\u{2028}"] {
            let n = safe_name(s);
            assert!(!n.is_empty() && n.len() <= MAX_NAME_BYTES);
            assert!(!n.starts_with('.'));
            assert!(!n.contains(['/', '\\', '\0']), "{n}");
            assert!(!n.chars().any(char::is_control), "{n:?}");
            assert_eq!(Path::new(&n).components().count(), 1);
        }
    }

    #[test]
    fn photo_counters() {
        assert_eq!(photo_counter("photo_Unknown_1_17.jpg"), Some(17));
        assert_eq!(photo_counter("photo_Unknown 1_12.png"), Some(12));
        assert_eq!(photo_counter("photo_J.R. Smith_4.jpg"), Some(4));
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
            let rec = AuditRecord { line: json!({"failed": i}), crops: vec![crop("a", b"x", "jpg"), crop("b", b"x", "jpg")] };
            let err = within(audit.record(rec)).await.unwrap_err();
            assert!(matches!(err, AuditError::Io { .. }), "{err}");
        }
        assert_eq!(audit.failures(), 2);
        // The lines are written all the same (they hold the crops); the writer keeps serving.
        let names = within(audit.record(AuditRecord { line: json!({"ok": 1}), crops: vec![] })).await.unwrap();
        assert!(names.is_empty());
        assert_eq!(log_lines(&cfg), vec![json!({"failed": 0}), json!({"failed": 1}), json!({"ok": 1})]);
        // Once the folder is back (here: removed, and recreated by the writer), crops are saved again,
        // with numbers after those the failed records took (one each: the second crop was not tried).
        fs::remove_file(&cfg.photo_dir).unwrap();
        let names = within(audit.record(AuditRecord { line: json!({"ok": 2}), crops: vec![crop("a", b"y", "jpg")] })).await.unwrap();
        assert_eq!(names, vec!["photo_a_3.jpg"]);
        assert_eq!(fs::read(cfg.photo_dir.join("photo_a_3.jpg")).unwrap(), b"y");
        assert_eq!(audit.failures(), 2);
        within(audit.close()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn failed_crop_keeps_the_line_and_the_crops_already_saved() {
        let tmp = TempDir::new("partial");
        let cfg = tmp.cfg();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        let rec = AuditRecord { line: json!({"x": 1}), crops: vec![crop("a", b"1", "jpg"), crop("b", b"2", "j.pg")] };
        let err = within(audit.record(rec)).await.unwrap_err();
        assert!(matches!(err, AuditError::BadExtension(ref e) if e == "j.pg"), "{err}");
        assert_eq!(photo_files(&cfg), BTreeSet::from(["photo_a_1.jpg".to_owned()]));
        assert_eq!(log_lines(&cfg), vec![json!({"x": 1})]);
        assert_eq!(audit.failures(), 1);
        within(audit.close()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn start_with_an_unusable_photo_folder_or_log_still_serves() {
        let tmp = TempDir::new("badstart");
        let file = tmp.0.join("file");
        fs::write(&file, b"").unwrap();
        // A photo folder under a regular file: lines are written, crops fail, counted.
        let cfg = AuditConfig { queue: 4, ..AuditConfig::new(tmp.0.join("logs.txt"), file.join("photo")) };
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        assert_eq!(audit.failures(), 1, "the folder that cannot be made counts at start");
        let err = within(audit.record(AuditRecord { line: json!({"a": 1}), crops: vec![crop("a", b"1", "jpg")] })).await.unwrap_err();
        assert!(matches!(err, AuditError::Io { .. }), "{err}");
        assert_eq!(log_lines(&cfg), vec![json!({"a": 1})]);
        assert_eq!(audit.failures(), 2);
        within(audit.close()).await.unwrap();
        // A log under a regular file: crops are saved, lines fail, counted.
        let cfg = AuditConfig { queue: 4, ..AuditConfig::new(file.join("logs.txt"), tmp.0.join("photo")) };
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        assert_eq!(audit.failures(), 1);
        let err = within(audit.record(AuditRecord { line: json!({"a": 2}), crops: vec![crop("a", b"2", "jpg")] })).await.unwrap_err();
        assert!(matches!(err, AuditError::Io { .. }), "{err}");
        assert_eq!(photo_files(&cfg), BTreeSet::from(["photo_a_1.jpg".to_owned()]));
        assert_eq!(audit.failures(), 2);
        within(audit.close()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn full_disk_log_is_counted_and_recovers_when_the_disk_comes_back() {
        let tmp = TempDir::new("full");
        let cfg = tmp.cfg();
        // The log path first leads to /dev/full (every write: ENOSPC).
        std::os::unix::fs::symlink("/dev/full", &cfg.log_file).unwrap();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        for i in 0..3 {
            let err =
                within(audit.record(AuditRecord { line: json!({"lost": i}), crops: vec![crop("a", b"1", "jpg")] })).await.unwrap_err();
            assert!(matches!(&err, AuditError::Io { source, .. } if source.raw_os_error() == Some(28)), "ENOSPC expected: {err}");
        }
        assert_eq!(audit.failures(), 3);
        // The crops were kept.
        assert_eq!(photo_files(&cfg).len(), 3);
        // The disk comes back: the writer reopens the log at the next record.
        fs::remove_file(&cfg.log_file).unwrap();
        within(audit.record(AuditRecord { line: json!({"back": 1}), crops: vec![] })).await.unwrap();
        within(audit.record(AuditRecord { line: json!({"back": 2}), crops: vec![] })).await.unwrap();
        assert_eq!(log_lines(&cfg), vec![json!({"back": 1}), json!({"back": 2})]);
        assert_eq!(audit.failures(), 3);
        within(audit.close()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_torn_last_line_is_moved_aside_at_start() {
        let tmp = TempDir::new("torn");
        let cfg = tmp.cfg();
        let big = format!("{{\"pad\":\"{}", "x".repeat(200_000));
        fs::write(&cfg.log_file, format!("{{\"a\":1}}\n{big}")).unwrap();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        assert_eq!(log_lines(&cfg), vec![json!({"a": 1})]);
        assert_eq!(fs::read_to_string(torn_path(&cfg.log_file)).unwrap(), format!("{big}\n"));
        within(audit.record(AuditRecord { line: json!({"b": 2}), crops: vec![] })).await.unwrap();
        assert_eq!(log_lines(&cfg), vec![json!({"a": 1}), json!({"b": 2})]);
        within(audit.close()).await.unwrap();
        // A log that is one torn line, without any newline.
        fs::write(&cfg.log_file, b"{\"c\":").unwrap();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        assert_eq!(fs::read(&cfg.log_file).unwrap(), b"");
        assert_eq!(fs::read_to_string(torn_path(&cfg.log_file)).unwrap(), format!("{big}\n{{\"c\":\n"));
        assert_eq!(audit.failures(), 0);
        within(audit.close()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn without_crops_only_the_line_is_written() {
        let tmp = TempDir::new("nocrops");
        let cfg = AuditConfig { save_crops: false, ..tmp.cfg() };
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        let names = within(audit.record(AuditRecord { line: json!({"a": 1}), crops: vec![crop("a", b"1", "jpg")] })).await.unwrap();
        assert!(names.is_empty());
        assert_eq!(log_lines(&cfg), vec![json!({"a": 1})]);
        assert!(!cfg.photo_dir.exists(), "no photo folder is made");
        assert_eq!(audit.failures(), 0);
        within(audit.close()).await.unwrap();
    }

    fn set_mtime(path: &Path, t: SystemTime) {
        File::options().write(true).open(path).unwrap().set_modified(t).unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retention_removes_old_crops_and_logs_and_never_reuses_a_counter() {
        let tmp = TempDir::new("retention");
        let cfg = AuditConfig { retention_days: 7, ..tmp.cfg() };
        let now = SystemTime::now();
        let day = Duration::from_secs(SECS_PER_DAY);
        fs::create_dir_all(&cfg.photo_dir).unwrap();
        for (name, age) in [("photo_old_1.jpg", 8), ("photo_old_41.jpg", 30), ("photo_new_2.jpg", 6), ("notes.txt", 100)] {
            let p = cfg.photo_dir.join(name);
            fs::write(&p, b"x").unwrap();
            set_mtime(&p, now - day * age);
        }
        // The log was last written two days ago; rotated logs of various ages lie beside it.
        fs::write(&cfg.log_file, b"{\"old\":1}\n").unwrap();
        set_mtime(&cfg.log_file, now - day * 2);
        let today = day_of(now);
        let rotated = |d: i64, n: u32| tmp.0.join(rotated_log_name("logs.txt", d, n));
        for (d, n) in [(today - 8, 0), (today - 8, 1), (today - 7, 0), (today - 2, 0), (today - 40, 0)] {
            fs::write(rotated(d, n), b"{}\n").unwrap();
        }
        fs::write(tmp.0.join("logs-not-a-date.txt"), b"keep").unwrap();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        assert_eq!(photo_files(&cfg), BTreeSet::from(["photo_new_2.jpg".into(), "notes.txt".into(), COUNTER_FILE.into()]));
        assert_eq!(fs::read_to_string(cfg.photo_dir.join(COUNTER_FILE)).unwrap().trim(), "41");
        assert!(!rotated(today - 8, 0).exists() && !rotated(today - 8, 1).exists() && !rotated(today - 40, 0).exists());
        assert!(rotated(today - 7, 0).exists(), "a day that ended less than 7 days ago is kept");
        // logs.txt was rotated under the day of its last write; that name was taken, so `.1`.
        assert_eq!(fs::read(rotated(today - 2, 0)).unwrap(), b"{}\n");
        assert_eq!(fs::read(rotated(today - 2, 1)).unwrap(), b"{\"old\":1}\n");
        assert!(tmp.0.join("logs-not-a-date.txt").exists());
        let names = within(audit.record(AuditRecord { line: json!({"new": 1}), crops: vec![crop("n", b"1", "jpg")] })).await.unwrap();
        assert_eq!(names, vec!["photo_n_42.jpg"]);
        assert_eq!(log_lines(&cfg), vec![json!({"new": 1})]);
        assert_eq!(audit.failures(), 0);
        within(audit.close()).await.unwrap();
        // Every crop removed: the counter file still keeps the numbers from being reused.
        for f in ["photo_new_2.jpg", "photo_n_42.jpg"] {
            fs::remove_file(cfg.photo_dir.join(f)).unwrap();
        }
        fs::write(cfg.photo_dir.join(COUNTER_FILE), b"42\n").unwrap();
        let audit = within(AuditHandle::start(cfg.clone())).await.unwrap();
        let names = within(audit.record(AuditRecord { line: json!({"new": 2}), crops: vec![crop("n", b"2", "jpg")] })).await.unwrap();
        assert_eq!(names, vec!["photo_n_43.jpg"]);
        within(audit.close()).await.unwrap();
    }

    #[test]
    fn the_log_rotates_when_its_day_is_over() {
        let tmp = TempDir::new("rotate");
        let cfg = AuditConfig { retention_days: 3, ..tmp.cfg() };
        let now = SystemTime::now();
        let mut w = Writer::open(&cfg, Arc::new(AtomicU64::new(0)), now);
        let today = day_of(now);
        w.try_write_record(AuditRecord { line: json!({"d": 0}), crops: vec![] }).unwrap();
        w.rotate_if_due(today).unwrap();
        assert_eq!(log_lines(&cfg), vec![json!({"d": 0})], "not yet");
        w.rotate_if_due(today + 1).unwrap();
        assert!(!cfg.log_file.exists());
        assert_eq!(fs::read(tmp.0.join(rotated_log_name("logs.txt", today, 0))).unwrap(), b"{\"d\":0}\n");
        w.try_write_record(AuditRecord { line: json!({"d": 1}), crops: vec![] }).unwrap();
        assert_eq!(log_lines(&cfg), vec![json!({"d": 1})]);
        // Without a retention the log never rotates.
        let cfg = AuditConfig { log_file: tmp.0.join("forever.txt"), ..tmp.cfg() };
        let mut w = Writer::open(&cfg, Arc::new(AtomicU64::new(0)), now);
        w.try_write_record(AuditRecord { line: json!({"d": 0}), crops: vec![] }).unwrap();
        w.rotate_if_due(today + 100).unwrap();
        assert_eq!(fs::read(&cfg.log_file).unwrap(), b"{\"d\":0}\n");
    }

    #[test]
    fn dates() {
        assert_eq!(day_of(UNIX_EPOCH + Duration::from_secs(86_399)), 0);
        assert_eq!(day_of(UNIX_EPOCH - Duration::from_secs(1)), -1);
        assert_eq!(rotated_log_name("logs.txt", 19_782, 0), "logs-2024-02-29.txt");
        assert_eq!(rotated_log_name("logs.txt", 19_782, 3), "logs-2024-02-29.3.txt");
        assert_eq!(rotated_log_name("audit", 0, 0), "audit-1970-01-01");
        assert_eq!(rotated_log_day("logs.txt", "logs-2024-02-29.txt"), Some(19_782));
        assert_eq!(rotated_log_day("logs.txt", "logs-2024-02-29.12.txt"), Some(19_782));
        assert_eq!(rotated_log_day("audit", "audit-1970-01-01"), Some(0));
        for other in [
            "logs.txt",
            "logs-2023-02-29.txt",
            "logs-2024-13-01.txt",
            "logs-2024-02-29.x.txt",
            "logs-2024-02-29.txt.torn",
            "logs-2024-02-29.",
            "other-2024-02-29.txt",
            "logs-2024-02-29.1.2.txt",
            "logs-2024-2-29.txt",
        ] {
            assert_eq!(rotated_log_day("logs.txt", other), None, "{other}");
        }
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
