//! Memory per idle connection: the server's resident memory before and
//! after opening N connections that send nothing.

use std::time::Duration;

use anyhow::Context;

use crate::client::{Target, spread_source};
use crate::figures::Figures;
use crate::process;

/// Parameters of the idle scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connections to open.
    pub connections: usize,
    /// Handshakes in progress at once while opening them.
    pub concurrency: usize,
    /// The server's process id (required: its memory is the figure).
    pub server_pid: u32,
    /// How long to let the server settle before reading its memory.
    pub settle: Duration,
}

/// Run the scenario.
///
/// # Errors
/// When a connection fails or the server's memory cannot be read.
pub async fn run(target: &Target, server: &str, options: &Options) -> anyhow::Result<Figures> {
    let limit = crate::process::raise_file_limit();
    anyhow::ensure!(
        limit as usize > options.connections + 64,
        "the open-file limit ({limit}) is too low for {} connections",
        options.connections
    );
    // One connection first, so one-time costs (first handshake, first
    // instance of the function) are not counted per connection.
    let first = target.connect(None).await.context("connecting")?;
    tokio::time::sleep(options.settle).await;
    let before = process::rss_bytes(options.server_pid)?;

    let mut held = Vec::with_capacity(options.connections);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let mut next = 0;
    use futures_util::StreamExt;
    while held.len() < options.connections {
        while next < options.connections && pending.len() < options.concurrency {
            let target = target.clone();
            let source = spread_source(next);
            pending.push(async move { target.connect(Some(source)).await });
            next += 1;
        }
        match pending.next().await {
            Some(ws) => {
                held.push(ws.with_context(|| format!("opening connection {}", held.len() + 1))?)
            }
            None => break,
        }
    }
    tokio::time::sleep(options.settle).await;
    let after = process::rss_bytes(options.server_pid)?;
    drop(held);
    drop(first);

    let mut figures = Figures::new(
        "idle",
        server,
        format!("connections={}", options.connections),
    );
    figures
        .set("rss_before_mib", before as f64 / (1 << 20) as f64)
        .set("rss_after_mib", after as f64 / (1 << 20) as f64)
        .set(
            "bytes_per_connection",
            after.saturating_sub(before) as f64 / options.connections as f64,
        );
    Ok(figures)
}
