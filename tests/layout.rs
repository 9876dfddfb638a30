//! The house rules a newcomer relies on (issue 13): no source file over 600 lines of code, and
//! the README's layout section names every module of the tree and nothing that is gone.
//!
//! "Lines of code" are the non-blank lines that are not `//` comments, up to the file's
//! `#[cfg(test)] mod tests` (its tests are not counted); files that are a test module of their
//! own (`tests.rs`) are not counted either.

use std::path::{Path, PathBuf};

const MAX_CODE_LINES: usize = 600;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("readable source folder").flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code lines of one file's text, its test module left out.
fn code_lines(text: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let mut n = 0;
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        let next = lines.get(i + 1).map_or("", |l| l.trim());
        if t == "#[cfg(test)]" && (next.starts_with("mod tests") || next.starts_with("pub mod tests")) {
            break;
        }
        if !t.is_empty() && !t.starts_with("//") {
            n += 1;
        }
    }
    n
}

fn sources() -> Vec<PathBuf> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    rust_files(&root().join("tools/src"), &mut files);
    files
}

#[test]
fn the_counter_counts_code_not_comments_blanks_or_tests() {
    let text = "//! doc\nuse a;\n\n// note\nfn f() {\n    g();\n}\n#[cfg(test)]\nmod tests {\n    fn t() {}\n}\n";
    assert_eq!(code_lines(text), 4);
    assert_eq!(code_lines("fn a() {}\n#[cfg(test)]\nfn only_in_tests() {}\n"), 3, "only a tests module ends the count");
}

#[test]
fn no_source_file_is_over_600_lines_of_code() {
    let files = sources();
    assert!(files.len() > 50, "the source tree was not found: {} files", files.len());
    let over: Vec<String> = files
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "tests.rs"))
        .filter_map(|p| {
            let n = code_lines(&std::fs::read_to_string(p).expect("readable source"));
            (n > MAX_CODE_LINES).then(|| format!("{} ({n} lines of code)", p.strip_prefix(root()).unwrap_or(p).display()))
        })
        .collect();
    assert!(over.is_empty(), "split these by job (at most {MAX_CODE_LINES} lines of code each): {over:?}");
}

/// The README's `## Layout` code block as (entry, its text): an entry starts at a line that
/// does not begin with a space and runs to the next such line.
fn layout_entries() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme.split("\n## Layout\n").nth(1).expect("a `## Layout` section");
    let block = section.split("```").nth(1).expect("a code block in the layout section");
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in block.lines().skip(1) {
        if line.is_empty() {
            continue;
        }
        if line.starts_with(' ') {
            if let Some(last) = entries.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else {
            let (name, rest) = line.split_once(' ').unwrap_or((line, ""));
            entries.push((name.to_owned(), rest.trim().to_owned()));
        }
    }
    entries
}

/// Whether `word` appears in `text` on its own (not as part of a longer name).
fn mentions(text: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(is_name) && !after.is_some_and(is_name)
    })
}

#[test]
fn the_readme_layout_names_every_module_and_nothing_gone() {
    let entries = layout_entries();
    assert!(entries.len() > 10, "the layout block was not found: {entries:?}");
    // Every entry names something that exists.
    for (name, _) in &entries {
        let path = name.split(['(', '+']).next().unwrap_or(name).trim();
        assert!(root().join(path).exists(), "README layout names `{path}`, which is not in the tree");
    }
    // Every module is named: by its own entry, or by its file stem in the entry of its top folder.
    let mut missing = Vec::new();
    for file in sources() {
        let rel = file.strip_prefix(root()).expect("under the root").to_string_lossy().replace('\\', "/");
        let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        if stem == "tests" || entries.iter().any(|(name, _)| *name == rel) {
            continue;
        }
        // src/api/budget.rs -> the entry `src/api/`; src/serve/conn.rs -> `src/serve/` or
        // `src/serve.rs`; tools/src/eval.rs -> `tools/`. A file right under src/ needs its own.
        let parts: Vec<&str> = rel.split('/').collect();
        let tops = match parts.as_slice() {
            ["src", _] => vec![],
            ["src", dir, ..] => vec![format!("src/{dir}/"), format!("src/{dir}.rs")],
            [top, ..] => vec![format!("{top}/")],
            [] => vec![],
        };
        let named = entries
            .iter()
            .any(|(name, text)| tops.contains(name) && (mentions(text, stem) || stem == "mod" && name.ends_with('/') || stem == "main"));
        if !named {
            missing.push(rel);
        }
    }
    assert!(missing.is_empty(), "the README's layout section does not name these: {missing:?}");
}
