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
    Crop { name: name.to_owned(), bytes: bytes.to_vec(), ext, at: None }
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
        let err = within(audit.record(AuditRecord { line: json!({"lost": i}), crops: vec![crop("a", b"1", "jpg")] })).await.unwrap_err();
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
