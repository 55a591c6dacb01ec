//! The cluster's link to the broker: one connection and one channel, kept
//! up (reconnecting with backoff), over which this node announces itself,
//! sends what the hub hands it in order, and takes what other nodes send.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind, PublisherConfirm};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::wire::{self, Reply};
use super::{Answer, Cluster, Outgoing, Request};
use crate::close::Close;
use crate::config::QueueSettings;
use crate::hub::Delivery;

/// The longest pause between attempts to reach the broker.
const MAX_RECONNECT_INTERVAL: Duration = Duration::from_secs(30);

/// Messages from other nodes taken before the first is acknowledged.
const PREFETCH: u16 = 256;

/// Longest a goodbye waits for the broker at shutdown.
const BYE_WAIT: Duration = Duration::from_secs(2);

/// The names this cluster uses on the broker.
struct Names {
    heartbeats: String,
    nodes: String,
    groups: String,
    queue: String,
    /// This node's queue of heartbeats, apart from its other messages: a
    /// backlog of those does not hold the heartbeats back until they
    /// expire (and this node with them, in its own eyes).
    beats: String,
}

impl Names {
    fn of(cluster: &Cluster) -> Self {
        let name = &cluster.settings.name;
        Self {
            heartbeats: format!("{name}.heartbeats"),
            nodes: format!("{name}.nodes"),
            groups: format!("{name}.groups"),
            queue: format!("{name}.node.{}", cluster.node),
            beats: format!("{name}.node.{}.heartbeats", cluster.node),
        }
    }
}

/// What the link task is handed: messages, and (apart, never dropped) the
/// binds and unbinds of groups.
pub(super) struct Work {
    pub(super) work: mpsc::Receiver<Outgoing>,
    pub(super) binds: mpsc::UnboundedReceiver<Outgoing>,
    /// Bytes of the messages in `work`, counted down as they are taken.
    pub(super) queued: Arc<super::Budget>,
}

impl Work {
    /// The next piece of work, binds first; `None` once the cluster is
    /// gone.
    async fn next(&mut self) -> Option<Outgoing> {
        tokio::select! {
            biased;
            Some(bind) = self.binds.recv() => Some(bind),
            next = self.work.recv() => {
                if let Some(work) = &next {
                    self.queued.give(work.size());
                }
                next
            }
        }
    }
}

/// Keep the link up until `shutdown`.
pub(super) async fn run(
    cluster: Arc<Cluster>,
    queue: QueueSettings,
    mut work: Work,
    shutdown: CancellationToken,
) {
    let mut pause = queue.reconnect_interval;
    let mut failures = 0u32;
    loop {
        let mut linked = false;
        let outcome = serve(&cluster, &queue, &mut work, &shutdown, &mut linked).await;
        cluster.set_linked(false);
        let error = match outcome {
            Ok(()) => return,
            Err(error) => error,
        };
        if linked {
            failures = 0;
            pause = queue.reconnect_interval;
        }
        failures += 1;
        if failures == 1 || failures.is_multiple_of(10) {
            tracing::warn!(failures, "cluster link: {error}; trying again in {pause:?}");
        } else {
            tracing::debug!(failures, "cluster link: {error}; trying again in {pause:?}");
        }
        // Meanwhile what comes is settled at once: nothing would take it.
        let sleep = tokio::time::sleep(pause);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut sleep => break,
                next = work.next() => match next {
                    Some(outgoing) => settle_unlinked(&cluster, outgoing),
                    None => return,
                },
            }
        }
        pause = (pause * 2).min(MAX_RECONNECT_INTERVAL.max(queue.reconnect_interval));
    }
}

/// Work that came while there was no link.
fn settle_unlinked(cluster: &Cluster, outgoing: Outgoing) {
    match outgoing {
        // Bound with every group that has members once the link is back.
        Outgoing::Bind { done, .. } => {
            let _ = done.send(());
        }
        Outgoing::Unbind { .. } => {}
        // Not known without the broker: the asker says the cluster is
        // unreachable.
        Outgoing::Probe { .. } => {}
        Outgoing::Ask { correlation, .. } => {
            cluster.answered(&correlation, Answer::Gone);
        }
        // Counted once already as they were handed over (`forwarded`).
        Outgoing::Send { .. } => cluster.count("send", "unreachable"),
        Outgoing::Close { .. } => cluster.count("close", "unreachable"),
        Outgoing::Broadcast { .. } => cluster.count("broadcast", "unreachable"),
    }
}

impl Cluster {
    fn hub_count(&self, delivery: Delivery) {
        self.metrics
            .deliveries
            .with_label_values(&[delivery.label()])
            .inc();
    }
}

/// One life of the link: connect, declare, bind, then serve until the
/// link fails (an error) or `shutdown` (after saying goodbye).
async fn serve(
    cluster: &Arc<Cluster>,
    queue: &QueueSettings,
    work: &mut Work,
    shutdown: &CancellationToken,
    linked: &mut bool,
) -> Result<(), String> {
    let names = Names::of(cluster);
    let connection =
        crate::broker::connect(queue, format!("tidegate {} cluster", cluster.node)).await?;
    let setup = async {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        for (exchange, kind) in [
            (&names.heartbeats, ExchangeKind::Fanout),
            (&names.nodes, ExchangeKind::Direct),
            (&names.groups, ExchangeKind::Direct),
        ] {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("declaring exchange {exchange}: {e}"))?;
        }
        for queue in [&names.queue, &names.beats] {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    format!(
                        "declaring this node's queue {queue}: {e} (another connection holds it: \
                         another gateway with the same server.node_id (give every node its own), \
                         or this node's previous run, until the broker gives its connection up \
                         (two queue.heartbeat periods))"
                    )
                })?;
        }
        bind(&channel, &names.queue, &names.nodes, &cluster.node).await?;
        bind(&channel, &names.beats, &names.heartbeats, "").await?;
        // Acknowledged one by one, at most PREFETCH ahead: the broker keeps
        // what this node has not taken yet, not this node's memory.
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(|e| format!("setting the prefetch of {}: {e}", names.queue))?;
        let mut consumers = Vec::new();
        for (queue, tag) in [(&names.queue, ""), (&names.beats, "-heartbeats")] {
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    format!("tidegate-{}{tag}", cluster.node).as_str().into(),
                    BasicConsumeOptions {
                        exclusive: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("consuming {queue}: {e}"))?;
            consumers.push(consumer);
        }
        Ok::<_, String>((channel, consumers))
    };
    let (channel, consumers) = tokio::time::timeout(queue.connect_timeout, setup)
        .await
        .map_err(|_| "the broker did not finish the cluster set-up in time".to_owned())??;
    let [mut consumer, mut beats]: [lapin::Consumer; 2] = consumers
        .try_into()
        .map_err(|_| "two consumers".to_owned())?;
    // Every group with members here, bound again: as many as there are
    // (per-user groups can be tens of thousands), so not within the set-up
    // time, and sent without waiting for each answer; one bind that waits
    // then stands for all.
    rebind(&channel, &names, &cluster.hub.local_groups()).await?;
    cluster.set_linked(true);
    *linked = true;
    tracing::info!(
        cluster = %cluster.settings.name,
        queue = %names.queue,
        "cluster link up"
    );
    let link = Link {
        cluster,
        connection: &connection,
        channel: &channel,
        names: &names,
    };
    // Publisher confirms of what is sent without waiting: taken as they
    // come (a confirm dropped unresolved is kept by the channel until the
    // link ends).
    let mut confirms = FuturesUnordered::new();
    confirms.push(link.heartbeat().await?);
    let mut ticks = tokio::time::interval(cluster.settings.heartbeat_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(BYE_WAIT, link.bye()).await;
                let _ = connection.close(200, "tidegate shutting down".into()).await;
                return Ok(());
            }
            _ = ticks.tick() => {
                confirms.push(link.heartbeat().await?);
                cluster.expire();
            }
            Some(confirmation) = confirms.next(), if !confirms.is_empty() => {
                confirmed(cluster, confirmation);
            }
            next = work.next() => match next {
                Some(outgoing) => confirms.extend(link.carry_out(outgoing).await?),
                None => return Ok(()),
            },
            delivery = consumer.next() => {
                confirms.extend(link.took(delivery).await?);
            }
            delivery = beats.next() => {
                confirms.extend(link.took(delivery).await?);
            }
        }
    }
}

/// A publish's confirm came. A mandatory message no queue took (one for a
/// node whose queue is gone) comes back with it: counted, and the request
/// it carried answered as gone. What it was is read from the message
/// itself: the broker's return names no publish, and the client library
/// may hand it to another publish's confirm.
fn confirmed(cluster: &Cluster, confirmation: lapin::Result<Confirmation>) {
    let (Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned)))) =
        confirmation
    else {
        return;
    };
    let properties = &returned.delivery.properties;
    let kind = properties
        .kind()
        .as_ref()
        .map(|k| k.as_str())
        .filter(|kind| matches!(*kind, "send" | "close" | "info"))
        .unwrap_or("unknown");
    cluster.count(kind, "unroutable");
    if let Some(correlation) = properties.correlation_id() {
        cluster.answered(correlation.as_str(), Answer::Gone);
    }
}

/// Bind this node's queue to every one of `groups`.
async fn rebind(channel: &Channel, names: &Names, groups: &[String]) -> Result<(), String> {
    let Some((last, rest)) = groups.split_last() else {
        return Ok(());
    };
    let started = std::time::Instant::now();
    for (n, group) in rest.iter().enumerate() {
        if n % 1024 == 1023 {
            // Each is only queued here: let the connection send them.
            tokio::task::yield_now().await;
        }
        channel
            .queue_bind(
                names.queue.as_str().into(),
                names.groups.as_str().into(),
                group.as_str().into(),
                QueueBindOptions { nowait: true },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("binding group {group:?}: {e}"))?;
    }
    // Answered after all the others (one channel, in order), or the
    // channel is closed with the first bind that failed.
    bind(channel, &names.queue, &names.groups, last).await?;
    tracing::info!(
        groups = groups.len(),
        "cluster link: the groups with members here are bound again in {:?}",
        started.elapsed()
    );
    Ok(())
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), String> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("binding {queue} to {exchange} ({key:?}): {e}"))
}

/// The link while it is up.
struct Link<'a> {
    cluster: &'a Arc<Cluster>,
    connection: &'a lapin::Connection,
    channel: &'a Channel,
    names: &'a Names,
}

impl Link<'_> {
    async fn publish(
        &self,
        exchange: &str,
        key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, String> {
        self.channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(key),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                properties.with_user_id(ShortString::from(self.cluster.user.as_str())),
            )
            .await
            .map_err(|e| format!("publishing to {exchange}: {e}"))
    }

    async fn heartbeat(&self) -> Result<PublisherConfirm, String> {
        let body = serde_json::to_vec(&self.cluster.announcement())
            .map_err(|e| format!("encoding the announcement: {e}"))?;
        let expiry = self.cluster.settings.node_expiry.as_millis().to_string();
        let properties = wire::properties("heartbeat", &[])
            .with_content_type("application/json".into())
            // Not kept past the time it says anything.
            .with_expiration(ShortString::from(expiry));
        let confirm = self
            .publish(&self.names.heartbeats, "", false, &body, properties)
            .await?;
        self.cluster.count("heartbeat", "out");
        Ok(confirm)
    }

    async fn bye(&self) -> Result<(), String> {
        let properties = wire::properties("bye", &[("node", wire::text(&self.cluster.node))]);
        let confirm = self
            .publish(&self.names.heartbeats, "", false, &[], properties)
            .await?;
        let _ = confirm.await;
        self.cluster.count("bye", "out");
        tracing::info!("said goodbye to the cluster");
        Ok(())
    }

    /// Publish a message for node `node`; mandatory, so that a node whose
    /// queue is gone is known at once (see [`confirmed`]).
    async fn to_node(
        &self,
        node: &str,
        kind: &'static str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Option<PublisherConfirm>, String> {
        let confirm = self
            .publish(&self.names.nodes, node, true, body, properties)
            .await?;
        self.cluster.count(kind, "out");
        Ok(Some(confirm))
    }

    /// Do `outgoing`; the confirm of what was published without waiting.
    async fn carry_out(&self, outgoing: Outgoing) -> Result<Option<PublisherConfirm>, String> {
        match outgoing {
            Outgoing::Send { node, id, message } => {
                let (body, content_type) = wire::encode(&message);
                let properties = wire::properties("send", &[("connection-id", wire::text(&id))])
                    .with_content_type(content_type.into());
                self.to_node(&node, "send", &body, properties).await
            }
            Outgoing::Close { node, id, close } => {
                let properties = close_properties(&id, &close);
                self.to_node(&node, "close", &[], properties).await
            }
            Outgoing::Broadcast { group, message } => {
                let (body, content_type) = wire::encode(&message);
                let properties = wire::properties(
                    "broadcast",
                    &[
                        ("group", wire::text(&group)),
                        ("node", wire::text(&self.cluster.node)),
                    ],
                )
                .with_content_type(content_type.into());
                let confirm = self
                    .publish(&self.names.groups, &group, false, &body, properties)
                    .await?;
                self.cluster.count("broadcast", "out");
                Ok(Some(confirm))
            }
            Outgoing::Probe { node, exists } => {
                // A passive declare fails, and closes its channel, when the
                // queue is gone: a channel of its own.
                let queue = format!("{}.node.{node}", self.cluster.settings.name);
                let found = match self.connection.create_channel().await {
                    Ok(probe) => {
                        let declared = probe
                            .queue_declare(
                                queue.as_str().into(),
                                QueueDeclareOptions {
                                    passive: true,
                                    ..QueueDeclareOptions::default()
                                },
                                FieldTable::default(),
                            )
                            .await;
                        let _ = probe.close(200, "probed".into()).await;
                        Some(declared.is_ok())
                    }
                    Err(_) => None,
                };
                if let Some(found) = found {
                    let _ = exists.send(found);
                }
                Ok(None)
            }
            Outgoing::Bind { group, done } => {
                bind(self.channel, &self.names.queue, &self.names.groups, &group).await?;
                let _ = done.send(());
                Ok(None)
            }
            Outgoing::Unbind { group } => self
                .channel
                .queue_unbind(
                    self.names.queue.as_str().into(),
                    self.names.groups.as_str().into(),
                    group.as_str().into(),
                    FieldTable::default(),
                )
                .await
                .map(|()| None)
                .map_err(|e| format!("unbinding group {group:?}: {e}")),
            Outgoing::Ask {
                node,
                correlation,
                request,
            } => {
                let (kind, body, properties) = match &request {
                    Request::Send { id, message } => {
                        let (body, content_type) = wire::encode(message);
                        let properties =
                            wire::properties("send", &[("connection-id", wire::text(id))])
                                .with_content_type(content_type.into());
                        ("send", body, properties)
                    }
                    Request::Close { id, close } => {
                        ("close", Vec::new(), close_properties(id, close))
                    }
                    Request::Info { id } => (
                        "info",
                        Vec::new(),
                        wire::properties("info", &[("connection-id", wire::text(id))]),
                    ),
                };
                let properties = properties
                    .with_reply_to(ShortString::from(self.cluster.node.as_str()))
                    .with_correlation_id(ShortString::from(correlation.as_str()));
                self.to_node(&node, kind, &body, properties).await
            }
        }
    }

    /// What one of this node's consumers gave: taken (acknowledged at once:
    /// the queue is this node's alone, and goes with it); the confirm of an
    /// answer published.
    async fn took(
        &self,
        delivery: Option<Result<AmqpDelivery, lapin::Error>>,
    ) -> Result<Option<PublisherConfirm>, String> {
        match delivery {
            Some(Ok(delivery)) => {
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| format!("acknowledging: {e}"))?;
                self.take(delivery).await
            }
            Some(Err(e)) => Err(format!("consuming: {e}")),
            None => Err("the broker ended a consumer".into()),
        }
    }

    /// A message from another node; the confirm of the answer published.
    async fn take(&self, delivery: AmqpDelivery) -> Result<Option<PublisherConfirm>, String> {
        let properties = &delivery.properties;
        let cluster = self.cluster;
        let from_a_node = properties
            .user_id()
            .as_ref()
            .is_some_and(|user| user.as_str() == cluster.user);
        if !from_a_node {
            cluster.count("foreign", "in");
            tracing::debug!(
                "a message not from a node of the cluster (its user_id is not {:?}): dropped",
                cluster.user
            );
            return Ok(None);
        }
        let kind = match properties.kind().as_ref().map(|k| k.as_str()) {
            Some(
                kind @ ("heartbeat" | "bye" | "broadcast" | "answer" | "send" | "close" | "info"),
            ) => kind.to_owned(),
            _ => "unknown".to_owned(),
        };
        let mut confirm = None;
        match kind.as_str() {
            "heartbeat" => match serde_json::from_slice(&delivery.data) {
                Ok(announced) => cluster.heard(announced),
                Err(e) => tracing::debug!("a heartbeat that is not an announcement: {e}"),
            },
            "bye" => {
                if let Some(node) = wire::header(properties, "node") {
                    cluster.left(&node);
                }
            }
            "broadcast" => {
                let from_here = wire::header(properties, "node").as_deref() == Some(&cluster.node);
                let group = wire::header(properties, "group");
                let content_type = properties.content_type().as_ref().map(|c| c.as_str());
                if let (false, Some(group), Some(message)) = (
                    from_here,
                    group,
                    wire::decode(delivery.data.clone(), content_type),
                ) {
                    cluster.hub.broadcast_here(&group, &message);
                }
            }
            "answer" => {
                let correlation = properties.correlation_id().as_ref().map(|c| c.as_str());
                let reply: Option<Reply> = serde_json::from_slice(&delivery.data).ok();
                if let (Some(correlation), Some(reply)) = (correlation, reply) {
                    cluster.answered(correlation, reply.into());
                }
            }
            "send" | "close" | "info" => {
                let reply = self.answer(&kind, &delivery);
                if let (Some(reply_to), Some(correlation)) =
                    (properties.reply_to(), properties.correlation_id())
                {
                    let body = serde_json::to_vec(&reply)
                        .map_err(|e| format!("encoding an answer: {e}"))?;
                    let properties = wire::properties("answer", &[])
                        .with_content_type("application/json".into())
                        .with_correlation_id(correlation.clone());
                    confirm = Some(
                        self.publish(
                            &self.names.nodes,
                            reply_to.as_str(),
                            false,
                            &body,
                            properties,
                        )
                        .await?,
                    );
                    cluster.count("answer", "out");
                }
            }
            other => tracing::debug!(kind = other, "a cluster message of an unknown type"),
        }
        cluster.count(&kind, "in");
        Ok(confirm)
    }

    /// Carry out another node's request about a connection of this node.
    fn answer(&self, kind: &str, delivery: &AmqpDelivery) -> Reply {
        let properties = &delivery.properties;
        let Some(id) = wire::header(properties, "connection-id") else {
            return Reply::Gone;
        };
        let hub = &self.cluster.hub;
        match kind {
            "send" => {
                let content_type = properties.content_type().as_ref().map(|c| c.as_str());
                let Some(message) = wire::decode(delivery.data.clone(), content_type) else {
                    return Reply::Gone;
                };
                let delivery = hub.deliver(&id, message);
                self.cluster.hub_count(delivery);
                match delivery {
                    Delivery::Delivered => Reply::Done,
                    Delivery::Full => Reply::Full,
                    _ => Reply::Gone,
                }
            }
            "close" => {
                let code = wire::header(properties, "code")
                    .and_then(|code| code.parse().ok())
                    .unwrap_or(crate::close::code::NORMAL);
                let reason = wire::header(properties, "reason").unwrap_or_default();
                // A code a function could not send becomes 1000.
                let close = Close::by_function(code, reason).unwrap_or_else(|fallback| fallback);
                if hub.close_here(&id, close) {
                    Reply::Done
                } else {
                    Reply::Gone
                }
            }
            _ => match hub.info(&id) {
                Some(info) => Reply::Info { info },
                None => Reply::Gone,
            },
        }
    }
}

fn close_properties(id: &str, close: &Close) -> BasicProperties {
    wire::properties(
        "close",
        &[
            ("connection-id", wire::text(id)),
            ("code", AMQPValue::ShortUInt(close.code())),
            ("reason", wire::text(&close.reason())),
        ],
    )
}
