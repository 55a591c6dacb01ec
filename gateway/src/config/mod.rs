//! Configuration: a TOML file, then `TIDEGATE__SECTION__KEY` environment
//! variables over it, read once at start-up and validated into typed
//! [`Settings`]. No other code reads the environment or the file.
//!
//! One file per section of the file, each with its raw shape, its typed
//! settings, its defaults and its checks:
//! - `server`: the WebSocket listener ([`ServerSettings`]).
//! - `tls`: the certificates ([`TlsSettings`]).
//! - `websocket`: sizes, buffers and time limits ([`WebSocketSettings`]).
//! - `admin`: the admin listener ([`AdminSettings`]).
//! - `queue`: the RabbitMQ copy of every message ([`QueueSettings`]).
//! - `runtime`: function limits and the failure policy ([`OnError`]).
//! - `auth`: tokens and JWT validation ([`AuthSettings`]).
//! - `functions`: `[functions]` and `[routes]` ([`FunctionSource`],
//!   [`BUILTINS`]).
//!
//! This file loads the sources and checks what spans sections: routes and
//! `auth.authorizer` name defined functions, and `--dev` serves echo when
//! nothing is configured.

mod admin;
mod auth;
mod cluster;
mod functions;
mod queue;
mod runtime;
mod server;
mod tls;
mod websocket;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use self::admin::AdminSettings;
pub use self::auth::{AuthSettings, JwtSettings, PemKey, TokenSource};
pub use self::cluster::ClusterSettings;
pub use self::functions::{BUILTINS, FunctionSource, builtin};
pub use self::queue::{QueueMode, QueueSettings, redact_url};
pub use self::runtime::OnError;
pub use self::server::ServerSettings;
pub use self::tls::{CertFiles, TlsSettings};
pub use self::websocket::WebSocketSettings;

/// What `Debug` shows in place of a secret.
const REDACTED: &str = "***";

/// Room a spooled copy takes beyond its body, at most: its framing, id,
/// timestamp and headers (connection id, route, function, version, node).
const SPOOL_RECORD_OVERHEAD: u64 = 64 << 10;

/// Environment variables with this prefix (then `__`) override the file.
pub const ENV_PREFIX: &str = "TIDEGATE";

/// Keys whose environment value is a comma-separated list.
const ENV_LIST_KEYS: &[&str] = &[
    "server.proxy_protocol_from",
    "websocket.forward_headers",
    "websocket.allowed_origins",
    "auth.jwt.rs256_public_keys",
    "auth.jwt.audience",
    "auth.jwt.issuer",
];

/// The function `--dev` serves when no function and no route is configured.
const DEV_FUNCTION: &str = "echo";

/// The route `--dev` serves [`DEV_FUNCTION`] on.
const DEV_ROUTE: &str = "/";

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

/// The file's shape. Every section and key is optional; defaults are
/// applied during validation, where `--dev` can change them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// `[server]`.
    #[serde(default)]
    server: server::RawServer,
    /// `[tls]`.
    #[serde(default)]
    tls: tls::RawTls,
    /// `[websocket]`.
    #[serde(default)]
    websocket: websocket::RawWebSocket,
    /// `[admin]`.
    #[serde(default)]
    admin: admin::RawAdmin,
    /// `[queue]`.
    #[serde(default)]
    queue: queue::RawQueue,
    /// `[cluster]`.
    #[serde(default)]
    cluster: cluster::RawCluster,
    /// `[runtime]`.
    #[serde(default)]
    runtime: runtime::RawRuntime,
    /// `[auth]`.
    #[serde(default)]
    auth: auth::RawAuth,
    /// `[log]`.
    #[serde(default)]
    log: RawLog,
    /// `[functions.<name>]`.
    #[serde(default)]
    functions: BTreeMap<String, functions::RawFunction>,
    /// `[routes]`: path to function name, or to the long form.
    #[serde(default)]
    routes: BTreeMap<String, functions::RawRoute>,
}

/// `[log]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    /// `log.format`: `text` or `json`.
    #[serde(default, deserialize_with = "word")]
    format: Option<LogFormat>,
}

/// How log lines are written (`log.format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event, coloured on a terminal only.
    #[default]
    Text,
    /// One JSON object per line, its fields at the top level (for a log
    /// collector).
    Json,
}

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
    /// The cluster this node is part of.
    pub cluster: ClusterSettings,
    /// Function limits.
    pub runtime: ::runtime::RuntimeConfig,
    /// How log lines are written (`log.format`).
    pub log_format: LogFormat,
    /// What a client sees when the function fails on its message
    /// (`runtime.on_error`).
    pub on_error: OnError,
    /// Longest pause before the next message of a client whose messages
    /// keep making the function fail (`runtime.fault_backoff`).
    pub fault_backoff: Duration,
    /// Largest state a function may keep per connection
    /// (`runtime.max_state_size`).
    pub max_state_size: usize,
    /// Most effects one call may return (`runtime.max_effects`).
    pub max_effects: usize,
    /// Authentication on connect.
    pub auth: AuthSettings,
    /// Functions by name.
    pub functions: BTreeMap<String, FunctionSource>,
    /// The routes of the config file.
    pub routes: Vec<crate::router::Route>,
    /// Whether `--dev` was given.
    pub dev: bool,
}

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
        let mut environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",");
        for key in ENV_LIST_KEYS {
            environment = environment.with_list_parse_key(key);
        }
        builder = builder.add_source(environment.source(Some(env)));
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
        let tls = self.tls.validate(dev)?;
        let websocket = self.websocket.validate()?;
        let admin = self.admin.validate()?;
        let queue = self.queue.validate(&server.state_dir)?;
        let cluster = self.cluster.validate(&admin)?;
        // A copy of the largest message must fit in the spool: a copy that
        // cannot reserve its room there is refused even with the broker up.
        let largest_copy = websocket.max_message_size as u64 + SPOOL_RECORD_OVERHEAD;
        if queue.mode != QueueMode::Off && queue.spool_max_bytes < largest_copy {
            return Err(invalid(
                "queue.spool_max_bytes",
                format!(
                    "{} is too small for one copy of the largest message: at least {largest_copy} \
                     (websocket.max_message_size plus {SPOOL_RECORD_OVERHEAD} for its headers)",
                    queue.spool_max_bytes
                ),
            ));
        }
        let runtime = self.runtime.validate(&server.state_dir)?;
        let auth = self.auth.validate()?;
        let mut functions = functions::validate_functions(self.functions)?;

        let mut routes = self.routes;
        if dev && functions.is_empty() && routes.is_empty() {
            functions.insert(
                DEV_FUNCTION.into(),
                FunctionSource::Builtin(DEV_FUNCTION.into()),
            );
            routes.insert(
                DEV_ROUTE.into(),
                functions::RawRoute::Short(DEV_FUNCTION.into()),
            );
        }
        let routes = routes
            .into_iter()
            .map(|(path, raw)| functions::validate_route(&path, raw, &functions))
            .collect::<Result<Vec<_>, _>>()?;
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
            cluster,
            runtime: runtime.limits,
            on_error: runtime.on_error,
            log_format: self.log.format.unwrap_or_default(),
            fault_backoff: runtime.fault_backoff,
            max_state_size: runtime.max_state_size,
            max_effects: runtime.max_effects,
            auth,
            functions,
            routes,
            dev,
        })
    }
}

/// A [`ConfigError::Invalid`] for `key`.
fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Whether `name` is a name of letters, digits, '-' and '_' only (a node id,
/// a function name), and not empty.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// An optional serde enum of words (`queue.mode = "async"`), read through
/// a string: the error then lists the allowed words, and a table is
/// refused. (The config crate's own enum support names the Rust type
/// instead, and takes a one-key table as a variant.)
fn word<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    Option::<String>::deserialize(deserializer)?
        .map(|text| T::deserialize(serde::de::value::StringDeserializer::<D::Error>::new(text)))
        .transpose()
}

/// A socket address (`ip:port`).
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

/// `value` or `default`, at least 1.
fn non_zero(key: &str, value: Option<usize>, default: usize) -> Result<NonZeroUsize, ConfigError> {
    NonZeroUsize::new(value.unwrap_or(default)).ok_or_else(|| invalid(key, "must be at least 1"))
}

/// `value` or `default`, at least `min`.
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

/// `value` or `default`, longer than zero.
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
    use std::path::PathBuf;

    use super::*;

    /// A temporary `.toml` file holding `text`.
    pub(super) fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    /// The least a configuration outside `--dev` needs.
    pub(super) const MINIMAL: &str = r#"
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
        assert_eq!(
            settings
                .routes
                .iter()
                .map(|r| (r.path(), r.connect()))
                .collect::<Vec<_>>(),
            vec![("/", Some("echo"))]
        );
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
    fn the_spool_must_hold_one_copy_of_the_largest_message() {
        let file = write(MINIMAL);
        let env = |mode: &str| {
            vec![
                (
                    "TIDEGATE__WEBSOCKET__MAX_MESSAGE_SIZE".to_owned(),
                    "2097152".to_owned(),
                ),
                (
                    "TIDEGATE__QUEUE__SPOOL_MAX_BYTES".to_owned(),
                    "1048576".to_owned(),
                ),
                ("TIDEGATE__QUEUE__MODE".to_owned(), mode.to_owned()),
            ]
        };
        let error = Settings::from_sources(Some(file.path()), env("receipt"), false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("queue.spool_max_bytes"), "{error}");
        assert!(error.contains("websocket.max_message_size"), "{error}");
        // Without copies there is no spool to fit in.
        Settings::from_sources(Some(file.path()), env("off"), false).unwrap();
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let file = write(MINIMAL);
        let env = vec![
            (
                "TIDEGATE__ADMIN__TOKEN".to_owned(),
                "admin-token-0123456789".to_owned(),
            ),
            (
                "TIDEGATE__AUTH__JWT__HS256_SECRET".to_owned(),
                "jwt-secret-0123456789-0123456789-0123456789".to_owned(),
            ),
            (
                "TIDEGATE__QUEUE__URL".to_owned(),
                "amqp://tidegate:broker-password@rabbit:5672/%2f".to_owned(),
            ),
        ];
        let settings = Settings::from_sources(Some(file.path()), env, false).unwrap();
        let shown = format!("{settings:?}");
        for secret in ["admin-token-0123456789", "jwt-secret-", "broker-password"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("amqp://tidegate:***@rabbit:5672/%2f"),
            "{shown}"
        );
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
    fn dev_mode_serves_echo_on_an_unprivileged_port_and_can_be_overridden() {
        let settings = Settings::from_sources(None, vec![], true).unwrap();
        assert_eq!(
            settings.server.listen,
            ServerSettings::DEV_LISTEN.parse().unwrap()
        );
        assert!(settings.tls.is_none());
        assert_eq!(
            settings
                .routes
                .iter()
                .map(|r| (r.path(), r.connect()))
                .collect::<Vec<_>>(),
            vec![("/", Some("echo"))]
        );
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
    fn the_log_format_is_text_or_json() {
        let format = |extra: &str| {
            Settings::from_toml(&format!("{MINIMAL}\n[log]\n{extra}\n"), vec![], false)
                .map(|settings| settings.log_format)
        };
        assert_eq!(format("").unwrap(), LogFormat::Text);
        assert_eq!(format("format = \"json\"").unwrap(), LogFormat::Json);
        assert_eq!(format("format = \"text\"").unwrap(), LogFormat::Text);
        for bad in ["\"JSON\"", "\"logfmt\"", "1"] {
            let error = format(&format!("format = {bad}")).unwrap_err().to_string();
            assert!(error.contains("log.format"), "{bad}: {error}");
        }
    }
}
