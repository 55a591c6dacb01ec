//! The runtime alone, in this process: the echo function's cost of a call
//! from zero (reload the compiled code, instantiate, call), from loaded
//! code (instantiate, call), and warm (call).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use runtime::{Context, Payload, Priority, Registry, RuntimeConfig, RuntimeMetrics};

use crate::figures::Figures;

/// Run `rounds` of each kind of call.
///
/// # Errors
/// When the runtime cannot be set up or a call fails.
pub async fn run(rounds: usize) -> anyhow::Result<Figures> {
    let dir = std::env::temp_dir().join(format!("tidegate-bench-{}", std::process::id()));
    let tiny = Duration::from_nanos(1);
    let cold = time_calls(&dir, rounds, tiny, tiny).await?;
    let fresh = time_calls(&dir, rounds, tiny, Duration::from_secs(3600)).await?;
    let warm = time_calls(
        &dir,
        rounds,
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    )
    .await?;
    let _ = std::fs::remove_dir_all(&dir);
    let mut figures = Figures::new("instantiate", "runtime (echo)", format!("rounds={rounds}"));
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    figures
        .set("from_zero_p50_us", us(&cold, 0.5))
        .set("from_zero_p99_us", us(&cold, 0.99))
        .set("new_instance_p50_us", us(&fresh, 0.5))
        .set("new_instance_p99_us", us(&fresh, 0.99))
        .set("warm_call_p50_us", us(&warm, 0.5))
        .set("warm_call_p99_us", us(&warm, 0.99));
    Ok(figures)
}

/// Time `rounds` calls, scaling down between calls with these timeouts.
async fn time_calls(
    dir: &std::path::Path,
    rounds: usize,
    idle_timeout: Duration,
    unload_after: Duration,
) -> anyhow::Result<Histogram<u64>> {
    let config = RuntimeConfig {
        artifact_dir: dir.join("artifacts"),
        max_total_instances: NonZeroU32::new(8).expect("not zero"),
        idle_timeout,
        unload_after,
        ..RuntimeConfig::default()
    };
    let metrics = RuntimeMetrics::register(&prometheus_registry())?;
    let registry = Registry::new(config, metrics)?;
    let echo = registry
        .load("echo", tidegate_functions::ECHO.to_vec())
        .await?;
    let conn = Arc::new(Context {
        id: "bench.1".into(),
        route: "/".into(),
        claims: vec![],
        state: None,
    });
    let message = Payload::Binary(vec![7; 64]);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    // One call first, so the artifact exists and caches are warm.
    echo.on_message(conn.clone(), message.clone(), Priority::Normal)
        .await?
        .ok();
    for _ in 0..rounds {
        registry.scale_down();
        let (ctx, payload) = (conn.clone(), message.clone());
        let started = Instant::now();
        echo.on_message(ctx, payload, Priority::Normal).await?.ok();
        histogram.record(started.elapsed().as_nanos().max(1) as u64)?;
    }
    Ok(histogram)
}

fn prometheus_registry() -> prometheus::Registry {
    prometheus::Registry::new()
}
