//! Connections to the broker (`queue.url`): the copies' link, the push
//! queue's consumer and the cluster's link all open theirs here, with the
//! same timeout and heartbeat.

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::config::{QueueSettings, redact_url};

/// A connection to the broker of `settings`, named `name` (as the broker's
/// management lists it), within `queue.connect_timeout`.
///
/// Both ends check the link with AMQP heartbeats every `queue.heartbeat`
/// (unless the URL sets its own `heartbeat`): a link that dies without a
/// word (a cable pulled, a firewall dropping packets) is given up after
/// two silent periods, on either side, instead of the broker's default of
/// two minutes, so copies are spooled and the node's cluster queue goes.
///
/// # Errors
/// A readable reason, with the URL's password hidden.
pub async fn connect(settings: &QueueSettings, name: String) -> Result<Connection, String> {
    let mut uri: AMQPUri = settings
        .url
        .parse()
        .map_err(|e| format!("queue.url {}: {e}", redact_url(&settings.url)))?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(settings.heartbeat_seconds());
    }
    let properties =
        ConnectionProperties::default().with_connection_name(lapin::types::LongString::from(name));
    tokio::time::timeout(
        settings.connect_timeout,
        Connection::connect_uri(uri, properties),
    )
    .await
    .map_err(|_| {
        format!(
            "no answer from {} within {:?} (queue.connect_timeout)",
            redact_url(&settings.url),
            settings.connect_timeout
        )
    })?
    .map_err(|e| format!("connecting to {}: {e}", redact_url(&settings.url)))
}
