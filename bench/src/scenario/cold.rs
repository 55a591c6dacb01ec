//! Cold start, end to end: wait until the function is scaled to zero (no
//! instances, compiled code unloaded, as its metrics say), then time one
//! message to its reply; then time one more, warm.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::client::Target;
use crate::figures::Figures;

/// Parameters of the cold-start scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// The gateway's admin address, to read its metrics.
    pub admin: SocketAddr,
    /// The function behind the URL.
    pub function: String,
    /// Cold starts to measure.
    pub rounds: usize,
}

/// Run the scenario. The gateway must run with short
/// `runtime.idle_timeout` and `runtime.unload_after`.
///
/// # Errors
/// When the function does not scale to zero within a minute.
pub async fn run(target: &Target, server: &str, options: &Options) -> anyhow::Result<Figures> {
    let mut ws = target.connect(None).await.context("connecting")?;
    let mut cold = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut warm = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let loaded = format!(
        "tidegate_function_code_loaded{{function=\"{}\"}}",
        options.function
    );
    let instances = format!(
        "tidegate_function_instances{{function=\"{}\"}}",
        options.function
    );
    for _ in 0..options.rounds {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let metrics = metrics(options.admin).await?;
            if value(&metrics, &loaded) == Some(0.0) && value(&metrics, &instances) == Some(0.0) {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} did not scale to zero within a minute", options.function);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for histogram in [&mut cold, &mut warm] {
            let started = Instant::now();
            ws.send(Message::Binary(vec![7u8; 64].into())).await?;
            ws.next()
                .await
                .context("the server closed the connection")??;
            histogram.record(started.elapsed().as_nanos().max(1) as u64)?;
        }
    }
    let _ = ws.close(None).await;
    let mut figures = Figures::new(
        "cold-start",
        server,
        format!("function={} rounds={}", options.function, options.rounds),
    );
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    figures
        .set("cold_p50_us", us(&cold, 0.5))
        .set("cold_p99_us", us(&cold, 0.99))
        .set("warm_p50_us", us(&warm, 0.5))
        .set("warm_p99_us", us(&warm, 0.99));
    Ok(figures)
}

/// Fetch `/metrics` from the admin listener.
///
/// # Errors
/// When the admin listener does not answer.
pub async fn metrics(admin: SocketAddr) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(admin)
        .await
        .context("admin listener")?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// A series' value in a metrics page. Labels after those given count as
/// one series: `{function="echo"}` sums every `version` of echo.
pub fn value(metrics: &str, series: &str) -> Option<f64> {
    let open = series.strip_suffix('}');
    metrics
        .lines()
        .filter_map(|line| {
            let rest = match line.strip_prefix(series) {
                Some(rest) => rest,
                None => {
                    line.strip_prefix(open?)?
                        .strip_prefix(',')?
                        .split_once('}')?
                        .1
                }
            };
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
        .reduce(|a, b| a + b)
}
