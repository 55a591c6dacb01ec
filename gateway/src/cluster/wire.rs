//! What nodes say to each other on the broker: the AMQP `type` of each
//! message, its headers, and its body.
//!
//! | type | headers | body |
//! |---|---|---|
//! | `heartbeat` | | an [`Announcement`], JSON |
//! | `bye` | `node` | empty |
//! | `send` | `connection-id` | the message (content type: text or binary) |
//! | `close` | `connection-id`, `code`, `reason` | empty |
//! | `info` | `connection-id` | empty |
//! | `broadcast` | `group`, `node` (the sender's) | the message |
//! | `answer` | | a [`Reply`], JSON |
//!
//! A request that wants an answer carries `reply_to` (the asking node's id)
//! and a `correlation_id`.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

use super::Answer;
use crate::hub::ConnectionInfo;

/// What a node announces about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// Its id (`server.node_id`).
    pub node: String,
    /// This run of it.
    pub instance: String,
    /// Its admin API (`cluster.admin_url`).
    pub admin_url: String,
    /// Its open connections.
    pub connections: usize,
    /// The functions it serves, with their live versions.
    pub functions: Vec<Served>,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Whether it is shutting down (closing its connections): it takes no
    /// share of the connections when others rebalance.
    #[serde(default)]
    pub draining: bool,
}

/// A function a node serves, and the version live there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    /// The function.
    pub name: String,
    /// Its live version there.
    pub version: String,
}

/// An answer as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Reply {
    /// [`Answer::Done`].
    Done,
    /// [`Answer::Full`].
    Full,
    /// [`Answer::Gone`].
    Gone,
    /// [`Answer::Info`].
    Info {
        /// The connection.
        info: ConnectionInfo,
    },
}

impl From<Reply> for Answer {
    fn from(reply: Reply) -> Self {
        match reply {
            Reply::Done => Answer::Done,
            Reply::Full => Answer::Full,
            Reply::Gone => Answer::Gone,
            Reply::Info { info } => Answer::Info(Box::new(info)),
        }
    }
}

/// The content type of a text message.
const TEXT: &str = "text/plain; charset=utf-8";
/// The content type of a binary message.
const BINARY: &str = "application/octet-stream";

/// A WebSocket message as a body and its content type.
pub fn encode(message: &Message) -> (Vec<u8>, &'static str) {
    match message {
        Message::Text(text) => (text.as_bytes().to_vec(), TEXT),
        other => (other.clone().into_data().to_vec(), BINARY),
    }
}

/// A body and content type back as the WebSocket message; `None` for text
/// that is not UTF-8.
pub fn decode(body: Vec<u8>, content_type: Option<&str>) -> Option<Message> {
    if content_type == Some(TEXT) {
        String::from_utf8(body)
            .ok()
            .map(|text| Message::Text(text.into()))
    } else {
        Some(Message::Binary(body.into()))
    }
}

/// Properties of a message of `kind` with `headers`.
pub fn properties(kind: &str, headers: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(ShortString::from(*name), value.clone());
    }
    BasicProperties::default()
        .with_type(ShortString::from(kind))
        .with_headers(table)
}

/// A header value of text.
pub fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Header `name` of `properties` as text.
pub fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::ShortUInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_answers_travel_unchanged() {
        for message in [
            Message::Text("héllo".into()),
            Message::Binary(vec![0, 255, 1].into()),
        ] {
            let (body, content_type) = encode(&message);
            assert_eq!(decode(body, Some(content_type)), Some(message));
        }
        assert_eq!(decode(vec![0xff], Some(TEXT)), None);
        let info = ConnectionInfo {
            id: "a.1".into(),
            route: "/".into(),
            path: "/".into(),
            remote_addr: "127.0.0.1:1".into(),
            connected_at: "2026-01-01T00:00:00Z".into(),
            last_active_at: "2026-01-01T00:00:00Z".into(),
            groups: vec!["g".into()],
            node: "a".into(),
        };
        for reply in [
            Reply::Done,
            Reply::Full,
            Reply::Gone,
            Reply::Info { info: info.clone() },
        ] {
            let json = serde_json::to_vec(&reply).unwrap();
            assert_eq!(serde_json::from_slice::<Reply>(&json).unwrap(), reply);
        }
        // An announcement of a node that does not say whether it drains
        // (an earlier build) reads as not draining.
        let older = r#"{"node":"a","instance":"i","admin_url":"http://a","connections":3,"functions":[],"started_at":"2026-01-01T00:00:00Z"}"#;
        let announced: Announcement = serde_json::from_str(older).unwrap();
        assert!(!announced.draining);
        let properties = properties("send", &[("connection-id", text("a.1"))]);
        assert_eq!(header(&properties, "connection-id").as_deref(), Some("a.1"));
        assert_eq!(properties.kind().as_ref().map(|k| k.as_str()), Some("send"));
    }
}
