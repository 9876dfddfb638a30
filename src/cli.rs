//! What both binaries (`facerec` and `facerec-tools`) do before their command: read `.env`,
//! parse the command line (an error is one clear line), and set up logging on stderr.

use std::process::ExitCode;

use crate::config::LogFormat;

/// `.env` first (a missing one is fine; a malformed one is reported), then the command line:
/// `--help` and `--version` print and exit; any other error is clap's first line (it names the
/// flag, its variable and the problem) and exit code 2.
pub fn parse<C: clap::Parser>() -> Result<C, ExitCode> {
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("error: .env: {e}");
        return Err(ExitCode::from(2));
    }
    match C::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: invalid arguments"));
            Err(ExitCode::from(2))
        }
    }
}

/// Logging on stderr: RUST_LOG's verbosity, in LOG_FORMAT's shape (after the command line is
/// parsed, which logs nothing: its errors are printed as one plain line).
pub fn init_tracing(format: LogFormat) {
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
