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
    /// `None` for the copy of an inbound message (to `queue.queue`); the
    /// routing key of a function's `publish` effect (to `queue.exchange`).
    pub routing_key: Option<String>,
}

/// The first byte of a spool record written since messages carry a
/// routing key. Records of the first version start with the length of
/// their 36-character message id (0x24), so the two never mix up.
pub const RECORD_V2: u8 = 0x02;

/// A spool record of the first version: a copy, without a routing key.
#[derive(Deserialize)]
struct RecordV1 {
    message_id: String,
    timestamp: u64,
    text: bool,
    body: Vec<u8>,
    connection_id: String,
    route: String,
    function: String,
    function_version: String,
    node: String,
}

impl RecordV1 {
    fn upgrade(self) -> QueueMessage {
        QueueMessage {
            message_id: self.message_id,
            timestamp: self.timestamp,
            text: self.text,
            body: self.body,
            connection_id: self.connection_id,
            route: self.route,
            function: self.function,
            function_version: self.function_version,
            node: self.node,
            routing_key: None,
        }
    }
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
            routing_key: None,
        }
    }

    /// The spool's record of this message: [`RECORD_V2`], then the
    /// message in postcard.
    ///
    /// # Errors
    /// When postcard cannot encode it (it always can).
    pub fn encode(&self) -> postcard::Result<Vec<u8>> {
        postcard::to_extend(self, vec![RECORD_V2])
    }

    /// A message from its spool record, of this version or the first.
    ///
    /// # Errors
    /// When the record does not decode.
    pub fn decode(record: &[u8]) -> postcard::Result<Self> {
        match record.split_first() {
            Some((&RECORD_V2, rest)) => postcard::from_bytes(rest),
            _ => postcard::from_bytes::<RecordV1>(record).map(RecordV1::upgrade),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_both_versions_decode() {
        let mut copy = QueueMessage::new(true, b"hi".to_vec(), "n.c", "/", "echo", "v1", "n");
        assert_eq!(QueueMessage::decode(&copy.encode().unwrap()).unwrap(), copy);
        copy.routing_key = Some("orders.created".into());
        assert_eq!(QueueMessage::decode(&copy.encode().unwrap()).unwrap(), copy);
        // What the spool held before routing keys: the struct without it.
        #[derive(Serialize)]
        struct Old<'a>(
            &'a str,
            u64,
            bool,
            &'a [u8],
            &'a str,
            &'a str,
            &'a str,
            &'a str,
            &'a str,
        );
        let old = postcard::to_stdvec(&Old(
            &copy.message_id,
            7,
            false,
            b"x",
            "n.c",
            "/",
            "echo",
            "v1",
            "n",
        ))
        .unwrap();
        assert_eq!(old[0], 36, "a v1 record starts with the id's length");
        let decoded = QueueMessage::decode(&old).unwrap();
        assert_eq!((decoded.timestamp, decoded.routing_key), (7, None));
        assert!(QueueMessage::decode(&[RECORD_V2, 0xff]).is_err());
    }
}
