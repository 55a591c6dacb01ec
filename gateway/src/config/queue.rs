//! `[queue]`: the RabbitMQ copy of every message: the broker, the queue,
//! when a client gets its reply relative to the copy ([`QueueMode`]), and
//! the spool that holds copies while the broker is unreachable.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid, non_zero, positive};

/// `[queue]` as written; `None` takes the default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    /// `queue.url`, `amqp://` or `amqps://`.
    url: Option<String>,
    /// `queue.queue`: the queue's name.
    queue: Option<String>,
    /// `queue.exchange`: where `publish` effects go.
    exchange: Option<String>,
    /// `queue.push_queue`: messages for connections and groups; `""`
    /// turns it off.
    push_queue: Option<String>,
    /// `queue.mode`: `receipt`, `async` or `off`.
    #[serde(default, deserialize_with = "super::word")]
    mode: Option<QueueMode>,
    /// `queue.max_in_flight`.
    max_in_flight: Option<usize>,
    /// `queue.spool_dir`.
    spool_dir: Option<PathBuf>,
    /// `queue.spool_max_bytes`.
    spool_max_bytes: Option<u64>,
    /// `queue.connect_timeout`, e.g. `5s`.
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    /// `queue.reconnect_interval`, e.g. `1s`.
    #[serde(default, with = "humantime_serde")]
    reconnect_interval: Option<Duration>,
    /// `queue.confirm_timeout`, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    confirm_timeout: Option<Duration>,
    /// `queue.heartbeat`, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    heartbeat: Option<Duration>,
}

/// When a client gets the reply to a message (`queue.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// The RabbitMQ copy of every message. Its `Debug` shows the URL without
/// its password.
#[derive(Clone)]
pub struct QueueSettings {
    /// AMQP URL of the broker.
    pub url: String,
    /// The durable queue copies go to (default exchange, routing key = name).
    pub queue: String,
    /// The exchange a function's `publish` effect goes to, with the
    /// function's routing key.
    pub exchange: String,
    /// The durable queue whose messages the gateway delivers to
    /// connections and groups; `None` when off.
    pub push_queue: Option<String>,
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
    /// The AMQP heartbeat asked of the broker (whole seconds): a link
    /// silent for two of them is given up by either end.
    pub heartbeat: Duration,
}

impl std::fmt::Debug for QueueSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Named field by field, so a new one is not forgotten here.
        let Self {
            url,
            queue,
            exchange,
            push_queue,
            mode,
            max_in_flight,
            spool_dir,
            spool_max_bytes,
            connect_timeout,
            reconnect_interval,
            confirm_timeout,
            heartbeat,
        } = self;
        f.debug_struct("QueueSettings")
            .field("url", &redact_url(url))
            .field("queue", queue)
            .field("exchange", exchange)
            .field("push_queue", push_queue)
            .field("mode", mode)
            .field("max_in_flight", max_in_flight)
            .field("spool_dir", spool_dir)
            .field("spool_max_bytes", spool_max_bytes)
            .field("connect_timeout", connect_timeout)
            .field("reconnect_interval", reconnect_interval)
            .field("confirm_timeout", confirm_timeout)
            .field("heartbeat", heartbeat)
            .finish()
    }
}

/// `url` without its password, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl QueueSettings {
    /// Default of `queue.url`: a broker on this host, its default user.
    pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    /// The schemes `queue.url` may start with.
    pub const URL_SCHEMES: &[&str] = &["amqp://", "amqps://"];
    /// Default of `queue.queue`.
    pub const QUEUE: &str = "tidegate.messages";
    /// Longest queue name, in bytes (an AMQP short string).
    pub const MAX_QUEUE_NAME: usize = 255;
    /// Default of `queue.exchange`: the broker's topic exchange, which every
    /// RabbitMQ has; bind queues to it by routing key.
    pub const EXCHANGE: &str = "amq.topic";
    /// Default of `queue.push_queue`.
    pub const PUSH_QUEUE: &str = "tidegate.push";
    /// Queue names with this prefix are the broker's own.
    pub const RESERVED_QUEUE_PREFIX: &str = "amq.";
    /// Default of `queue.mode`.
    pub const MODE: QueueMode = QueueMode::Receipt;
    /// Default of `queue.max_in_flight`.
    pub const MAX_IN_FLIGHT: usize = 1024;
    /// Default of `queue.spool_dir`, under `server.state_dir`.
    pub const SPOOL_DIR: &str = "spool";
    /// Default of `queue.spool_max_bytes`: 1 GiB.
    pub const SPOOL_MAX_BYTES: u64 = 1 << 30;
    /// Least `queue.spool_max_bytes`: 1 MiB.
    pub const MIN_SPOOL_MAX_BYTES: u64 = 1 << 20;
    /// Default of `queue.connect_timeout`.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default of `queue.reconnect_interval`.
    pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
    /// Default of `queue.confirm_timeout`.
    pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default of `queue.heartbeat`: a silent link is given up after 20 s.
    pub const HEARTBEAT: Duration = Duration::from_secs(10);
    /// Longest `queue.heartbeat` (AMQP carries it as 16-bit seconds).
    pub const MAX_HEARTBEAT: Duration = Duration::from_secs(u16::MAX as u64);

    /// `queue.heartbeat` in the whole seconds AMQP carries.
    pub fn heartbeat_seconds(&self) -> u16 {
        u16::try_from(self.heartbeat.as_secs()).unwrap_or(u16::MAX)
    }
}

impl RawQueue {
    /// The queue's settings; the spool defaults to a folder of `state_dir`.
    pub(super) fn validate(self, state_dir: &Path) -> Result<QueueSettings, ConfigError> {
        let url = self.url.unwrap_or_else(|| QueueSettings::URL.into());
        if !QueueSettings::URL_SCHEMES
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            return Err(invalid("queue.url", "must start with amqp:// or amqps://"));
        }
        let queue = self.queue.unwrap_or_else(|| QueueSettings::QUEUE.into());
        check_queue_name("queue.queue", &queue)?;
        let push_queue = match self.push_queue {
            None => Some(QueueSettings::PUSH_QUEUE.to_owned()),
            Some(name) if name.is_empty() => None,
            Some(name) => {
                check_queue_name("queue.push_queue", &name)?;
                if name == queue {
                    return Err(invalid(
                        "queue.push_queue",
                        "must differ from queue.queue: the gateway would deliver its own copies",
                    ));
                }
                Some(name)
            }
        };
        let exchange = self
            .exchange
            .unwrap_or_else(|| QueueSettings::EXCHANGE.into());
        // Not the default exchange (""): there a routing key is a queue's
        // name, and a function could publish into the copy queue or the
        // push queue.
        if exchange.is_empty() || exchange.len() > QueueSettings::MAX_QUEUE_NAME {
            return Err(invalid(
                "queue.exchange",
                format!(
                    "an exchange name is 1 to {} bytes; not the default exchange (\"\"), where a \
                     function could publish into any queue",
                    QueueSettings::MAX_QUEUE_NAME
                ),
            ));
        }
        Ok(QueueSettings {
            url,
            queue,
            exchange,
            push_queue,
            mode: self.mode.unwrap_or(QueueSettings::MODE),
            max_in_flight: non_zero(
                "queue.max_in_flight",
                self.max_in_flight,
                QueueSettings::MAX_IN_FLIGHT,
            )?,
            spool_dir: self
                .spool_dir
                .unwrap_or_else(|| state_dir.join(QueueSettings::SPOOL_DIR)),
            spool_max_bytes: {
                let bytes = self
                    .spool_max_bytes
                    .unwrap_or(QueueSettings::SPOOL_MAX_BYTES);
                if bytes < QueueSettings::MIN_SPOOL_MAX_BYTES {
                    return Err(invalid(
                        "queue.spool_max_bytes",
                        format!(
                            "must be at least {} (1 MiB)",
                            QueueSettings::MIN_SPOOL_MAX_BYTES
                        ),
                    ));
                }
                bytes
            },
            connect_timeout: positive(
                "queue.connect_timeout",
                self.connect_timeout,
                QueueSettings::CONNECT_TIMEOUT,
            )?,
            reconnect_interval: positive(
                "queue.reconnect_interval",
                self.reconnect_interval,
                QueueSettings::RECONNECT_INTERVAL,
            )?,
            confirm_timeout: positive(
                "queue.confirm_timeout",
                self.confirm_timeout,
                QueueSettings::CONFIRM_TIMEOUT,
            )?,
            heartbeat: {
                let heartbeat = self.heartbeat.unwrap_or(QueueSettings::HEARTBEAT);
                if heartbeat.subsec_nanos() != 0
                    || heartbeat.is_zero()
                    || heartbeat > QueueSettings::MAX_HEARTBEAT
                {
                    return Err(invalid(
                        "queue.heartbeat",
                        "whole seconds from 1s to 65535s (AMQP heartbeats count seconds)",
                    ));
                }
                heartbeat
            },
        })
    }
}

/// A queue name of ours, at `key`.
fn check_queue_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > QueueSettings::MAX_QUEUE_NAME
        || name.starts_with(QueueSettings::RESERVED_QUEUE_PREFIX)
    {
        return Err(invalid(
            key,
            format!(
                "{name:?}: a queue name is 1 to {} bytes and may not start with {:?}",
                QueueSettings::MAX_QUEUE_NAME,
                QueueSettings::RESERVED_QUEUE_PREFIX
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::super::tests::MINIMAL;
    use super::*;

    #[test]
    fn queue_modes_are_lower_case_words_and_others_are_refused() {
        let mode = |value: &str| {
            Settings::from_toml(
                &format!("{MINIMAL}\n[queue]\nmode = {value}\n"),
                vec![],
                false,
            )
            .map(|settings| settings.queue.mode)
        };
        assert_eq!(mode("\"receipt\"").unwrap(), QueueMode::Receipt);
        assert_eq!(mode("\"async\"").unwrap(), QueueMode::Async);
        assert_eq!(mode("\"off\"").unwrap(), QueueMode::Off);
        for bad in ["\"Async\"", "\"sometimes\"", "3"] {
            let error = mode(bad).unwrap_err().to_string();
            assert!(error.contains("queue.mode"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_push_queue_and_exchange_have_defaults_and_can_be_turned_off() {
        let queue = |extra: &str| {
            Settings::from_toml(&format!("{MINIMAL}\n[queue]\n{extra}\n"), vec![], false)
                .map(|settings| settings.queue)
        };
        let defaults = queue("").unwrap();
        assert_eq!(defaults.push_queue.as_deref(), Some("tidegate.push"));
        assert_eq!(defaults.exchange, "amq.topic");
        assert_eq!(queue("push_queue = \"\"").unwrap().push_queue, None);
        let error = queue("push_queue = \"tidegate.messages\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("queue.push_queue"), "{error}");
        let error = queue("push_queue = \"amq.x\"").unwrap_err().to_string();
        assert!(error.contains("queue.push_queue"), "{error}");
        let error = queue("exchange = \"\"").unwrap_err().to_string();
        assert!(error.contains("queue.exchange"), "{error}");
    }

    #[test]
    fn the_heartbeat_is_whole_seconds_with_a_default() {
        let heartbeat = |extra: &str| {
            Settings::from_toml(&format!("{MINIMAL}\n[queue]\n{extra}\n"), vec![], false)
                .map(|settings| settings.queue)
        };
        let defaults = heartbeat("").unwrap();
        assert_eq!(defaults.heartbeat, QueueSettings::HEARTBEAT);
        assert_eq!(defaults.heartbeat_seconds(), 10);
        assert_eq!(
            heartbeat("heartbeat = \"2s\"").unwrap().heartbeat_seconds(),
            2
        );
        for bad in ["0s", "1500ms", "70000s"] {
            let error = heartbeat(&format!("heartbeat = \"{bad}\""))
                .unwrap_err()
                .to_string();
            assert!(error.contains("queue.heartbeat"), "{bad}: {error}");
        }
    }
}
