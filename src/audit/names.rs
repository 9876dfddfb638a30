//! File names of the audit trail: safe crop names, photo counters, rotated log names, days.

use super::*;

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
pub(super) fn is_invisible_format(c: char) -> bool {
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

pub(super) fn split_ext(file_name: &str) -> (&str, Option<&str>) {
    match file_name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && !ext.is_empty() => (stem, Some(ext)),
        _ => (file_name, None),
    }
}

/// Days since 1970-01-01 (UTC) of a time; times before 1970 count down from -1.
pub(super) fn day_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs() / SECS_PER_DAY).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs().div_ceil(SECS_PER_DAY)).unwrap_or(i64::MAX),
    }
}

pub(super) fn check_ext(ext: &str) -> Result<(), AuditError> {
    if ext.is_empty() || ext.len() > MAX_EXT_BYTES || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(AuditError::BadExtension(ext.to_owned()));
    }
    Ok(())
}

pub(super) fn is_temp_name(file_name: &str) -> bool {
    file_name.starts_with(".photo_") && file_name.ends_with(".tmp")
}

/// The side file that receives torn last lines of the log: `<log>.torn`.
pub(super) fn torn_path(log_path: &Path) -> PathBuf {
    let mut name = log_path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".torn");
    log_path.with_file_name(name)
}
