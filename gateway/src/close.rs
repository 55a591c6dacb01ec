//! Why the gateway closes a connection: one place that chooses the close
//! code (RFC 6455, section 7.4.1), the reason sent with it and the label it
//! is counted under.

use std::num::NonZeroU32;
use std::time::Duration;

/// A close code as a number, for what `on-disconnect` is told.
pub mod code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away.
    pub const GOING_AWAY: u16 = 1001;
    /// Service restart: reconnect (the node sheds connections to others).
    pub const SERVICE_RESTART: u16 = 1012;
    /// No close frame was received (reported to `on-disconnect` only).
    pub const ABNORMAL: u16 = 1006;
}

/// A close the gateway sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// The gateway is shutting down (1001).
    Shutdown,
    /// The node holds more than its share of the cluster's connections and
    /// sheds this one to a node with room (1012).
    Rebalance,
    /// Nothing was received for `websocket.idle_timeout` (1001).
    Idle(Duration),
    /// Open for `websocket.max_duration` (1001).
    MaxDuration(Duration),
    /// The client broke the WebSocket protocol (1002).
    Protocol(String),
    /// A text message was not valid UTF-8 (1007).
    InvalidUtf8,
    /// More than `websocket.max_message_rate` messages per second (1008).
    Rate(NonZeroU32),
    /// The client's token expired (1008).
    TokenExpired,
    /// A message or frame over its size limit (1009).
    TooBig(String),
    /// With `runtime.on_error = "close"`: the function failed on a message,
    /// of this kind (1011).
    FunctionFailed(&'static str),
    /// With `runtime.on_error = "close"`: every instance was busy and the
    /// queue full (1013).
    Overloaded,
    /// The message's copy could not be kept (1013).
    NotStored(String),
    /// The broker link broke before it confirmed the message's copy: the
    /// copy is kept and will reach the queue, perhaps twice (same
    /// `message_id`), so its reply is not sent and the client must not
    /// send it again (1013).
    InDoubt,
    /// The function asked to close, with 1000 or 3000-4999.
    ByFunction {
        /// The code it chose.
        code: u16,
        /// Its reason.
        reason: String,
    },
}

impl Close {
    /// The close code sent.
    pub fn code(&self) -> u16 {
        match self {
            Close::Shutdown | Close::Idle(_) | Close::MaxDuration(_) => code::GOING_AWAY,
            Close::Protocol(_) => 1002,
            Close::InvalidUtf8 => 1007,
            Close::Rate(_) | Close::TokenExpired => 1008,
            Close::TooBig(_) => 1009,
            Close::FunctionFailed(_) => 1011,
            Close::Rebalance => code::SERVICE_RESTART,
            Close::Overloaded | Close::NotStored(_) | Close::InDoubt => 1013,
            Close::ByFunction { code, .. } => *code,
        }
    }

    /// The value of `tidegate_closes_total`'s `code` label: the code, with
    /// the function's own codes counted together.
    pub fn label(&self) -> &'static str {
        match self.code() {
            1001 => "1001",
            1002 => "1002",
            1007 => "1007",
            1008 => "1008",
            1009 => "1009",
            1011 => "1011",
            1012 => "1012",
            1013 => "1013",
            1000 => "1000",
            _ => "function",
        }
    }

    /// The reason sent in the close frame (at most 123 bytes).
    pub fn reason(&self) -> String {
        let reason = match self {
            Close::Shutdown => "server shutting down".to_owned(),
            Close::Rebalance => {
                "rebalancing: reconnect, another node has room for this connection".to_owned()
            }
            Close::Idle(limit) => format!(
                "idle for {} (websocket.idle_timeout)",
                humantime::format_duration(*limit)
            ),
            Close::MaxDuration(limit) => format!(
                "connection reached its maximum duration of {} (websocket.max_duration)",
                humantime::format_duration(*limit)
            ),
            Close::Protocol(error) => format!("protocol error: {error}"),
            Close::InvalidUtf8 => "text message is not valid UTF-8".to_owned(),
            Close::Rate(rate) => {
                format!("more than {rate} messages per second (websocket.max_message_rate)")
            }
            Close::TokenExpired => "the token expired".to_owned(),
            Close::TooBig(what) => what.clone(),
            Close::FunctionFailed(kind) => format!("function error: {kind}"),
            Close::Overloaded => "function overloaded; try again later".to_owned(),
            Close::NotStored(why) => format!("message not stored: {why}"),
            Close::InDoubt => "message kept but in doubt: it reaches the queue, perhaps twice \
                               (same message_id); do not send it again"
                .to_owned(),
            Close::ByFunction { reason, .. } => reason.clone(),
        };
        clip(reason)
    }

    /// The close a function asked for: 1000 and 3000-4999 are its to use;
    /// anything else becomes 1000 (and is logged by the caller).
    pub fn by_function(code: u16, reason: String) -> Result<Self, Self> {
        if code == code::NORMAL || (3000..=4999).contains(&code) {
            Ok(Close::ByFunction { code, reason })
        } else {
            Err(Close::ByFunction {
                code: code::NORMAL,
                reason,
            })
        }
    }
}

/// A close reason fits in 123 bytes (a control frame's 125, less the code).
fn clip(mut reason: String) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.truncate(end);
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_close_knows_its_code_and_label() {
        let rate = NonZeroU32::new(5).unwrap();
        let cases = [
            (Close::Shutdown, 1001, "1001"),
            (Close::Rebalance, 1012, "1012"),
            (Close::Idle(Duration::from_secs(1)), 1001, "1001"),
            (Close::MaxDuration(Duration::from_secs(1)), 1001, "1001"),
            (Close::Protocol("x".into()), 1002, "1002"),
            (Close::InvalidUtf8, 1007, "1007"),
            (Close::Rate(rate), 1008, "1008"),
            (Close::TokenExpired, 1008, "1008"),
            (Close::TooBig("x".into()), 1009, "1009"),
            (Close::FunctionFailed("trap"), 1011, "1011"),
            (Close::Overloaded, 1013, "1013"),
            (Close::NotStored("x".into()), 1013, "1013"),
            (Close::InDoubt, 1013, "1013"),
            (
                Close::ByFunction {
                    code: 4000,
                    reason: String::new(),
                },
                4000,
                "function",
            ),
        ];
        for (close, code, label) in cases {
            assert_eq!(close.code(), code, "{close:?}");
            assert_eq!(close.label(), label, "{close:?}");
        }
        assert!(
            Close::Rate(rate)
                .reason()
                .contains("websocket.max_message_rate")
        );
    }

    #[test]
    fn a_function_may_only_close_with_its_own_codes() {
        assert_eq!(Close::by_function(4001, "bye".into()).unwrap().code(), 4001);
        assert_eq!(
            Close::by_function(1000, String::new()).unwrap().code(),
            1000
        );
        assert_eq!(
            Close::by_function(1011, String::new()).unwrap_err().code(),
            1000
        );
    }

    #[test]
    fn the_in_doubt_reason_is_whole_in_the_frame() {
        let reason = Close::InDoubt.reason();
        assert!(reason.len() <= 123, "{} bytes", reason.len());
        assert!(reason.ends_with("do not send it again"), "{reason}");
    }

    #[test]
    fn close_reasons_fit_the_frame() {
        let long = "é".repeat(100);
        let clipped = Close::NotStored(long.clone()).reason();
        assert!(clipped.len() <= 123);
        assert!(format!("message not stored: {long}").starts_with(&clipped));
    }
}
