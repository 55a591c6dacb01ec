//! Echo throughput: C connections each keep W messages of S bytes in
//! flight; every reply is checked byte for byte.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::{matches, payload, rate};
use crate::client::{Target, spread_source};
use crate::figures::Figures;
use crate::process;

/// Parameters of the echo scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connections.
    pub connections: usize,
    /// Message size in bytes (at least 8).
    pub size: usize,
    /// Messages in flight per connection.
    pub window: usize,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// The server's process id, to report its CPU time per message.
    pub server_pid: Option<u32>,
}

/// Run the scenario.
///
/// # Errors
/// When a connection fails or a reply differs from its message.
pub async fn run(target: &Target, server: &str, options: &Options) -> anyhow::Result<Figures> {
    let mut connections = Vec::with_capacity(options.connections);
    for n in 0..options.connections {
        connections.push(
            target
                .connect(Some(spread_source(n)))
                .await
                .context("connecting")?,
        );
    }
    let counted = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + options.warmup;
    let end = start + options.duration;
    let mut tasks = Vec::new();
    for ws in connections {
        let counted = counted.clone();
        let (size, window) = (options.size, options.window);
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let (mut sent, mut received) = (0u64, 0u64);
            loop {
                while sent - received < window as u64 {
                    sink.feed(Message::Binary(payload(sent, size).into()))
                        .await?;
                    sent += 1;
                }
                sink.flush().await?;
                // Wait for one reply, then take every reply already here,
                // so the window is refilled (and flushed) in batches.
                let mut replies = 0;
                let mut next = Some(
                    stream
                        .next()
                        .await
                        .context("the server closed the connection")??,
                );
                while let Some(reply) = next {
                    if !matches(&reply.into_data(), received, size) {
                        bail!("reply {received} differs from its message");
                    }
                    received += 1;
                    replies += 1;
                    next = match stream.next().now_or_never() {
                        Some(Some(reply)) => Some(reply?),
                        Some(None) => bail!("the server closed the connection"),
                        None => None,
                    };
                }
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if now >= start {
                    counted.fetch_add(replies, Ordering::Relaxed);
                }
            }
            let _ = sink.close().await;
            Ok::<_, anyhow::Error>(())
        }));
    }
    tokio::time::sleep_until(start.into()).await;
    let cpu_start = options.server_pid.map(process::cpu_seconds).transpose()?;
    let own_start = process::own_cpu_seconds()?;
    tokio::time::sleep_until(end.into()).await;
    let cpu_end = options.server_pid.map(process::cpu_seconds).transpose()?;
    let own_end = process::own_cpu_seconds()?;
    for task in tasks {
        task.await??;
    }
    let messages = counted.load(Ordering::Relaxed);
    let mut figures = Figures::new(
        "echo",
        server,
        format!(
            "connections={} size={} window={} duration={:?}",
            options.connections, options.size, options.window, options.duration
        ),
    );
    let per_second = rate(messages, options.duration);
    figures
        .set("msgs_per_s", per_second)
        .set("mb_per_s", per_second * options.size as f64 / 1e6)
        .set(
            "loadgen_cpu_us_per_msg",
            (own_end - own_start) * 1e6 / messages.max(1) as f64,
        );
    if let (Some(a), Some(b)) = (cpu_start, cpu_end) {
        figures.set(
            "server_cpu_us_per_msg",
            (b - a) * 1e6 / messages.max(1) as f64,
        );
    }
    Ok(figures)
}
