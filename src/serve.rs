//! `facerec serve`: wires the runtime, engine, store, gallery and audit writer together,
//! then serves HTTP until SIGINT/SIGTERM, finishing in-flight requests and the audit queue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use crate::api::auth::AuthConfig;
use crate::api::faces::FaceIndex;
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
use crate::store::faces::FaceRecordStore;
use crate::store::follow::{self, WriteGate};
use crate::store::mongo::MongoStore;
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
    // MongoDB first: an unreachable database stops the start before the models are loaded.
    let mongo = match &cfg.mongo_uri {
        Some(uri) => Some(Arc::new(MongoStore::connect(uri, cfg.mongo_options()).await.context("MONGO_URI")?)),
        None => None,
    };
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

    let sqlite = Arc::new(
        SqliteStore::open(&cfg.database_path).with_context(|| format!("opening the embedded store at {}", cfg.database_path.display()))?,
    );
    let store: Arc<dyn FaceStore> = match mongo {
        Some(m) => m,
        None => Arc::clone(&sqlite) as Arc<dyn FaceStore>,
    };
    let loaded = store.load_users(&info.model_id).await.context("loading users from the store")?;
    if loaded.other_model > 0 {
        tracing::warn!(count = loaded.other_model, ours = %info.model_id, "users enrolled with another recognizer are kept but not compared");
    }
    let gallery = Arc::new(Gallery::from_entries(
        info.embedding_dim,
        loaded.users.into_iter().filter(|u| !u.embedding.is_empty()).map(|u| (u.username, u.embedding)),
    ));
    let faces_loaded = sqlite.load_faces(&info.model_id).await.context("loading face records from the store")?;
    let face_index = Arc::new(FaceIndex::new(info.embedding_dim));
    for r in &faces_loaded.faces {
        face_index.insert(r);
    }
    let faces: Arc<dyn FaceRecordStore> = sqlite;
    let auth = Arc::new(AuthConfig::new(cfg.jwt_secret_key.as_deref(), cfg.api_keys.as_deref()));
    if auth.is_open() {
        tracing::warn!("no JWT_SECRET_KEY and no API_KEYS: every endpoint is open to anyone who can reach it");
    } else {
        tracing::info!(jwt = auth.jwt_enabled(), api_keys = auth.api_keys_enabled(), "authentication on");
    }
    let audit = AuditHandle::start(AuditConfig { log_file: cfg.log_file.clone(), photo_dir: cfg.photo_dir.clone(), queue: 1024 })
        .await
        .with_context(|| format!("preparing {} and {}", cfg.log_file.display(), cfg.photo_dir.display()))?;
    tracing::info!(
        provider = %info.provider,
        pack = %cfg.models.model_pack,
        recognizer = %info.model_id,
        users = gallery.len(),
        face_records = face_index.len(),
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
        faces,
        face_index,
        audit,
        auth,
        metadata: std::sync::RwLock::new(serde_json::json!({})),
        sim_threshold: cfg.sim_threshold,
        model_pack: cfg.models.model_pack.clone(),
        skipped_other_model: loaded.other_model,
        skipped_malformed: loaded.malformed,
        writes: tokio::sync::Mutex::new(()),
    });
    // A shared store (MongoDB): follow the other replicas' writes into the gallery.
    if let Some(feed) = state.store.follow().await.context("following other replicas' writes")? {
        tokio::spawn(follow::run(Arc::clone(&state), Arc::clone(&state.gallery), info.model_id.clone(), feed));
    }
    Ok(Service { state, max_body_bytes: cfg.max_body_bytes })
}

/// The follower applies other replicas' changes under the handlers' write lock.
impl WriteGate for AppState {
    fn writes(&self) -> &tokio::sync::Mutex<()> {
        &self.writes
    }
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
