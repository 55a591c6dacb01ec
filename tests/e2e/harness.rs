//! Test harness: start the real `tidegate` binary, talk TLS WebSockets to
//! it, read its metrics, and read the real RabbitMQ queue.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The broker every test uses.
pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A WebSocket client connection.
pub type Client = WebSocketStream<TlsStream<TcpStream>>;

/// A running gateway, killed on drop; its queue is deleted on drop too.
pub struct Gateway {
    child: Option<Child>,
    /// The WebSocket listener.
    pub wss: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The queue copies go to.
    pub queue: String,
    /// Whether the queue is this gateway's own (deleted on drop), rather
    /// than one the test passed in and deletes itself.
    owns_queue: bool,
    /// A fresh directory for this gateway (its config file; its state
    /// unless [`Options::state`] chose another).
    pub state: tempfile::TempDir,
    /// The state directory in use (spool, artifacts, certificate).
    state_dir: PathBuf,
    /// Everything the gateway wrote to stderr, for failure messages.
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

/// How to start a gateway.
#[derive(Default, Clone)]
pub struct Options {
    /// Extra `TIDEGATE__*` variables.
    pub env: Vec<(String, String)>,
    /// Use this state directory instead of a fresh one (for restarts).
    pub state: Option<PathBuf>,
    /// Use this queue name instead of a fresh one.
    pub queue: Option<String>,
    /// A configuration file's contents, passed with `--config`.
    pub config: Option<String>,
    /// Run in this network namespace (`ip netns exec`, as root).
    pub netns: Option<String>,
}

impl Options {
    /// Use this configuration file's contents.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_owned());
        self
    }

    /// Use this state directory (to restart on the same spool).
    pub fn state(mut self, dir: &Path) -> Self {
        self.state = Some(dir.to_path_buf());
        self
    }

    /// Use this queue; the test deletes it.
    pub fn queue(mut self, queue: &str) -> Self {
        self.queue = Some(queue.to_owned());
        self
    }

    /// Run the gateway in network namespace `name`; its addresses
    /// (`TIDEGATE__SERVER__LISTEN`, `TIDEGATE__ADMIN__LISTEN`,
    /// `TIDEGATE__QUEUE__URL`) are then the test's to set.
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// Add a `TIDEGATE__*` variable.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }
}

/// A config file serving the chat function on `/chat`.
pub fn chat_config() -> String {
    format!(
        r#"
        [functions.chat]
        wasm = "{}"
        [routes]
        "/chat" = "chat"
        "#,
        tidegate_functions::CHAT_PATH
    )
}

/// A fresh queue name, unique to this test run.
pub fn unique_queue() -> String {
    format!("tidegate.test.{}", uuid::Uuid::now_v7().simple())
}

impl Gateway {
    /// Start `tidegate serve --dev` on ephemeral ports with a fresh queue
    /// and state directory, and wait until it is listening.
    pub fn start(options: Options) -> Self {
        let state = tempfile::tempdir().expect("temp dir");
        let state_path = options
            .state
            .clone()
            .unwrap_or_else(|| state.path().to_path_buf());
        let queue = options.queue.clone().unwrap_or_else(unique_queue);
        let mut command = match &options.netns {
            // `ip netns exec` enters the namespace and execs the gateway:
            // the child's pid is the gateway's, for signals.
            Some(netns) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", netns])
                    .arg(env!("CARGO_BIN_EXE_tidegate"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_tidegate")),
        };
        command
            .args(["serve", "--dev"])
            .env("RUST_LOG", "info,gateway=debug")
            .env("TIDEGATE__SERVER__LISTEN", "127.0.0.1:0")
            .env("TIDEGATE__ADMIN__LISTEN", "127.0.0.1:0")
            .env("TIDEGATE__SERVER__STATE_DIR", &state_path)
            .env("TIDEGATE__QUEUE__QUEUE", &queue)
            // Each gateway its own push queue, so pushes meant for one
            // test never reach another's gateway.
            .env("TIDEGATE__QUEUE__PUSH_QUEUE", format!("{queue}.push"))
            .env("TIDEGATE__QUEUE__URL", BROKER)
            // Shutdowns close every connection at once, unless a test
            // sets a window.
            .env("TIDEGATE__SERVER__DRAIN_WINDOW", "0s")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(toml) = &options.config {
            let path = state.path().join("tidegate.toml");
            std::fs::write(&path, toml).expect("write config");
            command.arg("--config").arg(path);
        }
        for (key, value) in &options.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start tidegate");
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("Tidegate listening on wss://") {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        // Long enough for a first start that compiles large components
        // (the JavaScript and Python ones take tens of seconds each in a
        // debug build); a start that fails says so at once, on stderr.
        let line = match rx.recv_timeout(Duration::from_secs(240)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "tidegate did not start; its log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        // "127.0.0.1:PORT/ (admin http://127.0.0.1:PORT/metrics)"
        let (wss, rest) = line.split_once("/ (admin http://").expect("listening line");
        let admin = rest.trim_end_matches("/metrics)");
        Self {
            child: Some(child),
            wss: wss.parse().expect("wss address"),
            admin: admin.parse().expect("admin address"),
            owns_queue: options.queue.is_none(),
            state_dir: state_path,
            queue,
            state,
            log,
        }
    }

    /// The dev certificate the gateway generated.
    pub fn certificate(&self, state: Option<&Path>) -> PathBuf {
        state
            .unwrap_or(&self.state_dir)
            .join("tls")
            .join("dev-cert.pem")
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Connect a client to `path` over TLS, trusting the dev certificate.
    pub async fn connect(&self, path: &str) -> Client {
        self.try_connect(path, None).await.expect("connect")
    }

    /// Connect a client, optionally with a custom state dir's certificate.
    pub async fn try_connect(
        &self,
        path: &str,
        state: Option<&Path>,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        Endpoint {
            wss: self.wss,
            cert: self.certificate(state),
        }
        .connect(path)
        .await
    }

    /// Where clients connect, detached from the process (for clients that
    /// outlive it).
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            wss: self.wss,
            cert: self.certificate(None),
        }
    }

    /// Connect with extra request headers; a refused upgrade gives its
    /// HTTP status and body as the error.
    pub async fn connect_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, (u16, String)> {
        let tls = tls_connect(self).await;
        let mut request = format!("wss://localhost:{}{path}", self.wss.port())
            .into_client_request()
            .unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .unwrap(),
                value.parse().unwrap(),
            );
        }
        match tokio_tungstenite::client_async(request, tls).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err((status, body))
            }
            Err(e) => panic!("connect failed without an HTTP status: {e}"),
        }
    }

    /// `GET path` on the admin listener: status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path, &[]).await
    }

    /// `method path` on the admin listener with a bearer token and a body
    /// of `content_type`: status and body.
    pub async fn admin_request(
        &self,
        method: &str,
        path: &str,
        token: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, String) {
        let bearer = format!("Bearer {token}");
        http_request(
            self.admin,
            method,
            path,
            &[("Authorization", &bearer), ("Content-Type", content_type)],
            body,
        )
        .await
    }

    /// `GET path` on the admin listener with extra headers.
    pub async fn admin_get_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        http_get(self.admin, path, headers).await
    }

    /// Current metric values, by `name{labels}` as rendered.
    pub async fn metrics(&self) -> HashMap<String, f64> {
        let (status, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        parse_metrics(&body)
    }

    /// One metric's value, 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics().await.get(series).copied().unwrap_or(0.0)
    }

    /// Wait (up to 10 s) until `series` reads `value`. Counters move when
    /// the gateway has finished with a connection, which can be just after
    /// the client saw the refusal or the drop.
    pub async fn metric_reaches(&self, series: &str, value: f64) {
        self.metric_meets(series, &format!("{value}"), |now| now == value)
            .await;
    }

    /// Wait (up to 10 s) until `series` reads at least `value`.
    pub async fn metric_reaches_at_least(&self, series: &str, value: f64) {
        self.metric_meets(series, &format!("at least {value}"), |now| now >= value)
            .await;
    }

    async fn metric_meets(&self, series: &str, expected: &str, meets: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.metric(series).await;
            if meets(now) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} is {now}, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The gateway's resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    /// Kill the process with SIGKILL: no drain, no flush.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("wait");
        assert!(!status.success(), "killed, not exited: {status:?}");
    }

    /// Send the process a signal (`TERM`, `STOP`, `CONT`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}: {status}");
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tidegate did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.owns_queue {
            return;
        }
        let queue = self.queue.clone();
        // Runs on its own thread: Drop may be called inside a runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                delete_queue(&queue).await;
                delete_queue(&format!("{queue}.push")).await;
            });
        })
        .join();
    }
}

/// Delete test exchanges.
pub async fn delete_exchanges(exchanges: &[String]) {
    if let Ok(connection) = Connection::connect(BROKER, ConnectionProperties::default()).await {
        if let Ok(channel) = connection.create_channel().await {
            for exchange in exchanges {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = connection.close(200, "bye".into()).await;
    }
}

/// Delete a test queue.
pub async fn delete_queue(queue: &str) {
    if let Ok(connection) = Connection::connect(BROKER, ConnectionProperties::default()).await {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = connection.close(200, "bye".into()).await;
    }
}

/// A gateway's WebSocket address and the certificate to trust.
#[derive(Clone)]
pub struct Endpoint {
    /// The WebSocket listener.
    pub wss: SocketAddr,
    /// The dev certificate.
    pub cert: PathBuf,
}

impl Endpoint {
    /// Connect a client to `path` over TLS.
    pub async fn connect(
        &self,
        path: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let tcp = TcpStream::connect(self.wss).await?;
        self.connect_on(tcp, path).await
    }

    /// Connect a client to `path` over TLS on a TCP connection the test
    /// opened itself (from another source address, or after a PROXY
    /// header).
    pub async fn connect_on(
        &self,
        tcp: TcpStream,
        path: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let connector = tls_connector(&self.cert);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await?;
        let request = format!("wss://localhost:{}{path}", self.wss.port())
            .into_client_request()
            .unwrap();
        let (ws, _) = tokio_tungstenite::client_async(request, tls).await?;
        Ok(ws)
    }
}

/// A TCP connection to `to` from the loopback address `from` (any of
/// 127.0.0.0/8), so a test can be several clients.
pub async fn tcp_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from.parse().expect("address"), 0))
        .expect("bind the client address");
    socket.connect(to).await.expect("tcp connect")
}

/// A TLS connection to the gateway, without a WebSocket upgrade.
pub async fn tls_connect(gateway: &Gateway) -> TlsStream<TcpStream> {
    let connector = tls_connector(&gateway.certificate(None));
    let tcp = TcpStream::connect(gateway.wss).await.expect("tcp connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.expect("tls handshake")
}

fn tls_connector(cert: &Path) -> TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert).expect("dev certificate") {
        roots.add(cert.expect("certificate")).expect("add root");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// A minimal HTTP/1.1 GET: status and body.
pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    http_request(addr, "GET", path, headers, &[]).await
}

/// A minimal HTTP/1.1 request with a body: status and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("admin connect");
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // A server that refuses the body (too large) answers and closes
    // without reading it: what it said is read all the same.
    let _ = stream.write_all(body).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// Every series by `name{labels}` as rendered. A series with a `version`
/// label is also summed under its name without it, so a test can read a
/// function's total over its versions (`..._instances{function="echo"}`).
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut metrics = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if let Some(all_versions) = without_version(series) {
            *metrics.entry(all_versions).or_insert(0.0) += value;
        }
        metrics.insert(series.to_owned(), value);
    }
    metrics
}

/// `series` without its `version="..."` label, if it has one.
fn without_version(series: &str) -> Option<String> {
    let (name, labels) = series.strip_suffix('}')?.split_once('{')?;
    let kept: Vec<&str> = labels
        .split(',')
        .filter(|label| !label.starts_with("version=\""))
        .collect();
    if kept.len() == labels.split(',').count() {
        return None;
    }
    Some(if kept.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{}}}", kept.join(","))
    })
}

/// Poll `condition` until it holds, or panic after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A message read back from the queue.
#[derive(Debug)]
pub struct Copy {
    /// The body.
    pub body: Vec<u8>,
    /// `content_type`.
    pub content_type: String,
    /// `message_id`.
    pub message_id: String,
    /// Whether `delivery_mode` is 2 (persistent).
    pub persistent: bool,
    /// `timestamp`.
    pub timestamp: u64,
    /// The string headers.
    pub headers: HashMap<String, String>,
}

/// The bodies of copies, as text.
pub fn bodies(copies: &[Copy]) -> Vec<String> {
    copies
        .iter()
        .map(|c| String::from_utf8(c.body.clone()).expect("a text body"))
        .collect()
}

/// Read (and acknowledge) every message now in `queue`, waiting up to
/// `timeout` for at least `expected` to arrive.
pub async fn drain_queue(queue: &str, expected: usize, timeout: Duration) -> Vec<Copy> {
    let connection = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    // In async mode replies can come before the gateway has reached the
    // broker and declared its queue: declare it the same way (durable, no
    // arguments) so that reading waits for the copies instead of failing.
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue.declare");
    let deadline = Instant::now() + timeout;
    let mut copies = Vec::new();
    loop {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        match got {
            Some(message) => {
                let properties = &message.delivery.properties;
                let headers = properties
                    .headers()
                    .as_ref()
                    .map(|table| {
                        table
                            .inner()
                            .iter()
                            .filter_map(|(key, value)| match value {
                                AMQPValue::LongString(s) => Some((key.to_string(), s.to_string())),
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                copies.push(Copy {
                    body: message.delivery.data.clone(),
                    content_type: properties
                        .content_type()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    message_id: properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    persistent: *properties.delivery_mode() == Some(2),
                    timestamp: properties.timestamp().unwrap_or_default(),
                    headers,
                });
            }
            None if copies.len() >= expected || Instant::now() > deadline => break,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    copies
}

/// Sending shorthands.
pub trait SendText {
    /// Send a text message.
    async fn send_text(&mut self, text: &str);
}

impl SendText for Client {
    async fn send_text(&mut self, text: &str) {
        self.send(Message::Text(text.into())).await.expect("send");
    }
}

/// Wait until the gateway holds no open connection on `/`.
pub async fn all_released(gateway: &Gateway, timeout: Duration) {
    eventually("every connection is released", timeout, || async {
        gateway
            .metric("tidegate_connections_open{route=\"/\"}")
            .await
            == 0.0
    })
    .await;
}

/// A well-behaved client is still served: one echo round trip.
pub async fn still_serves(gateway: &Gateway) {
    let mut client = gateway.connect("/").await;
    assert_eq!(
        round_trip(&mut client, Message::Text("still here".into())).await,
        Message::Text("still here".into())
    );
}

/// Send a message and read the reply.
pub async fn round_trip(client: &mut Client, message: Message) -> Message {
    client.send(message).await.expect("send");
    next_data(client).await
}

/// The next text or binary message (pings and pongs skipped).
pub async fn next_data(client: &mut Client) -> Message {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), client.next())
            .await
            .expect("a reply within 30 s")
            .expect("the connection is open")
            .expect("a valid frame");
        if message.is_text() || message.is_binary() || message.is_close() {
            return message;
        }
    }
}

/// Read until the close frame; its code.
pub async fn close_code(client: &mut Client) -> Option<u16> {
    close_frame(client).await.map(|(code, _)| code)
}

/// Read until the close frame; its code and reason.
pub async fn close_frame(client: &mut Client) -> Option<(u16, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(30), client.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                // Send the queued close reply, so the gateway ends the
                // connection now rather than after its close timeout.
                let _ = client.flush().await;
                return frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()));
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) | Err(_) => return None,
        }
    }
    None
}

/// The next message, as JSON.
pub async fn json(client: &mut Client) -> serde_json::Value {
    match next_data(client).await {
        Message::Text(text) => serde_json::from_str(&text).expect("JSON"),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Nothing arrives for a short while.
pub async fn quiet(client: &mut Client) {
    use futures_util::StreamExt;
    let next = tokio::time::timeout(Duration::from_millis(300), client.next()).await;
    assert!(next.is_err(), "expected nothing, got {next:?}");
}

/// Publish one push message with `headers`.
pub async fn push(queue: &str, headers: &[(&str, AMQPValue)], content_type: &str, body: &[u8]) {
    let connection = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = connection.create_channel().await.unwrap();
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(ShortString::from(*name), value.clone());
    }
    channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_headers(table)
                .with_content_type(ShortString::from(content_type)),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "bye".into()).await;
}

/// A header value of text.
pub fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}
