//! `facerec-tools`: what measures the service, apart from it: `eval` (the face pipeline over a
//! labelled photo set, parity with insightface's outputs and accuracy) and `bench` (figures
//! of the gallery, the search and the inference engine). Built on the `facerec` library.

mod bench;
mod bench_recognize;
mod eval;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use eval::EvalInput;
use facerec::config::{self, LogConfig, ModelConfig, ServeConfig};
use facerec::face::FaceAnalyzer;
use facerec::fetch;
use facerec::runtime::Runtime;

#[derive(Debug, Parser)]
#[command(name = "facerec-tools", version, about = "facerec's evaluation and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogConfig,
}

#[derive(Debug, Subcommand)]
// Parsed once at start: variant sizes cost nothing worth a Box.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Run the face pipeline over a labelled photo set and report parity and accuracy.
    Eval {
        /// Folder the labels' image paths are relative to.
        #[arg(long)]
        images: PathBuf,
        /// labels.json (identities, singletons, scenes).
        #[arg(long)]
        labels: PathBuf,
        /// Golden insightface outputs to compare with.
        #[arg(long)]
        golden: Option<PathBuf>,
        /// Detector input size (default: the golden file's, else 320).
        #[arg(long, value_parser = config::parse_det_size)]
        det_size: Option<u32>,
        #[command(flatten)]
        models: ModelConfig,
    },
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)]
enum BenchCommand {
    /// The inference engine: raw models in-process, then POST /recognize on a child service
    /// at 1, 4, 16 and 64 connections (or `--soak N`: 64 connections, VmRSS every 5 s).
    Recognize {
        /// Seconds measured per connection level.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Connection levels, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
        connections: Vec<usize>,
        /// Only the soak: 64 connections for this many seconds, sampling the server's memory.
        #[arg(long)]
        soak: Option<u64>,
        /// Folder with the photos the face crops are cut from.
        #[arg(long, default_value = "tests/fixtures")]
        fixtures: PathBuf,
        #[command(flatten)]
        serve: ServeConfig,
    },
    /// The in-memory gallery alone: build, memory, exact and fast top-k latency, fast recall
    /// on planted matches, then loading users from the embedded SQLite store.
    Gallery {
        /// Gallery sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
        sizes: Vec<usize>,
        /// Timed queries per size, mode and k.
        #[arg(long, default_value_t = 200)]
        queries: usize,
        /// Planted queries per similarity level (0.3, 0.4, 0.5, 0.7) for recall@1.
        #[arg(long, default_value_t = 200)]
        recall_queries: usize,
        /// Fast-search shortlist sizes to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "4096")]
        candidates: Vec<usize>,
        /// Users loaded from the embedded SQLite store (0: skip).
        #[arg(long, default_value_t = 1_000_000)]
        store_users: usize,
        /// Folder for the benchmark's SQLite file (reused between runs).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// /api/face/search over HTTP against N stored face records (synthetic vectors).
    Search {
        /// Stored face records.
        #[arg(long, default_value_t = 100_000)]
        faces: usize,
        /// The query photo (one face).
        #[arg(long, default_value = "tests/fixtures/img6.jpg")]
        image: PathBuf,
        /// Timed requests.
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Folder for the benchmark's database (reused between runs).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        #[command(flatten)]
        serve: ServeConfig,
    },
}

fn main() -> ExitCode {
    let cli: Cli = match facerec::cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    facerec::cli::init_tracing(cli.log.log_format);
    // reqwest is built with rustls but no bundled provider: ring, as in the service.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Eval { images, labels, golden, det_size, models } => run_eval(&models, &images, &labels, golden.as_deref(), det_size),
        Command::Bench { what: BenchCommand::Search { faces, image, runs, work_dir, serve } } => {
            let opts = bench::SearchBench { faces, image, runs, work_dir };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(bench::search(serve, opts)))
        }
        Command::Bench { what: BenchCommand::Gallery { sizes, queries, recall_queries, candidates, store_users, work_dir } } => {
            bench::gallery(bench::GalleryBench { sizes, queries, recall_queries, candidates, store_users, work_dir })
        }
        Command::Bench { what: BenchCommand::Recognize { seconds, connections, soak, fixtures, serve } } => {
            bench_recognize::run(serve, bench_recognize::RecognizeBench { seconds, levels: connections, soak, fixtures })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads ONNX Runtime and the pack, fetching what is missing.
fn load_analyzer(models: &ModelConfig, det_size: u32) -> anyhow::Result<FaceAnalyzer> {
    models.validate().map_err(anyhow::Error::msg)?;
    let runtime = Runtime::init(&models.runtime_options(1))?;
    let pack_dir = fetch::ensure_pack(&models.model_cache_dir, &models.model_pack)?;
    let analyzer = FaceAnalyzer::load(&runtime, &pack_dir, config::analyzer_options(det_size))?;
    tracing::info!(
        pack = %models.model_pack,
        detector = %analyzer.files().detector.display(),
        recognizer = %analyzer.model_id(),
        provider = %runtime.active_provider().map(|p| p.to_string()).unwrap_or_default(),
        backend = %runtime.active_backend().map(|b| b.to_string()).unwrap_or_default(),
        "models loaded"
    );
    Ok(analyzer)
}

fn run_eval(
    models: &ModelConfig,
    images: &std::path::Path,
    labels: &std::path::Path,
    golden: Option<&std::path::Path>,
    det_size: Option<u32>,
) -> anyhow::Result<()> {
    let input = EvalInput::load(images, labels, golden, det_size)?;
    let mut analyzer = load_analyzer(models, input.det_size)?;
    let summary = eval::run(&mut analyzer, &input, &mut |line| println!("{line}"));
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
