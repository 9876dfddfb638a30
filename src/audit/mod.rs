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
/// The default LOG_MAX_LINE_BYTES: 1 MiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1024 * 1024;
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
    /// The longest line written (LOG_MAX_LINE_BYTES; at least [`cap::MIN_LINE_BYTES`]): see [`cap`].
    pub max_line_bytes: usize,
}

impl AuditConfig {
    /// A configuration with the default queue size, crops saved and kept forever.
    pub fn new(log_file: impl Into<PathBuf>, photo_dir: impl Into<PathBuf>) -> Self {
        Self {
            log_file: log_file.into(),
            photo_dir: photo_dir.into(),
            queue: DEFAULT_QUEUE,
            save_crops: true,
            retention_days: 0,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        }
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
    /// Where the line carries this crop as base64 (a JSON pointer such as `/bboxes/0/crop`): a
    /// line over the cap refers to the saved file there instead.
    pub at: Option<String>,
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

pub mod cap;
mod files;
mod names;
pub mod read;
mod run;
#[cfg(test)]
mod tests;
mod writer;

use files::*;
use names::*;
pub use names::{photo_counter, rotated_log_day, rotated_log_name, safe_name};
use run::*;
use writer::*;
