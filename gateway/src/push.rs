//! The push queue (`queue.push_queue`): the SQS -> Lambda -> `@connections`
//! flow without code. A backend publishes a message with a
//! `connection-id` or a `group` header; the gateway delivers its body to
//! that connection or group (text when its content type is `text/*` or
//! JSON, binary otherwise), then acknowledges it. A `close` header (a close
//! code) with a `connection-id` closes that connection once the body, if
//! any, is queued.
//!
//! Every message is acknowledged once handled: one for an unknown
//! connection, an empty group or a malformed message is counted
//! (`tidegate_push_total{outcome}`) and logged, never requeued forever.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::close::Close;
use crate::config::QueueSettings;
use crate::hub::{Hub, check_group};
use crate::metrics::Metrics;

/// Messages taken from the queue before the first is acknowledged: with
/// the broker's largest message size, what the push queue can hold in
/// memory at once.
const PREFETCH: u16 = 16;

/// The longest pause between attempts to reach the broker.
const MAX_RECONNECT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// What a push message asks for.
#[derive(Debug, PartialEq)]
enum Push {
    /// Send to one connection, then close it if `close` is given.
    Connection {
        id: String,
        message: Option<Message>,
        close: Option<Close>,
    },
    /// Send to every member of a group.
    Group { group: String, message: Message },
}

/// Why a push message cannot be delivered: the `outcome` label and what
/// the log says.
#[derive(Debug, PartialEq)]
struct Malformed(&'static str, String);

/// A header's value as text.
fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::ByteArray(b) => std::str::from_utf8(b.as_slice()).ok().map(str::to_owned),
        _ => None,
    }
}

/// A header's value as a close code.
fn code(value: &AMQPValue) -> Option<u16> {
    match value {
        AMQPValue::ShortShortUInt(n) => Some(u16::from(*n)),
        AMQPValue::ShortUInt(n) => Some(*n),
        AMQPValue::ShortInt(n) => u16::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u16::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => u16::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u16::try_from(*n).ok(),
        other => text(other).and_then(|s| s.trim().parse().ok()),
    }
}

/// Read a push message: its headers, content type and body.
fn decide(
    headers: Option<&FieldTable>,
    content_type: Option<&str>,
    body: Vec<u8>,
    max_message_size: usize,
) -> Result<Push, Malformed> {
    let header = |name: &str| headers.and_then(|h| h.inner().get(name));
    let id = header("connection-id").map(|v| {
        text(v).ok_or_else(|| Malformed("malformed", "connection-id is not a string".into()))
    });
    let group = header("group")
        .map(|v| text(v).ok_or_else(|| Malformed("malformed", "group is not a string".into())));
    let close = header("close").map(|v| {
        let code = code(v)
            .ok_or_else(|| Malformed("malformed", "close is not a close code (a number)".into()))?;
        Close::by_function(code, String::new()).map_err(|_| {
            Malformed(
                "malformed",
                format!("close code {code} cannot be sent: use 1000 or 3000-4999"),
            )
        })
    });
    if body.len() > max_message_size {
        return Err(Malformed(
            "too_large",
            format!(
                "{} bytes, over websocket.max_message_size ({max_message_size})",
                body.len()
            ),
        ));
    }
    let essence = content_type
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let as_text =
        essence.starts_with("text/") || essence == "application/json" || essence.ends_with("+json");
    let empty = body.is_empty();
    let message = if as_text {
        match String::from_utf8(body) {
            Ok(text) => Message::Text(text.into()),
            Err(_) => {
                return Err(Malformed(
                    "malformed",
                    format!("the content type is {essence} but the body is not UTF-8"),
                ));
            }
        }
    } else {
        Message::Binary(body.into())
    };
    match (id.transpose()?, group.transpose()?, close.transpose()?) {
        (Some(_), Some(_), _) => Err(Malformed(
            "malformed",
            "both connection-id and group: give one".into(),
        )),
        (Some(id), None, close) => Ok(Push::Connection {
            id,
            // A close alone sends nothing first.
            message: (!(empty && close.is_some())).then_some(message),
            close,
        }),
        (None, Some(group), None) => {
            check_group(&group).map_err(|e| Malformed("malformed", e.to_string()))?;
            Ok(Push::Group { group, message })
        }
        (None, Some(_), Some(_)) => Err(Malformed(
            "malformed",
            "close applies to a connection-id, not a group".into(),
        )),
        (None, None, _) => Err(Malformed(
            "malformed",
            "no connection-id or group header".into(),
        )),
    }
}

/// Carry out a push message; the `outcome` label.
fn carry_out(hub: &Hub, push: Push) -> &'static str {
    match push {
        Push::Connection { id, message, close } => {
            let delivery = message.map(|message| hub.send(&id, message));
            // A close is carried out even when the body could not be
            // queued (a client that does not read is the one to close).
            match (close, delivery) {
                (Some(close), _) => {
                    if hub.close(&id, close) {
                        "closed"
                    } else {
                        "gone"
                    }
                }
                (None, Some(delivery)) => delivery.label(),
                (None, None) => "delivered",
            }
        }
        Push::Group { group, message } => match hub.broadcast(&group, &message) {
            (0, 0) => "gone",
            (0, _) => "full",
            _ => "delivered",
        },
    }
}

/// Consume the push queue until `shutdown`, reconnecting after
/// `queue.reconnect_interval` when the broker is away.
pub async fn run(
    settings: QueueSettings,
    queue: String,
    max_message_size: usize,
    hub: Arc<Hub>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    // Doubled after each failed attempt in a row (up to 30 s), so an
    // outage is one warning, then a quieter retry.
    let mut pause = settings.reconnect_interval;
    let mut failures = 0u32;
    loop {
        let mut consuming = false;
        let consumed = tokio::select! {
            _ = shutdown.cancelled() => return,
            consumed = consume(&settings, &queue, max_message_size, &hub, &metrics, &shutdown, &mut consuming) => consumed,
        };
        let error = match consumed {
            Ok(()) => return,
            Err(error) => error,
        };
        if consuming {
            failures = 0;
            pause = settings.reconnect_interval;
        }
        failures += 1;
        if failures == 1 {
            tracing::warn!(queue = %queue, "push queue: {error}; trying again in {pause:?}");
        } else {
            tracing::debug!(queue = %queue, failures, "push queue: {error}; trying again in {pause:?}");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_RECONNECT_INTERVAL.max(settings.reconnect_interval));
    }
}

async fn consume(
    settings: &QueueSettings,
    queue: &str,
    max_message_size: usize,
    hub: &Hub,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    consuming: &mut bool,
) -> Result<(), String> {
    let connection =
        crate::broker::connect(settings, format!("tidegate {} push", hub.node_id())).await?;
    let setup = async {
        let channel = connection.create_channel().await?;
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                format!("tidegate-{}", hub.node_id()).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((channel, consumer))
    };
    let (_channel, mut consumer) = tokio::time::timeout(settings.connect_timeout, setup)
        .await
        .map_err(|_| "the broker did not finish the channel set-up in time".to_owned())?
        .map_err(|e| {
            format!(
                "declaring and consuming durable queue {queue:?}: {e} (if it exists with other \
                 arguments, delete it or pick another queue.push_queue)"
            )
        })?;
    tracing::info!(queue = %queue, "consuming the push queue");
    *consuming = true;
    // Anyone who can publish to the queue could fill the log with
    // malformed messages: the first is a warning, the rest are counted.
    let mut warned = false;
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = connection.close(200, "tidegate shutting down".into()).await;
                return Ok(());
            }
            delivery = consumer.next() => delivery,
        };
        let mut delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => return Err(format!("consuming: {e}")),
            None => return Err("the broker ended the consumer".into()),
        };
        let headers = delivery.properties.headers().clone();
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str().to_owned());
        let body = std::mem::take(&mut delivery.data);
        let outcome = match decide(
            headers.as_ref(),
            content_type.as_deref(),
            body,
            max_message_size,
        ) {
            Ok(push) => carry_out(hub, push),
            Err(Malformed(outcome, why)) => {
                if warned {
                    tracing::debug!(queue = %queue, "push message dropped: {why}");
                } else {
                    warned = true;
                    tracing::warn!(
                        queue = %queue,
                        "push message dropped: {why} (further ones are logged at debug and \
                         counted in tidegate_push_total)"
                    );
                }
                outcome
            }
        };
        metrics.push.with_label_values(&[outcome]).inc();
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| format!("acknowledging: {e}"))?;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let map: BTreeMap<_, _> = pairs
            .iter()
            .map(|(k, v)| ((*k).into(), v.clone()))
            .collect();
        FieldTable::from(map)
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(s.into())
    }

    #[test]
    fn a_push_names_a_connection_or_a_group_and_its_type_follows_the_content_type() {
        let h = headers(&[("connection-id", long("n.1"))]);
        let push = decide(
            Some(&h),
            Some("text/plain; charset=utf-8"),
            b"hi".to_vec(),
            10,
        );
        assert_eq!(
            push,
            Ok(Push::Connection {
                id: "n.1".into(),
                message: Some(Message::text("hi")),
                close: None
            })
        );
        let push = decide(Some(&h), None, b"hi".to_vec(), 10).unwrap();
        assert!(matches!(
            push,
            Push::Connection {
                message: Some(Message::Binary(_)),
                ..
            }
        ));
        let g = headers(&[("group", long("room"))]);
        let push = decide(Some(&g), Some("application/json"), b"{}".to_vec(), 10).unwrap();
        assert_eq!(
            push,
            Push::Group {
                group: "room".into(),
                message: Message::text("{}")
            }
        );
    }

    #[test]
    fn a_close_header_closes_with_its_code_after_the_body() {
        let h = headers(&[
            ("connection-id", long("n.1")),
            ("close", AMQPValue::LongInt(4001)),
        ]);
        match decide(Some(&h), None, Vec::new(), 10).unwrap() {
            Push::Connection { message, close, .. } => {
                assert_eq!(message, None, "a close alone sends nothing");
                assert_eq!(close.map(|c| c.code()), Some(4001));
            }
            other => panic!("{other:?}"),
        }
        let h = headers(&[("connection-id", long("n.1")), ("close", long("1000"))]);
        assert!(decide(Some(&h), None, b"x".to_vec(), 10).is_ok());
    }

    #[test]
    fn malformed_pushes_say_why() {
        let outcome = |h: Option<FieldTable>, ct: Option<&str>, body: &[u8]| {
            decide(h.as_ref(), ct, body.to_vec(), 10).unwrap_err().0
        };
        assert_eq!(outcome(None, None, b"x"), "malformed");
        let both = headers(&[("connection-id", long("a")), ("group", long("g"))]);
        assert_eq!(outcome(Some(both), None, b"x"), "malformed");
        let id = headers(&[("connection-id", long("a"))]);
        assert_eq!(outcome(Some(id.clone()), None, &[0; 11]), "too_large");
        assert_eq!(outcome(Some(id), Some("text/plain"), &[0xff]), "malformed");
        let bad_code = headers(&[("connection-id", long("a")), ("close", long("1006"))]);
        assert_eq!(outcome(Some(bad_code), None, b""), "malformed");
        let group_close = headers(&[("group", long("g")), ("close", long("1000"))]);
        assert_eq!(outcome(Some(group_close), None, b""), "malformed");
        let bad_group = headers(&[("group", long("has space"))]);
        assert_eq!(outcome(Some(bad_group), None, b""), "malformed");
    }
}
