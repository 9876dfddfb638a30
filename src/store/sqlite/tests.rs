//! The SQLite store's tests: schema, migrations, enrolment, crash and concurrency behaviour.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "facerec-sqlite-{tag}-{}-{nanos}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// A database path in a sub-folder that does not exist yet (`open` must create it).
    fn db(&self) -> PathBuf {
        self.0.join("data").join("facerec.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random numbers (xorshift64*), in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vector(&mut self, scale: f32) -> Vec<f32> {
        (0..EMBEDDING_DIM).map(|_| self.next() * scale).collect()
    }
}

fn normalised(v: &[f64]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| (x / norm) as f32).collect()
}

fn unit(seed: u64) -> Vec<f32> {
    let v = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).vector(1.0);
    normalised(&v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>())
}

/// The L2-normalised mean of `vs`.
fn mean(vs: &[Vec<f32>]) -> Vec<f32> {
    let mut acc = vec![0.0f64; EMBEDDING_DIM];
    for v in vs {
        for (a, &x) in acc.iter_mut().zip(v) {
            *a += f64::from(x);
        }
    }
    normalised(&acc)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Writes a row as an older build, or a corrupted file, would.
fn insert_raw(store: &SqliteStore, username: &str, embedding: Option<Vec<u8>>, samples: i64, model_id: Option<&str>) {
    let conn = lock(&store.conn);
    conn.execute(
        "INSERT INTO users (username, embedding, samples, model_id, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![username, embedding, samples, model_id, 1_700_000_000_000i64],
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn create_get_list_delete_round_trip() {
    let dir = TempDir::new("roundtrip");
    let store = SqliteStore::open(&dir.db()).unwrap();
    assert_eq!(store.kind(), StoreKind::Sqlite);
    assert!(store.list_users().await.unwrap().is_empty());

    let bob = store.create_user("bob").await.unwrap();
    assert_eq!((bob.username.as_str(), bob.samples, bob.embedding.len(), bob.model_id.as_deref()), ("bob", 0, 0, None));
    let alice = store.create_user("alice").await.unwrap();
    assert_eq!(store.get_user("bob").await.unwrap(), Some(bob.clone()));
    assert_eq!(store.get_user("carol").await.unwrap(), None);

    let list = store.list_users().await.unwrap();
    assert_eq!(list.iter().map(|u| u.username.as_str()).collect::<Vec<_>>(), ["alice", "bob"]);
    assert_eq!(list[0], UserSummary { username: "alice".into(), samples: 0, model_id: None, updated_at: rfc3339(alice.updated_at) });

    assert!(matches!(store.create_user("bob").await, Err(StoreError::UserExists(u)) if u == "bob"));
    store.delete_user("bob").await.unwrap();
    assert_eq!(store.get_user("bob").await.unwrap(), None);
    assert!(matches!(store.delete_user("bob").await, Err(StoreError::UserNotFound(u)) if u == "bob"));
    assert!(matches!(store.enroll("bob", &[unit(1)], "m1").await, Err(StoreError::UserNotFound(u)) if u == "bob"));
    assert_eq!(store.list_users().await.unwrap().len(), 1);
    // The name is free again.
    store.create_user("bob").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn enroll_takes_the_weighted_mean() {
    let dir = TempDir::new("enroll");
    let store = SqliteStore::open(&dir.db()).unwrap();
    store.create_user("ann").await.unwrap();

    let first: Vec<Vec<f32>> = (1..=3).map(unit).collect();
    let rec = store.enroll("ann", &first, "arcface-r100").await.unwrap();
    assert_eq!(rec.samples, 3);
    assert_eq!(rec.model_id.as_deref(), Some("arcface-r100"));
    assert!(max_diff(&rec.embedding, &mean(&first)) < 1e-6);
    assert_eq!(store.get_user("ann").await.unwrap().as_ref(), Some(&rec));

    let second: Vec<Vec<f32>> = (4..=5).map(unit).collect();
    let rec2 = store.enroll("ann", &second, "arcface-r100").await.unwrap();
    let (expected, n) = weighted_template(&rec.embedding, 3, &second);
    assert_eq!((rec2.samples, n), (5, 5));
    assert!(max_diff(&rec2.embedding, &expected) < 1e-6);
    let norm = rec2.embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    assert_eq!(store.get_user("ann").await.unwrap(), Some(rec2.clone()));

    let list = store.list_users().await.unwrap();
    assert_eq!(list[0].samples, 5);
    assert_eq!(list[0].model_id.as_deref(), Some("arcface-r100"));

    // Bad input from a caller is refused before it reaches the file.
    assert!(matches!(store.enroll("ann", &[], "arcface-r100").await, Err(StoreError::Internal(_))));
    assert!(matches!(store.enroll("ann", &[vec![1.0; 3]], "arcface-r100").await, Err(StoreError::Internal(_))));
    let mut nan = unit(9);
    nan[7] = f32::NAN;
    assert!(matches!(store.enroll("ann", &[nan], "arcface-r100").await, Err(StoreError::Internal(_))));
    assert_eq!(store.get_user("ann").await.unwrap(), Some(rec2));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_enrolments_all_count() {
    let dir = TempDir::new("concurrent");
    let store = Arc::new(SqliteStore::open(&dir.db()).unwrap());
    store.create_user("zoe").await.unwrap();

    // Ten images of one face: a common direction plus a little noise per image. (The
    // step-by-step weighted mean equals the mean of all only up to the norm of the
    // partial means, which for a real face's images is close to 1.)
    let base = unit(42);
    let images: Vec<Vec<f32>> = (0..10u64)
        .map(|i| {
            let noise = Rng(1000 + i).vector(0.05 / (EMBEDDING_DIM as f32 / 3.0).sqrt());
            mean(&[base.iter().zip(&noise).map(|(b, n)| b + n).collect()])
        })
        .collect();
    let expected = mean(&images);
    // The tolerance can tell a lost image.
    for skip in 0..images.len() {
        let others: Vec<Vec<f32>> = images.iter().enumerate().filter(|(i, _)| *i != skip).map(|(_, v)| v.clone()).collect();
        let d = max_diff(&mean(&others), &expected);
        assert!(d > 2e-4, "leaving image {skip} out moves the mean by only {d}");
    }

    let tasks: Vec<_> = images
        .iter()
        .cloned()
        .map(|image| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.enroll("zoe", &[image], "m1").await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let rec = store.get_user("zoe").await.unwrap().unwrap();
    assert_eq!(rec.samples, 10);
    let diff = max_diff(&rec.embedding, &expected);
    assert!(diff < 1e-4, "template is {diff} away from the mean of all ten images");
}

#[tokio::test(flavor = "multi_thread")]
async fn model_mismatch_is_refused_and_legacy_rows_are_adopted() {
    let dir = TempDir::new("model");
    let store = SqliteStore::open(&dir.db()).unwrap();
    store.create_user("ann").await.unwrap();
    let before = store.enroll("ann", &[unit(1), unit(2)], "old-model").await.unwrap();
    match store.enroll("ann", &[unit(3)], "new-model").await {
        Err(StoreError::ModelMismatch { username, stored, ours }) => {
            assert_eq!((username.as_str(), stored.as_str(), ours.as_str()), ("ann", "old-model", "new-model"));
        }
        other => panic!("expected ModelMismatch, got {other:?}"),
    }
    assert_eq!(store.get_user("ann").await.unwrap(), Some(before));

    // No template yet: any model may enrol, and its id is written.
    store.create_user("bea").await.unwrap();
    let bea = store.enroll("bea", &[unit(4)], "new-model").await.unwrap();
    assert_eq!((bea.model_id.as_deref(), bea.samples), (Some("new-model"), 1));
    // A model id with no template (left by hand) does not block either.
    insert_raw(&store, "cid", None, 0, Some("old-model"));
    assert_eq!(store.enroll("cid", &[unit(5)], "new-model").await.unwrap().model_id.as_deref(), Some("new-model"));

    // A legacy row: a template, no model id, no count. It is taken as ours, weighs as one
    // image, and gets our model id.
    let legacy = unit(6);
    insert_raw(&store, "dan", Some(encode_embedding(&legacy)), 0, None);
    let got = store.get_user("dan").await.unwrap().unwrap();
    assert_eq!((got.samples, got.model_id, got.embedding.clone()), (0, None, legacy.clone()));
    assert_eq!(got.updated_at, SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000));
    let new = unit(7);
    let dan = store.enroll("dan", std::slice::from_ref(&new), "new-model").await.unwrap();
    assert_eq!((dan.samples, dan.model_id.as_deref()), (2, Some("new-model")));
    assert!(max_diff(&dan.embedding, &mean(&[legacy, new])) < 1e-6);
}

#[tokio::test(flavor = "multi_thread")]
async fn load_users_skips_malformed_and_foreign_rows() {
    let dir = TempDir::new("load");
    let store = SqliteStore::open(&dir.db()).unwrap();
    store.create_user("fresh").await.unwrap();
    store.create_user("ours").await.unwrap();
    let ours = store.enroll("ours", &[unit(1)], "m1").await.unwrap();
    store.create_user("theirs").await.unwrap();
    store.enroll("theirs", &[unit(2)], "m2").await.unwrap();
    insert_raw(&store, "legacy", Some(encode_embedding(&unit(3))), 0, None);
    insert_raw(&store, "empty-blob", Some(Vec::new()), 0, None);
    insert_raw(&store, "short", Some(vec![0u8; 100]), 1, Some("m1"));
    let mut nan = unit(4);
    nan[100] = f32::NAN;
    insert_raw(&store, "nan", Some(encode_embedding(&nan)), 1, Some("m1"));
    let mut inf = unit(5);
    inf[0] = f32::INFINITY;
    insert_raw(&store, "inf", Some(encode_embedding(&inf)), 1, None);

    let loaded = store.load_users("m1").await.unwrap();
    assert_eq!((loaded.malformed, loaded.other_model), (3, 1));
    let mut names: Vec<&str> = loaded.users.iter().map(|u| u.username.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["empty-blob", "fresh", "legacy", "ours"]);
    assert_eq!(loaded.users.iter().find(|u| u.username == "ours"), Some(&ours));
    assert!(loaded.users.iter().filter(|u| u.username.contains("fresh") || u.username.contains("empty")).all(|u| u.embedding.is_empty()));

    // From the other model's side, "ours" is the foreign one.
    let loaded = store.load_users("m2").await.unwrap();
    // "short" and "nan" are m1's rows: foreign here, not judged; only the legacy "inf" row is malformed.
    assert_eq!((loaded.malformed, loaded.other_model, loaded.users.len()), (1, 3, 4));

    // A malformed row is an error for a single read, and enrolling replaces it.
    assert!(matches!(store.get_user("short").await, Err(StoreError::Internal(_))));
    let fixed = store.enroll("short", &[unit(6)], "m1").await.unwrap();
    assert_eq!(fixed.samples, 1);
    assert_eq!(store.load_users("m1").await.unwrap().malformed, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_gives_what_a_load_gives_in_batches() {
    let dir = TempDir::new("stream");
    let store = SqliteStore::open(&dir.db()).unwrap();
    let n = 2 * STREAM_BATCH + 7;
    for i in 0..n {
        insert_raw(&store, &format!("u{i}"), Some(encode_embedding(&unit(i as u64))), 1, Some(if i % 100 == 0 { "m2" } else { "m1" }));
    }
    insert_raw(&store, "short", Some(vec![0u8; 100]), 1, Some("m1"));
    let loaded = store.load_users("m1").await.unwrap();

    let (sink, batches) = std::sync::mpsc::sync_channel(1);
    let reader = std::thread::spawn(move || batches.into_iter().collect::<Vec<Vec<UserRecord>>>());
    let streamed = store.stream_users("m1", sink).await.unwrap();
    let batches = reader.join().unwrap();
    assert_eq!((streamed.malformed, streamed.other_model, streamed.users.len()), (loaded.malformed, loaded.other_model, 0));
    assert_eq!((streamed.malformed, streamed.other_model), (1, n.div_ceil(100)));
    assert_eq!(batches.len(), loaded.users.len().div_ceil(STREAM_BATCH));
    assert!(batches.iter().all(|b| b.len() <= STREAM_BATCH));
    assert_eq!(batches.into_iter().flatten().collect::<Vec<_>>(), loaded.users, "the same users in the same order");

    // A receiver that is gone stops the sending, not the load.
    let (sink, batches) = std::sync::mpsc::sync_channel(1);
    drop(batches);
    assert_eq!(store.stream_users("m1", sink).await.unwrap().malformed, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn data_survives_reopening() {
    let dir = TempDir::new("reopen");
    let (kept, listed) = {
        let store = SqliteStore::open(&dir.db()).unwrap();
        store.create_user("gone").await.unwrap();
        store.create_user("kept").await.unwrap();
        let kept = store.enroll("kept", &[unit(1), unit(2)], "m1").await.unwrap();
        store.delete_user("gone").await.unwrap();
        (kept, store.list_users().await.unwrap())
    };
    let store = SqliteStore::open(&dir.db()).unwrap();
    assert_eq!(store.get_user("kept").await.unwrap(), Some(kept.clone()));
    assert_eq!(store.get_user("gone").await.unwrap(), None);
    assert_eq!(store.list_users().await.unwrap(), listed);
    let loaded = store.load_users("m1").await.unwrap();
    assert_eq!(loaded.users, vec![kept]);
    let version: i32 = lock(&store.conn).query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let mode: String = lock(&store.conn).query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_usernames_are_plain_data() {
    let dir = TempDir::new("names");
    let store = SqliteStore::open(&dir.db()).unwrap();
    let names = [
        "'; DROP TABLE users; --",
        "Robert'); DROP TABLE users;--",
        "O'Brien",
        "\"double\" quotes",
        "Zoë 張三 🙂",
        "back\\slash %_ wild",
        " spaced ",
    ];
    for name in names {
        let rec = store.create_user(name).await.unwrap();
        assert_eq!(rec.username, name);
    }
    assert!(matches!(store.create_user("O'Brien").await, Err(StoreError::UserExists(_))));
    for name in names {
        assert_eq!(store.get_user(name).await.unwrap().unwrap().username, name);
    }
    let mut sorted = names.map(str::to_owned).to_vec();
    sorted.sort();
    let list = store.list_users().await.unwrap();
    assert_eq!(list.iter().map(|u| u.username.clone()).collect::<Vec<_>>(), sorted);

    let rec = store.enroll("'; DROP TABLE users; --", &[unit(1)], "m'; --").await.unwrap();
    assert_eq!(rec.model_id.as_deref(), Some("m'; --"));
    store.delete_user("Robert'); DROP TABLE users;--").await.unwrap();
    assert_eq!(store.list_users().await.unwrap().len(), names.len() - 1);
    assert_eq!(store.load_users("m'; --").await.unwrap().users.len(), names.len() - 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_locked_database_is_unavailable_and_changes_nothing() {
    let dir = TempDir::new("busy");
    let store = SqliteStore::open_with_busy_timeout(&dir.db(), Duration::from_millis(200)).unwrap();
    store.create_user("ann").await.unwrap();
    let before = store.enroll("ann", &[unit(1)], "m1").await.unwrap();

    // Another process holds the write lock.
    let other = Connection::open(dir.db()).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    assert!(matches!(store.create_user("bob").await, Err(StoreError::Unavailable(_))));
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert!(matches!(store.enroll("ann", &[unit(2)], "m1").await, Err(StoreError::Unavailable(_))));
    // Readers are not blocked in WAL mode.
    assert_eq!(store.get_user("ann").await.unwrap(), Some(before.clone()));
    other.execute_batch("ROLLBACK").unwrap();

    assert_eq!(store.get_user("ann").await.unwrap(), Some(before));
    store.create_user("bob").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_does_not_poison_the_store() {
    let dir = TempDir::new("panic");
    let store = SqliteStore::open(&dir.db()).unwrap();
    // Panics with a transaction open and a row written in it.
    let result = store
        .call(|conn| -> Result<(), StoreError> {
            conn.execute_batch("BEGIN IMMEDIATE; INSERT INTO users (username, samples) VALUES ('half', 0);").unwrap();
            panic!("simulated bug");
        })
        .await;
    assert!(matches!(result, Err(StoreError::Internal(_))));
    assert!(store.conn.is_poisoned());
    // The next call recovers the connection and the half-done write is rolled back.
    assert_eq!(store.get_user("half").await.unwrap(), None);
    assert!(!store.conn.is_poisoned());
    store.create_user("ann").await.unwrap();
    store.enroll("ann", &[unit(1)], "m1").await.unwrap();
}

#[test]
fn newer_schema_is_refused() {
    let dir = TempDir::new("schema");
    drop(SqliteStore::open(&dir.db()).unwrap());
    Connection::open(dir.db()).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
    match SqliteStore::open(&dir.db()) {
        Err(StoreError::Internal(m)) => assert!(m.contains("newer"), "{m}"),
        other => panic!("expected Internal, got {other:?}"),
    }
}

#[tokio::test]
async fn ping_fails_while_the_database_folder_is_replaced_by_a_file() {
    let dir = TempDir::new("ping");
    let store = SqliteStore::open(&dir.db()).unwrap();
    store.ping().await.unwrap();
    let (folder, moved) = (dir.0.join("data"), dir.0.join("data.moved"));
    std::fs::rename(&folder, &moved).unwrap();
    std::fs::write(&folder, b"not a folder").unwrap();
    assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))));
    // Another file at the same path is not the database either.
    std::fs::remove_file(&folder).unwrap();
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(moved.join("facerec.db"), dir.db()).unwrap();
    assert!(matches!(store.ping().await, Err(StoreError::Unavailable(m)) if m.contains("replaced")));
    std::fs::remove_dir_all(&folder).unwrap();
    std::fs::rename(&moved, &folder).unwrap();
    store.ping().await.unwrap();
}

#[test]
fn open_fails_cleanly_when_the_folder_cannot_be_made() {
    let dir = TempDir::new("nofolder");
    let file = dir.0.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(SqliteStore::open(&file.join("facerec.db")), Err(StoreError::Unavailable(_))));
}

/// Load time at start for many users. Release mode:
/// `FACEREC_BENCH_USERS=1000000 cargo test --release --lib store::sqlite::tests::load_many_users -- --ignored --nocapture`
/// With `FACEREC_BENCH_DB=/some/file.db` the database is kept (and reused when it exists),
/// so that a later run can load it in a fresh process after its pages left the OS cache.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: writes a large database"]
async fn load_many_users() {
    let n: usize = std::env::var("FACEREC_BENCH_USERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let temp = TempDir::new("bench");
    let db = std::env::var_os("FACEREC_BENCH_DB").map_or_else(|| temp.db(), PathBuf::from);
    if !db.exists() {
        let store = SqliteStore::open(&db).unwrap();
        let started = Instant::now();
        let blobs: Vec<Vec<u8>> = (0..1024u64).map(|i| encode_embedding(&unit(i))).collect();
        let mut conn = lock(&store.conn);
        let tx = conn.transaction().unwrap();
        {
            let mut stmt =
                tx.prepare("INSERT INTO users (username, embedding, samples, model_id, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)").unwrap();
            for i in 0..n {
                stmt.execute(params![format!("user-{i:07}"), blobs[i % blobs.len()], 3, "buffalo_l", 1_700_000_000_000i64 + i as i64])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        eprintln!("inserted {n} users in {:.2?}", started.elapsed());
    }
    let size = std::fs::metadata(&db).unwrap().len();
    for round in 0..2 {
        let started = Instant::now();
        let store = SqliteStore::open(&db).unwrap();
        let loaded = store.load_users("buffalo_l").await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!((loaded.users.len(), loaded.malformed, loaded.other_model), (n, 0, 0));
        eprintln!("round {round}: opened and loaded {n} users in {elapsed:.2?} (file {:.1} MiB)", size as f64 / 1048576.0);
    }
}
