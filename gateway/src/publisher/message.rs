//! The queue copy of one inbound WebSocket message.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One AMQP message per inbound WebSocket message: the payload bytes
/// exactly, and where it came from. Also the spool's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueMessage {
    /// Unique id (UUIDv7), so consumers can drop duplicates.
    pub message_id: String,
    /// When the gateway received the message, in seconds since the epoch.
    pub timestamp: u64,
    /// Whether the frame was text (else binary); picks the content type.
    pub text: bool,
    /// The payload, byte for byte.
    pub body: Vec<u8>,
    /// The connection that sent it.
    pub connection_id: String,
    /// The route the connection is on.
    pub route: String,
    /// The function that handled it.
    pub function: String,
    /// The version of that function.
    pub function_version: String,
    /// The node that received it.
    pub node: String,
}

impl QueueMessage {
    /// A copy of a message received now.
    pub fn new(
        text: bool,
        body: Vec<u8>,
        connection_id: &str,
        route: &str,
        function: &str,
        function_version: &str,
        node: &str,
    ) -> Self {
        Self {
            message_id: uuid::Uuid::now_v7().to_string(),
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            text,
            body,
            connection_id: connection_id.to_owned(),
            route: route.to_owned(),
            function: function.to_owned(),
            function_version: function_version.to_owned(),
            node: node.to_owned(),
        }
    }

    /// The AMQP content type of the body.
    pub fn content_type(&self) -> &'static str {
        if self.text {
            "text/plain; charset=utf-8"
        } else {
            "application/octet-stream"
        }
    }
}
