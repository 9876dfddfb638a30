//! A real PostgreSQL 16.2 with pgvector 0.6.2 for the tests: PyPI's `pgserver==0.1.4` ships both
//! under `pgserver/pginstall/`; the harness installs it itself into `target/pgserver-venv`
//! (once; a lock file keeps parallel test binaries from racing), runs `initdb` and `postgres` as
//! `nobody` when the tests run as root (initdb refuses root) with the data folder owned by it,
//! on a free port, and stops the server on drop (and, through `setpriv --pdeathsig`, when the
//! test thread that started it ends). `psql` from the same install runs SQL as another client
//! would. Every wait is bounded.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
use super::mongo::Facerec;
use super::{TempDir, free_port, run_bounded, tail};

pub const REQUIREMENT: &str = "pgserver==0.1.4";
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `pgserver/pginstall` of the venv (installed on first use).
pub fn pginstall() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(install).clone()
}

fn install() -> PathBuf {
    let venv = super::venv::install("pgserver", &[REQUIREMENT], |venv| pginstall_in(venv).is_some());
    pginstall_in(&venv).expect("pgserver/pginstall/bin/postgres after the install")
}

/// `site-packages/pgserver/pginstall` of a venv, when its `bin/postgres` is there.
fn pginstall_in(venv: &Path) -> Option<PathBuf> {
    let lib =
        fs::read_dir(venv.join("lib")).ok()?.filter_map(Result::ok).find(|e| e.file_name().to_string_lossy().starts_with("python"))?;
    let dir = lib.path().join("site-packages/pgserver/pginstall");
    dir.join("bin/postgres").exists().then_some(dir)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A command of the install, run as `nobody` when we are root (dying with the thread that started it).
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--pdeathsig=TERM"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL server with its own data folder; stopped on drop.
pub struct Postgres {
    child: Option<Child>,
    pub port: u16,
    pub dir: TempDir,
    log: PathBuf,
}

impl Postgres {
    /// initdb (trust authentication, user `postgres`) and start on a free port.
    pub fn start() -> Postgres {
        Postgres::start_with(&pginstall().join("bin"), &[], |_| {})
    }

    /// The server of the install at `bin`, with `settings` (`-c` pairs) and `prepare` run on the
    /// data folder after initdb (files it writes there are handed to the server's user).
    pub fn start_with(bin: &Path, settings: &[(&str, &str)], prepare: impl FnOnce(&Path)) -> Postgres {
        let dir = TempDir::new("pg");
        let data = dir.path().join("data");
        fs::create_dir_all(&data).expect("data dir");
        let chown = || {
            if is_root() {
                let st = Command::new("chown").args(["-R", "nobody:nogroup"]).arg(dir.path()).status();
                assert!(st.is_ok_and(|s| s.success()), "chown of the data folder to nobody");
            }
        };
        chown();
        let log = dir.path().join("initdb.log");
        run_bounded(
            as_server_user(&bin.join("initdb")).arg("-D").arg(&data).args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"]),
            Duration::from_secs(120),
            &log,
            "initdb",
        );
        prepare(&data);
        chown();
        let settings: Vec<String> = settings.iter().flat_map(|(k, v)| ["-c".to_owned(), format!("{k}={v}")]).collect();
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log = dir.path().join(format!("postgres-{port}.log"));
            let out = File::create(&log).expect("server log");
            let child = as_server_user(&bin.join("postgres"))
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "fsync=off"])
                .args(["-c", "max_connections=200", "-c", "shared_buffers=256MB", "-c", "maintenance_work_mem=512MB"])
                .args(&settings)
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("log handle"))
                .stderr(out)
                .spawn()
                .expect("postgres starts");
            let mut child = child;
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if child.try_wait().ok().flatten().is_some() {
                    last = tail(&log, 4000);
                    break;
                }
                if psql_at(port, "postgres", "select 1").is_ok() {
                    return Postgres { child: Some(child), port, dir, log };
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    panic!("postgres did not answer within {START_TIMEOUT:?}:\n{}", tail(&log, 4000));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !last.contains("could not bind") {
                break;
            }
        }
        panic!("postgres exited at start:\n{last}");
    }

    /// One server for the whole test binary, started on first use by a thread that lives as long
    /// as the process (so `--pdeathsig` stops the server when the binary ends, not when the test
    /// that asked first does).
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(|| super::start_for_the_binary(Postgres::start, "the shared PostgreSQL"))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of database `db` on this server.
    pub fn url_of(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A fresh database (its name: letters, digits and `_`): its URL.
    pub fn create_database(&self, db: &str) -> String {
        assert!(db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "database name {db}");
        self.psql(&format!("create database {db}"));
        self.url_of(db)
    }

    /// Runs `sql` with psql (`-At`: unaligned, tuples only), as the other service would; its stdout.
    pub fn psql_try(&self, sql: &str) -> Result<String, String> {
        psql_at(self.port, "postgres", sql)
    }

    pub fn psql(&self, sql: &str) -> String {
        self.psql_try(sql).unwrap_or_else(|e| panic!("psql {sql:.200}: {e}"))
    }

    /// Runs `sql` in database `db`.
    pub fn psql_in(&self, db: &str, sql: &str) -> String {
        psql_at(self.port, db, sql).unwrap_or_else(|e| panic!("psql -d {db} {sql:.200}: {e}"))
    }

    /// Runs a file of SQL (large inserts).
    pub fn psql_file(&self, path: &Path) -> String {
        let out = Command::new(pginstall().join("bin/psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg("-f")
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .expect("psql runs");
        assert!(out.status.success(), "psql -f {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: a fast shutdown.
            let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `sql` with psql against the server on `port`.
fn psql_at(port: u16, db: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(pginstall().join("bin/psql"))
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-p"])
        .arg(port.to_string())
        .arg("-c")
        .arg(sql)
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A vector as pgvector's text form: `[0.1,0.2,...]`.
pub fn vector_text(v: &[f32]) -> String {
    let parts: Vec<String> = v.iter().map(|x| format!("{x:e}")).collect();
    format!("[{}]", parts.join(","))
}

/// The real `facerec` binary on this PostgreSQL (`DATABASE_URL`), with `extra` variables.
pub fn facerec(dir: &Path, pg: &Postgres, extra: &[(&str, &str)]) -> Facerec {
    let url = pg.url();
    let mut vars: Vec<(&str, &str)> = vec![("DATABASE_URL", url.as_str()), ("DATABASE_OP_TIMEOUT", "2s")];
    vars.extend_from_slice(extra);
    // An empty MONGO_URI counts as unset.
    Facerec::start(dir, "", &vars)
}
