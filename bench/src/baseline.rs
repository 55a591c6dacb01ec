//! The baseline: a plain tokio-tungstenite echo server, over TCP or over
//! rustls, with the same buffer sizes as the gateway. Whatever Tidegate
//! does beyond this (functions, copies, limits) is what its ratios show.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Serve echo on `listen` until killed; prints `listening on URL`.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(listen: SocketAddr, tls: bool) -> anyhow::Result<()> {
    crate::process::raise_file_limit();
    let (listener, url) = bind(listen, tls).await?;
    println!("listening on {url}");
    run(listener, tls).await
}

/// Bind the listener; returns it and its URL.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(listen: SocketAddr, tls: bool) -> anyhow::Result<(TcpListener, String)> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let local = listener.local_addr()?;
    Ok((
        listener,
        format!("{}://{local}/", if tls { "wss" } else { "ws" }),
    ))
}

/// Accept and echo until the task is dropped.
///
/// # Errors
/// When the TLS certificate cannot be made.
pub async fn run(listener: TcpListener, tls: bool) -> anyhow::Result<()> {
    let acceptor = if tls {
        Some(self_signed_acceptor()?)
    } else {
        None
    };
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => continue,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        echo(stream).await;
                    }
                }
                None => echo(tcp).await,
            }
        });
    }
}

/// The same buffer sizes and limits as the gateway's defaults.
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(2 << 10)
        .write_buffer_size(8 << 10)
        .max_message_size(Some(128 << 10))
        .max_frame_size(Some(128 << 10))
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(stream: S) {
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config())).await else {
        return;
    };
    // tokio-tungstenite's own echo example: forward feeds every message
    // that is ready and flushes when none is, like the gateway's writer.
    let (sink, stream) = ws.split();
    let _ = stream
        .try_filter(|message| std::future::ready(message.is_text() || message.is_binary()))
        .forward(sink)
        .await;
}

fn self_signed_acceptor() -> anyhow::Result<TlsAcceptor> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    //! The load generator against the baseline, in process: every scenario
    //! runs and produces its figures.

    use std::time::Duration;

    use crate::client::Target;
    use crate::scenario;

    async fn baseline(tls: bool) -> Target {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (listener, url) = super::bind("127.0.0.1:0".parse().unwrap(), tls)
            .await
            .unwrap();
        tokio::spawn(super::run(listener, tls));
        Target::parse(&url).unwrap()
    }

    #[tokio::test]
    async fn echo_verifies_replies_and_reports_throughput() {
        let target = baseline(true).await;
        let options = scenario::echo::Options {
            connections: 4,
            size: 100,
            window: 8,
            // Long enough that a loaded machine still gets replies in.
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(100),
            server_pid: Some(std::process::id()),
        };
        let figures = scenario::echo::run(&target, "baseline", &options)
            .await
            .unwrap();
        assert!(figures.get("msgs_per_s").unwrap() > 0.0, "{figures:?}");
        assert!(figures.get("server_cpu_us_per_msg").is_some());
    }

    #[tokio::test]
    async fn latency_counts_every_reply() {
        let target = baseline(false).await;
        let options = scenario::latency::Options {
            connections: 2,
            rate: 500.0,
            size: 64,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(50),
        };
        let figures = scenario::latency::run(&target, "baseline", &options)
            .await
            .unwrap();
        assert_eq!(figures.get("lost"), Some(0.0), "{figures:?}");
        assert!(figures.get("p99_us").unwrap() >= figures.get("p50_us").unwrap());
    }

    #[tokio::test]
    async fn connect_and_idle_report_their_figures() {
        let target = baseline(true).await;
        let connect = scenario::connect::Options {
            concurrency: 2,
            duration: Duration::from_secs(1),
            server_pid: None,
        };
        let figures = scenario::connect::run(&target, "baseline", &connect)
            .await
            .unwrap();
        assert!(figures.get("connects_per_s").unwrap() > 0.0, "{figures:?}");
        let idle = scenario::idle::Options {
            connections: 50,
            concurrency: 8,
            server_pid: std::process::id(),
            settle: Duration::from_millis(50),
        };
        let figures = scenario::idle::run(&target, "baseline", &idle)
            .await
            .unwrap();
        assert!(figures.get("rss_after_mib").unwrap() > 0.0, "{figures:?}");
    }
}
