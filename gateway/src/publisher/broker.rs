//! The link to RabbitMQ: one connection, one channel in confirm mode, and
//! the durable queue declared on every (re)connect.
//!
//! The publisher's worker sees the link only through [`Broker`], [`Link`]
//! and the [`Confirm`]/[`LinkError`] types defined here, so lapin stays in
//! this file and unit tests can put a scripted broker in its place.

use std::pin::Pin;
use std::sync::Arc;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection};

use super::message::QueueMessage;
use crate::config::QueueSettings;
pub use crate::config::redact_url as redact;

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// The broker's answer to one published copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// The broker has the copy (persistent, on a durable queue).
    Ack,
    /// The broker took the copy but could not route it to the queue (was
    /// the queue deleted?): it came back instead of vanishing.
    Unroutable,
    /// The broker refused the copy.
    Nack,
}

/// The link failed while a copy was on its way or waiting for its confirm:
/// the broker may or may not have it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct LinkError(String);

impl LinkError {
    /// A link error with a readable reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

/// One published copy on its way: resolves with the broker's confirm.
///
/// Its first poll hands the copy to the link (so copies leave in the order
/// their futures are first polled); later polls wait for the confirm.
pub type Confirming = Pin<Box<dyn Future<Output = Result<Confirm, LinkError>> + Send>>;

/// How the publisher reaches a broker.
pub enum Broker {
    /// RabbitMQ at `queue.url`.
    Amqp,
    /// A broker a unit test scripts (confirms, nacks, drops, stalls).
    #[cfg(test)]
    Scripted(super::scripted::Broker),
}

impl Broker {
    /// Open a link: connect, open a confirm-mode channel, declare the queue.
    ///
    /// # Errors
    /// A readable reason when the broker cannot be reached or refuses.
    pub async fn open(&self, settings: &QueueSettings, node: &str) -> Result<Link, String> {
        match self {
            Self::Amqp => AmqpLink::open(settings, node)
                .await
                .map(|link| Link::Amqp(Box::new(link))),
            #[cfg(test)]
            Self::Scripted(broker) => broker.open().map(Link::Scripted),
        }
    }
}

/// An open link to the broker.
pub enum Link {
    /// A RabbitMQ connection and channel (boxed: it is far larger than a
    /// scripted link, and opened once per connection to the broker).
    Amqp(Box<AmqpLink>),
    /// A link of a scripted test broker.
    #[cfg(test)]
    Scripted(super::scripted::Link),
}

impl Link {
    /// Whether the link is still up.
    pub fn is_connected(&self) -> bool {
        match self {
            Self::Amqp(link) => link.is_connected(),
            #[cfg(test)]
            Self::Scripted(link) => link.is_connected(),
        }
    }

    /// Publish one copy; see [`Confirming`].
    pub fn publish(&self, message: Arc<QueueMessage>) -> Confirming {
        match self {
            Self::Amqp(link) => link.publish(message),
            #[cfg(test)]
            Self::Scripted(link) => link.publish(message),
        }
    }

    /// Close the link politely.
    pub async fn close(self) {
        match self {
            Self::Amqp(link) => (*link).close().await,
            #[cfg(test)]
            Self::Scripted(_) => {}
        }
    }
}

/// An open RabbitMQ connection and confirm-mode channel.
pub struct AmqpLink {
    /// The AMQP connection; checked for liveness between publishes.
    connection: Connection,
    /// The channel copies are published on, in confirm mode.
    channel: lapin::Channel,
    /// The queue's name, also the routing key on the default exchange.
    queue: ShortString,
    /// Where functions' `publish` effects go (`queue.exchange`).
    exchange: ShortString,
}

impl AmqpLink {
    /// Connect, open a confirm-mode channel and declare the durable queue.
    ///
    /// # Errors
    /// A readable reason when the broker cannot be reached or refuses.
    async fn open(settings: &QueueSettings, node: &str) -> Result<Self, String> {
        let connection = crate::broker::connect(settings, format!("tidegate {node}")).await?;
        let setup = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            channel
                .queue_declare(
                    settings.queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>(channel)
        };
        // Functions' `publish` effects go to `queue.exchange`: it must
        // exist, else the broker would close the channel at the first one
        // (taking the copies in flight with it), again at every replay.
        let exchange = async {
            let channel = connection.create_channel().await?;
            channel
                .exchange_declare(
                    settings.exchange.as_str().into(),
                    lapin::ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let _ = channel.close(200, "checked".into()).await;
            Ok::<_, lapin::Error>(())
        };
        match tokio::time::timeout(settings.connect_timeout, exchange).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = connection.close(0, "setup failed".into()).await;
                return Err(format!(
                    "queue.exchange {:?} cannot be used: {e} (declare it, or set queue.exchange \
                     to one that exists, such as amq.topic)",
                    settings.exchange
                ));
            }
            Err(_) => return Err("the broker did not answer the exchange check in time".into()),
        }
        let channel = match tokio::time::timeout(settings.connect_timeout, setup).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                let _ = connection.close(0, "setup failed".into()).await;
                return Err(format!(
                    "declaring durable queue {:?}: {e} (if it exists with other \
                     arguments, delete it or pick another queue.queue)",
                    settings.queue
                ));
            }
            Err(_) => return Err("the broker did not finish the channel set-up in time".into()),
        };
        Ok(Self {
            connection,
            channel,
            queue: settings.queue.as_str().into(),
            exchange: settings.exchange.as_str().into(),
        })
    }

    /// Whether the connection is still up.
    fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Publish one copy: persistent, mandatory (an unroutable copy comes
    /// back instead of vanishing), with the contract's properties.
    ///
    /// The returned future owns what it needs. Its first poll hands the
    /// frames to lapin's I/O loop (so copies leave in the order their
    /// futures are first polled); it completes with the broker's confirm.
    fn publish(&self, message: Arc<QueueMessage>) -> Confirming {
        let mut headers = FieldTable::default();
        for (name, value) in [
            ("connection-id", &message.connection_id),
            ("route", &message.route),
            ("function", &message.function),
            ("function-version", &message.function_version),
            ("node", &message.node),
        ] {
            headers.insert(name.into(), AMQPValue::LongString(value.as_str().into()));
        }
        let mut properties = BasicProperties::default();
        if message.routing_key.is_some() {
            // Tells a function's messages from copies at a glance.
            properties = properties.with_type("tidegate.publish".into());
        }
        let properties = properties
            .with_delivery_mode(PERSISTENT)
            .with_message_id(message.message_id.as_str().into())
            .with_timestamp(message.timestamp)
            .with_content_type(message.content_type().into())
            .with_headers(headers);
        let channel = self.channel.clone();
        // A copy goes to the durable queue, and must reach it (mandatory:
        // an unroutable copy comes back). A function's `publish` goes to
        // the exchange with its routing key, where the broker's bindings
        // decide; with none, the broker drops it, as a topic would.
        let (exchange, routing_key, mandatory) = match &message.routing_key {
            None => (ShortString::from(""), self.queue.clone(), true),
            Some(key) => (
                self.exchange.clone(),
                ShortString::from(key.as_str()),
                false,
            ),
        };
        Box::pin(async move {
            let confirm = channel
                .basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions {
                        mandatory,
                        immediate: false,
                    },
                    &message.body,
                    properties,
                )
                .await
                .map_err(|e| LinkError(format!("publishing: {e}")))?;
            match confirm.await {
                Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(Confirm::Ack),
                Ok(Confirmation::Ack(Some(_))) => Ok(Confirm::Unroutable),
                Ok(Confirmation::Nack(_)) => Ok(Confirm::Nack),
                Err(e) => Err(LinkError(format!("waiting for a confirm: {e}"))),
            }
        })
    }

    /// Close the connection politely.
    async fn close(self) {
        let _ = self
            .connection
            .close(200, "tidegate shutting down".into())
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
    }
}
