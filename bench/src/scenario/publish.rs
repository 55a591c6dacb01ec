//! The broker's own ceiling: a lapin publisher with publisher confirms,
//! persistent messages to a durable queue (the gateway's settings),
//! keeping N unconfirmed, as fast as the broker confirms.
//!
//! Messages are bare (a content type) unless `copy_properties` is set: then
//! each carries what every gateway copy must carry (a unique `message_id`,
//! a `timestamp` and five string headers), which costs the broker about a
//! third of its throughput on this machine.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, PublisherConfirm};

use super::rate;
use crate::figures::Figures;
use crate::process;

type Sending = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// A message on its way: frames being written, or waiting for its confirm.
enum Stage {
    Sending(Sending),
    Confirming(PublisherConfirm),
}

/// Parameters of the publish scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// AMQP URL of the broker.
    pub url: String,
    /// Message size in bytes.
    pub size: usize,
    /// Unconfirmed messages kept in flight.
    pub in_flight: usize,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Give each message the properties of a gateway copy.
    pub copy_properties: bool,
}

impl Options {
    /// The figures' server name: says which messages were published.
    pub fn server(&self) -> &'static str {
        if self.copy_properties {
            COPY_SERVER
        } else {
            BARE_SERVER
        }
    }
}

/// The server name of figures measured with bare messages.
pub const BARE_SERVER: &str = "RabbitMQ (lapin, confirms)";
/// The server name of figures measured with a gateway copy's properties.
pub const COPY_SERVER: &str = "RabbitMQ (lapin, confirms, copy properties)";

/// A message's properties: persistent, with a content type, and with
/// `copy` the rest of a gateway copy's (values shaped like the gateway's).
fn properties(copy: bool) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/octet-stream".into());
    if !copy {
        return properties;
    }
    let mut headers = FieldTable::default();
    for (name, value) in [
        ("connection-id", "bench.0190a3b2c4d5e6f708192a3b4c5d6e7f"),
        ("route", "/"),
        ("function", "echo"),
        ("function-version", "0123456789abcdef"),
        ("node", "bench"),
    ] {
        headers.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_secs());
    properties
        .with_message_id(uuid::Uuid::now_v7().to_string().as_str().into())
        .with_timestamp(timestamp)
        .with_headers(headers)
}

/// Connect, open a confirm-mode channel and declare a fresh durable queue
/// (the gateway's queue settings).
async fn open(options: &Options) -> anyhow::Result<(Connection, lapin::Channel, String)> {
    let connection = Connection::connect(&options.url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {}", options.url))?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = format!("tidegate.bench.{}", uuid::Uuid::now_v7().simple());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, queue))
}

/// Delete the queue `open` declared and close the connection.
async fn close(connection: Connection, channel: &lapin::Channel, queue: &str) {
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
}

/// Start publishing one persistent message; one poll hands its frames to
/// lapin (as the gateway does), the rest is awaited later.
async fn begin_publish(
    channel: &lapin::Channel,
    queue: &str,
    body: &Arc<Vec<u8>>,
    copy_properties: bool,
) -> lapin::Result<Stage> {
    let (channel, queue, body) = (channel.clone(), queue.to_owned(), body.clone());
    let mut sending: Sending = Box::pin(async move {
        let properties = properties(copy_properties);
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                properties,
            )
            .await
    });
    match poll_fn(|cx| Poll::Ready(sending.as_mut().poll(cx))).await {
        Poll::Ready(confirm) => Ok(Stage::Confirming(confirm?)),
        Poll::Pending => Ok(Stage::Sending(sending)),
    }
}

/// Run the scenario against a fresh durable queue, deleted afterwards.
///
/// # Errors
/// When the broker is unreachable or refuses a message.
pub async fn run(options: &Options) -> anyhow::Result<Figures> {
    let (connection, channel, queue) = open(options).await?;
    let body = Arc::new(vec![b'p'; options.size]);
    let start = Instant::now() + options.warmup;
    let end = start + options.duration;
    // As the gateway does: each publish is polled once to hand its frames
    // to lapin, then confirms are awaited in order, so many messages are
    // on their way at once.
    let mut in_flight: VecDeque<Stage> = VecDeque::with_capacity(options.in_flight);
    let mut confirmed = 0u64;
    let mut cpu_start = None;
    let outcome = async {
        loop {
            while in_flight.len() < options.in_flight {
                in_flight.push_back(
                    begin_publish(&channel, &queue, &body, options.copy_properties).await?,
                );
            }
            let Some(stage) = in_flight.pop_front() else {
                break;
            };
            let confirm = match stage {
                Stage::Sending(sending) => sending.await?,
                Stage::Confirming(confirm) => confirm,
            };
            match confirm.await? {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                other => bail!("the broker did not take a message: {other:?}"),
            }
            let now = Instant::now();
            if now >= end {
                break;
            }
            if now >= start {
                if cpu_start.is_none() {
                    cpu_start = Some(process::own_cpu_seconds()?);
                }
                confirmed += 1;
            }
        }
        Ok(())
    }
    .await;
    let cpu = process::own_cpu_seconds()? - cpu_start.unwrap_or_default();
    close(connection, &channel, &queue).await;
    outcome?;
    let mut figures = Figures::new(
        "publish",
        options.server(),
        format!(
            "size={} in_flight={} duration={:?}",
            options.size, options.in_flight, options.duration
        ),
    );
    figures
        .set("msgs_per_s", rate(confirmed, options.duration))
        .set("client_cpu_us_per_msg", cpu * 1e6 / confirmed.max(1) as f64);
    Ok(figures)
}

/// Confirm latency at a fixed offered rate: what a reply that waits for
/// its copy cannot beat.
///
/// # Errors
/// When the broker is unreachable or refuses a message.
pub async fn latency(options: &Options, rate: f64) -> anyhow::Result<Figures> {
    use hdrhistogram::Histogram;
    use tokio::time::MissedTickBehavior;

    let (connection, channel, queue) = open(options).await?;
    let body = Arc::new(vec![b'p'; options.size]);
    let start = Instant::now() + options.warmup;
    let end = start + options.duration;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut in_flight: VecDeque<(Instant, Stage)> = VecDeque::new();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let outcome = async {
        loop {
            let sending = Instant::now() < end;
            if !sending && in_flight.is_empty() {
                break;
            }
            tokio::select! {
                _ = tick.tick(), if sending => {
                    let at = Instant::now();
                    let stage =
                        begin_publish(&channel, &queue, &body, options.copy_properties).await?;
                    in_flight.push_back((at, stage));
                }
                confirmed = front(&mut in_flight), if !in_flight.is_empty() => {
                    match confirmed? {
                        Confirmation::Ack(None) | Confirmation::NotRequested => {}
                        other => bail!("the broker did not take a message: {other:?}"),
                    }
                    if let Some((at, _)) = in_flight.pop_front()
                        && at >= start {
                            histogram.record(at.elapsed().as_nanos().max(1) as u64)?;
                        }
                }
            }
        }
        Ok(())
    }
    .await;
    close(connection, &channel, &queue).await;
    outcome?;
    let mut figures = Figures::new(
        "publish-latency",
        options.server(),
        format!(
            "size={} rate={rate:.0}/s duration={:?}",
            options.size, options.duration
        ),
    );
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1e3;
    figures
        .set("offered_msgs_per_s", rate)
        .set("p50_us", us(0.5))
        .set("p99_us", us(0.99))
        .set("p99_9_us", us(0.999))
        .set("max_us", histogram.max() as f64 / 1e3);
    Ok(figures)
}

/// The confirm of the oldest message in flight (its frames written first).
async fn front(in_flight: &mut VecDeque<(Instant, Stage)>) -> lapin::Result<Confirmation> {
    poll_fn(|cx| {
        let Some((_, stage)) = in_flight.front_mut() else {
            return Poll::Pending;
        };
        loop {
            match stage {
                Stage::Sending(sending) => match sending.as_mut().poll(cx) {
                    Poll::Ready(Ok(confirm)) => *stage = Stage::Confirming(confirm),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                },
                Stage::Confirming(confirm) => return Pin::new(confirm).poll(cx),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::properties;

    #[test]
    fn copy_properties_are_those_of_a_gateway_copy() {
        let bare = properties(false);
        assert_eq!(bare.delivery_mode(), &Some(2));
        assert!(bare.message_id().is_none() && bare.headers().is_none());

        let (first, second) = (properties(true), properties(true));
        assert_eq!(first.delivery_mode(), &Some(2));
        assert!(first.timestamp().is_some());
        assert_ne!(first.message_id(), second.message_id(), "unique ids");
        let headers = first.headers().as_ref().expect("headers");
        let mut names: Vec<String> = headers.inner().keys().map(ToString::to_string).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "connection-id",
                "function",
                "function-version",
                "node",
                "route"
            ]
        );
    }
}
