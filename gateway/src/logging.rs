//! Log output on stderr, filtered by `RUST_LOG` (default `info`): readable
//! lines, coloured only on a terminal (a log collector would keep the
//! escape codes), or one JSON object per line (`log.format = "json"`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global log subscriber, writing `format`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        // Each event's fields (connection, route, function, version, ...)
        // at the top level of its object, beside `timestamp`, `level`,
        // `target` and `message`.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}
