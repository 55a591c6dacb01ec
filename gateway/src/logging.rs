//! Log output: human-readable lines on stderr, filtered by `RUST_LOG`
//! (default `info`), coloured only on a terminal (a log collector would
//! keep the escape codes).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Install the global log subscriber.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
