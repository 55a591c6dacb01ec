//! Thousands of idle connections that never send anything are closed by
//! the handshake or idle timeouts, and the memory they took is given back.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Gateway, Options, round_trip};

/// Connections that open TCP and send nothing (not even a TLS hello).
const SILENT: usize = 4_000;
/// Connections that complete the upgrade, then send nothing.
const IDLE: usize = 1_000;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_connections_are_closed_by_timeouts_and_memory_returns() {
    // The test holds 5,000 sockets itself.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let gateway = Gateway::start(
        Options::default()
            .env("TIDEGATE__SERVER__TLS_HANDSHAKE_TIMEOUT", "3s")
            .env("TIDEGATE__WEBSOCKET__IDLE_TIMEOUT", "4s")
            .env("TIDEGATE__SERVER__MAX_HANDSHAKES", "6000")
            .env("TIDEGATE__SERVER__MAX_CONNECTIONS_PER_IP", "6000")
            // One test client plays thousands of hosts.
            .env("TIDEGATE__SERVER__MAX_HANDSHAKES_PER_IP", "6000"),
    );
    // Warm up: the function loaded, an instance made, the broker linked.
    let mut warm = gateway.connect("/").await;
    round_trip(&mut warm, Message::Text("warm".into())).await;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = gateway.rss();

    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(gateway.wss).await.expect("connect"));
    }
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(gateway.connect("/").await);
    }
    // (On a loaded machine the first ones may already be closing.)
    let peak = gateway.rss();

    // The gateway drops the silent ones at the TLS handshake timeout and
    // closes the idle ones with 1001 at the idle timeout.
    let silent_closed = tokio::spawn(async move {
        let mut closed = 0;
        for mut tcp in silent {
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(
                Duration::from_secs(120),
                tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
            )
            .await;
            if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
                closed += 1;
            }
        }
        closed
    });
    let mut codes = std::collections::HashMap::new();
    for mut client in idle {
        let code = loop {
            match tokio::time::timeout(Duration::from_secs(120), client.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                _ => break None,
            }
        };
        *codes.entry(code).or_insert(0usize) += 1;
    }
    assert_eq!(
        silent_closed.await.unwrap(),
        SILENT,
        "every silent connection dropped"
    );
    assert_eq!(codes.get(&Some(1001)).copied(), Some(IDLE), "{codes:?}");
    crate::harness::all_released(&gateway, Duration::from_secs(120)).await;
    gateway
        .metric_reaches(
            "tidegate_connections_rejected_total{reason=\"tls_handshake_timeout\"}",
            SILENT as f64,
        )
        .await;

    // Memory goes back near where it started.
    let mut after = gateway.rss();
    let limit = before + before / 4 + (4 << 20);
    for _ in 0..40 {
        if after <= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = gateway.rss();
    }
    println!(
        "RSS: {:.1} MiB before, {:.1} MiB with {} connections, {:.1} MiB after they closed",
        mib(before),
        mib(peak),
        SILENT + IDLE,
        mib(after)
    );
    assert!(
        after <= limit,
        "RSS {:.1} MiB after the connections closed; {:.1} MiB before, {:.1} MiB at the peak",
        mib(after),
        mib(before),
        mib(peak)
    );
    // And the gateway still serves.
    crate::harness::still_serves(&gateway).await;
}
