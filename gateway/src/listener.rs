//! The WebSocket listeners: a handshake place first, then accept, the
//! PROXY header from a trusted balancer, a place among the client
//! address's handshakes (or the socket is closed at once), admission
//! (per-address and total limits), the TLS handshake and the WebSocket
//! upgrade, each under its own timeout, then the connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::{self, ConnectionSettings};
use crate::handshake::{self, Refusal, Upgrader};
use crate::limits::{Admission, HandshakeSlot};
use crate::metrics::Metrics;
use crate::proxy_protocol::{self, ProxyHeaderError};

/// What the listeners need: who is let in, how long each step may take,
/// the upgrade, and what connections need once open.
pub struct Intake {
    /// Connection limits.
    pub admission: Admission,
    /// Balancers whose connections start with a PROXY protocol header.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Longest the TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// Longest the PROXY header and the upgrade request may take.
    pub handshake_timeout: Duration,
    /// The HTTP upgrade.
    pub upgrader: Upgrader,
    /// What open connections need.
    pub connections: Arc<ConnectionSettings>,
    /// Refused connections are counted here.
    pub metrics: Metrics,
    /// Cancelled once, when the gateway starts shutting down.
    pub shutdown: CancellationToken,
}

/// Bind a WebSocket listener.
///
/// # Errors
/// An error that says how to fix a refused bind (privileged port, address
/// in use).
pub async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot listen on {addr}: permission denied. Ports below 1024 need root or the \
             CAP_NET_BIND_SERVICE capability: grant it with \
             `sudo setcap cap_net_bind_service=+ep $(command -v tidegate)` (or \
             `securityContext.capabilities.add: [NET_BIND_SERVICE]` on Kubernetes), or set \
             {key} to an unprivileged port such as 0.0.0.0:8443"
        ),
        io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "cannot listen on {addr}: the address is in use by another process; stop it or set \
             {key} to another port"
        ),
        _ => anyhow::anyhow!("cannot listen on {addr}: {e}"),
    })
}

/// Accept connections until shutdown, with TLS (`Some` acceptor) or
/// without. Each connection runs in a task tracked by `tracker`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Intake>,
    tracker: TaskTracker,
) {
    loop {
        let place = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            place = shared.admission.handshake_place() => match place {
                Some(place) => place,
                None => break,
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
        let tls = tls.clone();
        let shared = shared.clone();
        tracker.spawn(async move {
            let Some((tcp, client, handshake_slot)) = admit_socket(tcp, peer, &shared).await else {
                return;
            };
            // Refused connections still get their TLS handshake and an
            // HTTP answer that says why; they hold handshake places only.
            let admitted = shared.admission.admit(client.ip());
            let (admitted, refusal) = match admitted {
                Ok(admitted) => (Some(admitted), None),
                Err(refusal) => (None, Some(refusal)),
            };
            let upgraded = match tls {
                Some(acceptor) => upgrade_tls(acceptor, tcp, client, &shared, refusal).await,
                None => upgrade(tcp, client, &shared, refusal)
                    .await
                    .map(Upgraded::Plain),
            };
            drop(place);
            drop(handshake_slot);
            match upgraded {
                Ok(Upgraded::Tls(accepted)) => {
                    connection::serve(accepted, shared.connections.clone()).await;
                }
                Ok(Upgraded::Plain(accepted)) => {
                    connection::serve(accepted, shared.connections.clone()).await;
                }
                Err(rejection) => {
                    reject(&shared, &rejection, client);
                }
            }
            drop(admitted);
        });
    }
    tracing::info!("listener closed: no new connections");
}

/// The first steps after accept, before any TLS work: the client's
/// address (from a PROXY header when the peer is a trusted balancer) and
/// one of that address's handshake places. `None` when the socket is
/// refused; dropping it closes it at once.
async fn admit_socket(
    mut tcp: TcpStream,
    peer: SocketAddr,
    shared: &Intake,
) -> Option<(TcpStream, SocketAddr, HandshakeSlot)> {
    let client = if proxy_protocol::required_from(peer.ip(), &shared.proxy_protocol_from) {
        let header = tokio::time::timeout(
            shared.handshake_timeout,
            proxy_protocol::read_header(&mut tcp),
        )
        .await;
        match header {
            Ok(Ok(client)) => client.unwrap_or(peer),
            Ok(Err(e)) => {
                reject(shared, &Rejection::ProxyHeader(e), peer);
                return None;
            }
            Err(_) => {
                reject(shared, &Rejection::Timeout, peer);
                return None;
            }
        }
    } else {
        peer
    };
    let Some(slot) = shared.admission.handshake_slot(client.ip()) else {
        reject(shared, &Rejection::HandshakesPerAddress, client);
        return None;
    };
    Some((tcp, client, slot))
}

fn reject(shared: &Intake, rejection: &Rejection, client: SocketAddr) {
    let reason = rejection.reason();
    shared
        .metrics
        .connections_rejected
        .with_label_values(&[reason])
        .inc();
    tracing::debug!(%client, reason, "connection not upgraded: {rejection}");
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

enum Upgraded {
    Tls(Box<handshake::Accepted<TlsStream>>),
    Plain(Box<handshake::Accepted<TcpStream>>),
}

async fn upgrade_tls(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    shared: &Intake,
    refusal: Option<Refusal>,
) -> Result<Upgraded, Rejection> {
    // Boxed: the TLS handshake's state is only needed until it completes.
    let tls = Box::pin(tokio::time::timeout(
        shared.tls_handshake_timeout,
        acceptor.accept(tcp),
    ))
    .await
    .map_err(|_| Rejection::TlsTimeout)?
    .map_err(Rejection::Tls)?;
    upgrade(tls, peer, shared, refusal).await.map(Upgraded::Tls)
}

async fn upgrade<S>(
    stream: S,
    peer: SocketAddr,
    shared: &Intake,
    refusal: Option<Refusal>,
) -> Result<Box<handshake::Accepted<S>>, Rejection>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Boxed: the request buffers are only needed until the upgrade.
    Box::pin(tokio::time::timeout(
        shared.handshake_timeout,
        shared.upgrader.accept(stream, peer, refusal),
    ))
    .await
    .map_err(|_| Rejection::Timeout)?
    .map_err(Rejection::Upgrade)
}

#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("TLS handshake not completed within server.tls_handshake_timeout")]
    TlsTimeout,
    #[error("upgrade request not received within server.handshake_timeout")]
    Timeout,
    #[error(transparent)]
    Upgrade(Refusal),
    #[error(transparent)]
    ProxyHeader(ProxyHeaderError),
    #[error(
        "the client's address already holds server.max_handshakes_per_ip handshakes: closed without TLS"
    )]
    HandshakesPerAddress,
}

impl Rejection {
    fn reason(&self) -> &'static str {
        match self {
            Rejection::Tls(_) => "tls",
            Rejection::TlsTimeout => "tls_handshake_timeout",
            Rejection::Timeout => "handshake_timeout",
            Rejection::Upgrade(refusal) => refusal.reason(),
            Rejection::ProxyHeader(_) => "proxy_protocol",
            Rejection::HandshakesPerAddress => "per_ip_handshake_limit",
        }
    }
}
