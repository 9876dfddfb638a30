//! The one writer: appends lines, saves crops, rotates the log, sweeps old files (runs on the blocking pool).

use super::*;

/// The writer's state, moved into the blocking pool for each batch and back.
pub(super) struct Writer {
    /// The open log; `None` after a failed write (or open): reopened at the next record.
    pub(super) log: Option<File>,
    pub(super) log_path: PathBuf,
    pub(super) photo_dir: PathBuf,
    pub(super) save_crops: bool,
    pub(super) retention_days: u32,
    pub(super) max_line_bytes: usize,
    /// The next photo counter; trusted once `scanned`.
    pub(super) next: u64,
    /// Whether the photo folder has been scanned for the highest counter.
    pub(super) scanned: bool,
    /// The UTC day of the lines in the current log (rotation, with a retention).
    pub(super) log_day: i64,
    pub(super) failures: Arc<AtomicU64>,
    /// Failures since the last success.
    pub(super) burst: u64,
    pub(super) last_warn: Option<Instant>,
    /// Records taken, and the one to panic on (a fault for tests).
    pub(super) records: u64,
    pub(super) panic_on_record: Option<u64>,
}

impl Writer {
    pub(super) fn open(cfg: &AuditConfig, failures: Arc<AtomicU64>, now: SystemTime) -> Writer {
        let mut w = Writer {
            log: None,
            log_path: cfg.log_file.clone(),
            photo_dir: cfg.photo_dir.clone(),
            save_crops: cfg.save_crops,
            retention_days: cfg.retention_days,
            max_line_bytes: cfg.max_line_bytes,
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
    pub(super) fn write_record(&mut self, rec: AuditRecord) -> Result<Vec<String>, AuditError> {
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

    pub(super) fn try_write_record(&mut self, rec: AuditRecord) -> Result<Vec<String>, AuditError> {
        self.records += 1;
        if self.panic_on_record == Some(self.records) {
            panic!("injected fault: the audit writer panics on record {}", self.records);
        }
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
        let line = super::cap::fit(rec.line, &rec.crops, &names, self.max_line_bytes)?;
        self.append(&line)?;
        match crop_error {
            Some(e) => Err(e),
            None => Ok(names),
        }
    }

    /// The start of a run of failures is a warning, then one a minute at most while it lasts.
    pub(super) fn failed(&mut self, e: &AuditError) {
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

    pub(super) fn succeeded(&mut self) {
        if self.burst > 0 {
            tracing::info!(failed_in_a_row = self.burst, "audit trail writing again");
            self.burst = 0;
            self.last_warn = None;
        }
    }

    /// Appends one complete line in one write; on failure, truncates what may have been written and
    /// drops the handle (reopened at the next record).
    pub(super) fn append(&mut self, line: &[u8]) -> Result<(), AuditError> {
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
    pub(super) fn scan(&mut self, create: bool) -> Result<(), AuditError> {
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
    pub(super) fn save_crop(&mut self, crop: &Crop) -> Result<String, AuditError> {
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
    pub(super) fn write_temp(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
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
    pub(super) fn rotate(&mut self, now: SystemTime) {
        if let Err(e) = self.rotate_if_due(day_of(now)) {
            self.failed(&e);
        }
    }

    pub(super) fn rotate_if_due(&mut self, today: i64) -> Result<(), AuditError> {
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
    pub(super) fn sweep(&mut self, now: SystemTime) {
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
    pub(super) fn remove_old_crops(&mut self, cutoff: SystemTime) -> Result<usize, AuditError> {
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
    pub(super) fn remove_old_logs(&mut self, oldest_kept: i64, cutoff: SystemTime) -> Result<usize, AuditError> {
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
    pub(super) fn sync(&mut self) -> Result<(), AuditError> {
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
