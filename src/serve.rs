//! `facerec serve`: wires the runtime, engine, store, gallery and audit writer together,
//! then serves HTTP until SIGINT/SIGTERM, finishing in-flight requests and the audit queue.
//! Connections and their limits: [`conn`].

pub mod conn;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use crate::api::{self, AppState};
use crate::audit::{AuditConfig, AuditHandle};
use crate::config::ServeConfig;
use crate::engine::{Engine, EngineConfig};
use crate::face::pack;
use crate::fetch;
use crate::runtime::Runtime;
use crate::service::{Service, ServiceOptions};
use crate::store::FaceStore;
use crate::store::faces::FaceRecordStore;
use crate::store::mongo::MongoStore;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;

/// Everything built at start, before listening.
pub struct Assembled {
    pub state: Arc<AppState>,
    pub max_body_bytes: usize,
}

/// Loads models, store and gallery. Errors say what to fix.
pub async fn build(cfg: &ServeConfig) -> anyhow::Result<Assembled> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    // MongoDB first: an unreachable database stops the start before the models are loaded.
    let mongo = match cfg.mongo() {
        Some(uri) => Some(Arc::new(MongoStore::connect(uri, cfg.mongo_options()).await.context("MONGO_URI")?)),
        None => None,
    };
    let postgres = match cfg.postgres() {
        Some(url) => Some(Arc::new(PgStore::connect(url, cfg.pg_options()).await.context("DATABASE_URL")?)),
        None => None,
    };
    let images = cfg.images.open().await.map_err(anyhow::Error::msg)?;
    let models = cfg.models.clone();
    let workers = usize::from(cfg.workers);
    let (runtime, files) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let runtime = Runtime::init(&models.runtime_options(workers))?;
        let pack_dir = fetch::ensure_pack(&models.model_cache_dir, &models.model_pack)?;
        Ok((runtime, pack::resolve(&pack_dir)?))
    })
    .await??;
    let runtime = Arc::new(runtime);
    private_files();
    let engine_cfg = EngineConfig {
        workers: usize::from(cfg.workers),
        queue: cfg.queue_size as usize,
        batch_size: usize::from(cfg.batch_size),
        batch_wait: std::time::Duration::from_micros(u64::from(cfg.batch_wait_us)),
        analyzer: cfg.analyzer_options(),
        limits: cfg.image_limits(),
        timeout: cfg.inference_timeout,
        ..EngineConfig::default()
    };
    let engine = {
        let runtime = Arc::clone(&runtime);
        tokio::task::spawn_blocking(move || Engine::start(runtime, files, engine_cfg)).await??
    };
    let info = engine.info().clone();

    // One store for users and face records: MongoDB when MONGO_URI is set, PostgreSQL when
    // DATABASE_URL is, else SQLite.
    let (store, faces): (Arc<dyn FaceStore>, Arc<dyn FaceRecordStore>) = match (mongo, postgres) {
        (Some(m), _) => (Arc::clone(&m) as Arc<dyn FaceStore>, m),
        (None, Some(p)) => (Arc::clone(&p) as Arc<dyn FaceStore>, p),
        (None, None) => {
            let sqlite = Arc::new(
                SqliteStore::open(&cfg.database_path)
                    .with_context(|| format!("opening the embedded store at {}", cfg.database_path.display()))?,
            );
            (Arc::clone(&sqlite) as Arc<dyn FaceStore>, sqlite)
        }
    };
    let auth = Arc::new(cfg.auth_config());
    if auth.is_open() {
        tracing::warn!("no JWT_SECRET_KEY and no API_KEYS: every endpoint is open to anyone who can reach it");
    } else {
        tracing::info!(jwt = auth.jwt_enabled(), api_keys = auth.api_keys_enabled(), "authentication on");
    }
    let audit = AuditHandle::start(AuditConfig {
        log_file: cfg.log_file.clone(),
        photo_dir: cfg.photo_dir.clone(),
        queue: 1024,
        save_crops: cfg.save_crops,
        retention_days: cfg.retention_days,
        max_line_bytes: cfg.log_max_line_bytes,
    })
    .await
    .with_context(|| format!("preparing {} and {}", cfg.log_file.display(), cfg.photo_dir.display()))?;
    let options = ServiceOptions {
        sim_threshold: cfg.sim_threshold,
        model_pack: cfg.models.model_pack.clone(),
        search: cfg.search_options(),
        face_search: cfg.face_search_options(),
    };
    let service = Service::open(engine, store, faces, audit, options).await.context("loading users and face records from the store")?;
    let service = Arc::new(service.with_images(images));
    tracing::info!(
        provider = %info.provider,
        backend = %info.backend,
        pack = %cfg.models.model_pack,
        recognizer = %info.model_id,
        users = service.gallery().len(),
        face_records = service.face_index().len(),
        store = ?service.store_kind(),
        workers = cfg.workers,
        det_size = cfg.det_size,
        secs = started.elapsed().as_secs_f32(),
        "ready"
    );
    // A shared store (MongoDB): follow the other replicas' writes into both indexes.
    service.follow().await.context("following other replicas' writes")?;
    let mut state = AppState::new(service, auth, cfg.request_limits(), cfg.legacy_status);
    state.streams = crate::stream::Streams::new(cfg.stream.clone());
    state.audit_log = cfg.log_file.clone();
    let state = Arc::new(state);
    Ok(Assembled { state, max_body_bytes: cfg.max_body_bytes })
}

/// Builds the service and serves until SIGTERM or SIGINT; then stops accepting connections, lets
/// the requests in flight finish (at most SHUTDOWN_TIMEOUT; a second signal cuts the wait short),
/// writes and syncs what the audit trail still holds (bounded the same way) and returns `Ok`.
pub async fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    let service = build(&cfg).await?;
    let requested: IpAddr = if cfg.host == "localhost" {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        cfg.host.parse().with_context(|| format!("HOST {}", cfg.host))?
    };
    let ip = listen_ip(requested, service.state.auth.is_open(), cfg.connections.allow_open_access);
    if ip != requested {
        tracing::warn!(
            host = %cfg.host,
            listening_on = %ip,
            "NO CREDENTIALS CONFIGURED: listening on the loopback only, not on HOST. Set API_KEYS or JWT_SECRET_KEY, \
        or ALLOW_OPEN_ACCESS=true to open every endpoint to anyone on the network"
        );
    } else if service.state.auth.is_open() && !ip.is_loopback() {
        tracing::warn!(
            %ip,
            "ALLOW_OPEN_ACCESS: NO CREDENTIALS and listening beyond the loopback: anyone who can reach this address may read, \
        enrol and delete faces"
        );
    }
    let addr = SocketAddr::new(ip, cfg.port);
    // Handlers first: from the moment we listen, a SIGTERM is a graceful stop, never the default kill.
    let mut signals = Signals::new().context("installing the SIGTERM/SIGINT handlers")?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, "listening");
    let audit = service.state.service.audit().clone();
    let state_engine = service.state.service.engine().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = api::app(service.state, service.max_body_bytes);
    let cfg_connections = cfg.connections.clone();
    let server = async move {
        conn::serve(listener, router, cfg_connections, async move {
            let _ = stopped.await;
        })
        .await;
        Ok::<(), std::io::Error>(())
    };
    let mut server = std::pin::pin!(server);
    tokio::select! {
        served = &mut server => {
            // Only an accept loop failure ends serving before a signal.
            served.context("serving HTTP")?;
        }
        signal = signals.next() => {
            tracing::info!(signal, timeout = ?cfg.shutdown_timeout, "stopping: no new connections; finishing the requests in flight");
            let _ = stop.send(());
            tokio::select! {
                served = &mut server => {
                    if let Err(e) = served {
                        tracing::warn!(error = %e, "HTTP server error while stopping");
                    }
                }
                () = tokio::time::sleep(cfg.shutdown_timeout) => {
                    tracing::warn!(timeout = ?cfg.shutdown_timeout, "requests still in flight at SHUTDOWN_TIMEOUT are cut off");
                }
                signal = signals.next() => {
                    tracing::warn!(signal, "second signal: requests still in flight are cut off");
                }
            }
        }
    }
    // Connections still open past the timeout are ended when the runtime stops (main); a record
    // they queued before the audit queue closes is still written, later ones are not.
    let workers_done = {
        let engine = state_engine;
        let limit = cfg.shutdown_timeout;
        tokio::task::spawn_blocking(move || engine.shutdown(limit)).await.unwrap_or(false)
    };
    if !workers_done {
        tracing::warn!("inference workers still busy at SHUTDOWN_TIMEOUT");
    }
    tracing::info!("finishing the audit queue");
    match tokio::time::timeout(cfg.shutdown_timeout, audit.shutdown()).await {
        Ok(Ok(())) => tracing::info!(audit_failures = audit.failures(), "stopped"),
        Ok(Err(e)) => tracing::error!(error = %e, audit_failures = audit.failures(), "stopped; the audit trail could not be synced"),
        Err(_) => tracing::error!(timeout = ?cfg.shutdown_timeout, "stopped; the audit queue was not written within SHUTDOWN_TIMEOUT"),
    }
    Ok(())
}

/// SIGTERM and SIGINT (Ctrl-C), installed once so a second signal is seen too.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    #[cfg(not(unix))]
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {})
    }

    /// The name of the next signal received.
    #[cfg(unix)]
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    #[cfg(not(unix))]
    async fn next(&mut self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// From here on, what the process creates (the database, the audit log, the photo folder and
/// its crops: every face it holds) is readable by its own user only: files 0600, folders 0700.
/// Set after the model pack is in place (its files get their own modes anyway).
fn private_files() {
    #[cfg(unix)]
    // SAFETY: umask only changes the process's file-creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Where to listen: `requested` (HOST), except that with no credentials configured (`open`) an
/// address beyond the loopback becomes the loopback of its family unless the operator allowed
/// open access (ALLOW_OPEN_ACCESS): a service anyone on the network may write to is never the
/// result of a missing variable.
pub fn listen_ip(requested: IpAddr, open: bool, allow_open_access: bool) -> IpAddr {
    if !open || allow_open_access || requested.is_loopback() {
        return requested;
    }
    match requested {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_service_listens_on_the_loopback_unless_allowed() {
        let any4: IpAddr = "0.0.0.0".parse().expect("ip");
        let any6: IpAddr = "::".parse().expect("ip");
        let lan: IpAddr = "192.168.1.20".parse().expect("ip");
        let lo4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let lo6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(listen_ip(any4, true, false), lo4);
        assert_eq!(listen_ip(lan, true, false), lo4);
        assert_eq!(listen_ip(any6, true, false), lo6);
        assert_eq!(listen_ip(lo4, true, false), lo4);
        assert_eq!(listen_ip(any4, true, true), any4, "explicitly allowed");
        assert_eq!(listen_ip(any4, false, false), any4, "credentials configured");
        assert_eq!(listen_ip(lan, false, false), lan);
    }
}
