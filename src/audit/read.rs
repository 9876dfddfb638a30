//! Reading the audit trail back, newest first, for `GET /recognitions`: the NDJSON log is read
//! backwards from its end (or from a cursor) in blocks, so a page costs the size of its lines,
//! not of the log. An entry's id is the byte offset where its line starts: stable while the log
//! grows (it is only appended to), and the cursor of the next page (`before`). The current log
//! only: lines rotated away (RETENTION_DAYS) are not listed.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

/// Bytes read per step backwards.
const BLOCK: usize = 64 * 1024;
/// A line longer than this is skipped (the audit writer never writes one: bodies are bounded).
const MAX_LINE: usize = 256 * 1024 * 1024;

/// Up to `limit` lines that start before byte `before` (the end when `None`), newest first, each
/// with the offset it starts at. A missing log is an empty one.
pub fn newest_lines(path: &Path, before: Option<u64>, limit: usize) -> io::Result<Vec<(u64, Vec<u8>)>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let end = before.map_or(len, |b| b.min(len));
    let mut pos = end;
    // Bytes [pos, pos + buf.len()) of the file not yet handed out.
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut trailing_checked = false;
    while out.len() < limit {
        if !trailing_checked && !buf.is_empty() {
            if buf.last() == Some(&b'\n') {
                buf.pop();
            }
            trailing_checked = true;
        }
        if trailing_checked && let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            let line = buf.split_off(i + 1);
            buf.pop();
            if !line.is_empty() {
                out.push((pos + i as u64 + 1, line));
            }
            continue;
        }
        if pos == 0 {
            if !buf.is_empty() {
                out.push((0, std::mem::take(&mut buf)));
            }
            break;
        }
        if buf.len() > MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "an audit line is longer than 256 MiB"));
        }
        let step = (BLOCK as u64).min(pos);
        pos -= step;
        let mut block = vec![0u8; step as usize];
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut block)?;
        block.extend_from_slice(&buf);
        buf = block;
    }
    Ok(out)
}

/// The line that starts at byte `offset` exactly (an id from [`newest_lines`]), if there is one.
pub fn line_at(path: &Path, offset: u64) -> io::Result<Option<Vec<u8>>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if offset >= len {
        return Ok(None);
    }
    if offset > 0 {
        let mut prev = [0u8; 1];
        file.seek(SeekFrom::Start(offset - 1))?;
        file.read_exact(&mut prev)?;
        if prev[0] != b'\n' {
            return Ok(None);
        }
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut line = Vec::new();
    let mut block = vec![0u8; BLOCK];
    loop {
        let n = file.read(&mut block)?;
        if n == 0 {
            break;
        }
        if let Some(i) = block[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&block[..i]);
            break;
        }
        line.extend_from_slice(&block[..n]);
        if line.len() > MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "an audit line is longer than 256 MiB"));
        }
    }
    Ok(Some(line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_newest_first_with_offsets_as_cursors() {
        let dir = std::env::temp_dir().join(format!("facerec-audit-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("logs.txt");
        assert!(newest_lines(&path, None, 10).unwrap().is_empty(), "no log: nothing");
        // Lines around the block size, so that a line spans blocks.
        let lines: Vec<String> = (0..40).map(|i| format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i * 5000))).collect();
        std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
        let page = newest_lines(&path, None, 3).unwrap();
        assert_eq!(page.len(), 3);
        assert_eq!(page[0].1, lines[39].as_bytes());
        assert_eq!(page[2].1, lines[37].as_bytes());
        let mut all = page.clone();
        let mut before = page.last().map(|p| p.0);
        while let Some(b) = before {
            let next = newest_lines(&path, Some(b), 7).unwrap();
            before = next.last().map(|p| p.0);
            all.extend(next);
        }
        assert_eq!(all.len(), 40);
        for (k, (offset, line)) in all.iter().enumerate() {
            assert_eq!(line, lines[39 - k].as_bytes());
            assert_eq!(line_at(&path, *offset).unwrap().as_deref(), Some(line.as_slice()));
        }
        assert_eq!(all.last().unwrap().0, 0);
        assert_eq!(line_at(&path, 1).unwrap(), None, "not a line start");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
