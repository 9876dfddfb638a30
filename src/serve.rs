//! `facerec serve`: wires the runtime, engine, store, gallery and audit writer together,
//! then serves HTTP until SIGINT/SIGTERM, finishing in-flight requests and the audit queue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use crate::api::{self, AppState};
use crate::audit::{AuditConfig, AuditHandle};
use crate::config::{ServeConfig, analyzer_options};
use crate::engine::{Engine, EngineConfig};
use crate::face::image::ImageLimits;
use crate::face::pack;
use crate::fetch;
use crate::gallery::Gallery;
use crate::runtime::Runtime;
use crate::store::FaceStore;
use crate::store::sqlite::SqliteStore;

/// Everything built at start, before listening.
pub struct Service {
    pub state: Arc<AppState>,
    pub max_body_bytes: usize,
}

/// Loads models, store and gallery. Errors say what to fix.
pub async fn build(cfg: &ServeConfig) -> anyhow::Result<Service> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let models = cfg.models.clone();
    let (runtime, files) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let runtime = Runtime::init(&models.runtime_options())?;
        let pack_dir = fetch::ensure_pack(&models.model_cache_dir, &models.model_pack)?;
        Ok((runtime, pack::resolve(&pack_dir)?))
    })
    .await??;
    let runtime = Arc::new(runtime);
    let engine_cfg = EngineConfig {
        workers: usize::from(cfg.workers),
        queue: cfg.queue_size as usize,
        analyzer: analyzer_options(cfg.det_size),
        limits: ImageLimits::default(),
    };
    let engine = {
        let runtime = Arc::clone(&runtime);
        tokio::task::spawn_blocking(move || Engine::start(runtime, files, engine_cfg)).await??
    };
    let info = engine.info().clone();

    if cfg.mongo_uri.is_some() {
        anyhow::bail!(
            "MONGO_URI is set, but this build has no MongoDB store yet: unset MONGO_URI to use the embedded store at DATABASE_PATH"
        );
    }
    let store: Arc<dyn FaceStore> = Arc::new(
        SqliteStore::open(&cfg.database_path).with_context(|| format!("opening the embedded store at {}", cfg.database_path.display()))?,
    );
    let loaded = store.load_users(&info.model_id).await.context("loading users from the store")?;
    if loaded.other_model > 0 {
        tracing::warn!(count = loaded.other_model, ours = %info.model_id, "users enrolled with another recognizer are kept but not compared");
    }
    let gallery = Arc::new(Gallery::from_entries(
        info.embedding_dim,
        loaded.users.into_iter().filter(|u| !u.embedding.is_empty()).map(|u| (u.username, u.embedding)),
    ));
    let audit = AuditHandle::start(AuditConfig { log_file: cfg.log_file.clone(), photo_dir: cfg.photo_dir.clone(), queue: 1024 })
        .await
        .with_context(|| format!("preparing {} and {}", cfg.log_file.display(), cfg.photo_dir.display()))?;
    tracing::info!(
        provider = %info.provider,
        pack = %cfg.models.model_pack,
        recognizer = %info.model_id,
        users = gallery.len(),
        store = ?store.kind(),
        workers = cfg.workers,
        det_size = cfg.det_size,
        secs = started.elapsed().as_secs_f32(),
        "ready"
    );
    let state = Arc::new(AppState {
        engine,
        gallery,
        store_kind: store.kind(),
        store,
        audit,
        metadata: std::sync::RwLock::new(serde_json::json!({})),
        sim_threshold: cfg.sim_threshold,
        model_pack: cfg.models.model_pack.clone(),
        skipped_other_model: loaded.other_model,
        skipped_malformed: loaded.malformed,
        writes: tokio::sync::Mutex::new(()),
    });
    Ok(Service { state, max_body_bytes: cfg.max_body_bytes })
}

/// Builds the service and serves until a shutdown signal.
pub async fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    let service = build(&cfg).await?;
    let host = if cfg.host == "localhost" { "127.0.0.1" } else { cfg.host.as_str() };
    let addr: SocketAddr = format!("{host}:{}", cfg.port).parse().with_context(|| format!("HOST {} / PORT {}", cfg.host, cfg.port))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, "listening");
    let audit = service.state.audit.clone();
    axum::serve(listener, api::app(service.state, service.max_body_bytes)).with_graceful_shutdown(shutdown_signal()).await?;
    tracing::info!("shutting down: finishing the audit queue");
    audit.shutdown().await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
