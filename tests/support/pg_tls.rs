//! A real PostgreSQL that speaks TLS, for tests/postgres_tls.rs: pgserver's build has no OpenSSL,
//! so this is Debian's `postgresql-15` (`scripts/test` installs it with apt-get when missing;
//! `POSTGRES_TLS_BIN` names another install's `bin`), started by the same harness as the
//! pgserver one. It has no pgvector: the tests check connections, not the store's schema.
//!
//! Certificates are made fresh by rcgen: a test CA, a server certificate for `localhost` only
//! (so `127.0.0.1` is a name mismatch), a client certificate for the role `cert_user`, and a
//! second CA that signed nothing the server shows. `pg_hba.conf`:
//! - `postgres` over plain TCP with trust (the harness' psql, which has no TLS);
//! - `scram_user` (password `scram-pass`) over TLS only, SCRAM-SHA-256;
//! - `cert_user` over TLS only, by client certificate.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use super::TempDir;
use super::pg::Postgres;

pub const SCRAM_USER: &str = "scram_user";
pub const SCRAM_PASSWORD: &str = "scram-pass";
pub const CERT_USER: &str = "cert_user";

/// Debian's PostgreSQL 15 `bin`, or `POSTGRES_TLS_BIN`.
pub fn tls_bin() -> PathBuf {
    let bin = std::env::var_os("POSTGRES_TLS_BIN").map_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"), PathBuf::from);
    assert!(
        bin.join("postgres").exists(),
        "no PostgreSQL with TLS at {}: run the tests with scripts/test (it installs Debian's postgresql-15), \
         `apt-get install postgresql-15`, or set POSTGRES_TLS_BIN to a PostgreSQL built with OpenSSL",
        bin.display()
    );
    bin
}

/// The client's files: the CA, the other CA, the client certificate and key.
pub struct ClientFiles {
    _dir: TempDir,
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A TLS PostgreSQL and the files a client needs.
pub struct TlsPostgres {
    pub pg: Postgres,
    pub files: ClientFiles,
}

fn new_ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA certificate");
    (Issuer::new(params, key), cert.pem())
}

fn leaf(names: &[&str], common_name: &str, usage: ExtendedKeyUsagePurpose, issuer: &Issuer<'_, KeyPair>) -> (String, String) {
    let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("leaf certificate");
    (cert.pem(), key.serialize_pem())
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

impl TlsPostgres {
    pub fn start() -> TlsPostgres {
        let (ca, ca_pem) = new_ca("facerec test CA");
        let (_, other_pem) = new_ca("another CA");
        let (server_pem, server_key) = leaf(&["localhost"], "localhost", ExtendedKeyUsagePurpose::ServerAuth, &ca);
        let (client_pem, client_key) = leaf(&[], CERT_USER, ExtendedKeyUsagePurpose::ClientAuth, &ca);

        let dir = TempDir::new("pg-tls-client");
        let files = ClientFiles {
            ca: dir.path().join("ca.pem"),
            other_ca: dir.path().join("other-ca.pem"),
            client_cert: dir.path().join("client.crt"),
            client_key: dir.path().join("client.key"),
            _dir: dir,
        };
        write(&files.ca, &ca_pem);
        write(&files.other_ca, &other_pem);
        write(&files.client_cert, &client_pem);
        write(&files.client_key, &client_key);

        let settings = [("ssl", "on"), ("ssl_cert_file", "server.crt"), ("ssl_key_file", "server.key"), ("ssl_ca_file", "ca.crt")];
        let pg = Postgres::start_with(&tls_bin(), &settings, |data| {
            write(&data.join("server.crt"), &server_pem);
            write(&data.join("server.key"), &server_key);
            write(&data.join("ca.crt"), &ca_pem);
            let hba = format!(
                "host all postgres 127.0.0.1/32 trust\n\
                 hostssl all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n\
                 hostssl all {CERT_USER} 127.0.0.1/32 cert\n"
            );
            write(&data.join("pg_hba.conf"), &hba);
            use std::os::unix::fs::PermissionsExt;
            // PostgreSQL refuses a key others can read.
            fs::set_permissions(data.join("server.key"), fs::Permissions::from_mode(0o600)).expect("key mode");
        });
        pg.psql(&format!("create role {SCRAM_USER} login password '{SCRAM_PASSWORD}'; create role {CERT_USER} login"));
        TlsPostgres { pg, files }
    }

    /// `postgres://USER@HOST:PORT/postgres?QUERY`.
    pub fn url(&self, user: &str, host: &str, query: &str) -> String {
        let password = if user == SCRAM_USER { format!(":{SCRAM_PASSWORD}") } else { String::new() };
        format!("postgres://{user}{password}@{host}:{}/postgres?{query}", self.pg.port)
    }
}
