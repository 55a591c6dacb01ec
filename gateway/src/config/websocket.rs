//! `[websocket]`: what one WebSocket connection may hold and send: message,
//! frame and request-head sizes, buffers, the send queue, the message rate,
//! the headers and origins allowed, and its time limits.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, at_least, invalid, non_zero, positive};

/// `[websocket]` as written; `None` takes the default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebSocket {
    /// `websocket.max_message_size`, bytes.
    max_message_size: Option<usize>,
    /// `websocket.max_frame_size`, bytes.
    max_frame_size: Option<usize>,
    /// `websocket.read_buffer_size`, bytes.
    read_buffer_size: Option<usize>,
    /// `websocket.write_buffer_size`, bytes.
    write_buffer_size: Option<usize>,
    /// `websocket.send_queue`, messages.
    send_queue: Option<usize>,
    /// `websocket.send_queue_bytes`, bytes.
    send_queue_bytes: Option<usize>,
    /// `websocket.max_groups`, per connection.
    max_groups: Option<usize>,
    /// `websocket.max_request_head`, bytes.
    max_request_head: Option<usize>,
    /// `websocket.forward_headers`: header names.
    forward_headers: Option<Vec<String>>,
    /// `websocket.allowed_origins`: `Origin` values.
    allowed_origins: Option<Vec<String>>,
    /// `websocket.max_message_rate`, messages per second.
    max_message_rate: Option<u32>,
    /// `websocket.idle_timeout`, e.g. `10m`.
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    /// `websocket.max_duration`, e.g. `24h`.
    #[serde(default, with = "humantime_serde")]
    max_duration: Option<Duration>,
    /// `websocket.send_timeout`, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    send_timeout: Option<Duration>,
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
    /// Most groups one connection may be in (`websocket.max_groups`).
    pub max_groups: NonZeroUsize,
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
    /// Default of `websocket.max_message_size`: 128 KiB.
    pub const MAX_MESSAGE_SIZE: usize = 128 << 10;
    /// Least `websocket.max_message_size` and `websocket.max_frame_size`.
    pub const MIN_MESSAGE_SIZE: usize = 16;
    /// Default of `websocket.read_buffer_size`: one Ethernet frame's worth,
    /// so an idle connection costs little.
    pub const READ_BUFFER_SIZE: usize = 1536;
    /// Least `websocket.read_buffer_size`.
    pub const MIN_READ_BUFFER_SIZE: usize = 1024;
    /// Default of `websocket.write_buffer_size`: 8 KiB.
    pub const WRITE_BUFFER_SIZE: usize = 8 << 10;
    /// Default of `websocket.send_queue`.
    pub const SEND_QUEUE: usize = 256;
    /// Default of `websocket.send_queue_bytes` (raised to
    /// `websocket.max_message_size` when that is larger).
    pub const SEND_QUEUE_BYTES: usize = 1 << 20;
    /// Default of `websocket.max_groups`.
    pub const MAX_GROUPS: usize = 64;
    /// Most `websocket.max_groups`.
    pub const MAX_MAX_GROUPS: usize = 4096;
    /// Most `websocket.send_queue_bytes`: the queue counts bytes in a `u32`.
    pub const MAX_SEND_QUEUE_BYTES: usize = u32::MAX as usize;
    /// Default of `websocket.max_request_head`: 8 KiB.
    pub const MAX_REQUEST_HEAD: usize = 8 << 10;
    /// Least `websocket.max_request_head`.
    pub const MIN_REQUEST_HEAD: usize = 512;
    /// Default of `websocket.forward_headers`.
    pub const FORWARD_HEADERS: &[&str] = &["origin", "user-agent"];
    /// Default of `websocket.max_message_rate`, per second.
    pub const MAX_MESSAGE_RATE: u32 = 1_000;
    /// Default of `websocket.idle_timeout`: ten minutes.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
    /// Default of `websocket.max_duration`: a day.
    pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
    /// Default of `websocket.send_timeout`.
    pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
}

impl RawWebSocket {
    /// The connection settings; frames default to the message size.
    pub(super) fn validate(self) -> Result<WebSocketSettings, ConfigError> {
        let max_message_size = at_least(
            "websocket.max_message_size",
            self.max_message_size,
            WebSocketSettings::MAX_MESSAGE_SIZE,
            WebSocketSettings::MIN_MESSAGE_SIZE,
        )?;
        let max_frame_size = at_least(
            "websocket.max_frame_size",
            self.max_frame_size,
            max_message_size,
            WebSocketSettings::MIN_MESSAGE_SIZE,
        )?;
        if max_frame_size > max_message_size {
            return Err(invalid(
                "websocket.max_frame_size",
                format!(
                    "{max_frame_size} is larger than websocket.max_message_size ({max_message_size})"
                ),
            ));
        }
        let forward_headers = match self.forward_headers {
            Some(names) => names,
            None => WebSocketSettings::FORWARD_HEADERS
                .iter()
                .map(|&name| name.to_owned())
                .collect(),
        }
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
                WebSocketSettings::READ_BUFFER_SIZE,
                WebSocketSettings::MIN_READ_BUFFER_SIZE,
            )?,
            write_buffer_size: self
                .write_buffer_size
                .unwrap_or(WebSocketSettings::WRITE_BUFFER_SIZE),
            send_queue: non_zero(
                "websocket.send_queue",
                self.send_queue,
                WebSocketSettings::SEND_QUEUE,
            )?,
            send_queue_bytes: {
                let bytes = self
                    .send_queue_bytes
                    .unwrap_or(WebSocketSettings::SEND_QUEUE_BYTES.max(max_message_size));
                if bytes < max_message_size || bytes > WebSocketSettings::MAX_SEND_QUEUE_BYTES {
                    return Err(invalid(
                        "websocket.send_queue_bytes",
                        format!(
                            "{bytes} must be at least websocket.max_message_size ({max_message_size}), \
                             so one reply fits, and at most {}",
                            WebSocketSettings::MAX_SEND_QUEUE_BYTES
                        ),
                    ));
                }
                bytes
            },
            max_groups: {
                let groups = non_zero(
                    "websocket.max_groups",
                    self.max_groups,
                    WebSocketSettings::MAX_GROUPS,
                )?;
                if groups.get() > WebSocketSettings::MAX_MAX_GROUPS {
                    return Err(invalid(
                        "websocket.max_groups",
                        format!(
                            "{groups}: at most {} (joins and leaves scan a connection's groups)",
                            WebSocketSettings::MAX_MAX_GROUPS
                        ),
                    ));
                }
                groups
            },
            max_request_head: at_least(
                "websocket.max_request_head",
                self.max_request_head,
                WebSocketSettings::MAX_REQUEST_HEAD,
                WebSocketSettings::MIN_REQUEST_HEAD,
            )?,
            forward_headers,
            allowed_origins: self
                .allowed_origins
                .unwrap_or_default()
                .into_iter()
                .map(|origin| origin.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|origin| !origin.is_empty())
                .collect(),
            max_message_rate: NonZeroU32::new(
                self.max_message_rate
                    .unwrap_or(WebSocketSettings::MAX_MESSAGE_RATE),
            )
            .ok_or_else(|| invalid("websocket.max_message_rate", "must be at least 1"))?,
            idle_timeout: positive(
                "websocket.idle_timeout",
                self.idle_timeout,
                WebSocketSettings::IDLE_TIMEOUT,
            )?,
            max_duration: positive(
                "websocket.max_duration",
                self.max_duration,
                WebSocketSettings::MAX_DURATION,
            )?,
            send_timeout: positive(
                "websocket.send_timeout",
                self.send_timeout,
                WebSocketSettings::SEND_TIMEOUT,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::super::tests::MINIMAL;

    #[test]
    fn groups_per_connection_default_to_64_and_are_bounded() {
        let groups = |extra: &str| {
            Settings::from_toml(&format!("{MINIMAL}\n[websocket]\n{extra}\n"), vec![], false)
                .map(|settings| settings.websocket.max_groups.get())
        };
        assert_eq!(groups("").unwrap(), 64);
        assert_eq!(groups("max_groups = 4096").unwrap(), 4096);
        for bad in ["max_groups = 0", "max_groups = 4097"] {
            let error = groups(bad).unwrap_err().to_string();
            assert!(error.contains("websocket.max_groups"), "{bad}: {error}");
        }
    }
}
