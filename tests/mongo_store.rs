//! The MongoDB store against a real MongoDB wire-protocol server (SecantusDB, installed and
//! started by the harness in `mongo_support`; never skipped): the store's contract, atomic
//! enrolment, seed documents, restarts, an outage in the middle of a run, and two replicas
//! following each other, most of it through the real `facerec` binary.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use facerec::gallery::Gallery;
use facerec::service::follow;
use facerec::store::faces::{FaceRecord, FaceRecordStore, StoredImage};
use facerec::store::mongo::{FollowMode, MongoOptions, MongoStore};
use facerec::store::{EMBEDDING_DIM, FaceStore, StoreError, weighted_template};
use serde_json::{Value, json};
use support::mongo::{Facerec, Secantus, dump_docs, insert_docs};
use support::{TempDir, wait_until};

const MODEL: &str = "w600k_mbf@test";

fn opts(follow: FollowMode) -> MongoOptions {
    MongoOptions {
        connect_timeout: Duration::from_secs(20),
        op_timeout: Duration::from_secs(2),
        follow,
        poll_interval: Duration::from_millis(100),
    }
}

async fn store(uri: &str) -> MongoStore {
    MongoStore::connect(uri, opts(FollowMode::Auto)).await.expect("connects to secantusd")
}

/// insightface's own embedding of a fixture (tests/fixtures/golden_det320.json): what the old
/// Python service stored.
fn golden(name: &str) -> Vec<f64> {
    static GOLDEN: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    let g = GOLDEN.get_or_init(|| serde_json::from_slice(&support::fixture("golden_det320.json")).expect("golden fixture parses"));
    g["images"][name]["faces"][0]["embedding"].as_array().expect("golden embedding").iter().map(|v| v.as_f64().expect("number")).collect()
}

/// A unit vector along `i`, and a pseudo-random one near `base`.
fn unit(i: usize) -> Vec<f32> {
    let mut v = vec![0.0; EMBEDDING_DIM];
    v[i % EMBEDDING_DIM] = 1.0;
    v
}

fn near(base: &[f32], seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let scale = 0.05 / (EMBEDDING_DIM as f32 / 3.0).sqrt();
    let v: Vec<f32> = base
        .iter()
        .map(|b| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            b + ((s >> 33) as f32 / (1u64 << 31) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    normalise(&v)
}

fn normalise(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    v.iter().map(|x| (f64::from(*x) / n) as f32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn doc_of<'a>(docs: &'a [Value], username: &str) -> &'a Value {
    docs.iter().find(|d| d["username"] == username).unwrap_or_else(|| panic!("no document for {username} in {docs:?}"))
}

fn int_of(v: &Value) -> Option<i64> {
    v.get("$int").and_then(Value::as_i64)
}

#[tokio::test(flavor = "multi_thread")]
async fn store_contract_on_a_real_server() {
    let uri = Secantus::shared().uri("contract");
    let store = store(&uri).await;
    assert_eq!(store.database(), "contract");

    // Create, read, list, delete.
    let ann = store.create_user("ann").await.unwrap();
    assert_eq!((ann.samples, ann.embedding.len(), ann.model_id.as_deref()), (0, 0, None));
    assert!(matches!(store.create_user("ann").await, Err(StoreError::UserExists(u)) if u == "ann"));
    assert_eq!(store.get_user("ann").await.unwrap(), Some(ann.clone()));
    assert_eq!(store.get_user("nobody").await.unwrap(), None);
    assert!(matches!(store.delete_user("nobody").await, Err(StoreError::UserNotFound(_))));
    assert!(matches!(store.enroll("nobody", &[unit(1)], MODEL).await, Err(StoreError::UserNotFound(_))));

    // Names are data, never operators or expressions.
    for name in ["$where", "a.b", "O'Brien", "Zoë 張三 🙂", "{\"$gt\": \"\"}"] {
        store.create_user(name).await.unwrap();
        assert_eq!(store.enroll(name, &[unit(2)], MODEL).await.unwrap().username, name);
    }
    let names: Vec<String> = store.list_users().await.unwrap().into_iter().map(|u| u.username).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!((names.len(), &names), (6, &sorted));

    // Enrolment: the weighted mean, the layout the old service can read.
    let first = store.enroll("ann", &[unit(3), unit(4), unit(5)], MODEL).await.unwrap();
    let (expected, n) = weighted_template(&[], 0, &[unit(3), unit(4), unit(5)]);
    assert_eq!((first.samples, n, first.model_id.as_deref()), (3, 3, Some(MODEL)));
    assert!(max_diff(&first.embedding, &expected) < 1e-6);
    let second = store.enroll("ann", &[unit(6)], MODEL).await.unwrap();
    let (expected, _) = weighted_template(&first.embedding, 3, &[unit(6)]);
    assert_eq!(second.samples, 4);
    assert!(max_diff(&second.embedding, &expected) < 1e-6);
    assert_eq!(store.get_user("ann").await.unwrap(), Some(second.clone()));
    let docs = dump_docs(&uri);
    let doc = doc_of(&docs, "ann");
    let stored = doc["embeddings"].as_array().unwrap();
    assert_eq!(stored.len(), EMBEDDING_DIM);
    assert!(stored.iter().all(Value::is_f64), "embeddings are doubles");
    assert_eq!((int_of(&doc["samples"]), doc["model_id"].as_str()), (Some(4), Some(MODEL)));
    assert!(doc["updated_at"]["$date"].as_i64().is_some(), "updated_at is a BSON date: {}", doc["updated_at"]);
    assert!(doc.get("_facerec_sum").is_none(), "no working fields left behind");

    // Bad input never reaches the server.
    assert!(matches!(store.enroll("ann", &[], MODEL).await, Err(StoreError::Internal(_))));
    assert!(matches!(store.enroll("ann", &[vec![1.0; 3]], MODEL).await, Err(StoreError::Internal(_))));

    // Another recognizer's template: refused, nothing written.
    assert!(matches!(
        store.enroll("ann", &[unit(7)], "other-model").await,
        Err(StoreError::ModelMismatch { stored, ours, .. }) if stored == MODEL && ours == "other-model"
    ));
    assert_eq!(store.get_user("ann").await.unwrap(), Some(second));

    // Seed-layout documents (the old service: no samples, no model id, ints or doubles, raw
    // means), a wrong length, a foreign model, a template-less user.
    let raw: Vec<f64> = golden("img5.jpg").iter().map(|v| v * 21.5).collect();
    let ints: Vec<i64> = golden("img12.jpg").iter().map(|v| (v * 10_000.0).round() as i64).collect();
    insert_docs(
        &uri,
        &json!([
            {"username": "legacy", "embeddings": raw},
            {"username": "legacy-ints", "embeddings": ints},
            {"username": "short", "embeddings": vec![0.5; 128]},
            {"username": "foreign", "embeddings": vec![0.1; EMBEDDING_DIM], "model_id": "buffalo_l-r50"},
            {"username": "bare"},
            {"embeddings": vec![0.1; EMBEDDING_DIM]},
        ]),
    );
    let loaded = store.load_users(MODEL).await.unwrap();
    assert_eq!((loaded.malformed, loaded.other_model), (2, 1), "short and the nameless document; foreign");
    let legacy = loaded.users.iter().find(|u| u.username == "legacy").expect("legacy loaded");
    assert_eq!((legacy.samples, legacy.model_id.as_deref()), (0, None));
    let norm = legacy.embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "normalised when read");
    let golden5: Vec<f32> = golden("img5.jpg").iter().map(|v| *v as f32).collect();
    assert!(max_diff(&legacy.embedding, &normalise(&golden5)) < 1e-6);
    assert!(loaded.users.iter().any(|u| u.username == "legacy-ints" && u.embedding.len() == EMBEDDING_DIM));
    assert!(loaded.users.iter().any(|u| u.username == "bare" && u.embedding.is_empty()));

    // A legacy template weighs as one image and is adopted by our model id; a malformed one is replaced.
    let new = near(&golden5, 1);
    let adopted = store.enroll("legacy", std::slice::from_ref(&new), MODEL).await.unwrap();
    let (expected, _) = weighted_template(&legacy.embedding, 1, std::slice::from_ref(&new));
    assert_eq!((adopted.samples, adopted.model_id.as_deref()), (2, Some(MODEL)));
    assert!(max_diff(&adopted.embedding, &expected) < 1e-6);
    assert_eq!(store.get_user("short").await.unwrap().map(|u| u.embedding.len()), Some(0), "exists, template unusable");
    assert_eq!(store.enroll("short", &[unit(9)], MODEL).await.unwrap().samples, 1);
    assert!(matches!(store.enroll("foreign", &[unit(9)], MODEL).await, Err(StoreError::ModelMismatch { .. })));

    // Deletion.
    store.delete_user("ann").await.unwrap();
    assert_eq!(store.get_user("ann").await.unwrap(), None);
    assert!(!store.list_users().await.unwrap().iter().any(|u| u.username == "ann"));
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_concurrent_enrolments_from_two_clients_all_count() {
    let uri = Secantus::shared().uri("concurrent");
    // Two clients: as two replicas would.
    let (a, b) = (Arc::new(store(&uri).await), Arc::new(store(&uri).await));
    a.create_user("zoe").await.unwrap();
    let base = unit(42);
    let old = a.enroll("zoe", &[near(&base, 100), near(&base, 101), near(&base, 102)], MODEL).await.unwrap();
    assert_eq!(old.samples, 3);

    let images: Vec<Vec<f32>> = (0..10).map(|i| near(&base, i)).collect();
    let (expected, n) = weighted_template(&old.embedding, 3, &images);
    assert_eq!(n, 13);
    // The tolerance can tell a lost image.
    for skip in 0..images.len() {
        let others: Vec<Vec<f32>> = images.iter().enumerate().filter(|(i, _)| *i != skip).map(|(_, v)| v.clone()).collect();
        let d = max_diff(&weighted_template(&old.embedding, 3, &others).0, &expected);
        assert!(d > 2e-4, "leaving image {skip} out moves the template by only {d}");
    }
    let tasks: Vec<_> = images
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, image)| {
            let s = if i % 2 == 0 { Arc::clone(&a) } else { Arc::clone(&b) };
            tokio::spawn(async move { s.enroll("zoe", &[image], MODEL).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let rec = a.get_user("zoe").await.unwrap().unwrap();
    assert_eq!(rec.samples, 13);
    let diff = max_diff(&rec.embedding, &expected);
    assert!(diff < 1e-4, "template is {diff} away from the weighted mean of all thirteen images");
}

/// The follower on a feed of store B brings store A's writes into B's gallery, and a local
/// write on B and its echo through the feed leave the gallery right.
async fn follower_scenario(db: &str, mode: FollowMode) {
    let uri = Secantus::shared().uri(db);
    let a = store(&uri).await;
    let b = MongoStore::connect(&uri, opts(mode)).await.unwrap();
    a.create_user("early").await.unwrap();
    let early = a.enroll("early", &[unit(1)], MODEL).await.unwrap();

    let loaded = b.load_users(MODEL).await.unwrap();
    let gallery = Arc::new(Gallery::from_entries(EMBEDDING_DIM, loaded.users.into_iter().map(|u| (u.username, u.embedding))));
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let held = Arc::clone(&gallery);
    let feed = b.follow(Arc::new(move || held.names())).await.unwrap().expect("a MongoDB store has a feed");
    let task = tokio::spawn(follow::users(Arc::clone(&gate), Arc::clone(&gallery), MODEL.to_owned(), feed));
    let within = |what: &'static str, f: Box<dyn Fn(&Gallery) -> bool + Send>| {
        let g = Arc::clone(&gallery);
        async move {
            let started = Instant::now();
            while !f(&g) {
                assert!(started.elapsed() < Duration::from_secs(5), "{what}: not seen within 5 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            started.elapsed()
        }
    };
    assert!(gallery.contains("early"));
    let _ = early;

    // Enrolment, new template, deletion through A.
    a.create_user("amy").await.unwrap();
    a.enroll("amy", &[unit(10)], MODEL).await.unwrap();
    let t = within("amy enrolled", Box::new(|g| g.best(&unit(10)).is_some_and(|m| m.name == "amy"))).await;
    assert!(t < Duration::from_secs(1), "took {t:?}");
    a.enroll("amy", &[unit(11), unit(11), unit(11)], MODEL).await.unwrap();
    within("amy re-enrolled", Box::new(|g| g.best(&unit(11)).is_some_and(|m| m.name == "amy"))).await;
    a.delete_user("early").await.unwrap();
    let t = within("early deleted", Box::new(|g| !g.contains("early"))).await;
    assert!(t < Duration::from_secs(1), "took {t:?}");

    // A local write on B (under the gate, as the handlers do), then its echo: the gallery
    // ends with the store's latest template.
    {
        let _w = gate.lock().await;
        let rec = b.enroll("amy", &[unit(12), unit(12), unit(12), unit(12), unit(12), unit(12)], MODEL).await.unwrap();
        gallery.upsert("amy", &rec.embedding);
    }
    // Deleted and created again under the same name by A, enrolled: the new document wins.
    a.delete_user("amy").await.unwrap();
    a.create_user("amy").await.unwrap();
    a.enroll("amy", &[unit(20)], MODEL).await.unwrap();
    within("amy re-created", Box::new(|g| g.best(&unit(20)).is_some_and(|m| m.name == "amy" && m.score > 0.999))).await;
    // Another recognizer takes over a user elsewhere: no longer compared here. Changes are
    // applied in order, so once a later write is seen, "other" has been decided.
    a.create_user("other").await.unwrap();
    a.enroll("other", &[unit(30)], "other-model").await.unwrap();
    a.create_user("marker").await.unwrap();
    a.enroll("marker", &[unit(31)], MODEL).await.unwrap();
    within("the write after other's", Box::new(|g| g.contains("marker"))).await;
    assert!(!gallery.contains("other"));
    a.delete_user("marker").await.unwrap();
    within("marker deleted", Box::new(|g| !g.contains("marker"))).await;

    // Written on B (under the gate) and deleted through A before B's feed saw its document:
    // B's gallery held it only from its own write, and must still drop it (in polling mode at
    // the next full compare, 120 polls).
    {
        let _w = gate.lock().await;
        b.create_user("zed").await.unwrap();
        let rec = b.enroll("zed", &[unit(40)], MODEL).await.unwrap();
        gallery.upsert("zed", &rec.embedding);
    }
    a.delete_user("zed").await.unwrap();
    let started = Instant::now();
    while gallery.contains("zed") {
        assert!(started.elapsed() < Duration::from_secs(30), "zed, deleted elsewhere, still compared after 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Settled: exactly the store's state.
    assert_eq!(gallery.len(), 1);
    let amy = a.get_user("amy").await.unwrap().unwrap();
    assert!(gallery.best(&amy.embedding).is_some_and(|m| m.name == "amy" && m.score > 0.9999));
    task.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn follower_applies_other_writers_changes_through_a_change_stream() {
    follower_scenario("follow_stream", FollowMode::Auto).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn follower_applies_other_writers_changes_by_polling() {
    follower_scenario("follow_poll", FollowMode::Poll).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_server_fails_the_connect_within_the_timeout() {
    let port = support::free_port();
    let started = Instant::now();
    let o = MongoOptions { connect_timeout: Duration::from_secs(1), ..opts(FollowMode::Auto) };
    match MongoStore::connect(&format!("mongodb://127.0.0.1:{port}/x"), o).await {
        Err(StoreError::Unavailable(m)) => {
            assert!(m.contains("did not answer within 1s (MONGO_CONNECT_TIMEOUT)") && !m.contains('\n'), "{m}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
}

#[test]
fn seed_documents_are_recognised_and_a_restart_keeps_everything() {
    let server = Secantus::shared();
    let uri = server.uri("dashboard");
    // What the dashboard and the old service left: raw (unnormalised) means as doubles, ints,
    // no samples, no model id; a wrong length; another recognizer's template.
    let mean: Vec<f64> = golden("img5.jpg").iter().zip(golden("img10.jpg")).map(|(a, b)| (a + b) * 11.0).collect();
    let ints: Vec<i64> = golden("img12.jpg").iter().map(|v| (v * 10_000.0).round() as i64).collect();
    insert_docs(
        &uri,
        &json!([
            {"username": "Seed Person", "embeddings": mean, "role": "staff"},
            {"username": "ints", "embeddings": ints},
            {"username": "broken", "embeddings": vec![0.25; 100]},
            {"username": "tom", "embeddings": golden("Tom_Hanks_54745.png"), "model_id": "buffalo_l-r50"},
        ]),
    );
    let dir = TempDir::new("seed");
    let f = Facerec::start(dir.path(), &uri, &[]);
    let health = f.get("/health").json();
    assert_eq!((health["store"].as_str(), health["users"].as_u64()), (Some("mongodb"), Some(2)), "{health}");
    assert_eq!((health["skipped_malformed"].as_u64(), health["skipped_other_model"].as_u64()), (Some(1), Some(1)), "{health}");
    let warnings: Vec<String> = f.stderr().lines().filter(|l| l.contains("WARN") && l.contains("'broken'")).map(str::to_owned).collect();
    assert_eq!(warnings.len(), 1, "one warning naming the malformed user: {warnings:?}");

    let (name, score) = f.recognize("img6.jpg");
    assert_eq!(name, "Seed Person", "similarity {score}");
    assert_eq!(f.recognize("img12.jpg").0, "ints");
    assert!(f.recognize("Tom_Hanks_54745.png").0.starts_with("Unknown"), "another model's template is not compared");

    // Enrolling a seed user: the document keeps its layout and the owner's fields, and gains ours.
    let r = f.enrol("Seed Person", &["img11.jpg"]);
    assert_eq!(r.status, 200, "{}", r.text());
    let docs = dump_docs(&uri);
    let seed = doc_of(&docs, "Seed Person");
    assert_eq!(seed["role"], "staff");
    assert!(seed["embeddings"].as_array().is_some_and(|a| a.len() == EMBEDDING_DIM && a.iter().all(Value::is_f64)));
    assert_eq!(int_of(&seed["samples"]), Some(2), "the legacy template weighed as one image");
    let model_id = health["model_id"].as_str().unwrap();
    assert_eq!(seed["model_id"].as_str(), Some(model_id));
    assert!(seed["updated_at"]["$date"].as_i64().is_some());
    assert_eq!(f.post_json("/users", &json!({"username": "newbie"})).status, 201);
    assert_eq!(f.enrol("newbie", &["img16.jpg", "img17.jpg"]).status, 200);
    let users_before = f.get("/users").json();
    let before: Vec<(String, f64)> = ["img6.jpg", "img12.jpg", "img17.jpg"].iter().map(|p| f.recognize(p)).collect();
    f.stop();

    // A restart loses nothing.
    let f = Facerec::start(dir.path(), &uri, &[]);
    assert_eq!(f.get("/users").json(), users_before);
    let after: Vec<(String, f64)> = ["img6.jpg", "img12.jpg", "img17.jpg"].iter().map(|p| f.recognize(p)).collect();
    // The same names, and scores within 1e-4: each start picks its inference backend anew
    // (INFERENCE_BACKEND=auto), and the two backends agree to about 1e-5, not to the bit.
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(a.0, b.0, "{after:?} vs {before:?}");
        assert!((a.1 - b.1).abs() <= 1e-4, "{after:?} vs {before:?}");
    }
    assert_eq!(after.len(), before.len());
    assert_eq!(after[2].0, "newbie");
    assert_eq!(f.get("/health").json()["users"].as_u64(), Some(3));
}

#[test]
fn an_outage_mid_run_is_survived_without_a_restart() {
    let dir = TempDir::new("outage");
    let mut server = Secantus::start(&dir.path().join("db"), false);
    let uri = server.uri("outage");
    let f = Facerec::start(dir.path(), &uri, &[]);
    assert_eq!(f.post_json("/users", &json!({"username": "ann"})).status, 201);
    assert_eq!(f.enrol("ann", &["img5.jpg"]).status, 200);
    let (name, score) = f.recognize("img6.jpg");
    assert_eq!(name, "ann");
    let before = dump_docs(&uri);

    server.stop();
    // Recognition is answered from memory, throughout.
    assert_eq!(f.recognize("img6.jpg"), (name.clone(), score));
    // Writes: 503 store_unavailable, quickly (MONGO_OP_TIMEOUT=1s), and nothing changes.
    let bounded = |what: &str, r: support::mongo::Response, started: Instant| {
        assert_eq!(r.status, 503, "{what}: {}", r.text());
        assert_eq!(r.json()["code"], "store_unavailable", "{what}");
        assert!(started.elapsed() < Duration::from_secs(5), "{what} took {:?}", started.elapsed());
    };
    let t = Instant::now();
    bounded("create", f.post_json("/users", &json!({"username": "bob"})), t);
    let t = Instant::now();
    bounded("enrol", f.enrol("ann", &["img10.jpg"]), t);
    let t = Instant::now();
    bounded("delete", f.delete("/users/ann"), t);
    assert_eq!(f.recognize("img6.jpg"), (name.clone(), score), "the gallery did not change");
    assert_eq!(f.recognize("img11.jpg").0, "ann");
    assert_eq!(f.get("/health").status, 200);

    server.restart();
    // Writes work again, with no restart of facerec.
    let back = wait_until(Duration::from_secs(30), || f.post_json("/users", &json!({"username": "bob"})).status == 201);
    assert!(back.is_some(), "writes did not come back within 30 s: {}", f.stderr());
    let after = dump_docs(&uri);
    assert_eq!(doc_of(&after, "ann"), doc_of(&before, "ann"), "nothing half-written during the outage");
    assert_eq!(after.len(), 2);
    let r = f.enrol("ann", &["img10.jpg"]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(int_of(&doc_of(&dump_docs(&uri), "ann")["samples"]), Some(2));
    assert_eq!(f.delete("/users/bob").status, 200);
    assert_eq!(f.recognize("img6.jpg").0, "ann");
}

/// Two facerec processes on one database: what one writes, the other recognises within 1 s.
fn two_replicas(server: &Secantus, db: &str, extra: &[(&str, &str)]) {
    let uri = server.uri(db);
    let (da, db_) = (TempDir::new("replica-a"), TempDir::new("replica-b"));
    let a = Facerec::start(da.path(), &uri, extra);
    let b = Facerec::start(db_.path(), &uri, extra);
    let within_1s = |what: &str, replica: &Facerec, photo: &str, want: &dyn Fn(&str) -> bool| {
        let took = wait_until(Duration::from_secs(1), || want(&replica.recognize(photo).0));
        assert!(took.is_some(), "{what}: not seen by the other replica within 1 s; its stderr:\n{}", replica.stderr());
    };

    // Enrolment through A, seen by B.
    assert_eq!(a.post_json("/users", &json!({"username": "carol"})).status, 201);
    assert!(b.recognize("img6.jpg").0.starts_with("Unknown"));
    assert_eq!(a.enrol("carol", &["img5.jpg"]).status, 200);
    within_1s("enrolment", &b, "img6.jpg", &|n| n == "carol");

    // A new user through B, enrolled through B, seen by A.
    assert_eq!(b.post_json("/users", &json!({"username": "dave"})).status, 201);
    assert!(a.get("/users").json()["users"].as_array().unwrap().iter().any(|u| u["username"] == "dave"));
    assert_eq!(b.enrol("dave", &["img16.jpg"]).status, 200);
    within_1s("new user", &a, "img17.jpg", &|n| n == "dave");

    // Concurrent enrolments through both: all count, and both galleries hold the stored template.
    let photos = ["img6.jpg", "img10.jpg", "img11.jpg", "img5.jpg", "img6.jpg", "img10.jpg"];
    std::thread::scope(|s| {
        for (i, p) in photos.iter().enumerate() {
            let replica = if i % 2 == 0 { &a } else { &b };
            s.spawn(move || assert_eq!(replica.enrol("carol", &[p]).status, 200));
        }
    });
    let docs = dump_docs(&uri);
    assert_eq!(int_of(&doc_of(&docs, "carol")["samples"]), Some(7));
    // The same name and score within 1e-4: each replica picks its inference backend at start
    // (INFERENCE_BACKEND=auto), and ONNX Runtime and OpenVINO agree to about 1e-5, not to the bit.
    let agree = || {
        let (x, y) = (a.recognize("img11.jpg"), b.recognize("img11.jpg"));
        x.0 == y.0 && (x.1 - y.1).abs() <= 1e-4
    };
    let settled = wait_until(Duration::from_secs(1), agree);
    assert!(settled.is_some(), "the replicas disagree: {:?} vs {:?}", a.recognize("img11.jpg"), b.recognize("img11.jpg"));

    // Deletion through A, seen by B.
    assert_eq!(a.delete("/users/carol").status, 200);
    within_1s("deletion", &b, "img6.jpg", &|n| n.starts_with("Unknown"));
    assert_eq!(b.get("/health").json()["users"].as_u64(), Some(1));

    // Face records of the second API: registered through A, found by B's search within 1 s;
    // deleted through B, gone from A's search within 1 s.
    face_records_follow(&a, &b);
}

/// A face record registered on one replica is found by the other's search within 1 s, and a
/// deletion on the other is gone from the first's within 1 s.
fn face_records_follow(a: &Facerec, b: &Facerec) {
    let found_within_1s = |what: &str, replica: &Facerec, photo: &str, want: &dyn Fn(&[String]) -> bool| {
        let took = wait_until(Duration::from_secs(1), || want(&replica.search(photo)));
        assert!(took.is_some(), "{what}: not seen by the other replica within 1 s; its stderr:\n{}", replica.stderr());
    };
    let before = b.search("img6.jpg");
    let id = a.register("Carol at the gate", "img5.jpg");
    assert!(!before.contains(&id));
    found_within_1s("face registration", b, "img6.jpg", &|ids| ids.first() == Some(&id));
    assert_eq!(b.delete(&format!("/api/face/{id}")).status, 200);
    found_within_1s("face deletion", a, "img6.jpg", &|ids| !ids.contains(&id));

    // Registered through A and deleted through B at once, before A's feed can have seen it:
    // A's index got it from its own write, and must still drop it.
    let id = a.register("Carol again", "img5.jpg");
    assert_eq!(b.delete(&format!("/api/face/{id}")).status, 200);
    found_within_1s("a face deleted before its registration was followed", a, "img6.jpg", &|ids| !ids.contains(&id));
}

#[test]
fn two_replicas_follow_each_other_through_a_change_stream() {
    two_replicas(Secantus::shared(), "replicas", &[]);
}

#[test]
fn two_replicas_follow_each_other_by_polling_a_standalone_server() {
    // A standalone server has no change streams: MONGO_FOLLOW=auto falls back to polling.
    let dir = TempDir::new("standalone");
    let server = Secantus::start(&dir.path().join("db"), true);
    two_replicas(&server, "replicas", &[]);
}

#[test]
fn an_unreachable_mongodb_stops_the_start_with_one_clear_line() {
    let dir = TempDir::new("unreachable");
    let dead = support::free_port();
    let started = Instant::now();
    let (mut child, stderr) =
        Facerec::spawn(dir.path(), &format!("mongodb://127.0.0.1:{dead}/x"), support::free_port(), &[("MONGO_CONNECT_TIMEOUT", "1s")], 0);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("facerec kept running without its database");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let text = support::tail(&stderr, 10_000);
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    assert!(last.starts_with("error: MONGO_URI:"), "{text}");
    assert!(last.contains(&format!("127.0.0.1:{dead} did not answer within 1s (MONGO_CONNECT_TIMEOUT)")), "{last}");
    assert_eq!(text.lines().filter(|l| l.starts_with("error")).count(), 1, "{text}");
}

// ---- The second API's face records (`faces`, `face_images`) ----

fn face_record(id: &str, name: &str, ms: u64, hot: usize) -> FaceRecord {
    FaceRecord {
        id: id.into(),
        display_name: name.into(),
        image_url: format!("/api/face/{id}/image"),
        inserted_at: std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
        face_vec: unit(hot),
        model_id: MODEL.into(),
    }
}

/// Every document of `db.faces` (without `_id`; dates as `{"$date": ms}`) and, per id, the
/// `face_images` document's content type, binary subtype and length.
fn dump_faces(uri: &str) -> (Vec<Value>, Value) {
    let script = r#"import json, sys, datetime, pymongo
d = json.load(sys.stdin)
db = pymongo.MongoClient(d['uri'], serverSelectionTimeoutMS=10000).get_default_database()
def conv(v):
    if isinstance(v, datetime.datetime): return {'$date': round(v.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)}
    if isinstance(v, list): return [conv(x) for x in v]
    return v
faces = [{k: conv(v) for k, v in x.items() if k != '_id'} for x in db.faces.find({}, sort=[('id', 1)])]
images = {x['id']: {'content_type': x['content_type'], 'is_bytes': isinstance(x['bytes'], bytes), 'len': len(x['bytes'])} for x in db.face_images.find({})}
print(json.dumps([faces, images]))
"#;
    let out = support::mongo::pymongo(script, &json!({"uri": uri}).to_string());
    let v: Value = serde_json::from_str(&out).expect("dump is JSON");
    (v[0].as_array().cloned().unwrap_or_default(), v[1].clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn face_records_contract_on_a_real_server() {
    let uri = Secantus::shared().uri("faces_contract");
    let s = store(&uri).await;
    let img = StoredImage { bytes: vec![0xff, 0xd8, 0, 1, 2, 3], content_type: "image/jpeg".into() };
    s.insert_face(&face_record("a", "Ann", 2, 0), Some(&img)).await.unwrap();
    s.insert_face(&face_record("b", "Bob", 1, 1), Some(&img)).await.unwrap();
    let mut other = face_record("c", "Cy", 3, 2);
    other.model_id = "m2".into();
    s.insert_face(&other, Some(&img)).await.unwrap();

    // An id is never overwritten: the second insert fails and changes nothing.
    let dup = StoredImage { bytes: vec![9; 4], content_type: "image/png".into() };
    assert!(matches!(s.insert_face(&face_record("a", "Dup", 4, 7), Some(&dup)).await, Err(StoreError::Internal(_))));
    assert_eq!(s.get_face("a").await.unwrap(), Some(face_record("a", "Ann", 2, 0)), "round trip, exactly");
    assert_eq!(s.get_face_image("a").await.unwrap(), Some(img.clone()));
    // A malformed vector never reaches the server.
    let mut bad = face_record("d", "Di", 5, 3);
    bad.face_vec.truncate(3);
    assert!(matches!(s.insert_face(&bad, Some(&img)).await, Err(StoreError::Internal(_))));
    assert_eq!(s.get_face("d").await.unwrap(), None);

    // The layout: the other API's fields, doubles, a BSON date; the image as binary, apart.
    let (faces, images) = dump_faces(&uri);
    assert_eq!(faces.len(), 3);
    let a = &faces[0];
    assert_eq!(
        (a["id"].as_str(), a["display_name"].as_str(), a["image_url"].as_str()),
        (Some("a"), Some("Ann"), Some("/api/face/a/image"))
    );
    assert_eq!((a["model_id"].as_str(), a["inserted_at"]["$date"].as_i64()), (Some(MODEL), Some(2)));
    let vec = a["face_vec"].as_array().unwrap();
    assert_eq!(vec.len(), EMBEDDING_DIM);
    assert!(vec.iter().all(Value::is_f64), "face_vec holds doubles");
    assert!(a.get("bytes").is_none() && a.get("image").is_none(), "no image in the record");
    assert_eq!(images["a"], json!({"content_type": "image/jpeg", "is_bytes": true, "len": 6}));

    // Listing: oldest first, with the total; loading: ours only.
    let (page, total) = s.list_faces(2, 0).await.unwrap();
    assert_eq!((total, page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>()), (3, vec!["b", "a"]));
    let (page, _) = s.list_faces(10, 2).await.unwrap();
    assert_eq!(page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["c"]);
    let loaded = s.load_faces(MODEL).await.unwrap();
    assert_eq!((loaded.faces.len(), loaded.other_model, loaded.malformed), (2, 1, 0));

    // Documents of the other API's schema (no model id, ints, an unnormalised vector), and
    // malformed ones, written by another client.
    let script = r#"import json, sys, datetime, pymongo
d = json.load(sys.stdin)
db = pymongo.MongoClient(d['uri'], serverSelectionTimeoutMS=10000).get_default_database()
db.faces.insert_many(d['docs'])
"#;
    let legacy: Vec<f64> = golden("img5.jpg").iter().map(|v| v * 3.0).collect();
    let docs = json!([
        {"id": "legacy", "display_name": "Lee", "image_url": "/api/face/legacy/image", "face_vec": legacy},
        {"id": "short", "display_name": "Sho", "face_vec": vec![0.5; 128]},
        {"display_name": "nameless", "face_vec": vec![0.1; EMBEDDING_DIM]},
    ]);
    support::mongo::pymongo(script, &json!({"uri": uri, "docs": docs}).to_string());
    let loaded = s.load_faces(MODEL).await.unwrap();
    assert_eq!((loaded.faces.len(), loaded.other_model, loaded.malformed), (3, 1, 2));
    let lee = loaded.faces.iter().find(|r| r.id == "legacy").expect("the other API's record loads");
    let golden5: Vec<f32> = golden("img5.jpg").iter().map(|v| *v as f32).collect();
    assert!(max_diff(&lee.face_vec, &normalise(&golden5)) < 1e-6, "normalised when read");
    assert_eq!(s.get_face_image("legacy").await.unwrap(), None);
    // A record whose vector is unusable is listed and shown (not searched), and can be deleted;
    // a document without an id is not a record.
    let short = s.get_face("short").await.unwrap().expect("shown");
    assert_eq!((short.display_name.as_str(), short.face_vec.len()), ("Sho", 0));
    assert_eq!(s.list_faces(100, 0).await.unwrap().1, 5);

    // Ids are data, never operators.
    for id in ["$where", "a.b", "{\"$gt\": \"\"}"] {
        assert_eq!(s.get_face(id).await.unwrap(), None);
        assert!(!s.delete_face(id).await.unwrap());
    }

    // Delete: record and image gone; a second delete finds nothing.
    assert!(s.delete_face("a").await.unwrap());
    assert!(!s.delete_face("a").await.unwrap());
    assert_eq!(s.get_face("a").await.unwrap(), None);
    assert_eq!(s.get_face_image("a").await.unwrap(), None, "the image goes with the record");
    let (_, images) = dump_faces(&uri);
    assert!(images.get("a").is_none());
    assert!(s.delete_face("short").await.unwrap());
    let (page, total) = s.list_faces(10, 0).await.unwrap();
    assert_eq!((total, page.len()), (3, 3));
}

#[tokio::test(flavor = "multi_thread")]
async fn face_record_writes_in_an_outage_are_unavailable_and_change_nothing() {
    let dir = TempDir::new("faces-outage");
    let storage = dir.path().join("db");
    let mut server = tokio::task::spawn_blocking(move || Secantus::start(&storage, false)).await.unwrap();
    let uri = server.uri("faces_outage");
    let s = store(&uri).await;
    let img = StoredImage { bytes: vec![1, 2, 3], content_type: "image/png".into() };
    s.insert_face(&face_record("kept", "Kay", 1, 0), Some(&img)).await.unwrap();

    let mut server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .unwrap();
    for (what, result) in [
        ("insert", s.insert_face(&face_record("new", "Nu", 2, 1), Some(&img)).await.map(|_| ())),
        ("delete", s.delete_face("kept").await.map(|_| ())),
        ("get", s.get_face("kept").await.map(|_| ())),
        ("image", s.get_face_image("kept").await.map(|_| ())),
        ("list", s.list_faces(10, 0).await.map(|_| ())),
        ("load", s.load_faces(MODEL).await.map(|_| ())),
    ] {
        assert!(matches!(result, Err(StoreError::Unavailable(_))), "{what}: {result:?}");
    }

    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    // The driver reconnects by itself; nothing was half-written.
    let mut listed = None;
    for _ in 0..60 {
        if let Ok(page) = s.list_faces(10, 0).await {
            listed = Some(page);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (page, total) = listed.expect("the store answers again after the restart");
    assert_eq!((total, page[0].id.as_str()), (1, "kept"));
    let (faces, images) = dump_faces(&uri);
    assert_eq!((faces.len(), images.as_object().map(|o| o.len())), (1, Some(1)), "no orphan image of the failed insert");
    s.insert_face(&face_record("new", "Nu", 2, 1), Some(&img)).await.unwrap();
    assert!(s.delete_face("kept").await.unwrap());
    drop(server);
}

/// The real binary with MONGO_URI keeps face records in MongoDB (not in a SQLite file) and
/// finds them again after a restart.
#[test]
fn the_binary_keeps_face_records_in_mongodb_across_a_restart() {
    let server = Secantus::shared();
    let uri = server.uri("faces_binary");
    let dir = TempDir::new("faces-binary");
    let boundary = "facerec-faces-boundary";
    let form = |fields: &[(&str, Option<&str>, Vec<u8>)]| {
        let mut body = Vec::new();
        for (name, file, bytes) in fields {
            let disposition = match file {
                Some(f) => format!("form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/jpeg"),
                None => format!("form-data; name=\"{name}\""),
            };
            body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").as_bytes());
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        body
    };
    let ct = format!("multipart/form-data; boundary={boundary}");
    let f = Facerec::start(dir.path(), &uri, &[]);
    let r = f.call(
        "POST",
        "/api/face/register",
        Some(&ct),
        &form(&[("displayName", None, b"Alice".to_vec()), ("image", Some("img5.jpg"), support::fixture("img5.jpg"))]),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    f.stop();
    assert!(!dir.path().join("faces.db").exists(), "no SQLite file when MONGO_URI is set");
    let (faces, images) = dump_faces(&uri);
    assert_eq!((faces.len(), faces[0]["id"].as_str(), faces[0]["display_name"].as_str()), (1, Some(id.as_str()), Some("Alice")));
    assert_eq!(images[&id]["len"].as_u64(), Some(support::fixture("img5.jpg").len() as u64));

    let f = Facerec::start(dir.path(), &uri, &[]);
    let r = f.call("POST", "/api/face/search", Some(&ct), &form(&[("image", Some("img6.jpg"), support::fixture("img6.jpg"))]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()[0]["id"].as_str(), Some(id.as_str()), "loaded from MongoDB at start: {}", r.text());
    let img = f.get(&format!("/api/face/{id}/image"));
    assert_eq!((img.status, img.body), (200, support::fixture("img5.jpg")));
    assert_eq!(f.delete(&format!("/api/face/{id}")).status, 200);
    assert_eq!(dump_faces(&uri).0.len(), 0);
}

/// A replica that was down while the other registered and deleted face records starts with the
/// store's state (not its own old one), then follows again.
#[test]
fn a_restarted_replica_loads_then_follows_face_records() {
    let uri = Secantus::shared().uri("face-restart");
    let (da, db_) = (TempDir::new("face-restart-a"), TempDir::new("face-restart-b"));
    let a = Facerec::start(da.path(), &uri, &[]);
    let b = Facerec::start(db_.path(), &uri, &[]);
    let old = a.register("Dave", "img16.jpg");
    let took = wait_until(Duration::from_secs(1), || b.search("img17.jpg").contains(&old));
    assert!(took.is_some(), "B follows A before the restart; B's stderr:\n{}", b.stderr());

    b.stop();
    assert_eq!(a.delete(&format!("/api/face/{old}")).status, 200);
    let new = a.register("Carol", "img5.jpg");
    let b = Facerec::start(db_.path(), &uri, &[]);
    assert!(!b.search("img17.jpg").contains(&old), "deleted while B was down: gone after its start");
    assert_eq!(b.search("img6.jpg").first(), Some(&new), "registered while B was down: found after its start");

    let later = a.register("Dave again", "img16.jpg");
    let took = wait_until(Duration::from_secs(1), || b.search("img17.jpg").first() == Some(&later));
    assert!(took.is_some(), "B follows A again after its restart; B's stderr:\n{}", b.stderr());
}
