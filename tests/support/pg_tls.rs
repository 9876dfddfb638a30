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
//!
//! [`TlsTerminator`] puts TLS in front of the pgserver PostgreSQL (which has pgvector), so the
//! whole store (schema, pool, LISTEN feed, search) can run over TLS too.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

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

/// Certificates made for one run: a CA, a server certificate for `localhost` only, a client
/// certificate for `cert_user`, and another CA; and the client's files of them.
pub struct Pki {
    pub ca_pem: String,
    pub server_pem: String,
    pub server_key: String,
    pub files: ClientFiles,
}

impl Pki {
    pub fn new() -> Pki {
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
        Pki { ca_pem, server_pem, server_key, files }
    }
}

impl TlsPostgres {
    pub fn start() -> TlsPostgres {
        let Pki { ca_pem, server_pem, server_key, files } = Pki::new();
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

/// A TLS terminator in front of a PostgreSQL without TLS (pgserver's, which has pgvector), as
/// pgbouncer or Supabase's Supavisor sit in front of one: it answers the client's SSLRequest
/// with `S`, does the handshake with rustls under the run's server certificate, and relays the
/// plain protocol to the server. A client that does not ask for TLS is turned away.
pub struct TlsTerminator {
    pub port: u16,
    sessions: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl TlsTerminator {
    pub fn start(upstream: u16, pki: &Pki) -> TlsTerminator {
        let chain = CertificateDer::pem_slice_iter(pki.server_pem.as_bytes()).collect::<Result<Vec<_>, _>>().expect("server chain");
        let key = PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes()).expect("server key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (sessions, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, r) = (Arc::clone(&sessions), Arc::clone(&refused));
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, s, r) = (acceptor.clone(), Arc::clone(&s), Arc::clone(&r));
                tokio::spawn(async move {
                    if relay(client, upstream, acceptor, &s).await.is_err() {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        TlsTerminator { port, sessions, refused, _runtime: runtime }
    }

    /// Connections that went through the handshake.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }

    /// Connections turned away (no SSLRequest, or a failed handshake).
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

async fn relay(
    mut client: tokio::net::TcpStream,
    upstream: u16,
    acceptor: tokio_rustls::TlsAcceptor,
    sessions: &AtomicUsize,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut first = [0u8; 8];
    client.read_exact(&mut first).await?;
    if first != SSL_REQUEST {
        return Err(std::io::Error::other("not an SSLRequest"));
    }
    client.write_all(b"S").await?;
    let mut tls = acceptor.accept(client).await?;
    sessions.fetch_add(1, Ordering::SeqCst);
    let mut server = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
    Ok(())
}
