//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and the
//! management API under `/v1/` (and API Gateway's `/@connections/`)
//! behind a bearer token.
//!
//! - [`api`]: the token and JSON errors every management endpoint shares.
//! - `connections`: `/v1/connections`, `/@connections`, `/v1/groups`.
//! - `functions`: `/v1/functions` (uploads, versions, the live one).
//! - `routes`: `/v1/routes`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use runtime::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::publisher::Publisher;
use crate::router::RouteTable;
use crate::store::Catalog;

pub mod api;
mod connections;
mod functions;
mod routes;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// Rendered by `/metrics`.
    pub metrics: Metrics,
    /// Its readiness feeds `/readyz`; `None` when copies are off.
    pub publisher: Option<Publisher>,
    /// The functions this node serves.
    pub registry: Arc<Registry>,
    /// The routes, changed through `/v1/routes`.
    pub routes: Arc<RouteTable>,
    /// The connections and groups of `/v1/connections`, `/v1/groups`.
    pub hub: Arc<Hub>,
    /// The cluster, when this node is part of one: connections of other
    /// nodes, `/v1/nodes`.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Largest message sent to a connection (`websocket.max_message_size`).
    pub max_message_size: usize,
    /// Longest a request body may stop arriving (`admin.header_timeout`).
    pub body_timeout: std::time::Duration,
    /// True once the WebSocket listener accepts, false again on shutdown.
    pub accepting: Arc<AtomicBool>,
    /// Bearer token of `/v1/`; `None` turns the management API off.
    pub token: Option<Arc<str>>,
    /// What `/v1/functions` and `/v1/routes` change, kept on disk.
    pub catalog: Arc<Catalog>,
    /// A new cluster node: true once it applied the changes the cluster's
    /// registry held when it started (not ready before).
    pub caught_up: Option<tokio::sync::watch::Receiver<bool>>,
}

/// How many admin connections, and how patient with each.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Most connections open at once; more wait in the accept backlog.
    pub max_connections: usize,
    /// Longest a client may take to send a request head (also while a
    /// kept-alive connection sits idle between requests), and to take
    /// any part of a response.
    pub header_timeout: Duration,
}

/// How long open admin connections get to finish at shutdown.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// The warning for an admin listener reachable from other hosts without
/// a token, if `listen` is one.
pub fn exposure_warning(listen: SocketAddr, token: Option<&str>) -> Option<String> {
    if listen.ip().is_loopback() {
        return None;
    }
    Some(match token {
        None => format!(
            "the admin listener on {listen} is reachable from other hosts and has no admin.token: \
             anyone who reaches it reads /metrics; bind admin.listen to 127.0.0.1, or set \
             admin.token and restrict access to the port"
        ),
        // The token guards /v1/ only: probes and scrapers do not send one.
        Some(_) => format!(
            "the admin listener on {listen} is reachable from other hosts: /v1/ needs \
             admin.token, but /metrics, /healthz and /readyz answer anyone who reaches it; \
             restrict access to the port (a network policy, a firewall)"
        ),
    })
}

/// The admin endpoints, as a router.
fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(connections::router())
        .merge(functions::router())
        .merge(routes::router())
        .route("/v1", axum::routing::any(api::no_such_path))
        .route("/v1/{*rest}", axum::routing::any(api::no_such_path))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::guard,
        ))
        .with_state(state)
}

/// Serve the admin endpoints on `listener` until `shutdown`: a place is
/// taken before each accept (at most `limits.max_connections` open), and a
/// client that does not send a request head within `limits.header_timeout`
/// is dropped.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    limits: AdminLimits,
    shutdown: CancellationToken,
) {
    serve_router(listener, router(state), limits, shutdown).await;
}

async fn serve_router(
    listener: TcpListener,
    app: Router,
    limits: AdminLimits,
    shutdown: CancellationToken,
) {
    let places = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let place = tokio::select! {
            _ = shutdown.cancelled() => break,
            place = places.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
        };
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // A client that stops taking its responses would hold its place
        // forever (the header timeout only runs while a request head is
        // awaited): a write that makes no progress for as long fails.
        let mut io = TimeoutStream::new(tcp);
        io.set_write_timeout(Some(limits.header_timeout));
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(
                TokioIo::new(Box::pin(io)),
                TowerToHyperService::new(app.clone()),
            );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("admin connection: {e}");
            }
            drop(place);
        });
    }
    if tokio::time::timeout(SHUTDOWN_WAIT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("admin connections still open at shutdown are closed");
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if !state.accepting.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not accepting connections\n",
        )
            .into_response();
    }
    if let Some(caught_up) = &state.caught_up
        && !*caught_up.borrow()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "catching up with the cluster's registry (the functions and routes the other nodes \
             serve)\n",
        )
            .into_response();
    }
    let copies = match &state.publisher {
        None => "message copies off",
        // Not ready whenever a new copy would be refused: the broker cannot
        // take it directly (unreachable, or the spool is being replayed)
        // and the spool has no room (counting room reserved for copies
        // awaiting their confirm) or cannot be written.
        Some(publisher) if !publisher.is_ready() => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "message copies cannot be kept: the spool is full or failing and the broker \
                 cannot take them directly\n",
            )
                .into_response();
        }
        Some(publisher) if publisher.is_connected() => "broker connected",
        Some(_) => "broker unreachable, spooling",
    };
    (StatusCode::OK, format!("ready ({copies})\n")).into_response()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// An admin listener with only `/healthz`, on a free port.
    async fn start(limits: AdminLimits) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
        let stop = CancellationToken::new();
        tokio::spawn(serve_router(listener, app, limits, stop.clone()));
        (addr, stop)
    }

    /// `GET /healthz`: the response's first line.
    async fn healthz(addr: SocketAddr) -> String {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        response.lines().next().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn a_client_that_sends_no_request_head_is_dropped() {
        let limits = AdminLimits {
            max_connections: 4,
            header_timeout: Duration::from_millis(200),
        };
        let (addr, _stop) = start(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
            .await
            .expect("dropped after admin.header_timeout");
        // hyper may answer 408 before closing; either way the socket ends.
        if let Ok(n) = read
            && n > 0
        {
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"));
        }
        assert_eq!(healthz(addr).await, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_until_one_closes() {
        let limits = AdminLimits {
            max_connections: 2,
            header_timeout: Duration::from_secs(60),
        };
        let (addr, _stop) = start(limits).await;
        let first = TcpStream::connect(addr).await.unwrap();
        let _second = TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::spawn(healthz(addr));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiting.is_finished(), "a third connection is not served");
        drop(first);
        let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("served once a place is free")
            .unwrap();
        assert_eq!(answer, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn clients_that_do_not_take_their_responses_give_their_places_back() {
        let limits = AdminLimits {
            max_connections: 2,
            header_timeout: Duration::from_millis(300),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Responses of 64 KiB, so a client that does not read soon fills
        // its socket's buffers.
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/big", get(|| async { "x".repeat(64 << 10) }));
        let stop = CancellationToken::new();
        tokio::spawn(serve_router(listener, app, limits, stop.clone()));
        let mut stalled = Vec::new();
        for _ in 0..2 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let mut tcp = socket.connect(addr).await.unwrap();
            let requests = "GET /big HTTP/1.1\r\nHost: admin\r\n\r\n".repeat(200);
            tcp.write_all(requests.as_bytes()).await.unwrap();
            stalled.push(tcp);
        }
        let answer = tokio::time::timeout(Duration::from_secs(10), healthz(addr))
            .await
            .expect("probes are answered once the stalled clients are dropped");
        assert_eq!(answer, "HTTP/1.1 200 OK");
    }

    #[test]
    fn an_admin_listener_beyond_loopback_without_a_token_is_warned_about() {
        let public: SocketAddr = "0.0.0.0:9090".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let warning = exposure_warning(public, None).expect("warned");
        assert!(warning.contains("admin.token"), "{warning}");
        let with_token = exposure_warning(public, Some("a-long-enough-token")).expect("warned");
        assert!(with_token.contains("/metrics"), "{with_token}");
        assert!(exposure_warning(local, None).is_none());
        assert!(exposure_warning("[::1]:9090".parse().unwrap(), None).is_none());
    }
}
