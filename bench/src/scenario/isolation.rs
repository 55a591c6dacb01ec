//! Isolation: the latency of well-behaved connections at a fixed rate,
//! first alone, then while other connections keep making the function
//! misbehave (spin until the time limit, exhaust its memory, overflow its
//! stack, panic). The ratio of the two is the price others pay for one
//! bad function.
//!
//! Needs a server whose route runs the `faulty` test function (which
//! echoes binary messages and misbehaves on text commands).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::latency;
use crate::client::{Target, spread_source};
use crate::figures::Figures;

/// The commands the misbehaving connections cycle through by default.
pub const FAULTS: &[&str] = &["loop", "alloc", "recurse", "panic"];

/// Parameters of the isolation scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// The well-behaved load, measured in both phases.
    pub latency: latency::Options,
    /// Connections that keep triggering faults in the second phase.
    pub offenders: usize,
    /// The `faulty` commands they cycle through.
    pub faults: Vec<String>,
}

/// Run the scenario.
///
/// # Errors
/// When a connection fails.
pub async fn run(target: &Target, server: &str, options: &Options) -> anyhow::Result<Figures> {
    let calm = latency::run(target, server, &options.latency).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let faults = Arc::new(AtomicU64::new(0));
    let mut offenders = Vec::new();
    for n in 0..options.offenders {
        // Sources apart from the well-behaved connections'.
        let ws = target
            .connect(Some(spread_source(10_000 + n)))
            .await
            .context("connecting an offender")?;
        let (stop, faults) = (stop.clone(), faults.clone());
        let commands = options.faults.clone();
        offenders.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let mut i = n;
            while !stop.load(Ordering::Relaxed) {
                let command = commands[i % commands.len()].as_str();
                sink.send(Message::Text(command.into())).await?;
                // The error reply (the function failed on this message).
                match stream.next().await {
                    Some(Ok(Message::Text(_))) => {
                        faults.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(_)) => {}
                    other => anyhow::bail!("an offender's connection ended: {other:?}"),
                }
                i += 1;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let stormy = latency::run(target, server, &options.latency).await;
    stop.store(true, Ordering::Relaxed);
    for offender in offenders {
        offender.abort();
    }
    let stormy = stormy?;

    let mut figures = Figures::new(
        "isolation",
        server,
        format!(
            "connections={} rate={:.0}/s size={} duration={:?} offenders={} faults={}",
            options.latency.connections,
            options.latency.rate,
            options.latency.size,
            options.latency.duration,
            options.offenders,
            options.faults.join("+")
        ),
    );
    let get = |figures: &Figures, name: &str| figures.get(name).unwrap_or(f64::NAN);
    for name in ["p50_us", "p99_us", "p99_9_us", "lost"] {
        figures.set(&format!("calm_{name}"), get(&calm, name));
        figures.set(&format!("faulting_{name}"), get(&stormy, name));
    }
    figures
        .set("p50_ratio", get(&stormy, "p50_us") / get(&calm, "p50_us"))
        .set("p99_ratio", get(&stormy, "p99_us") / get(&calm, "p99_us"))
        .set("faults_triggered", faults.load(Ordering::Relaxed) as f64);
    Ok(figures)
}
