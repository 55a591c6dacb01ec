//! Configuration: a TOML file, then `TIDEGATE__SECTION__KEY` environment
//! variables over it, read once at start-up and validated into typed
//! [`Settings`]. No other code reads the environment or the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Environment variables with this prefix (then `__`) override the file.
pub const ENV_PREFIX: &str = "TIDEGATE";

/// A configuration error. Every variant names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or the environment could not be read or parsed.
    #[error("{0}")]
    Read(String),
    /// A key has a value that is not allowed.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, as `section.key`.
        key: String,
        /// What is wrong with its value.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------
// The file's shape. Every section and key is optional; defaults are applied
// during validation, where `--dev` can change them.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    websocket: RawWebSocket,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    queue: RawQueue,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    functions: BTreeMap<String, RawFunction>,
    #[serde(default)]
    routes: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    plain_listen: Option<String>,
    node_id: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_handshakes: Option<usize>,
    max_handshakes_per_ip: Option<usize>,
    ipv6_client_prefix: Option<u8>,
    proxy_protocol_from: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    tls_handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    shutdown_grace_period: Option<Duration>,
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default)]
    sni: Vec<RawCertFiles>,
    #[serde(default, with = "humantime_serde")]
    reload_interval: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertFiles {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebSocket {
    max_message_size: Option<usize>,
    max_frame_size: Option<usize>,
    read_buffer_size: Option<usize>,
    write_buffer_size: Option<usize>,
    send_queue: Option<usize>,
    send_queue_bytes: Option<usize>,
    max_request_head: Option<usize>,
    forward_headers: Option<Vec<String>>,
    allowed_origins: Option<Vec<String>>,
    max_message_rate: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_duration: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    send_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token: Option<String>,
    max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    header_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    url: Option<String>,
    queue: Option<String>,
    mode: Option<String>,
    max_in_flight: Option<usize>,
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    reconnect_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    confirm_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    artifact_dir: Option<PathBuf>,
    max_instances: Option<u32>,
    max_total_instances: Option<u32>,
    memory_limit: Option<usize>,
    max_stack: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    long_call_after: Option<Duration>,
    long_call_priority: Option<String>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    unload_after: Option<Duration>,
    max_log_line: Option<usize>,
    max_log_lines_per_second: Option<u32>,
    keep_resident: Option<usize>,
    max_queued: Option<usize>,
    on_error: Option<String>,
    #[serde(default, with = "humantime_serde")]
    fault_backoff: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    token_header: Option<String>,
    token_query: Option<String>,
    authorizer: Option<String>,
    jwt: Option<RawJwt>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    hs256_secret: Option<String>,
    rs256_public_keys: Option<Vec<RawPemKey>>,
    jwks_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    jwks_reload_interval: Option<Duration>,
    audience: Option<Vec<String>>,
    issuer: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    leeway: Option<Duration>,
    close_on_expiry: Option<bool>,
}

/// An entry of `auth.jwt.rs256_public_keys`: a path, as it always was, or a
/// table that also names the key's `kid`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPemKey {
    File(PathBuf),
    Named(RawNamedPemKey),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamedPemKey {
    file: PathBuf,
    kid: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    wasm: String,
}

// ---------------------------------------------------------------------------
// Validated settings.
// ---------------------------------------------------------------------------

/// Everything the gateway needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The WebSocket listener.
    pub server: ServerSettings,
    /// Certificate and key; `None` in `--dev` without configured files, in
    /// which case a self-signed certificate is generated.
    pub tls: Option<TlsSettings>,
    /// WebSocket sizes and buffers.
    pub websocket: WebSocketSettings,
    /// The admin listener.
    pub admin: AdminSettings,
    /// The RabbitMQ copy of every message.
    pub queue: QueueSettings,
    /// Function limits.
    pub runtime: runtime::RuntimeConfig,
    /// What a client sees when the function fails on its message
    /// (`runtime.on_error`).
    pub on_error: OnError,
    /// Longest pause before the next message of a client whose messages
    /// keep making the function fail (`runtime.fault_backoff`).
    pub fault_backoff: Duration,
    /// Authentication on connect.
    pub auth: AuthSettings,
    /// Functions by name.
    pub functions: BTreeMap<String, FunctionSource>,
    /// Route path to function name.
    pub routes: BTreeMap<String, String>,
    /// Whether `--dev` was given.
    pub dev: bool,
}

/// The WebSocket listener.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address to listen on (`server.listen`).
    pub listen: SocketAddr,
    /// An optional second listener without TLS (`server.plain_listen`),
    /// for deployments where a proxy in front terminates TLS.
    pub plain_listen: Option<SocketAddr>,
    /// This node's id; connection ids and queue headers carry it.
    pub node_id: String,
    /// Most connections, open or in their handshakes
    /// (`server.max_connections`); further clients get HTTP 503.
    pub max_connections: NonZeroUsize,
    /// Most connections from one client IP address
    /// (`server.max_connections_per_ip`); further ones get HTTP 429.
    pub max_connections_per_ip: NonZeroUsize,
    /// Most connections in their TLS or upgrade handshake at once
    /// (`server.max_handshakes`); further clients wait in the accept
    /// backlog.
    pub max_handshakes: NonZeroUsize,
    /// Most connections from one client address in their TLS or upgrade
    /// handshake at once (`server.max_handshakes_per_ip`); further sockets
    /// from it are closed at once, without TLS, so one host cannot hold
    /// every handshake place.
    pub max_handshakes_per_ip: NonZeroUsize,
    /// IPv6 clients are counted per network of this prefix length
    /// (`server.ipv6_client_prefix`, 64 by default): one host usually holds
    /// a whole /64, so counting single addresses would not limit it.
    pub ipv6_client_prefix: u8,
    /// Peers that must begin every connection with a PROXY protocol header
    /// (v1 or v2) giving the real client's address
    /// (`server.proxy_protocol_from`, networks such as `10.0.0.0/8`): the
    /// load balancers in front of the gateway. Empty: no PROXY header is
    /// read from anyone.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Longest a client may take for the TLS handshake, from accept.
    pub tls_handshake_timeout: Duration,
    /// Longest a client may take to send its upgrade request after TLS.
    pub handshake_timeout: Duration,
    /// Longest a shutdown may take before remaining connections are cut.
    pub shutdown_grace_period: Duration,
    /// Where state (spool, artifacts, dev certificate) lives by default.
    pub state_dir: PathBuf,
}

impl ServerSettings {
    /// Default of `server.max_handshakes_per_ip`: an eighth of the default
    /// `server.max_handshakes`, room for a burst of reconnects behind one
    /// NAT address while other clients still find places.
    pub const MAX_HANDSHAKES_PER_IP: usize = 128;
    /// Default of `server.ipv6_client_prefix`.
    pub const IPV6_CLIENT_PREFIX: u8 = 64;
}

/// One certificate chain and its key, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The certificates, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Served when the client's SNI name matches no other certificate
    /// (`tls.cert`, `tls.key`).
    pub default: CertFiles,
    /// Served to clients whose SNI name they are valid for (`[[tls.sni]]`).
    pub sni: Vec<CertFiles>,
    /// How often the files are checked for changes (`tls.reload_interval`).
    pub reload_interval: Duration,
}

impl TlsSettings {
    /// Default reload check interval.
    pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

    /// Every file named, certificates and keys.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(&self.default)
            .chain(&self.sni)
            .flat_map(|files| [files.cert.as_path(), files.key.as_path()])
    }
}

/// WebSocket sizes and buffers.
#[derive(Debug, Clone)]
pub struct WebSocketSettings {
    /// Largest message, in bytes, after reassembly; larger closes with 1009.
    pub max_message_size: usize,
    /// Largest single frame, in bytes; larger closes with 1009.
    pub max_frame_size: usize,
    /// Read buffer per connection, in bytes.
    pub read_buffer_size: usize,
    /// Write buffer per connection, in bytes, before a flush is forced.
    pub write_buffer_size: usize,
    /// Outbound messages queued per connection before the reader waits.
    pub send_queue: NonZeroUsize,
    /// Most bytes of replies queued per connection before the reader
    /// waits (`websocket.send_queue_bytes`): with `send_queue`, a bound in
    /// bytes as well as in count.
    pub send_queue_bytes: usize,
    /// Largest HTTP upgrade request head, in bytes; larger gets 431.
    pub max_request_head: usize,
    /// Request headers passed to functions (lower-case names).
    pub forward_headers: Vec<String>,
    /// `Origin` values allowed to connect (lower case, no trailing '/');
    /// empty allows any. Requests without `Origin` (non-browser clients)
    /// are allowed.
    pub allowed_origins: Vec<String>,
    /// Most messages a connection may send per second (also the burst);
    /// more closes with 1008.
    pub max_message_rate: NonZeroU32,
    /// A connection that sends nothing (no message, ping or pong) for this
    /// long is closed with 1001.
    pub idle_timeout: Duration,
    /// A connection open for this long is closed with 1001.
    pub max_duration: Duration,
    /// A client that does not take what the gateway sends for this long is
    /// a slow consumer: its connection is dropped and its queue freed.
    pub send_timeout: Duration,
}

impl WebSocketSettings {
    /// Default of `websocket.send_queue_bytes` (raised to
    /// `websocket.max_message_size` when that is larger).
    pub const SEND_QUEUE_BYTES: usize = 1 << 20;
}

/// The admin listener.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Address of `/metrics`, `/healthz`, `/readyz` and `/v1/`.
    pub listen: SocketAddr,
    /// Bearer token of the management API; without one `/v1/` is off.
    pub token: Option<String>,
    /// Most admin connections open at once (`admin.max_connections`);
    /// further ones wait in the accept backlog, so the admin listener
    /// cannot use up the process's file descriptors.
    pub max_connections: NonZeroUsize,
    /// Longest a client may take to send a request head, also between
    /// requests on a kept-alive connection (`admin.header_timeout`).
    pub header_timeout: Duration,
}

impl AdminSettings {
    /// Default of `admin.max_connections`: probes, a scraper and a few
    /// operators, with room to spare.
    pub const MAX_CONNECTIONS: usize = 64;
    /// Default of `admin.header_timeout`.
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
}

/// When a client gets the reply to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueMode {
    /// The reply is sent once the copy is durable (confirmed by RabbitMQ or
    /// fsync'ed to the spool): an echo is a receipt.
    Receipt,
    /// The reply is sent without waiting; the copy is still confirmed or
    /// spooled, but a crash can lose copies of replied messages.
    Async,
    /// No copies at all: messages only go through the function. For
    /// deployments that do not need the queue, and for measuring the
    /// function path alone.
    Off,
}

/// The RabbitMQ copy of every message.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// AMQP URL of the broker.
    pub url: String,
    /// The durable queue copies go to (default exchange, routing key = name).
    pub queue: String,
    /// When replies are sent relative to the copy.
    pub mode: QueueMode,
    /// Most copies published and not yet confirmed.
    pub max_in_flight: NonZeroUsize,
    /// Where copies go while the broker is unreachable.
    pub spool_dir: PathBuf,
    /// Largest spool, in bytes; when full, messages are refused (1013).
    pub spool_max_bytes: u64,
    /// Longest a connection attempt to the broker may take.
    pub connect_timeout: Duration,
    /// Pause between attempts to reach the broker.
    pub reconnect_interval: Duration,
    /// Longest to wait for the broker to confirm a copy before the link is
    /// considered broken and unconfirmed copies are spooled.
    pub confirm_timeout: Duration,
}

/// Authentication on connect: JWT validation, an authorizer function, or
/// both (JWT first); neither by default.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Where the token is (`auth.token_header`, `auth.token_query`).
    pub token: TokenSource,
    /// A function whose `on-connect` admits or refuses every client before
    /// the route's function (`auth.authorizer`).
    pub authorizer: Option<String>,
    /// JWT validation (`[auth.jwt]`), when any key is configured.
    pub jwt: Option<JwtSettings>,
}

/// Where a client's token is, as configured (the auth module reads it from
/// the request).
#[derive(Debug, Clone)]
pub struct TokenSource {
    /// Request header (lower case); for `authorization`, the `Bearer `
    /// scheme is stripped.
    pub header: String,
    /// Query-string parameter, for browsers (which cannot set headers on a
    /// WebSocket). Removed from the query the function sees.
    pub query: String,
}

/// JWT validation keys and checks.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// HS256 shared secret (`auth.jwt.hs256_secret`), at least 32 bytes.
    pub hs256_secret: Option<String>,
    /// RS256 public keys, PEM files (`auth.jwt.rs256_public_keys`), each
    /// with the `kid` tokens signed by it carry, if any.
    pub rs256_public_keys: Vec<PemKey>,
    /// A JWKS document with RS256 keys, chosen by `kid`
    /// (`auth.jwt.jwks_file`).
    pub jwks_file: Option<PathBuf>,
    /// How often the JWKS file is checked for changes, which are loaded
    /// without a restart (`auth.jwt.jwks_reload_interval`).
    pub jwks_reload_interval: Duration,
    /// Accepted `aud` values; empty: `aud` is not checked.
    pub audience: Vec<String>,
    /// Accepted `iss` values; empty: `iss` is not checked.
    pub issuer: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Whether a connection is closed with 1008 when its token expires
    /// (`exp` plus the leeway), so access ends with the token's life
    /// (`auth.jwt.close_on_expiry`, true by default).
    pub close_on_expiry: bool,
}

impl JwtSettings {
    /// Default of `auth.jwt.jwks_reload_interval`, as for the TLS files.
    pub const JWKS_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
}

/// An RS256 public key file (`auth.jwt.rs256_public_keys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemKey {
    /// The PEM file holding the RSA public key.
    pub file: PathBuf,
    /// The key id tokens signed with this key name in their header, so a
    /// token with a `kid` is checked with its key alone; `None`: the key is
    /// tried only for tokens without a `kid`. Unique among the PEM keys.
    pub kid: Option<String>,
}

/// What a client sees when the function fails on its message (a trap, a
/// time or memory limit, a reply over the size limit, an overload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// An error reply, `{"error":"function-failed"|"overloaded",...}`, in
    /// place of the function's reply; the connection stays open.
    Reply,
    /// The connection is closed: 1011 for a failure, 1013 for an overload.
    Close,
}

/// Where a function's component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FunctionSource {
    /// A `.wasm` component file.
    File(PathBuf),
    /// A function bundled into the binary (`builtin:echo`).
    Builtin(String),
}

/// Functions bundled into the binary.
pub const BUILTIN_FUNCTIONS: &[&str] = &["echo"];

impl Settings {
    /// Read `file` (if any) and the environment, and validate.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key at fault.
    pub fn load(file: Option<&Path>, dev: bool) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(name, _)| name.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        Self::from_sources(file, env, dev)
    }

    /// Like [`Settings::load`], with the environment given explicitly (for
    /// tests).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key at fault.
    pub fn from_sources(
        file: Option<&Path>,
        env: Vec<(String, String)>,
        dev: bool,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Read(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(file)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        Self::from_builder(builder, env, dev)
    }

    /// Like [`Settings::from_sources`], with the file's contents given as
    /// text (for tests and fuzzing).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key at fault.
    pub fn from_toml(
        text: &str,
        env: Vec<(String, String)>,
        dev: bool,
    ) -> Result<Self, ConfigError> {
        let builder = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml));
        Self::from_builder(builder, env, dev)
    }

    fn from_builder(
        mut builder: config::ConfigBuilder<config::builder::DefaultState>,
        env: Vec<(String, String)>,
        dev: bool,
    ) -> Result<Self, ConfigError> {
        let env: config::Map<String, String> = env.into_iter().collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("server.proxy_protocol_from")
                .with_list_parse_key("websocket.forward_headers")
                .with_list_parse_key("websocket.allowed_origins")
                .with_list_parse_key("auth.jwt.rs256_public_keys")
                .with_list_parse_key("auth.jwt.audience")
                .with_list_parse_key("auth.jwt.issuer")
                .source(Some(env)),
        );
        let raw: RawConfig = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Read(format!("configuration: {e}")))?;
        raw.validate(dev)
    }
}

impl RawConfig {
    fn validate(self, dev: bool) -> Result<Settings, ConfigError> {
        let server = self.server.validate(dev)?;
        let reload_interval = positive(
            "tls.reload_interval",
            self.tls.reload_interval,
            TlsSettings::RELOAD_INTERVAL,
        )?;
        let sni: Vec<CertFiles> = self
            .tls
            .sni
            .into_iter()
            .map(|files| CertFiles {
                cert: files.cert,
                key: files.key,
            })
            .collect();
        let tls = match (self.tls.cert, self.tls.key) {
            (Some(cert), Some(key)) => Some(TlsSettings {
                default: CertFiles { cert, key },
                sni,
                reload_interval,
            }),
            (None, None) if dev && !sni.is_empty() => {
                return Err(invalid(
                    "tls.sni",
                    "needs a default certificate too: set tls.cert and tls.key",
                ));
            }
            (None, None) if dev => None,
            (None, None) => {
                return Err(invalid(
                    "tls.cert",
                    "a certificate is required: set tls.cert and tls.key (PEM files), \
                     or run with --dev for a self-signed one",
                ));
            }
            (Some(_), None) => {
                return Err(invalid("tls.key", "tls.cert is set but tls.key is not"));
            }
            (None, Some(_)) => {
                return Err(invalid("tls.cert", "tls.key is set but tls.cert is not"));
            }
        };
        let websocket = self.websocket.validate()?;
        let admin = AdminSettings {
            listen: parse_addr(
                "admin.listen",
                self.admin.listen.as_deref().unwrap_or("127.0.0.1:9090"),
            )?,
            token: match self.admin.token {
                Some(token) if token.len() < 16 => {
                    return Err(invalid(
                        "admin.token",
                        "must be at least 16 characters (use a random string)",
                    ));
                }
                token => token,
            },
            max_connections: non_zero(
                "admin.max_connections",
                self.admin.max_connections,
                AdminSettings::MAX_CONNECTIONS,
            )?,
            header_timeout: positive(
                "admin.header_timeout",
                self.admin.header_timeout,
                AdminSettings::HEADER_TIMEOUT,
            )?,
        };
        let queue = self.queue.validate(&server.state_dir)?;
        let on_error = match self.runtime.on_error.as_deref().unwrap_or("reply") {
            "reply" => OnError::Reply,
            "close" => OnError::Close,
            other => {
                return Err(invalid(
                    "runtime.on_error",
                    format!("{other:?}: expected \"reply\" or \"close\""),
                ));
            }
        };
        let fault_backoff = positive(
            "runtime.fault_backoff",
            self.runtime.fault_backoff,
            Duration::from_secs(1),
        )?;
        let runtime = self.runtime.validate(&server.state_dir)?;
        let auth = self.auth.validate()?;

        let mut functions = BTreeMap::new();
        for (name, function) in self.functions {
            let key = format!("functions.{name}.wasm");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    format!("functions.{name}"),
                    "function names may only use letters, digits, '-' and '_'",
                ));
            }
            let source = match function.wasm.strip_prefix("builtin:") {
                Some(builtin) if BUILTIN_FUNCTIONS.contains(&builtin) => {
                    FunctionSource::Builtin(builtin.to_owned())
                }
                Some(builtin) => {
                    return Err(invalid(
                        key,
                        format!(
                            "no builtin function {builtin:?}; builtins are {}",
                            BUILTIN_FUNCTIONS.join(", ")
                        ),
                    ));
                }
                None => FunctionSource::File(PathBuf::from(function.wasm)),
            };
            functions.insert(name, source);
        }
        let mut routes = self.routes;
        if dev && functions.is_empty() && routes.is_empty() {
            functions.insert("echo".into(), FunctionSource::Builtin("echo".into()));
            routes.insert("/".into(), "echo".into());
        }
        for (path, function) in &routes {
            let key = format!("routes.\"{path}\"");
            if !path.starts_with('/') || path.contains(['?', '#']) {
                return Err(invalid(
                    key,
                    "a route is a path starting with '/', without query",
                ));
            }
            if path.len() > 1 && path.ends_with('/') {
                return Err(invalid(
                    key,
                    "a route must not end with '/' (except \"/\" itself)",
                ));
            }
            if !functions.contains_key(function) {
                return Err(invalid(
                    key,
                    format!("function {function:?} is not defined under [functions]"),
                ));
            }
        }
        if let Some(authorizer) = &auth.authorizer
            && !functions.contains_key(authorizer)
        {
            return Err(invalid(
                "auth.authorizer",
                format!("function {authorizer:?} is not defined under [functions]"),
            ));
        }
        if routes.is_empty() {
            return Err(invalid(
                "routes",
                "no routes: map at least one path to a function, e.g. [routes] \"/\" = \"echo\"",
            ));
        }
        Ok(Settings {
            server,
            tls,
            websocket,
            admin,
            queue,
            runtime,
            on_error,
            fault_backoff,
            auth,
            functions,
            routes,
            dev,
        })
    }
}

/// The state directory of `--dev` without `server.state_dir`: the user's
/// own (`$XDG_STATE_HOME/tidegate/dev/<port>`, else
/// `~/.local/state/tidegate/dev/<port>`), never a shared temporary
/// directory where another user could plant files.
fn dev_state_dir(
    xdg_state_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
    port: u16,
) -> Result<PathBuf, ConfigError> {
    let base = match (xdg_state_home, home) {
        (Some(state), _) if Path::new(&state).is_absolute() => PathBuf::from(state),
        (_, Some(home)) if Path::new(&home).is_absolute() => {
            PathBuf::from(home).join(".local").join("state")
        }
        _ => {
            return Err(invalid(
                "server.state_dir",
                "--dev keeps its state in $XDG_STATE_HOME or $HOME, and neither is set: \
                 set server.state_dir (TIDEGATE__SERVER__STATE_DIR) to a directory of your own",
            ));
        }
    };
    Ok(base.join("tidegate").join("dev").join(port.to_string()))
}

/// Default listen address in `--dev`: unprivileged, loopback only.
pub const DEV_LISTEN: &str = "127.0.0.1:8443";

impl RawServer {
    fn validate(self, dev: bool) -> Result<ServerSettings, ConfigError> {
        let default_listen = if dev { DEV_LISTEN } else { "0.0.0.0:443" };
        let listen = parse_addr(
            "server.listen",
            self.listen.as_deref().unwrap_or(default_listen),
        )?;
        let node_id = match self.node_id {
            Some(id) => id,
            None => hostname::get()
                .ok()
                .and_then(|name| name.into_string().ok())
                .unwrap_or_else(|| "tidegate".into()),
        };
        if node_id.is_empty()
            || !node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "server.node_id",
                format!("{node_id:?}: use letters, digits, '-' and '_' only"),
            ));
        }
        let state_dir = match self.state_dir {
            Some(dir) => dir,
            None if dev => dev_state_dir(
                std::env::var_os("XDG_STATE_HOME"),
                std::env::var_os("HOME"),
                listen.port(),
            )?,
            None => PathBuf::from("/var/lib/tidegate"),
        };
        let plain_listen = self
            .plain_listen
            .as_deref()
            .map(|addr| parse_addr("server.plain_listen", addr))
            .transpose()?;
        if plain_listen.is_some_and(|plain| plain == listen && plain.port() != 0) {
            return Err(invalid(
                "server.plain_listen",
                "must differ from server.listen",
            ));
        }
        Ok(ServerSettings {
            listen,
            plain_listen,
            node_id,
            max_connections: non_zero("server.max_connections", self.max_connections, 10_000)?,
            max_connections_per_ip: non_zero(
                "server.max_connections_per_ip",
                self.max_connections_per_ip,
                1_000,
            )?,
            max_handshakes: non_zero("server.max_handshakes", self.max_handshakes, 1_024)?,
            max_handshakes_per_ip: non_zero(
                "server.max_handshakes_per_ip",
                self.max_handshakes_per_ip,
                ServerSettings::MAX_HANDSHAKES_PER_IP,
            )?,
            ipv6_client_prefix: match self.ipv6_client_prefix {
                None => ServerSettings::IPV6_CLIENT_PREFIX,
                Some(prefix @ 1..=128) => prefix,
                Some(other) => {
                    return Err(invalid(
                        "server.ipv6_client_prefix",
                        format!("{other} is not a prefix length; expected 1 to 128"),
                    ));
                }
            },
            proxy_protocol_from: self
                .proxy_protocol_from
                .unwrap_or_default()
                .iter()
                .map(|net| parse_net("server.proxy_protocol_from", net))
                .collect::<Result<_, _>>()?,
            tls_handshake_timeout: positive(
                "server.tls_handshake_timeout",
                self.tls_handshake_timeout,
                Duration::from_secs(5),
            )?,
            handshake_timeout: positive(
                "server.handshake_timeout",
                self.handshake_timeout,
                Duration::from_secs(10),
            )?,
            shutdown_grace_period: positive(
                "server.shutdown_grace_period",
                self.shutdown_grace_period,
                Duration::from_secs(30),
            )?,
            state_dir,
        })
    }
}

impl RawWebSocket {
    fn validate(self) -> Result<WebSocketSettings, ConfigError> {
        let max_message_size = at_least(
            "websocket.max_message_size",
            self.max_message_size,
            128 << 10,
            16,
        )?;
        let max_frame_size = at_least(
            "websocket.max_frame_size",
            self.max_frame_size,
            max_message_size,
            16,
        )?;
        if max_frame_size > max_message_size {
            return Err(invalid(
                "websocket.max_frame_size",
                format!(
                    "{max_frame_size} is larger than websocket.max_message_size ({max_message_size})"
                ),
            ));
        }
        let forward_headers = self
            .forward_headers
            .unwrap_or_else(|| vec!["origin".into(), "user-agent".into()])
            .into_iter()
            .map(|name| name.trim().to_ascii_lowercase())
            .filter(|name| !name.is_empty())
            .collect();
        Ok(WebSocketSettings {
            max_message_size,
            max_frame_size,
            read_buffer_size: at_least(
                "websocket.read_buffer_size",
                self.read_buffer_size,
                1536,
                1024,
            )?,
            write_buffer_size: at_least(
                "websocket.write_buffer_size",
                self.write_buffer_size,
                8 << 10,
                0,
            )?,
            send_queue: non_zero("websocket.send_queue", self.send_queue, 256)?,
            send_queue_bytes: {
                let bytes = self
                    .send_queue_bytes
                    .unwrap_or(WebSocketSettings::SEND_QUEUE_BYTES.max(max_message_size));
                if bytes < max_message_size || bytes > u32::MAX as usize {
                    return Err(invalid(
                        "websocket.send_queue_bytes",
                        format!(
                            "{bytes} must be at least websocket.max_message_size ({max_message_size}), \
                             so one reply fits, and at most {}",
                            u32::MAX
                        ),
                    ));
                }
                bytes
            },
            max_request_head: at_least(
                "websocket.max_request_head",
                self.max_request_head,
                8 << 10,
                512,
            )?,
            forward_headers,
            allowed_origins: self
                .allowed_origins
                .unwrap_or_default()
                .into_iter()
                .map(|origin| origin.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|origin| !origin.is_empty())
                .collect(),
            max_message_rate: NonZeroU32::new(self.max_message_rate.unwrap_or(1_000))
                .ok_or_else(|| invalid("websocket.max_message_rate", "must be at least 1"))?,
            idle_timeout: positive(
                "websocket.idle_timeout",
                self.idle_timeout,
                Duration::from_secs(600),
            )?,
            max_duration: positive(
                "websocket.max_duration",
                self.max_duration,
                Duration::from_secs(24 * 3600),
            )?,
            send_timeout: positive(
                "websocket.send_timeout",
                self.send_timeout,
                Duration::from_secs(10),
            )?,
        })
    }
}

impl RawAuth {
    fn validate(self) -> Result<AuthSettings, ConfigError> {
        let token = TokenSource {
            header: self
                .token_header
                .unwrap_or_else(|| "authorization".into())
                .trim()
                .to_ascii_lowercase(),
            query: self.token_query.unwrap_or_else(|| "access_token".into()),
        };
        if tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(token.header.as_bytes())
            .is_err()
        {
            return Err(invalid(
                "auth.token_header",
                format!("{:?} is not a header name", token.header),
            ));
        }
        if token.query.is_empty() {
            return Err(invalid("auth.token_query", "must not be empty"));
        }
        let jwt = match self.jwt {
            None => None,
            Some(jwt) => {
                if let Some(secret) = &jwt.hs256_secret
                    && secret.len() < 32
                {
                    return Err(invalid(
                        "auth.jwt.hs256_secret",
                        "must be at least 32 bytes (256 bits) of random text",
                    ));
                }
                let settings = JwtSettings {
                    hs256_secret: jwt.hs256_secret,
                    rs256_public_keys: pem_keys(jwt.rs256_public_keys.unwrap_or_default())?,
                    jwks_file: jwt.jwks_file,
                    jwks_reload_interval: positive(
                        "auth.jwt.jwks_reload_interval",
                        jwt.jwks_reload_interval,
                        JwtSettings::JWKS_RELOAD_INTERVAL,
                    )?,
                    audience: jwt.audience.unwrap_or_default(),
                    issuer: jwt.issuer.unwrap_or_default(),
                    leeway: jwt.leeway.unwrap_or(Duration::from_secs(30)),
                    close_on_expiry: jwt.close_on_expiry.unwrap_or(true),
                };
                if settings.hs256_secret.is_none()
                    && settings.rs256_public_keys.is_empty()
                    && settings.jwks_file.is_none()
                {
                    return Err(invalid(
                        "auth.jwt",
                        "no key: set hs256_secret, rs256_public_keys or jwks_file",
                    ));
                }
                Some(settings)
            }
        };
        Ok(AuthSettings {
            token,
            authorizer: self.authorizer,
            jwt,
        })
    }
}

/// The PEM key entries, checked: a `kid` is not empty and names one key.
fn pem_keys(raw: Vec<RawPemKey>) -> Result<Vec<PemKey>, ConfigError> {
    const KEY: &str = "auth.jwt.rs256_public_keys";
    let mut keys: Vec<PemKey> = Vec::with_capacity(raw.len());
    for entry in raw {
        let key = match entry {
            RawPemKey::File(file) => PemKey { file, kid: None },
            RawPemKey::Named(named) => PemKey {
                file: named.file,
                kid: named.kid,
            },
        };
        if let Some(kid) = &key.kid {
            if kid.is_empty() {
                return Err(invalid(
                    KEY,
                    format!("{}: kid must not be empty", key.file.display()),
                ));
            }
            if let Some(other) = keys.iter().find(|k| k.kid.as_ref() == Some(kid)) {
                return Err(invalid(
                    KEY,
                    format!(
                        "kid {kid:?} is given to both {} and {}",
                        other.file.display(),
                        key.file.display()
                    ),
                ));
            }
        }
        keys.push(key);
    }
    Ok(keys)
}

impl RawQueue {
    fn validate(self, state_dir: &Path) -> Result<QueueSettings, ConfigError> {
        let url = self
            .url
            .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(invalid("queue.url", "must start with amqp:// or amqps://"));
        }
        let queue = self.queue.unwrap_or_else(|| "tidegate.messages".into());
        if queue.is_empty() || queue.len() > 255 || queue.starts_with("amq.") {
            return Err(invalid(
                "queue.queue",
                format!(
                    "{queue:?}: a queue name is 1 to 255 bytes and may not start with \"amq.\""
                ),
            ));
        }
        let mode = match self.mode.as_deref().unwrap_or("receipt") {
            "receipt" => QueueMode::Receipt,
            "async" => QueueMode::Async,
            "off" => QueueMode::Off,
            other => {
                return Err(invalid(
                    "queue.mode",
                    format!("{other:?}: expected \"receipt\", \"async\" or \"off\""),
                ));
            }
        };
        Ok(QueueSettings {
            url,
            queue,
            mode,
            max_in_flight: non_zero("queue.max_in_flight", self.max_in_flight, 1024)?,
            spool_dir: self.spool_dir.unwrap_or_else(|| state_dir.join("spool")),
            spool_max_bytes: {
                let bytes = self.spool_max_bytes.unwrap_or(1 << 30);
                if bytes < 1 << 20 {
                    return Err(invalid(
                        "queue.spool_max_bytes",
                        "must be at least 1048576 (1 MiB)",
                    ));
                }
                bytes
            },
            connect_timeout: positive(
                "queue.connect_timeout",
                self.connect_timeout,
                Duration::from_secs(5),
            )?,
            reconnect_interval: positive(
                "queue.reconnect_interval",
                self.reconnect_interval,
                Duration::from_secs(1),
            )?,
            confirm_timeout: positive(
                "queue.confirm_timeout",
                self.confirm_timeout,
                Duration::from_secs(10),
            )?,
        })
    }
}

impl RawRuntime {
    fn validate(self, state_dir: &Path) -> Result<runtime::RuntimeConfig, ConfigError> {
        let defaults = runtime::RuntimeConfig::default();
        let nz = |key: &str, value: Option<u32>, default: NonZeroU32| match value {
            None => Ok(default),
            Some(v) => NonZeroU32::new(v).ok_or_else(|| invalid(key, "must be at least 1")),
        };
        let max_instances = nz(
            "runtime.max_instances",
            self.max_instances,
            defaults.max_instances,
        )?;
        let max_total_instances = nz(
            "runtime.max_total_instances",
            self.max_total_instances,
            defaults.max_total_instances,
        )?;
        if max_instances > max_total_instances {
            return Err(invalid(
                "runtime.max_instances",
                format!(
                    "{max_instances} is more than runtime.max_total_instances ({max_total_instances})"
                ),
            ));
        }
        let memory_limit = at_least(
            "runtime.memory_limit",
            self.memory_limit,
            defaults.memory_limit,
            1 << 16,
        )?;
        let idle_timeout = positive(
            "runtime.idle_timeout",
            self.idle_timeout,
            defaults.idle_timeout,
        )?;
        let unload_after = positive(
            "runtime.unload_after",
            self.unload_after,
            defaults.unload_after,
        )?;
        if unload_after < idle_timeout {
            return Err(invalid(
                "runtime.unload_after",
                "must not be shorter than runtime.idle_timeout",
            ));
        }
        Ok(runtime::RuntimeConfig {
            artifact_dir: self
                .artifact_dir
                .unwrap_or_else(|| state_dir.join("artifacts")),
            max_instances,
            max_queued: self.max_queued.unwrap_or(defaults.max_queued),
            max_total_instances,
            memory_limit,
            max_stack: {
                let bytes = self.max_stack.unwrap_or(defaults.max_stack);
                if !(64 << 10..=64 << 20).contains(&bytes) {
                    return Err(invalid(
                        "runtime.max_stack",
                        format!("{bytes} is outside 65536 (64 KiB) to 67108864 (64 MiB)"),
                    ));
                }
                bytes
            },
            timeout: positive("runtime.timeout", self.timeout, defaults.timeout)?,
            long_call_after: self.long_call_after.unwrap_or(defaults.long_call_after),
            long_call_lowest_priority: match self.long_call_priority.as_deref() {
                None => defaults.long_call_lowest_priority,
                Some("lowest") => true,
                Some("normal") => false,
                Some(other) => {
                    return Err(invalid(
                        "runtime.long_call_priority",
                        format!("{other:?} is not \"lowest\" or \"normal\""),
                    ));
                }
            },
            idle_timeout,
            unload_after,
            max_log_line: at_least(
                "runtime.max_log_line",
                self.max_log_line,
                defaults.max_log_line,
                80,
            )?,
            max_log_lines_per_second: nz(
                "runtime.max_log_lines_per_second",
                self.max_log_lines_per_second,
                defaults.max_log_lines_per_second,
            )?,
            keep_resident: {
                let bytes = self.keep_resident.unwrap_or(defaults.keep_resident);
                if bytes > memory_limit {
                    return Err(invalid(
                        "runtime.keep_resident",
                        format!("{bytes} is more than runtime.memory_limit ({memory_limit})"),
                    ));
                }
                bytes
            },
        })
    }
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("{value:?} is not an address; expected ip:port, e.g. 0.0.0.0:443 or [::]:443"),
        )
    })
}

/// A network (`10.0.0.0/8`, `fd00::/8`) or a single address (`10.1.2.3`).
fn parse_net(key: &str, value: &str) -> Result<ipnet::IpNet, ConfigError> {
    let value = value.trim();
    value
        .parse::<ipnet::IpNet>()
        .or_else(|_| value.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| {
            invalid(
                key,
                format!("{value:?} is not a network; expected an address or CIDR, e.g. 10.0.0.0/8"),
            )
        })
}

fn non_zero(key: &str, value: Option<usize>, default: usize) -> Result<NonZeroUsize, ConfigError> {
    NonZeroUsize::new(value.unwrap_or(default)).ok_or_else(|| invalid(key, "must be at least 1"))
}

fn at_least(
    key: &str,
    value: Option<usize>,
    default: usize,
    min: usize,
) -> Result<usize, ConfigError> {
    let value = value.unwrap_or(default);
    if value < min {
        return Err(invalid(
            key,
            format!("{value} is below the minimum of {min}"),
        ));
    }
    Ok(value)
}

fn positive(
    key: &str,
    value: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(default);
    if value.is_zero() {
        return Err(invalid(key, "must be longer than zero"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    const MINIMAL: &str = r#"
        [tls]
        cert = "/etc/tidegate/tls.crt"
        key = "/etc/tidegate/tls.key"
        [functions.echo]
        wasm = "builtin:echo"
        [routes]
        "/" = "echo"
    "#;

    #[test]
    fn defaults_follow_the_documented_values() {
        let file = write(MINIMAL);
        let settings = Settings::from_sources(Some(file.path()), vec![], false).unwrap();
        assert_eq!(settings.server.listen, "0.0.0.0:443".parse().unwrap());
        assert_eq!(settings.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(settings.queue.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(settings.queue.queue, "tidegate.messages");
        assert_eq!(settings.queue.mode, QueueMode::Receipt);
        assert_eq!(settings.websocket.max_message_size, 128 * 1024);
        assert_eq!(settings.websocket.read_buffer_size, 1536);
        assert_eq!(
            settings.queue.spool_dir,
            PathBuf::from("/var/lib/tidegate/spool")
        );
        assert_eq!(settings.routes.get("/").map(String::as_str), Some("echo"));
        assert_eq!(settings.runtime.long_call_after, Duration::from_millis(1));
        assert!(
            settings.runtime.long_call_lowest_priority,
            "long calls run at the lowest priority unless configured otherwise"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let file = write(MINIMAL);
        let env = vec![
            ("TIDEGATE__SERVER__LISTEN".into(), "127.0.0.1:9443".into()),
            ("TIDEGATE__QUEUE__QUEUE".into(), "other".into()),
            ("TIDEGATE__QUEUE__MODE".into(), "async".into()),
            ("TIDEGATE__RUNTIME__IDLE_TIMEOUT".into(), "2s".into()),
            ("TIDEGATE__RUNTIME__LONG_CALL_AFTER".into(), "5ms".into()),
            (
                "TIDEGATE__RUNTIME__LONG_CALL_PRIORITY".into(),
                "normal".into(),
            ),
            (
                "TIDEGATE__WEBSOCKET__MAX_MESSAGE_SIZE".into(),
                "1024".into(),
            ),
            (
                "TIDEGATE__WEBSOCKET__FORWARD_HEADERS".into(),
                "X-Tenant,Origin".into(),
            ),
        ];
        let settings = Settings::from_sources(Some(file.path()), env, false).unwrap();
        assert_eq!(settings.server.listen, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(settings.queue.queue, "other");
        assert_eq!(settings.queue.mode, QueueMode::Async);
        assert_eq!(settings.runtime.idle_timeout, Duration::from_secs(2));
        assert_eq!(settings.runtime.long_call_after, Duration::from_millis(5));
        assert!(!settings.runtime.long_call_lowest_priority);
        assert_eq!(settings.websocket.max_message_size, 1024);
        assert_eq!(settings.websocket.max_frame_size, 1024);
        assert_eq!(
            settings.websocket.forward_headers,
            vec!["x-tenant", "origin"]
        );
    }

    #[test]
    fn dev_state_is_kept_in_the_users_own_directory() {
        let dir = dev_state_dir(None, Some("/home/ann".into()), 8443).unwrap();
        assert_eq!(
            dir,
            PathBuf::from("/home/ann/.local/state/tidegate/dev/8443")
        );
        let dir = dev_state_dir(Some("/xdg".into()), Some("/home/ann".into()), 8443).unwrap();
        assert_eq!(dir, PathBuf::from("/xdg/tidegate/dev/8443"));
        // A relative XDG_STATE_HOME is invalid by the XDG rules: ignored.
        let dir = dev_state_dir(Some("rel".into()), Some("/home/ann".into()), 1).unwrap();
        assert_eq!(dir, PathBuf::from("/home/ann/.local/state/tidegate/dev/1"));
        let error = dev_state_dir(None, None, 8443).unwrap_err();
        assert!(error.to_string().contains("server.state_dir"), "{error}");
        // And never the shared temporary directory.
        let settings = Settings::from_toml("", vec![], true).unwrap();
        assert!(
            !settings.server.state_dir.starts_with(std::env::temp_dir()),
            "{}",
            settings.server.state_dir.display()
        );
    }

    #[test]
    fn client_address_settings_have_defaults_and_take_networks() {
        let file = write(MINIMAL);
        let settings = Settings::from_sources(Some(file.path()), vec![], false).unwrap();
        assert_eq!(settings.server.max_handshakes_per_ip.get(), 128);
        assert_eq!(settings.server.ipv6_client_prefix, 64);
        assert!(settings.server.proxy_protocol_from.is_empty());
        let env = vec![(
            "TIDEGATE__SERVER__PROXY_PROTOCOL_FROM".into(),
            "10.0.0.0/8, 192.0.2.7,fd00::/8".into(),
        )];
        let settings = Settings::from_sources(Some(file.path()), env, false).unwrap();
        let nets: Vec<String> = settings
            .server
            .proxy_protocol_from
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "fd00::/8"]);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "TIDEGATE__SERVER__LISTEN",
                "not-an-address",
                "server.listen",
            ),
            ("TIDEGATE__QUEUE__MODE", "sometimes", "queue.mode"),
            ("TIDEGATE__QUEUE__URL", "http://x", "queue.url"),
            (
                "TIDEGATE__SERVER__MAX_CONNECTIONS",
                "0",
                "server.max_connections",
            ),
            ("TIDEGATE__RUNTIME__TIMEOUT", "0s", "runtime.timeout"),
            (
                "TIDEGATE__WEBSOCKET__MAX_FRAME_SIZE",
                "999999999",
                "websocket.max_frame_size",
            ),
            ("TIDEGATE__ADMIN__TOKEN", "short", "admin.token"),
            (
                "TIDEGATE__RUNTIME__KEEP_RESIDENT",
                "999999999999",
                "runtime.keep_resident",
            ),
            (
                "TIDEGATE__AUTH__JWT__HS256_SECRET",
                "short",
                "auth.jwt.hs256_secret",
            ),
            ("TIDEGATE__AUTH__AUTHORIZER", "nobody", "auth.authorizer"),
            ("TIDEGATE__RUNTIME__ON_ERROR", "explode", "runtime.on_error"),
            (
                "TIDEGATE__RUNTIME__LONG_CALL_PRIORITY",
                "high",
                "runtime.long_call_priority",
            ),
            (
                "TIDEGATE__SERVER__MAX_CONNECTIONS_PER_IP",
                "0",
                "server.max_connections_per_ip",
            ),
            (
                "TIDEGATE__WEBSOCKET__IDLE_TIMEOUT",
                "0s",
                "websocket.idle_timeout",
            ),
            (
                "TIDEGATE__ADMIN__MAX_CONNECTIONS",
                "0",
                "admin.max_connections",
            ),
            (
                "TIDEGATE__WEBSOCKET__SEND_QUEUE_BYTES",
                "1000",
                "websocket.send_queue_bytes",
            ),
            (
                "TIDEGATE__ADMIN__HEADER_TIMEOUT",
                "0s",
                "admin.header_timeout",
            ),
            (
                "TIDEGATE__SERVER__MAX_HANDSHAKES_PER_IP",
                "0",
                "server.max_handshakes_per_ip",
            ),
            (
                "TIDEGATE__SERVER__IPV6_CLIENT_PREFIX",
                "129",
                "server.ipv6_client_prefix",
            ),
            (
                "TIDEGATE__SERVER__PROXY_PROTOCOL_FROM",
                "10.0.0.0/8,balancer.local",
                "server.proxy_protocol_from",
            ),
        ];
        for (var, value, key) in cases {
            let file = write(MINIMAL);
            let error =
                Settings::from_sources(Some(file.path()), vec![(var.into(), value.into())], false)
                    .unwrap_err()
                    .to_string();
            assert!(
                error.contains(key),
                "{var}={value}: {error:?} does not name {key}"
            );
        }
    }

    #[test]
    fn pem_keys_are_paths_or_tables_with_a_kid() {
        let jwt = |keys: &str| {
            let file = write(&format!(
                "{MINIMAL}\n[auth.jwt]\nrs256_public_keys = {keys}\n"
            ));
            Settings::from_sources(Some(file.path()), vec![], false)
                .map(|settings| settings.auth.jwt.unwrap().rs256_public_keys)
        };
        let pem = |file: &str, kid: Option<&str>| PemKey {
            file: PathBuf::from(file),
            kid: kid.map(str::to_owned),
        };
        assert_eq!(
            jwt(r#"["a.pem", { file = "b.pem", kid = "2025-06" }, { file = "c.pem" }]"#).unwrap(),
            [
                pem("a.pem", None),
                pem("b.pem", Some("2025-06")),
                pem("c.pem", None)
            ]
        );
        // The environment still takes a list of paths.
        let file = write(&format!("{MINIMAL}\n[auth.jwt]\n"));
        let env = vec![(
            "TIDEGATE__AUTH__JWT__RS256_PUBLIC_KEYS".into(),
            "a.pem,b.pem".into(),
        )];
        let settings = Settings::from_sources(Some(file.path()), env, false).unwrap();
        assert_eq!(
            settings.auth.jwt.unwrap().rs256_public_keys,
            [pem("a.pem", None), pem("b.pem", None)]
        );
        for bad in [
            r#"[{ file = "a.pem", kid = "k" }, { file = "b.pem", kid = "k" }]"#,
            r#"[{ file = "a.pem", kid = "" }]"#,
            r#"[{ file = "a.pem", kdi = "k" }]"#,
        ] {
            let error = jwt(bad).unwrap_err().to_string();
            assert!(error.contains("rs256_public_keys"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_jwks_file_is_checked_every_ten_seconds_unless_configured() {
        let jwt = |extra: &str, env: Vec<(String, String)>| {
            let file = write(&format!(
                "{MINIMAL}\n[auth.jwt]\njwks_file = \"jwks.json\"\n{extra}"
            ));
            Settings::from_sources(Some(file.path()), env, false)
                .map(|settings| settings.auth.jwt.unwrap().jwks_reload_interval)
        };
        assert_eq!(jwt("", vec![]).unwrap(), Duration::from_secs(10));
        assert_eq!(
            jwt("jwks_reload_interval = \"1m\"\n", vec![]).unwrap(),
            Duration::from_secs(60)
        );
        let env = vec![(
            "TIDEGATE__AUTH__JWT__JWKS_RELOAD_INTERVAL".into(),
            "250ms".into(),
        )];
        assert_eq!(jwt("", env).unwrap(), Duration::from_millis(250));
        let error = jwt("jwks_reload_interval = \"0s\"\n", vec![])
            .unwrap_err()
            .to_string();
        assert!(error.contains("auth.jwt.jwks_reload_interval"), "{error}");
    }

    #[test]
    fn connections_close_when_their_token_expires_unless_configured() {
        let close = |extra: &str, env: Vec<(String, String)>| {
            let file = write(&format!(
                "{MINIMAL}\n[auth.jwt]\njwks_file = \"jwks.json\"\n{extra}"
            ));
            Settings::from_sources(Some(file.path()), env, false)
                .map(|settings| settings.auth.jwt.unwrap().close_on_expiry)
        };
        assert!(close("", vec![]).unwrap());
        assert!(!close("close_on_expiry = false\n", vec![]).unwrap());
        let env = vec![(
            "TIDEGATE__AUTH__JWT__CLOSE_ON_EXPIRY".into(),
            "false".into(),
        )];
        assert!(!close("", env).unwrap());
        let error = close("close_on_expiry = \"sometimes\"\n", vec![])
            .unwrap_err()
            .to_string();
        assert!(error.contains("close_on_expiry"), "{error}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let file = write(&format!("{MINIMAL}\n[server]\nlisn = \"0.0.0.0:1\"\n"));
        let error = Settings::from_sources(Some(file.path()), vec![], false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("lisn"), "{error}");
    }

    #[test]
    fn routes_must_name_defined_functions() {
        let file = write(
            r#"
            [tls]
            cert = "a.pem"
            key = "b.pem"
            [routes]
            "/chat" = "chat"
        "#,
        );
        let error = Settings::from_sources(Some(file.path()), vec![], false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("routes.\"/chat\"") && error.contains("chat"),
            "{error}"
        );
    }

    #[test]
    fn a_certificate_is_required_outside_dev_mode() {
        let file = write("[functions.echo]\nwasm = \"builtin:echo\"\n[routes]\n\"/\" = \"echo\"\n");
        let error = Settings::from_sources(Some(file.path()), vec![], false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("tls.cert") && error.contains("--dev"),
            "{error}"
        );
    }

    #[test]
    fn dev_mode_serves_echo_on_an_unprivileged_port_and_can_be_overridden() {
        let settings = Settings::from_sources(None, vec![], true).unwrap();
        assert_eq!(settings.server.listen, DEV_LISTEN.parse().unwrap());
        assert!(settings.tls.is_none());
        assert_eq!(settings.routes.get("/").map(String::as_str), Some("echo"));
        assert_eq!(
            settings.functions.get("echo"),
            Some(&FunctionSource::Builtin("echo".into()))
        );
        let env = vec![
            ("TIDEGATE__SERVER__LISTEN".into(), "127.0.0.1:0".into()),
            ("TIDEGATE__QUEUE__QUEUE".into(), "mine".into()),
        ];
        let settings = Settings::from_sources(None, env, true).unwrap();
        assert_eq!(settings.server.listen.port(), 0);
        assert_eq!(settings.queue.queue, "mine");
    }

    #[test]
    fn guest_log_lines_per_second_default_to_100_and_are_at_least_1() {
        let file = write(MINIMAL);
        let settings = Settings::from_sources(Some(file.path()), vec![], false).unwrap();
        assert_eq!(settings.runtime.max_log_lines_per_second.get(), 100);

        let set = |value: &str| {
            let file = write(MINIMAL);
            let env = vec![(
                "TIDEGATE__RUNTIME__MAX_LOG_LINES_PER_SECOND".into(),
                value.into(),
            )];
            Settings::from_sources(Some(file.path()), env, false)
        };
        let settings = set("20").unwrap();
        assert_eq!(settings.runtime.max_log_lines_per_second.get(), 20);
        let error = set("0").unwrap_err().to_string();
        assert!(
            error.contains("runtime.max_log_lines_per_second"),
            "{error}"
        );
    }
}
