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
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let local = listener.local_addr()?;
    let acceptor = if tls {
        Some(self_signed_acceptor()?)
    } else {
        None
    };
    println!("listening on {}://{local}/", if tls { "wss" } else { "ws" });
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
        .read_buffer_size(8 << 10)
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
