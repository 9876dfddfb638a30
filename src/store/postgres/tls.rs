//! TLS to PostgreSQL, set as libpq sets it, so that a connection string that works with `psql`
//! works here: `sslmode` (`disable`, `allow` and `prefer` (the default; both try TLS and fall back
//! to plain text when the server has none), `require`, `verify-ca`, `verify-full`),
//! `sslrootcert` (a PEM file, or `system` for the platform's roots, which implies `verify-full`),
//! `sslcert` and `sslkey` (a client certificate), in the URL's query, in a `key=value` string or
//! in the `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY` variables. As in libpq,
//! `~/.postgresql/root.crt` is the default root file, `prefer` and `require` with a root file
//! verify the chain (`require` then reads as `verify-ca`), and without one they encrypt but
//! accept any certificate.
//!
//! tokio-postgres parses none of these but `sslmode` (and not `verify-*`): they are taken out of
//! the string here, the rest is parsed by tokio-postgres, and rustls (on ring) does the
//! handshake through `tokio-postgres-rustls`, which also gives SCRAM its channel binding.
//! The pool and the listening connections use the same connector.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as WireMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// `allow` and `prefer`: TLS when the server offers it.
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(format!("unknown sslmode '{other}': expected disable, allow, prefer, require, verify-ca or verify-full")),
        })
    }

    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A connection string made usable: tokio-postgres' settings and the TLS connector.
#[derive(Clone)]
pub struct Connection {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    /// The mode in effect, after libpq's rules (`require` with a root file is `verify-ca`).
    pub mode: SslMode,
    /// What the server's certificate is checked against, for the log.
    pub roots: Option<String>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("mode", &self.mode).field("roots", &self.roots).finish_non_exhaustive()
    }
}

impl Connection {
    /// `url` with the TLS settings of the process environment (`PGSSLMODE` and the others, and
    /// `HOME` for the default files).
    pub fn parse(url: &str) -> Result<Connection, String> {
        Connection::parse_with(url, |k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// `url` with the environment given by `env` (tests).
    pub fn parse_with(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<Connection, String> {
        let (rest, keys) = split_tls_keys(url)?;
        let get = |key: &str, var: &str| keys.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone()).or_else(|| env(var));
        let home = env("HOME").map(PathBuf::from);
        let default_file = |name: &str| home.as_ref().map(|h| h.join(".postgresql").join(name)).filter(|p| p.exists());

        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| format!("DATABASE_URL is not a usable connection string: {}", super::pg_text(&e)))?;
        let asked = get("sslmode", "PGSSLMODE").map(|m| SslMode::parse(&m)).transpose()?;
        let rootcert = get("sslrootcert", "PGSSLROOTCERT");
        let system = rootcert.as_deref() == Some("system");
        let mode = match asked {
            None if system => SslMode::VerifyFull,
            None => SslMode::Prefer,
            Some(m) if system && m != SslMode::VerifyFull => {
                return Err(format!("sslmode={} may not be used with sslrootcert=system: use sslmode=verify-full", m.name()));
            }
            Some(m) => m,
        };
        config.ssl_mode(match mode {
            SslMode::Disable => WireMode::Disable,
            SslMode::Prefer => WireMode::Prefer,
            _ => WireMode::Require,
        });

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let root_file = rootcert.filter(|r| r != "system").map(PathBuf::from).or_else(|| default_file("root.crt"));
        let (mode, verifier, roots): (SslMode, Arc<dyn ServerCertVerifier>, Option<String>) = match (mode, system, root_file) {
            (SslMode::VerifyFull, true, _) => {
                let roots = system_roots()?;
                (mode, full_verifier(roots, &provider)?, Some("the system's roots".into()))
            }
            (SslMode::Disable, _, _) | (SslMode::Prefer | SslMode::Require, _, None) => {
                (mode, Arc::new(Lenient { chain: None, algorithms }), None)
            }
            (_, _, Some(file)) => {
                let roots = file_roots(&file)?;
                let full = full_verifier(roots, &provider)?;
                let shown = Some(file.display().to_string());
                match mode {
                    SslMode::VerifyFull => (mode, full, shown),
                    // libpq checks the chain whenever a root file is there; `prefer` still
                    // falls back to plain text when the server has no TLS.
                    SslMode::Prefer => (mode, Arc::new(Lenient { chain: Some(full), algorithms }), shown),
                    _ => (SslMode::VerifyCa, Arc::new(Lenient { chain: Some(full), algorithms }), shown),
                }
            }
            (SslMode::VerifyCa | SslMode::VerifyFull, _, None) => {
                return Err(format!(
                    "sslmode={} needs the certificate authority: set sslrootcert to its PEM file (or ~/.postgresql/root.crt), or sslrootcert=system",
                    mode.name()
                ));
            }
        };

        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS settings: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let cert = get("sslcert", "PGSSLCERT").map(PathBuf::from).or_else(|| default_file("postgresql.crt"));
        let key = get("sslkey", "PGSSLKEY").map(PathBuf::from).or_else(|| default_file("postgresql.key"));
        let mut tls = match (cert, key) {
            (Some(cert), Some(key)) => {
                let chain = read_certificates(&cert, "sslcert")?;
                let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("sslkey {}: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("sslcert/sslkey: {e}"))?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => return Err("sslcert is set but sslkey is not: a client certificate needs both".into()),
            (None, Some(_)) => return Err("sslkey is set but sslcert is not: a client certificate needs both".into()),
        };
        // What libpq 17 sends; PostgreSQL 17 requires it with `sslnegotiation=direct` (which
        // tokio-postgres parses itself), older servers ignore it.
        tls.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Connection { config, tls: MakeRustlsConnect::new(tls), mode, roots })
    }

    /// One line for the start log: how the connection is protected.
    pub fn describe(&self) -> String {
        match (self.mode, &self.roots) {
            (SslMode::Disable, _) => "sslmode=disable: plain text".into(),
            (SslMode::Prefer, None) => "sslmode=prefer: TLS when the server offers it, its certificate not verified".into(),
            (SslMode::Prefer, Some(r)) => format!("sslmode=prefer: TLS when the server offers it, its chain verified against {r}"),
            (SslMode::Require, _) => "sslmode=require: TLS, the server's certificate not verified".into(),
            (m, Some(r)) => format!("sslmode={}: TLS, the server's certificate verified against {r}", m.name()),
            (m, None) => format!("sslmode={}", m.name()),
        }
    }
}

/// Whether `e` is rustls refusing the handshake (a certificate not trusted, a name mismatch).
pub fn is_handshake_refusal(e: &tokio_postgres::Error) -> bool {
    // tokio-rustls wraps rustls' error in an io::Error, whose `source` skips it.
    std::error::Error::source(e)
        .and_then(|c| c.downcast_ref::<std::io::Error>())
        .and_then(|io| io.get_ref())
        .is_some_and(|inner| inner.is::<rustls::Error>())
}

/// The TLS keys of a connection string (decoded) and the string without them.
fn split_tls_keys(url: &str) -> Result<(String, Vec<(String, String)>), String> {
    const KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];
    let mut taken = Vec::new();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((head, query)) = url.split_once('?') else { return Ok((url.to_owned(), taken)) };
        let mut kept = Vec::new();
        for part in query.split('&') {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let key = decode(k)?;
            if KEYS.contains(&key.as_str()) {
                taken.push((key, decode(v)?));
            } else if !part.is_empty() {
                // Left as written: tokio-postgres decodes it itself.
                kept.push(part);
            }
        }
        let rest = if kept.is_empty() { head.to_owned() } else { format!("{head}?{}", kept.join("&")) };
        return Ok((rest, taken));
    }
    // `key=value` pairs, values bare or in single quotes, `\` escaping (libpq's grammar).
    let mut rest = String::new();
    let mut chars = url.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else { break };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Err(format!("DATABASE_URL: '{key}' has no '=' (expected key=value pairs or a postgres:// URL)"));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut end = url.len();
        loop {
            match chars.next() {
                None if quoted => return Err(format!("DATABASE_URL: the value of '{key}' has no closing quote")),
                None => break,
                Some((_, '\\')) => value.extend(chars.next().map(|(_, c)| c)),
                Some((_, '\'')) if quoted => {
                    end = chars.peek().map_or(url.len(), |(i, _)| *i);
                    break;
                }
                Some((i, c)) if c.is_whitespace() && !quoted => {
                    end = i;
                    break;
                }
                Some((_, c)) => value.push(c),
            }
        }
        if KEYS.contains(&key.as_str()) {
            taken.push((key, value));
        } else {
            rest.push_str(&url[start..end]);
            rest.push(' ');
        }
    }
    Ok((rest.trim_end().to_owned(), taken))
}

fn decode(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s).decode_utf8().map(|c| c.into_owned()).map_err(|_| format!("DATABASE_URL: '{s}' is not UTF-8"))
}

fn read_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

fn file_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(path, "sslrootcert")? {
        roots.add(cert).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found.errors.first().map_or_else(|| "none found".to_owned(), |e| e.to_string());
        return Err(format!("sslrootcert=system: the system's certificate authorities could not be read ({why})"));
    }
    Ok(roots)
}

fn full_verifier(roots: RootCertStore, provider: &Arc<CryptoProvider>) -> Result<Arc<dyn ServerCertVerifier>, String> {
    let verifier: Arc<dyn ServerCertVerifier> = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|e| format!("sslrootcert: {e}"))?;
    Ok(verifier)
}

/// The server's certificate below `verify-full`: with `chain`, checked against the roots but
/// not against the host name (`verify-ca`, and `prefer`/`require` with a root file); without,
/// any certificate (libpq's `prefer` and `require`). The handshake's signatures are checked
/// either way.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<dyn ServerCertVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn url_keys_are_taken_out_and_the_rest_left_as_written() {
        let (rest, keys) = split_tls_keys(
            "postgres://u:p%40ss@db.example.com:6543/postgres?sslmode=verify-full&options=-c%20x%3D1&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .expect("splits");
        assert_eq!(rest, "postgres://u:p%40ss@db.example.com:6543/postgres?options=-c%20x%3D1");
        assert_eq!(keys, [("sslmode".to_owned(), "verify-full".to_owned()), ("sslrootcert".to_owned(), "/tmp/ca.pem".to_owned())]);
        let (rest, keys) = split_tls_keys("postgresql://h/db?sslmode=require").expect("splits");
        assert_eq!((rest.as_str(), keys.len()), ("postgresql://h/db", 1));
    }

    #[test]
    fn key_value_strings_are_split_with_quotes_and_escapes() {
        let (rest, keys) =
            split_tls_keys(r"host=localhost  sslmode = verify-ca password='a b\'c' sslrootcert='/tmp/my ca.pem' dbname=x").expect("splits");
        assert_eq!(rest, r"host=localhost password='a b\'c' dbname=x");
        assert_eq!(keys, [("sslmode".to_owned(), "verify-ca".to_owned()), ("sslrootcert".to_owned(), "/tmp/my ca.pem".to_owned())]);
        assert!(split_tls_keys("host=x password='open").is_err());
        assert!(split_tls_keys("host").is_err());
    }

    #[test]
    fn modes_follow_libpq() {
        let c = Connection::parse_with("postgres://u@h/db", no_env).expect("parses");
        assert_eq!((c.mode, c.config.get_ssl_mode()), (SslMode::Prefer, WireMode::Prefer));
        let c = Connection::parse_with("postgres://u@h/db?sslmode=disable", no_env).expect("parses");
        assert_eq!((c.mode, c.config.get_ssl_mode()), (SslMode::Disable, WireMode::Disable));
        let c = Connection::parse_with("postgres://u@h/db?sslmode=require", no_env).expect("parses");
        assert_eq!((c.mode, c.config.get_ssl_mode(), c.roots), (SslMode::Require, WireMode::Require, None));
        // The environment, under what the string says.
        let env = |k: &str| (k == "PGSSLMODE").then(|| "require".to_owned());
        assert_eq!(Connection::parse_with("host=h user=u", env).expect("parses").mode, SslMode::Require);
        assert_eq!(Connection::parse_with("host=h user=u sslmode=disable", env).expect("parses").mode, SslMode::Disable);
    }

    #[test]
    fn bad_tls_settings_are_refused_with_what_to_change() {
        let err = |url: &str| Connection::parse_with(url, no_env).expect_err(url);
        assert!(err("postgres://h/db?sslmode=verify-full").contains("sslrootcert"));
        assert!(err("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem").contains("/nonexistent/ca.pem"));
        assert!(err("postgres://h/db?sslmode=require&sslrootcert=system").contains("verify-full"));
        assert!(err("postgres://h/db?sslmode=always").contains("unknown sslmode"));
        assert!(err("postgres://h/db?sslcert=/tmp/c.pem").contains("sslkey"));
        let e = err("postgres://h/db?sslcrl=/tmp/x");
        assert!(e.contains("sslcrl"), "what tokio-postgres cannot do is named: {e}");
    }
}
