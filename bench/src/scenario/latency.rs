//! Latency at a fixed offered rate: messages are sent on a schedule, not
//! when the previous reply arrives, so a slow server cannot hide its
//! slowness by slowing the sender (no coordinated omission).

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;

use super::sequence;
use crate::client::{Target, spread_source};
use crate::figures::Figures;

/// Parameters of the latency scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connections the rate is spread over.
    pub connections: usize,
    /// Messages per second, all connections together.
    pub rate: f64,
    /// Message size in bytes (at least 8).
    pub size: usize,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
}

/// Run the scenario.
///
/// # Errors
/// When a connection fails.
pub async fn run(target: &Target, server: &str, options: &Options) -> anyhow::Result<Figures> {
    let epoch = Instant::now();
    let start = epoch + options.warmup;
    let end = start + options.duration;
    // Only messages sent after the warm-up are recorded.
    let measure_from = (start - epoch).as_nanos() as u64;
    let per_connection = options.rate / options.connections as f64;
    let period = Duration::from_secs_f64(1.0 / per_connection.max(0.001));
    let mut tasks = Vec::new();
    for n in 0..options.connections {
        let ws = target
            .connect(Some(spread_source(n)))
            .await
            .context("connecting")?;
        let size = options.size.max(8);
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            // The sender says how many it sent once it is done; the
            // receiver stops when it has that many replies.
            let (done, mut sent_total) = tokio::sync::watch::channel(None::<u64>);
            let sender = async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
                let mut sent = 0u64;
                while Instant::now() < end {
                    tick.tick().await;
                    // The payload carries its send time, in ns since `epoch`.
                    let mut bytes = vec![0u8; size];
                    let at = epoch.elapsed().as_nanos() as u64;
                    bytes[..8].copy_from_slice(&at.to_le_bytes());
                    sink.send(Message::Binary(bytes.into())).await?;
                    sent += 1;
                }
                let _ = done.send(Some(sent));
                Ok::<_, anyhow::Error>((sink, sent))
            };
            let receiver = async move {
                let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
                let mut received = 0u64;
                let mut sender_gone = false;
                loop {
                    if let Some(total) = *sent_total.borrow()
                        && received >= total
                    {
                        break;
                    }
                    tokio::select! {
                        message = stream.next() => {
                            let message = message.context("the server closed the connection")??;
                            let Some(sent_at) = sequence(&message.into_data()) else { continue };
                            let now = epoch.elapsed().as_nanos() as u64;
                            received += 1;
                            if sent_at >= measure_from {
                                histogram.record(now.saturating_sub(sent_at).max(1))?;
                            }
                        }
                        changed = sent_total.changed(), if !sender_gone => {
                            // Once the sender is gone its count is final.
                            sender_gone = changed.is_err();
                        }
                    }
                }
                Ok::<_, anyhow::Error>((histogram, received))
            };
            let late = end + Duration::from_secs(5);
            let (sent, received) =
                tokio::join!(sender, tokio::time::timeout_at(late.into(), receiver));
            let (mut sink, sent) = sent?;
            let _ = sink.close().await;
            let (histogram, received) = match received {
                Ok(result) => result?,
                Err(_) => anyhow::bail!("replies were still missing five seconds after the run"),
            };
            Ok((histogram, sent, received))
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let (mut sent, mut received) = (0, 0);
    for task in tasks {
        let (histogram, s, r) = task.await??;
        total.add(histogram)?;
        sent += s;
        received += r;
    }
    let mut figures = Figures::new(
        "latency",
        server,
        format!(
            "connections={} rate={:.0}/s size={} duration={:?}",
            options.connections, options.rate, options.size, options.duration
        ),
    );
    let us = |q: f64| total.value_at_quantile(q) as f64 / 1e3;
    figures
        .set("offered_msgs_per_s", options.rate)
        .set("p50_us", us(0.5))
        .set("p99_us", us(0.99))
        .set("p99_9_us", us(0.999))
        .set("max_us", total.max() as f64 / 1e3)
        .set("lost", sent.saturating_sub(received) as f64);
    Ok(figures)
}
