//! The WebSocket upgrade: read the HTTP request, choose the route, ask the
//! function's `on-connect`, and answer with `101 Switching Protocols` or
//! an HTTP error, before any WebSocket frame is exchanged.

use std::net::SocketAddr;
use std::sync::Arc;

use runtime::{ConnectDecision, Connection, Context, Effect, Function, Registry};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::create_response;
use tokio_tungstenite::tungstenite::http;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::auth::JwtVerifier;
use crate::config::AuthSettings;
use crate::connection::{Opened, Upgraded};
use crate::router::{Route, RouteTable};

/// Most request headers parsed.
const MAX_HEADERS: usize = 64;

/// What the upgrade needs: where each path goes, the functions, who may
/// connect, and the WebSocket settings of new connections.
pub struct Upgrader {
    /// This node's id, the first part of every connection id.
    pub node_id: String,
    /// Path to route.
    pub routes: Arc<RouteTable>,
    /// The functions.
    pub registry: Arc<Registry>,
    /// Where tokens are, and the authorizer function.
    pub auth: AuthSettings,
    /// JWT validation, when configured.
    pub jwt: Option<JwtVerifier>,
    /// Frame and buffer limits of the WebSocket.
    pub ws_config: WebSocketConfig,
    /// Largest request head (`websocket.max_request_head`).
    pub max_request_head: usize,
    /// Request headers passed to functions (`websocket.forward_headers`).
    pub forward_headers: Vec<String>,
    /// Allowed `Origin`s (`websocket.allowed_origins`); empty: any.
    pub allowed_origins: Vec<String>,
}

/// A connection that completed the upgrade, boxed so that handing it on
/// moves a pointer (an async fn keeps its arguments for its whole life).
pub type Accepted<S> = Upgraded<S, Registry>;

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The client went away before sending a whole request.
    #[error("the client closed the connection during the handshake")]
    ClientGone,
    /// The request was answered with an HTTP error.
    #[error("HTTP {status}: {message}")]
    Http {
        /// The status sent.
        status: u16,
        /// Metric label.
        reason: &'static str,
        /// The explanation sent in the body.
        message: String,
    },
    /// Reading or writing failed.
    #[error("handshake I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Refusal {
    /// An HTTP error answer.
    pub fn http(status: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Refusal::Http {
            status,
            reason,
            message: message.into(),
        }
    }

    /// A fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::ClientGone => "client_gone",
            Refusal::Http { reason, .. } => reason,
            Refusal::Io(_) => "io_error",
        }
    }
}

/// The parsed request head.
struct RequestHead {
    request: http::Request<()>,
    /// Bytes after the head: the first frames, if the client did not wait.
    leftover: Vec<u8>,
}

/// What the upgrade learned before answering.
struct Prepared {
    head: RequestHead,
    conn: Connection,
    route: Arc<Route>,
    /// The `connect` function that admitted the client, if the route has
    /// one.
    connected_by: Option<Arc<Function>>,
    /// What it asked for once the connection is open.
    effects: Vec<Effect>,
    expires_at: Option<std::time::Instant>,
}

impl Upgrader {
    /// Run the upgrade on `stream`. A `refusal` decided before the request
    /// (a connection limit) is sent once the request head is read. On refusal
    /// the HTTP error has already been written.
    ///
    /// # Errors
    /// A [`Refusal`] saying why the connection was not upgraded.
    pub async fn accept<S>(
        &self,
        mut stream: S,
        peer: SocketAddr,
        refusal: Option<Refusal>,
    ) -> Result<Box<Accepted<S>>, Refusal>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match self.prepare(&mut stream, peer, refusal).await {
            Ok(Prepared {
                head,
                conn,
                route,
                connected_by,
                effects,
                expires_at,
            }) => {
                let mut response = match create_response(&head.request) {
                    Ok(response) => response,
                    Err(e) => {
                        let refusal = Refusal::http(
                            400,
                            "bad_upgrade",
                            format!("not a WebSocket upgrade: {e}"),
                        );
                        write_refusal(&mut stream, &refusal).await;
                        return Err(refusal);
                    }
                };
                if let Some(protocol) = &conn.subprotocol
                    && let Ok(value) = http::HeaderValue::from_str(protocol)
                {
                    response
                        .headers_mut()
                        .insert("sec-websocket-protocol", value);
                }
                let mut bytes = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
                for (name, value) in response.headers() {
                    bytes.extend_from_slice(name.as_str().as_bytes());
                    bytes.extend_from_slice(b": ");
                    bytes.extend_from_slice(value.as_bytes());
                    bytes.extend_from_slice(b"\r\n");
                }
                bytes.extend_from_slice(b"\r\n");
                stream.write_all(&bytes).await?;
                stream.flush().await?;
                let ws = WebSocketStream::from_partially_read(
                    stream,
                    head.leftover,
                    Role::Server,
                    Some(self.ws_config),
                )
                .await;
                // Boxed, so handing it to the connection moves a pointer: an
                // async fn keeps its arguments for its whole life.
                Ok(Box::new(Upgraded {
                    ws,
                    opened: Opened {
                        ctx: Context {
                            id: conn.id,
                            route: conn.route,
                            claims: conn.claims,
                            state: conn.state,
                        },
                        functions: self.registry.clone(),
                        route,
                        path: conn.path,
                        remote_addr: conn.remote_addr,
                        connected_by,
                        effects,
                        expires_at,
                    },
                }))
            }
            Err(refusal) => {
                write_refusal(&mut stream, &refusal).await;
                Err(refusal)
            }
        }
    }

    async fn prepare<S>(
        &self,
        stream: &mut S,
        peer: SocketAddr,
        refusal: Option<Refusal>,
    ) -> Result<Prepared, Refusal>
    where
        S: AsyncRead + Unpin,
    {
        let head = read_head(stream, self.max_request_head).await?;
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        let request = &head.request;
        if request.method() != http::Method::GET {
            return Err(Refusal::http(
                405,
                "method",
                "only GET upgrades to a WebSocket",
            ));
        }
        check_origin(request, &self.allowed_origins)?;
        let path = request.uri().path().to_owned();
        let Some(route) = self.routes.resolve(&path) else {
            return Err(Refusal::http(
                404,
                "no_route",
                format!("no route serves {path}"),
            ));
        };
        let connect = match route.connect() {
            Some(name) => match self.registry.get(name) {
                Some(function) => Some(function),
                None => {
                    return Err(Refusal::http(
                        503,
                        "function_unavailable",
                        format!("function {name} is not loaded"),
                    ));
                }
            },
            None => None,
        };
        let full_query: Vec<(String, String)> = request
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let mut query = full_query.clone();
        let auth = &self.auth;
        let mut claims = Vec::new();
        let mut expires_at = None;
        if self.jwt.is_some() || auth.authorizer.is_some() {
            // The function never sees the token.
            let token = auth.token.take(request.headers(), &mut query);
            if let Some(verifier) = &self.jwt {
                let Some(token) = token else {
                    return Err(Refusal::http(
                        401,
                        "missing_token",
                        format!(
                            "no token: send it in the {} header (Bearer) or the {} query parameter",
                            auth.token.header, auth.token.query
                        ),
                    ));
                };
                let verified = verifier
                    .verify(&token)
                    .map_err(|reason| Refusal::http(401, "invalid_token", reason))?;
                if verifier.close_on_expiry() {
                    expires_at = verified.deadline();
                }
                claims = verified.claims;
            }
        }
        let headers = self
            .forward_headers
            .iter()
            .flat_map(|name| {
                request
                    .headers()
                    .get_all(name.as_str())
                    .iter()
                    .filter_map(|value| value.to_str().ok())
                    .map(|value| (name.clone(), value.to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let offered: Vec<String> = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        let mut conn = Connection {
            id: format!("{}.{}", self.node_id, uuid::Uuid::now_v7().simple()),
            route: route.path().to_owned(),
            path,
            query,
            headers,
            subprotocol: None,
            remote_addr: peer.to_string(),
            claims,
            state: None,
        };
        if let Some(name) = &auth.authorizer {
            self.authorize(name, &mut conn, request, full_query).await?;
        }
        let Some(function) = connect else {
            // No `connect` function: whoever passed authentication is in.
            return Ok(Prepared {
                head,
                conn,
                route,
                connected_by: None,
                effects: Vec::new(),
                expires_at,
            });
        };
        let conn = Arc::new(conn);
        let decision: ConnectDecision = function.on_connect(conn.clone()).await.map_err(|e| {
            Refusal::http(
                500,
                "function_error",
                format!("the function failed to accept the connection: {}", e.kind()),
            )
        })?;
        // The call has ended, so this is the only reference left.
        let mut conn = Arc::unwrap_or_clone(conn);
        if !decision.accept {
            return Err(Refusal::http(
                refusal_status(decision.status, 403),
                "refused_by_function",
                "connection refused by the function",
            ));
        }
        conn.claims.extend(decision.claims.iter().cloned());
        if let Some(chosen) = &decision.subprotocol {
            if offered.iter().any(|p| p == chosen) {
                conn.subprotocol = Some(chosen.clone());
            } else {
                tracing::warn!(
                    function = function.name(),
                    subprotocol = %chosen,
                    "on-connect chose a subprotocol the client did not offer; none is agreed"
                );
            }
        }
        Ok(Prepared {
            head,
            conn,
            route,
            connected_by: Some(function),
            effects: decision.effects,
            expires_at,
        })
    }

    /// Ask the authorizer function about `conn`: it sees every request header
    /// and the whole query (token included); its claims are added to the
    /// connection's.
    async fn authorize(
        &self,
        name: &str,
        conn: &mut Connection,
        request: &http::Request<()>,
        full_query: Vec<(String, String)>,
    ) -> Result<(), Refusal> {
        let Some(authorizer) = self.registry.get(name) else {
            return Err(Refusal::http(
                503,
                "function_unavailable",
                format!("the authorizer function {name} is not loaded"),
            ));
        };
        let headers = request
            .headers()
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect();
        let probe = Connection {
            query: full_query,
            headers,
            ..conn.clone()
        };
        let decision = authorizer.on_connect(Arc::new(probe)).await.map_err(|e| {
            Refusal::http(
                500,
                "authorizer_error",
                format!("the authorizer failed: {}", e.kind()),
            )
        })?;
        if !decision.accept {
            return Err(Refusal::http(
                refusal_status(decision.status, 401),
                "refused_by_authorizer",
                "connection refused by the authorizer",
            ));
        }
        conn.claims.extend(decision.claims);
        Ok(())
    }
}

/// The status a function chose to refuse with, if it is an HTTP error.
fn refusal_status(chosen: u16, default: u16) -> u16 {
    if (400..=599).contains(&chosen) {
        chosen
    } else {
        default
    }
}

/// Refuse a browser whose page's origin is not on the allow-list. An empty
/// list allows any; a request without `Origin` (not from a browser) is
/// allowed, since `Origin` protects browser users, not the server.
///
/// # Errors
/// A 403 [`Refusal`].
pub fn check_origin(request: &http::Request<()>, allowed: &[String]) -> Result<(), Refusal> {
    if allowed.is_empty() {
        return Ok(());
    }
    let mut origins = request.headers().get_all(http::header::ORIGIN).iter();
    let (Some(origin), None) = (origins.next(), origins.next()) else {
        return match request.headers().contains_key(http::header::ORIGIN) {
            true => Err(Refusal::http(403, "origin", "more than one Origin header")),
            false => Ok(()),
        };
    };
    let origin = String::from_utf8_lossy(origin.as_bytes());
    let normalized = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    if allowed.iter().any(|a| a == "*" || *a == normalized) {
        Ok(())
    } else {
        Err(Refusal::http(
            403,
            "origin",
            format!("origin {origin:?} is not allowed (websocket.allowed_origins)"),
        ))
    }
}

/// Read until the end of the request head, at most `max` bytes.
async fn read_head<S>(stream: &mut S, max: usize) -> Result<RequestHead, Refusal>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(1024.min(max));
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(Refusal::ClientGone);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((request, len)) = parse_head(&buf, max)? {
            let leftover = buf.split_off(len);
            return Ok(RequestHead { request, leftover });
        }
    }
}

/// Parse an upgrade request head from the bytes read so far: the request
/// and the head's length, `None` while it is incomplete (and under `max`
/// bytes), or the HTTP refusal for a head that is malformed or too large.
///
/// # Errors
/// A 400 or 431 [`Refusal`].
pub fn parse_head(buf: &[u8], max: usize) -> Result<Option<(http::Request<()>, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some((build_request(&parsed)?, len))),
        Ok(httparse::Status::Partial) if buf.len() >= max => Err(Refusal::http(
            431,
            "request_too_large",
            format!("the request head is larger than {max} bytes (websocket.max_request_head)"),
        )),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(Refusal::http(
            431,
            "request_too_large",
            format!("more than {MAX_HEADERS} request headers"),
        )),
        Err(e) => Err(Refusal::http(
            400,
            "bad_request",
            format!("malformed HTTP request: {e}"),
        )),
    }
}

fn build_request(parsed: &httparse::Request<'_, '_>) -> Result<http::Request<()>, Refusal> {
    let bad = |message: String| Refusal::http(400, "bad_request", message);
    // Only origin-form targets ("/path?query"): an upgrade names a path on
    // this server, never a proxy target or an authority.
    if !parsed.path.is_some_and(|path| path.starts_with('/')) {
        return Err(bad(
            "the request target must be a path starting with '/'".into()
        ));
    }
    let mut builder = http::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"))
        .version(match parsed.version {
            Some(0) => http::Version::HTTP_10,
            _ => http::Version::HTTP_11,
        });
    for header in parsed.headers.iter() {
        builder = builder.header(header.name, header.value);
    }
    builder
        .body(())
        .map_err(|e| bad(format!("malformed HTTP request: {e}")))
}

async fn write_refusal<S: AsyncWrite + Unpin>(stream: &mut S, refusal: &Refusal) {
    let Refusal::Http {
        status, message, ..
    } = refusal
    else {
        return;
    };
    let status = http::StatusCode::from_u16(*status).unwrap_or(http::StatusCode::BAD_REQUEST);
    let body = format!("{message}\n");
    let response = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(origins: &[&str]) -> http::Request<()> {
        let mut builder = http::Request::builder().uri("/");
        for origin in origins {
            builder = builder.header("origin", *origin);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn a_head_over_the_limit_or_with_too_many_headers_gets_431() {
        let status = |result: Result<Option<(http::Request<()>, usize)>, Refusal>| match result {
            Err(Refusal::Http { status, .. }) => Some(status),
            _ => None,
        };
        // Incomplete and already at the limit.
        let long = format!("GET / HTTP/1.1\r\nX-Pad: {}", "a".repeat(600));
        assert_eq!(status(parse_head(long.as_bytes(), 512)), Some(431));
        assert!(matches!(parse_head(long.as_bytes(), 8192), Ok(None)));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(status(parse_head(head.as_bytes(), 1 << 20)), Some(431));
    }

    #[test]
    fn only_path_request_targets_are_taken() {
        let head =
            |target: &str| format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes();
        assert!(parse_head(&head("/chat?x=1"), 8192).unwrap().is_some());
        for target in ["chat", "example.com:443", "http://example.com/", "*"] {
            let refused = parse_head(&head(target), 8192);
            assert!(
                matches!(refused, Err(Refusal::Http { status: 400, .. })),
                "{target}"
            );
        }
    }

    #[test]
    fn origins_are_checked_against_the_allow_list() {
        let allowed = vec!["https://app.example.com".to_owned()];
        assert!(check_origin(&request(&["https://app.example.com"]), &allowed).is_ok());
        assert!(check_origin(&request(&["HTTPS://App.Example.com/"]), &allowed).is_ok());
        assert!(check_origin(&request(&[]), &allowed).is_ok());
        assert!(check_origin(&request(&["https://evil.example"]), &allowed).is_err());
        assert!(check_origin(&request(&["null"]), &allowed).is_err());
        assert!(
            check_origin(
                &request(&["https://app.example.com", "https://evil.example"]),
                &allowed
            )
            .is_err()
        );
        assert!(check_origin(&request(&["https://evil.example"]), &[]).is_ok());
    }
}
