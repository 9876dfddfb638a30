//! TLS to PostgreSQL, against a real PostgreSQL that speaks it (Debian's postgresql-15, see
//! tests/support/pg_tls.rs; never skipped) and the TLS-less pgserver one: each sslmode does what
//! libpq does with it, the certificate is checked as asked (chain, name), SCRAM binds to the TLS
//! channel, a client certificate logs in, and the store's pool uses the same settings.
//! The server reports the connection's TLS itself (`pg_stat_ssl`). And the whole store over TLS:
//! two replicas of the real binary on pgserver's PostgreSQL (pgvector) behind a TLS terminator.

mod support;

use std::time::Duration;

use facerec::store::StoreError;
use facerec::store::postgres::tls::{Connection, SslMode};
use facerec::store::postgres::{Migrate, PgOptions, PgStore};
use support::mongo::Facerec;
use support::pg::Postgres;
use support::pg_tls::{CERT_USER, Pki, SCRAM_USER, TlsPostgres, TlsTerminator};
use support::{TempDir, wait_until};

fn server() -> &'static TlsPostgres {
    static SERVER: std::sync::OnceLock<TlsPostgres> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| support::start_for_the_binary(TlsPostgres::start, "the TLS PostgreSQL"))
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// Connects with `url` (no PG* variables, no home folder) and asks the server about the
/// connection: whether it is TLS, and its protocol version.
async fn session(url: &str) -> Result<(SslMode, bool, String), String> {
    let conn = Connection::parse_with(url, |_| None)?;
    let mode = conn.mode;
    let (client, connection) = tokio::time::timeout(Duration::from_secs(15), conn.config.connect(conn.tls))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| chain(&e))?;
    tokio::spawn(connection);
    let row = client
        .query_one("select ssl, coalesce(version, '') from pg_stat_ssl where pid = pg_backend_pid()", &[])
        .await
        .map_err(|e| chain(&e))?;
    Ok((mode, row.get(0), row.get(1)))
}

#[tokio::test]
async fn verify_full_checks_the_chain_and_the_name() {
    let s = server();
    let ca = s.files.ca.display().to_string();
    let (mode, ssl, version) =
        session(&s.url(SCRAM_USER, "localhost", &format!("sslmode=verify-full&sslrootcert={ca}"))).await.expect("verify-full");
    assert_eq!((mode, ssl), (SslMode::VerifyFull, true));
    assert!(version.starts_with("TLSv1."), "{version}");

    // The certificate names localhost, not 127.0.0.1.
    let e = session(&s.url(SCRAM_USER, "127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}"))).await.expect_err("a name mismatch");
    eprintln!("refused as expected: {e}");
    assert!(e.contains("not valid for name"), "{e}");
    // Signed by another CA than the one trusted.
    let other = s.files.other_ca.display().to_string();
    let e =
        session(&s.url(SCRAM_USER, "localhost", &format!("sslmode=verify-full&sslrootcert={other}"))).await.expect_err("an unknown issuer");
    eprintln!("refused as expected: {e}");
    assert!(e.contains("UnknownIssuer"), "{e}");
}

#[tokio::test]
async fn verify_ca_and_require_or_prefer_with_a_root_file_check_the_chain_only() {
    let s = server();
    let ca = s.files.ca.display().to_string();
    for (mode, effective_mode) in [("verify-ca", SslMode::VerifyCa), ("require", SslMode::VerifyCa), ("prefer", SslMode::Prefer)] {
        let (effective, ssl, _) = session(&s.url(SCRAM_USER, "127.0.0.1", &format!("sslmode={mode}&sslrootcert={ca}"))).await.expect(mode);
        assert_eq!((effective, ssl), (effective_mode, true), "{mode} with a root file: the chain, not the name");
        let other = s.files.other_ca.display().to_string();
        let e = session(&s.url(SCRAM_USER, "127.0.0.1", &format!("sslmode={mode}&sslrootcert={other}"))).await.expect_err("wrong CA");
        eprintln!("refused as expected: {e}");
        assert!(e.contains("UnknownIssuer"), "{mode}: {e}");
    }
}

#[tokio::test]
async fn prefer_and_require_encrypt_and_disable_does_not() {
    let s = server();
    for (query, mode) in [("sslmode=require", SslMode::Require), ("sslmode=prefer", SslMode::Prefer), ("", SslMode::Prefer)] {
        let (effective, ssl, _) = session(&s.url(SCRAM_USER, "127.0.0.1", query)).await.expect(query);
        assert_eq!((effective, ssl), (mode, true), "'{query}': TLS, the certificate not checked");
    }
    // The server takes scram_user over TLS only: in plain text it has no entry for it.
    let e = session(&s.url(SCRAM_USER, "127.0.0.1", "sslmode=disable")).await.expect_err("plain text refused");
    eprintln!("refused as expected: {e}");
    assert!(e.contains("no encryption"), "{e}");
}

#[tokio::test]
async fn scram_binds_to_the_tls_channel() {
    let s = server();
    let ca = s.files.ca.display().to_string();
    let url = s.url(SCRAM_USER, "localhost", &format!("sslmode=verify-full&sslrootcert={ca}&channel_binding=require"));
    assert!(session(&url).await.expect("SCRAM-SHA-256-PLUS").1);
}

#[tokio::test]
async fn a_client_certificate_logs_in() {
    let s = server();
    let f = &s.files;
    let url = s.url(
        CERT_USER,
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            f.ca.display(),
            f.client_cert.display(),
            f.client_key.display()
        ),
    );
    assert!(session(&url).await.expect("certificate login").1);
    let e = session(&s.url(CERT_USER, "localhost", &format!("sslmode=verify-full&sslrootcert={}", f.ca.display())))
        .await
        .expect_err("no certificate, no login");
    eprintln!("refused as expected: {e}");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}

#[tokio::test]
async fn a_server_without_tls_is_used_in_plain_text_unless_tls_is_required() {
    let pg = Postgres::shared();
    let (mode, ssl, _) = session(&pg.url()).await.expect("prefer falls back");
    assert_eq!((mode, ssl), (SslMode::Prefer, false));
    let e = session(&format!("{}?sslmode=require", pg.url())).await.expect_err("require refuses plain text");
    eprintln!("refused as expected: {e}");
    assert!(e.contains("TLS"), "{e}");
}

#[tokio::test]
async fn the_store_pool_uses_the_tls_settings() {
    let s = server();
    let opts = PgOptions {
        connect_timeout: Duration::from_secs(2),
        op_timeout: Duration::from_secs(2),
        migrate: Migrate::Off,
        ..PgOptions::default()
    };
    let other = s.files.other_ca.display().to_string();
    let url = s.url(SCRAM_USER, "localhost", &format!("sslmode=verify-full&sslrootcert={other}"));
    match PgStore::connect(&url, opts.clone()).await {
        Err(StoreError::Unavailable(m)) => {
            eprintln!("refused as expected: {m}");
            assert!(m.contains("UnknownIssuer") && m.contains("sslrootcert"), "{m}");
            assert!(!m.contains("did not answer"), "refused at once, not waited out: {m}");
        }
        other => panic!("a certificate from an untrusted CA: {other:?}"),
    }
    // With the right CA it gets in, and finds no facerec schema in this database.
    let url = s.url(SCRAM_USER, "localhost", &format!("sslmode=verify-full&sslrootcert={}", s.files.ca.display()));
    match PgStore::connect(&url, opts).await {
        Err(StoreError::Unavailable(m)) => {
            eprintln!("refused as expected: {m}");
            assert!(m.contains("schema is incomplete"), "{m}");
        }
        other => panic!("connected, no schema: {other:?}"),
    }
    // Settings facerec cannot honour are refused before any connection.
    match PgStore::connect(&s.url(SCRAM_USER, "localhost", "sslmode=verify-full"), PgOptions::default()).await {
        Err(StoreError::Internal(m)) => assert!(m.contains("sslrootcert"), "{m}"),
        other => panic!("verify-full with no CA: {other:?}"),
    }
}

#[test]
fn two_replicas_over_tls_see_each_other_within_one_second() {
    let pg = Postgres::shared();
    pg.create_database("tls_replicas");
    let pki = Pki::new();
    let terminator = TlsTerminator::start(pg.port, &pki);
    // The replicas know the terminator only, and must verify it.
    let url = format!(
        "postgres://postgres@localhost:{}/tls_replicas?sslmode=verify-full&sslrootcert={}",
        terminator.port,
        pki.files.ca.display()
    );
    let vars = [("DATABASE_URL", url.as_str()), ("DATABASE_OP_TIMEOUT", "5s"), ("GALLERY", "memory")];
    let (da, db) = (TempDir::new("tls-replica-a"), TempDir::new("tls-replica-b"));
    let a = Facerec::start(da.path(), "", &vars);
    let b = Facerec::start(db.path(), "", &vars);
    assert_eq!(a.get("/health").json()["store"], "postgres");

    // Registered through A (schema, pool and NOTIFY over TLS), found through B (its LISTEN
    // connection over TLS) within 1 s; deleted through B, gone from A.
    let id = a.register("Carol over TLS", "img5.jpg");
    let took = wait_until(Duration::from_secs(1), || b.search("img6.jpg").contains(&id));
    assert!(took.is_some(), "registration not seen by B within 1 s; its stderr:\n{}", b.stderr());
    assert_eq!(b.delete(&format!("/api/face/{id}")).status, 200);
    let took = wait_until(Duration::from_secs(1), || !a.search("img6.jpg").contains(&id));
    assert!(took.is_some(), "deletion not seen by A within 1 s; its stderr:\n{}", a.stderr());

    // Each replica: at least one pooled connection and one listening connection per channel.
    eprintln!("TLS sessions through the terminator: {}", terminator.sessions());
    assert!(terminator.sessions() >= 6, "{} TLS sessions", terminator.sessions());
    assert_eq!(terminator.refused(), 0, "every connection asked for TLS and verified the terminator");
    assert!(a.stderr().contains("sslmode=verify-full: TLS, the server's certificate verified against"), "the start log says so");
    a.stop();
    b.stop();
}
