//! Registered images in S3-compatible storage (IMAGE_STORE=s3://bucket/prefix), against moto's
//! real S3 server (`s3_support`) and the real `facerec` binary, on each store: SQLite, PostgreSQL
//! (pgserver, `pg_support`) and MongoDB (SecantusDB, `mongo_support`). The bucket is read as
//! another client would (ListObjectsV2 and GET on moto). Never skipped: a server that cannot be
//! installed or started fails the test.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::mongo::{Facerec, Secantus};
use support::pg::Postgres;
use support::s3::Moto;
use support::{TempDir, fixture};

const BUCKET: &str = "faces";

/// The store behind the binary.
#[derive(Debug, Clone, Copy)]
enum Db {
    Sqlite,
    Postgres,
    Mongo,
}

/// Runs `$name(Db)` once per store: tests `$name::sqlite`, `$name::postgres`, `$name::mongodb`.
macro_rules! on_each_store {
    ($name:ident) => {
        mod $name {
            #[test]
            fn sqlite() {
                super::$name(super::Db::Sqlite)
            }
            #[test]
            fn postgres() {
                super::$name(super::Db::Postgres)
            }
            #[test]
            fn mongodb() {
                super::$name(super::Db::Mongo)
            }
        }
    };
}

/// A fresh database name for this test.
fn db_name(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("img_{tag}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// facerec on a fresh database of `db`, its images in `s3://faces/<prefix>` on `moto`.
fn facerec_on(db: Db, dir: &TempDir, moto: &Moto, prefix: &str, extra: &[(&str, &str)]) -> Facerec {
    let env = moto.env(&format!("s3://{BUCKET}/{prefix}"));
    let mut vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    vars.extend_from_slice(extra);
    match db {
        Db::Sqlite => Facerec::start(dir.path(), "", &vars),
        Db::Postgres => {
            let url = Postgres::shared().create_database(&db_name("pg"));
            vars.extend_from_slice(&[("DATABASE_URL", url.as_str()), ("DATABASE_OP_TIMEOUT", "10s")]);
            Facerec::start(dir.path(), "", &vars)
        }
        Db::Mongo => {
            let uri = Secantus::shared().uri(&db_name("mongo"));
            vars.push(("MONGO_OP_TIMEOUT", "10s"));
            Facerec::start(dir.path(), &uri, &vars)
        }
    }
}

fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "facerec-image-store-boundary";
    let mut body = Vec::new();
    for (name, file, bytes) in parts {
        let disposition = match file {
            Some(f) => format!("form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream"),
            None => format!("form-data; name=\"{name}\""),
        };
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// `POST /api/face/register`: (status, body as JSON).
fn register(f: &Facerec, name: &str, image: &[u8]) -> (u16, serde_json::Value) {
    let (ct, body) = multipart(&[("displayName", None, name.as_bytes()), ("image", Some("face.jpg"), image)]);
    let r = f.call("POST", "/api/face/register", Some(&ct), &body);
    (r.status, r.json())
}

/// How many records `GET /api/face` counts.
fn total(f: &Facerec) -> u64 {
    let r = f.get("/api/face?limit=1");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["total"].as_u64().expect("total")
}

on_each_store!(registered_images_live_in_the_bucket);
fn registered_images_live_in_the_bucket(db: Db) {
    let mut moto = Moto::start();
    moto.create_bucket(BUCKET);
    let dir = TempDir::new("s3-register");
    let f = facerec_on(db, &dir, &moto, "reg/v1", &[]);

    let (alice, bob) = (fixture("img5.jpg"), fixture("img16.jpg"));
    let (s, a) = register(&f, "Alice", &alice);
    assert_eq!(s, 201, "{a}");
    let (s, b) = register(&f, "Bob", &bob);
    assert_eq!(s, 201, "{b}");
    let (a, b) = (a["id"].as_str().expect("id").to_owned(), b["id"].as_str().expect("id").to_owned());
    let expected: BTreeSet<String> = [format!("reg/v1/{a}"), format!("reg/v1/{b}")].into();
    assert_eq!(moto.keys(BUCKET, "").into_iter().collect::<BTreeSet<_>>(), expected, "one object per record, under the prefix");
    assert_eq!(moto.object(BUCKET, &format!("reg/v1/{a}")).as_deref(), Some(alice.as_slice()), "the bytes as uploaded");
    assert_eq!(moto.content_type(BUCKET, &format!("reg/v1/{a}")).as_deref(), Some("image/jpeg"));

    // image_url is still ours, and serves the bucket's bytes.
    let rec = f.get(&format!("/api/face/{a}")).json();
    assert_eq!(rec["image_url"].as_str(), Some(format!("/api/face/{a}/image").as_str()));
    let r = f.get(&format!("/api/face/{a}/image"));
    assert_eq!(r.status, 200);
    assert_eq!(r.body, alice, "/api/face/{{id}}/image returns the same bytes");

    // Delete: row and object gone; the other stays.
    let r = f.delete(&format!("/api/face/{a}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(moto.keys(BUCKET, ""), [format!("reg/v1/{b}")]);
    assert_eq!(f.get(&format!("/api/face/{a}/image")).status, 404);
    assert_eq!(f.get(&format!("/api/face/{a}")).status, 404);
    assert_eq!(total(&f), 1);

    // The bucket gone away: reading an image and registering fail with a code, and no row is left.
    moto.stop();
    let r = f.get(&format!("/api/face/{b}/image"));
    assert_eq!((r.status, r.json()["code"].as_str().map(str::to_owned)), (503, Some("store_unavailable".into())), "served from the bucket");
    let (s, body) = register(&f, "Carol", &fixture("img6.jpg"));
    assert_eq!((s, body["code"].as_str()), (503, Some("store_unavailable")), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("image store")), "{body}");
    assert_eq!(total(&f), 1, "a failed upload leaves no row");
    let metrics = f.get("/metrics").text();
    assert!(metrics.contains("facerec_image_orphans_total 0"), "nothing orphaned:\n{metrics}");
    f.stop();
}

on_each_store!(a_batch_of_fifty_with_three_bad_images_stores_forty_seven_objects);
fn a_batch_of_fifty_with_three_bad_images_stores_forty_seven_objects(db: Db) {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let dir = TempDir::new("s3-batch");
    let f = facerec_on(db, &dir, &moto, "batch", &[]);
    let good = ["img5.jpg", "img6.jpg", "img10.jpg", "img11.jpg", "img12.jpg", "img16.jpg", "img17.jpg"];
    let mut grey = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(200, 200, image::Luma([128u8])))
        .write_to(&mut grey, image::ImageFormat::Png)
        .expect("png");
    let bad: [(usize, Vec<u8>, &str); 3] = [
        (3, b"not an image at all".to_vec(), "invalid_image"),
        (29, grey.into_inner(), "no_face_detected"),
        (48, fixture("img5.jpg")[..2000].to_vec(), "invalid_image"),
    ];
    let names: Vec<String> = (0..50).map(|i| format!("Person {i}")).collect();
    let images: Vec<Vec<u8>> =
        (0..50).map(|i| bad.iter().find(|b| b.0 == i).map_or_else(|| fixture(good[i % good.len()]), |b| b.1.clone())).collect();
    let mut parts: Vec<(&str, Option<&str>, &[u8])> = Vec::new();
    for i in 0..50 {
        parts.push(("displayName", None, names[i].as_bytes()));
        parts.push(("image", Some("face.jpg"), &images[i]));
    }
    let (ct, body) = multipart(&parts);
    let r = f.call("POST", "/api/face/register/batch", Some(&ct), &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!((answer["registered"].as_u64(), answer["failed"].as_u64()), (Some(47), Some(3)), "{answer}");
    let items = answer["items"].as_array().expect("items");
    let mut ids = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        match bad.iter().find(|b| b.0 == i) {
            Some((_, _, code)) => assert_eq!(item["error"]["code"].as_str(), Some(*code), "item {i}: {item}"),
            None => {
                assert_eq!(item["status"].as_u64(), Some(201), "item {i}: {item}");
                ids.insert(format!("batch/{}", item["face"]["id"].as_str().expect("id")));
            }
        }
    }
    assert_eq!(ids.len(), 47);
    assert_eq!(total(&f), 47, "47 rows");
    assert_eq!(moto.keys(BUCKET, "").into_iter().collect::<BTreeSet<_>>(), ids, "47 objects, one per stored item, none for the failed");
    for (i, item) in items.iter().enumerate().filter(|(_, it)| it["status"] == 201).take(3) {
        let key = format!("batch/{}", item["face"]["id"].as_str().expect("id"));
        assert_eq!(moto.object(BUCKET, &key).as_deref(), Some(images[i].as_slice()), "item {i}'s bytes");
    }
    f.stop();
}

/// A registration whose row the database refuses (a check the test adds): its object is taken
/// back, nothing is left in the bucket; the next registration is stored as usual.
fn a_refused_row_takes_its_object_back(f: &Facerec, moto: &Moto) {
    let (s, body) = register(f, "Blocked", &fixture("img5.jpg"));
    assert!(s >= 500, "{s} {body}");
    assert!(matches!(body["code"].as_str(), Some("internal" | "store_unavailable")), "{body}");
    assert!(moto.keys(BUCKET, "").is_empty(), "the object of the refused row was deleted");
    assert_eq!(total(f), 0);
    let (s, body) = register(f, "Fine", &fixture("img5.jpg"));
    assert_eq!(s, 201, "{body}");
    assert_eq!(moto.keys(BUCKET, ""), [format!("refused/{}", body["id"].as_str().expect("id"))]);
}

#[test]
fn a_refused_row_takes_its_object_back_on_sqlite() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let dir = TempDir::new("s3-refused-sqlite");
    let f = facerec_on(Db::Sqlite, &dir, &moto, "refused", &[]);
    let conn = rusqlite::Connection::open(dir.path().join("faces.db")).expect("the service's SQLite file");
    conn.execute_batch(
        "CREATE TRIGGER refuse_blocked BEFORE INSERT ON faces WHEN NEW.display_name = 'Blocked' \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .expect("trigger");
    drop(conn);
    a_refused_row_takes_its_object_back(&f, &moto);
    f.stop();
}

#[test]
fn a_refused_row_takes_its_object_back_on_postgres() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let pg = Postgres::start();
    let dir = TempDir::new("s3-refused-pg");
    let env = moto.env(&format!("s3://{BUCKET}/refused"));
    let vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let f = support::pg::facerec(dir.path(), &pg, &vars);
    pg.psql("alter table faces add constraint refuse_blocked check (display_name <> 'Blocked')");
    a_refused_row_takes_its_object_back(&f, &moto);
    f.stop();
}

#[test]
fn with_image_presign_the_image_url_redirects_into_the_bucket() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let dir = TempDir::new("s3-presign");
    let f = facerec_on(Db::Sqlite, &dir, &moto, "signed", &[("IMAGE_PRESIGN", "5m")]);
    let alice = fixture("img5.jpg");
    let (s, a) = register(&f, "Alice", &alice);
    assert_eq!(s, 201, "{a}");
    let id = a["id"].as_str().expect("id");

    let r = f.get(&format!("/api/face/{id}/image"));
    assert_eq!(r.status, 307, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("private, no-store"));
    let location = r.header("location").expect("Location").to_owned();
    assert!(location.starts_with(&format!("{}/{BUCKET}/signed/{id}?", moto.endpoint())), "{location}");
    for part in ["X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Expires=300", "X-Amz-Signature="] {
        assert!(location.contains(part), "{part} in {location}");
    }
    // Fetched straight from the bucket, without facerec or its credentials.
    let got = reqwest::blocking::get(&location).expect("GET the presigned URL");
    assert_eq!(got.status().as_u16(), 200);
    assert_eq!(got.bytes().expect("body").as_ref(), alice.as_slice(), "the bytes as registered");

    // A record deleted: no redirect, 404.
    assert_eq!(f.delete(&format!("/api/face/{id}")).status, 200);
    let r = f.get(&format!("/api/face/{id}/image"));
    assert_eq!((r.status, r.header("location")), (404, None));
    f.stop();
}

/// The binary with `vars` exits at start; its stderr.
fn start_fails(dir: &TempDir, vars: &[(&str, &str)]) -> String {
    let port = support::free_port();
    let (mut child, stderr) = Facerec::spawn(dir.path(), "", port, vars, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("facerec still running: {}", support::tail(&stderr, 4000));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    support::tail(&stderr, 8000)
}

#[test]
fn a_missing_bucket_or_a_bad_setting_stops_the_start_with_a_clear_error() {
    let moto = Moto::start();
    let dir = TempDir::new("s3-start");
    let env = moto.env("s3://no-such-bucket/reg");
    let vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let err = start_fails(&dir, &vars);
    assert!(err.contains("IMAGE_STORE s3://no-such-bucket/reg") && err.contains("is the bucket there"), "{err}");

    let mut vars = vars.clone();
    vars[0] = ("IMAGE_STORE", "gs://faces/reg");
    let err = start_fails(&dir, &vars);
    assert!(err.contains("IMAGE_STORE 'gs://faces/reg'") && err.contains("expected s3://BUCKET/PREFIX"), "{err}");

    // Nothing listens there.
    let port = support::free_port().to_string();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    vars[0] = ("IMAGE_STORE", "s3://faces/reg");
    vars[2] = ("AWS_ENDPOINT_URL", endpoint.as_str());
    let err = start_fails(&dir, &vars);
    assert!(err.contains("IMAGE_STORE s3://faces/reg"), "{err}");

    // Presigned URLs need an S3 store, and last 7 days at most.
    let err = start_fails(&dir, &[("IMAGE_PRESIGN", "5m")]);
    assert!(err.contains("IMAGE_PRESIGN is set but IMAGE_STORE is not"), "{err}");
    let folder = format!("file://{}", dir.path().join("images").display());
    let err = start_fails(&dir, &[("IMAGE_STORE", folder.as_str()), ("IMAGE_PRESIGN", "5m")]);
    assert!(err.contains("IMAGE_PRESIGN needs an S3 image store"), "{err}");
    let mut vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    vars.push(("IMAGE_PRESIGN", "8d"));
    let err = start_fails(&dir, &vars);
    assert!(err.contains("IMAGE_PRESIGN is over 7 days"), "{err}");
}
