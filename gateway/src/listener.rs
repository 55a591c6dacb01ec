//! The WebSocket listener: a connection permit first, then accept, then the
//! TLS and WebSocket handshakes under one timeout, then the connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::connection;
use crate::handshake::{self, Refusal};
use crate::server::Shared;

/// Bind the WebSocket listener.
///
/// # Errors
/// An error that says how to fix a refused bind (privileged port, address
/// in use).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot listen on {addr}: permission denied. Ports below 1024 need root or the \
             CAP_NET_BIND_SERVICE capability: grant it with \
             `sudo setcap cap_net_bind_service=+ep $(command -v tidegate)` (or \
             `securityContext.capabilities.add: [NET_BIND_SERVICE]` on Kubernetes), or set \
             server.listen (TIDEGATE__SERVER__LISTEN) to an unprivileged port such as 0.0.0.0:8443"
        ),
        io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "cannot listen on {addr}: the address is in use by another process; stop it or set \
             server.listen (TIDEGATE__SERVER__LISTEN) to another port"
        ),
        _ => anyhow::anyhow!("cannot listen on {addr}: {e}"),
    })
}

/// Accept connections until shutdown. Each connection runs in a task
/// tracked by `tracker`, holding one of `server.max_connections` permits.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(shared.max_connections));
    loop {
        let permit = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or a connection reset before
                    // accept: pause briefly instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tracker.spawn(async move {
            let _permit = permit;
            // Boxed: its state (TLS handshake, request buffers) is only
            // needed until the upgrade, not for the connection's life.
            let handshakes = Box::pin(async {
                let tls = acceptor.accept(tcp).await.map_err(Rejection::Tls)?;
                handshake::accept(tls, peer, &shared)
                    .await
                    .map_err(Rejection::Upgrade)
            });
            match tokio::time::timeout(shared.handshake_timeout, handshakes).await {
                Ok(Ok(accepted)) => connection::serve(accepted, shared).await,
                Ok(Err(rejection)) => {
                    let reason = rejection.reason();
                    shared
                        .metrics
                        .connections_rejected
                        .with_label_values(&[reason])
                        .inc();
                    tracing::debug!(%peer, reason, "connection not upgraded: {rejection}");
                }
                Err(_) => {
                    shared
                        .metrics
                        .connections_rejected
                        .with_label_values(&["handshake_timeout"])
                        .inc();
                    tracing::debug!(%peer, "handshake timed out");
                }
            }
        });
    }
    tracing::info!("listener closed: no new connections");
}

#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error(transparent)]
    Upgrade(Refusal),
}

impl Rejection {
    fn reason(&self) -> &'static str {
        match self {
            Rejection::Tls(_) => "tls",
            Rejection::Upgrade(refusal) => refusal.reason(),
        }
    }
}
