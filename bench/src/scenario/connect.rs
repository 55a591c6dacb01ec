//! New connections per second: TCP, TLS and the WebSocket handshake, by a
//! few workers in a loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::rate;
use crate::client::{Target, spread_source};
use crate::figures::Figures;

/// Parameters of the connect scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// Handshakes in progress at once.
    pub concurrency: usize,
    /// Measured time.
    pub duration: Duration,
    /// The server's process id, to report its CPU time per connection.
    pub server_pid: Option<u32>,
}

/// Run the scenario.
///
/// # Errors
/// When every handshake fails.
pub async fn run(target: &Target, server: &str, options: &Options) -> anyhow::Result<Figures> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let next_source = Arc::new(AtomicUsize::new(0));
    let end = Instant::now() + options.duration;
    let cpu_start = options
        .server_pid
        .map(crate::process::cpu_seconds)
        .transpose()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..options.concurrency {
        let (target, done, failed, next_source) = (
            target.clone(),
            done.clone(),
            failed.clone(),
            next_source.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let source = spread_source(next_source.fetch_add(1, Ordering::Relaxed));
                match target.connect(Some(source)).await {
                    Ok(mut ws) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        let _ = ws.close(None).await;
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed();
    let cpu_end = options
        .server_pid
        .map(crate::process::cpu_seconds)
        .transpose()?;
    let connects = done.load(Ordering::Relaxed);
    anyhow::ensure!(connects > 0, "no handshake succeeded");
    let mut figures = Figures::new(
        "connect",
        server,
        format!(
            "concurrency={} duration={:?}",
            options.concurrency, options.duration
        ),
    );
    figures
        .set("connects_per_s", rate(connects, elapsed))
        .set("failed", failed.load(Ordering::Relaxed) as f64);
    if let (Some(a), Some(b)) = (cpu_start, cpu_end) {
        figures.set("server_cpu_us_per_connect", (b - a) * 1e6 / connects as f64);
    }
    Ok(figures)
}
