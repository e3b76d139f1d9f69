//! The `opsagent-audit` binary: parses the command line, sets up logging, runs.

use std::io::IsTerminal;

use clap::Parser;
use opsagent_audit::cli::{self, Cli};
use opsagent_audit::config::LogFormat;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    // A server logs what it does; a one-shot read command prints its answer, and only
    // warnings besides.
    let default_level = if cli.command.is_report() { "warn" } else { "info,sqlx=warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colour only for a person at a terminal; a log file or collector gets plain text.
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let json = config.server.log_format == LogFormat::Json;
    if json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    match cli::run(cli, config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader went away (`… | head`): the output was wanted only so far, as
        // every Unix tool treats it.
        Err(e) if is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Once: as a structured log line for JSON logs, else as a plain message.
            if json {
                tracing::error!(error = format!("{e:#}"), "opsagent-audit stopped with an error");
            } else {
                eprintln!("error: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// True when the error is, at bottom, a write to a closed pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let kind = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => Some(io.kind()),
            // serde_json keeps the writer's error inside its own.
            None => cause.downcast_ref::<serde_json::Error>().and_then(serde_json::Error::io_error_kind),
        };
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}
