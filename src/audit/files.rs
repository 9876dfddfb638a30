//! Opening the log (torn-tail repair), the counter file, publishing crops without overwriting, scanning the photo folder.

use super::*;

/// Opens the log for appending (creating it and its folder), cuts off a torn last line; returns the
/// file and, when it already held lines, the UTC day of its last write.
pub(super) fn open_log(path: &Path) -> Result<(File, Option<i64>), AuditError> {
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
pub(super) fn repair_torn_tail(file: &File, path: &Path, len: u64) -> Result<(), AuditError> {
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
pub(super) fn read_counter_file(dir: &Path) -> u64 {
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
pub(super) fn write_counter_file(dir: &Path, highest: u64) -> io::Result<()> {
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
pub(super) fn publish(tmp: &Path, final_path: &Path) -> io::Result<()> {
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
pub(super) fn scan_photo_dir(dir: &Path) -> Result<u64, AuditError> {
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
