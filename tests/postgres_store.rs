//! The PostgreSQL store against a real PostgreSQL 16 with pgvector (PyPI's pgserver, installed
//! and started by `pg_support`; never skipped): the store's contract, atomic enrolment, rows the
//! other service writes with plain SQL, `match_faces` on facerec's rows, search in the database,
//! and two replicas following each other through LISTEN/NOTIFY.

mod mongo_support;
mod pg_support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use facerec::store::faces::{FaceRecord, FaceRecordStore, StoredImage};
use facerec::store::postgres::{Migrate, PgOptions, PgStore};
use facerec::store::{EMBEDDING_DIM, FaceStore, StoreError, StoreKind, weighted_template};
use pg_support::{Facerec, Postgres, TempDir, facerec, fixture, vector_text, wait_until};
use serde_json::{Value, json};

const MODEL: &str = "w600k_mbf@test";

fn opts() -> PgOptions {
    PgOptions { connect_timeout: Duration::from_secs(20), op_timeout: Duration::from_secs(3), migrate: Migrate::Auto, ef_search: 100 }
}

fn unit(i: usize) -> Vec<f32> {
    let mut v = vec![0.0; EMBEDDING_DIM];
    v[i % EMBEDDING_DIM] = 1.0;
    v
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime")
}

/// insightface's own embedding of a fixture (tests/fixtures/golden_det320.json).
fn golden(name: &str) -> Vec<f32> {
    let g: Value = serde_json::from_slice(&fixture("golden_det320.json")).expect("golden fixture parses");
    g["images"][name]["faces"][0]["embedding"]
        .as_array()
        .expect("golden embedding")
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect()
}

fn record(id: &str, v: Vec<f32>) -> FaceRecord {
    FaceRecord {
        id: id.into(),
        display_name: format!("name {id}"),
        image_url: format!("/api/face/{id}/image"),
        inserted_at: SystemTime::now(),
        face_vec: v,
        model_id: MODEL.into(),
    }
}

#[test]
fn the_store_contract_holds_and_ten_concurrent_enrolments_all_count() {
    let pg = Postgres::start();
    rt().block_on(async {
        let store = Arc::new(PgStore::connect(&pg.url(), opts()).await.expect("connects"));
        // The schema is idempotent: a second start (another replica) finds it and changes nothing.
        let again = PgStore::connect(&pg.url(), opts()).await.expect("connects again");
        assert_eq!(store.kind(), StoreKind::Postgres);
        assert_eq!(pg.psql("select count(*) from pg_indexes where tablename = 'faces' and indexdef ilike '%hnsw%'").trim(), "1");

        store.create_user("bob").await.expect("created");
        store.create_user("Ann").await.expect("created");
        assert!(matches!(store.create_user("bob").await, Err(StoreError::UserExists(_))));
        assert!(matches!(store.enroll("nobody", &[unit(0)], MODEL).await, Err(StoreError::UserNotFound(_))));
        let names: Vec<String> = store.list_users().await.unwrap().into_iter().map(|u| u.username).collect();
        assert_eq!(names, ["Ann", "bob"], "byte order, as the other stores list");

        // Ten concurrent enrolments through two stores (two replicas' pools): all count.
        let mut tasks = Vec::new();
        for i in 0..10 {
            let s: Arc<dyn FaceStore> =
                if i % 2 == 0 { store.clone() } else { Arc::new(PgStore::connect(&pg.url(), opts()).await.unwrap()) };
            tasks.push(tokio::spawn(async move { s.enroll("bob", &[unit(i)], MODEL).await }));
        }
        for t in tasks {
            t.await.expect("joined").expect("enrolled");
        }
        let bob = store.get_user("bob").await.unwrap().expect("bob");
        assert_eq!(bob.samples, 10);
        // Every image is in the template (the weighted mean of whichever order the locks gave).
        assert!(bob.embedding[..10].iter().all(|&v| v > 0.05), "{:?}", &bob.embedding[..10]);
        let norm: f32 = bob.embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let (two, n) = weighted_template(&unit(0), 1, &[unit(1)]);
        assert_eq!(n, 2);
        assert!((two[0] - two[1]).abs() < 1e-6);
        drop(again);

        // A seed row as the original service wrote it (no samples, no model, raw mean): loaded,
        // normalised, weighed as one image.
        let raw: Vec<f32> = unit(3).iter().map(|v| v * 7.0).collect();
        pg.psql(&format!(
            "insert into users (username, embeddings) values ('seed', '{}')",
            vector_text(&raw).replace('[', "{").replace(']', "}")
        ));
        let loaded = store.load_users(MODEL).await.unwrap();
        let seed = loaded.users.iter().find(|u| u.username == "seed").expect("seed loaded");
        assert_eq!((seed.embedding[3], seed.model_id.clone()), (1.0, None));
        let seed = store.enroll("seed", &[unit(4)], MODEL).await.unwrap();
        assert_eq!(seed.samples, 2);
        assert!((seed.embedding[3] - seed.embedding[4]).abs() < 1e-6);

        // Another recognizer's template is refused and left unchanged.
        pg.psql("update users set model_id = 'other@1' where username = 'seed'");
        assert!(matches!(store.enroll("seed", &[unit(5)], MODEL).await, Err(StoreError::ModelMismatch { .. })));
        assert_eq!(store.load_users(MODEL).await.unwrap().other_model, 1);
        store.delete_user("seed").await.unwrap();
        assert!(matches!(store.delete_user("seed").await, Err(StoreError::UserNotFound(_))));
        store.ping().await.expect("ping");

        // Face records: record and image together, listed oldest first, deleted together.
        let id = uuid::Uuid::new_v4().to_string();
        let image = StoredImage { bytes: fixture("img5.jpg"), content_type: "image/jpeg".into() };
        store.insert_face(&record(&id, unit(7)), &image).await.expect("inserted");
        assert!(store.insert_face(&record(&id, unit(7)), &image).await.is_err(), "the id is taken");
        assert_eq!(store.get_face(&id).await.unwrap().expect("found").face_vec, unit(7));
        assert_eq!(store.get_face_image(&id).await.unwrap().expect("image"), image);
        assert_eq!(store.get_face("not-a-uuid").await.unwrap(), None);
        let (page, total) = store.list_faces(10, 0).await.unwrap();
        assert_eq!((page.len(), total), (1, 1));
        let hits = store.search_faces(&unit(7), 5, 0.5, MODEL).await.unwrap();
        assert_eq!(hits.iter().map(|h| h.id.clone()).collect::<Vec<_>>(), [id.clone()]);
        assert!((hits[0].score - 1.0).abs() < 1e-5);
        assert!(store.search_faces(&unit(7), 5, 0.5, "other@1").await.unwrap().is_empty(), "another recognizer's records are not matched");
        assert!(store.delete_face(&id).await.unwrap());
        assert!(!store.delete_face(&id).await.unwrap());
        assert_eq!(pg.psql("select count(*) from face_images").trim(), "0");
    });
}

/// A multipart body of text fields and one image.
fn form(texts: &[(&str, &str)], image: &[u8]) -> (String, Vec<u8>) {
    let boundary = "facerec-pg-test-boundary";
    let mut body = Vec::new();
    for (name, value) in texts {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes());
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(image);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// `/api/face/search` of a fixture: (id, score) of every hit, closest first.
fn search(f: &Facerec, photo: &str) -> Vec<(String, f64)> {
    let (ct, body) = form(&[("topK", "10"), ("threshold", "0.9")], &fixture(photo));
    let r = f.call("POST", "/api/face/search", Some(&ct), &body);
    assert_eq!(r.status, 200, "search: {}", r.text());
    r.json().as_array().expect("a list").iter().map(|h| (h["id"].as_str().unwrap().to_owned(), h["score"].as_f64().unwrap())).collect()
}

fn encode(f: &Facerec, photo: &str) -> Vec<f32> {
    let (ct, body) = form(&[], &fixture(photo));
    let r = f.call("POST", "/api/face/encode", Some(&ct), &body);
    assert_eq!(r.status, 200, "encode: {}", r.text());
    r.json()["embedding"].as_array().expect("embedding").iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

#[test]
fn rows_of_the_other_service_are_served_and_ours_are_matched_by_match_faces() {
    let pg = Postgres::start();
    for gallery in ["memory", "database"] {
        let dir = TempDir::new(gallery);
        let f = facerec(dir.path(), &pg, &[("GALLERY", gallery)]);
        assert_eq!(f.get("/health").json()["store"], "postgres");
        // A row exactly as the other service writes it: no model id, its storage's image URL.
        let theirs = pg.psql(&format!(
            "insert into faces (display_name, image_url, face_vec) values ('Their {gallery}', 'https://bucket.example/{gallery}.jpg', '{}') returning id",
            vector_text(&golden("img5.jpg"))
        ));
        let theirs = theirs.trim().to_owned();
        // The memory index learns of it through the feed; the database search sees it at once.
        let found = wait_until(Duration::from_secs(2), || search(&f, "img6.jpg").iter().any(|(id, _)| *id == theirs));
        assert!(found.is_some(), "GALLERY={gallery}: the other service's row was not found; stderr:\n{}", f.stderr());
        let shown = f.get(&format!("/api/face/{theirs}")).json();
        assert_eq!(
            (shown["display_name"].as_str(), shown["image_url"].as_str()),
            (Some(format!("Their {gallery}").as_str()), Some(format!("https://bucket.example/{gallery}.jpg").as_str()))
        );

        // Ours, read by the other service's function with the same score.
        let id = f.register(&format!("Ours {gallery}"), "img10.jpg");
        let ours = search(&f, "img11.jpg").into_iter().find(|(i, _)| *i == id).expect("our record is found");
        let query = vector_text(&encode(&f, "img11.jpg"));
        let theirs_score = pg.psql(&format!("select score from match_faces('{query}'::vector, 10, 0.9) where id = '{id}'"));
        let theirs_score: f64 = theirs_score.trim().parse().unwrap_or_else(|_| panic!("match_faces did not return {id}: {theirs_score:?}"));
        assert!((ours.1 - theirs_score).abs() < 1e-4, "GALLERY={gallery}: facerec {} vs match_faces {theirs_score}", ours.1);
        assert_eq!(pg.psql(&format!("select model_id is not null from faces where id = '{id}'")).trim(), "t");
        f.stop();
    }
}

#[test]
fn two_replicas_see_each_other_within_one_second() {
    let pg = Postgres::start();
    let (da, db) = (TempDir::new("replica-a"), TempDir::new("replica-b"));
    let a = facerec(da.path(), &pg, &[("GALLERY", "memory")]);
    let b = facerec(db.path(), &pg, &[("GALLERY", "memory")]);

    // A face registered through A is found through B within 1 s; deleted through B, gone from A.
    let id = a.register("Carol at the gate", "img5.jpg");
    let took = wait_until(Duration::from_secs(1), || search(&b, "img6.jpg").iter().any(|(i, _)| *i == id));
    assert!(took.is_some(), "registration not seen by B within 1 s; its stderr:\n{}", b.stderr());
    assert_eq!(b.delete(&format!("/api/face/{id}")).status, 200);
    let took = wait_until(Duration::from_secs(1), || !search(&a, "img6.jpg").iter().any(|(i, _)| *i == id));
    assert!(took.is_some(), "deletion not seen by A within 1 s; its stderr:\n{}", a.stderr());

    // A user enrolled through A is recognised by B within 1 s.
    assert_eq!(a.post_json("/users", &json!({"username": "carol"})).status, 201);
    assert!(b.recognize("img6.jpg").0.starts_with("Unknown"));
    assert_eq!(a.enrol("carol", &["img5.jpg"]).status, 200);
    let took = wait_until(Duration::from_secs(1), || b.recognize("img6.jpg").0 == "carol");
    assert!(took.is_some(), "enrolment not seen by B within 1 s; its stderr:\n{}", b.stderr());
    // Concurrent enrolments through both replicas all count.
    std::thread::scope(|s| {
        for (i, p) in ["img6.jpg", "img10.jpg", "img11.jpg", "img5.jpg"].iter().enumerate() {
            let replica = if i % 2 == 0 { &a } else { &b };
            s.spawn(move || assert_eq!(replica.enrol("carol", &[p]).status, 200));
        }
    });
    assert_eq!(pg.psql("select samples from users where username = 'carol'").trim(), "5");
    assert_eq!(a.delete("/users/carol").status, 200);
    let took = wait_until(Duration::from_secs(1), || b.recognize("img6.jpg").0.starts_with("Unknown"));
    assert!(took.is_some(), "deletion of a user not seen by B within 1 s");
}
