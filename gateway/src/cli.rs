//! The command line: `tidegate serve [--config FILE] [--dev]`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::App;
use crate::config::Settings;

/// Exit status for a configuration error (EX_CONFIG would be 78; linkerd
/// and sysexits' EX_USAGE use 64 for "the input was wrong").
pub const EXIT_CONFIG: u8 = 64;

/// Tidegate: a self-hosted, auto-scaling WebSocket gateway.
#[derive(Debug, Parser)]
#[command(name = "tidegate", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve WebSocket clients.
    Serve {
        /// TOML configuration file; `TIDEGATE__SECTION__KEY` environment
        /// variables override it.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Development mode: a self-signed certificate, an unprivileged
        /// port (127.0.0.1:8443) and the bundled echo function on `/`; the
        /// local RabbitMQ if there is one, else the spool.
        #[arg(long)]
        dev: bool,
    },
}

/// Parse the arguments, load the configuration and run.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::logging::init();
    crate::tls::install_crypto_provider();
    match cli.command {
        Command::Serve { config, dev } => {
            let settings = match Settings::load(config.as_deref(), dev) {
                Ok(settings) => settings,
                Err(e) => {
                    eprintln!("tidegate: configuration error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("tidegate")
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("tidegate: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tidegate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Build the gateway, say where it listens, and run it until SIGTERM or
/// SIGINT.
async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = App::build(settings).await?;
    let addresses = app.addresses();
    if let Some(plain) = addresses.plain {
        println!("Tidegate listening on ws://{plain}/ (no TLS: server.plain_listen)");
    }
    println!(
        "Tidegate listening on wss://{}/ (admin http://{}/metrics)",
        addresses.wss, addresses.admin
    );
    app.run(async {
        let signal = wait_for_signal().await;
        tracing::info!(signal, "termination signal");
    })
    .await
}

/// Wait for SIGTERM or SIGINT; returns its name.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
