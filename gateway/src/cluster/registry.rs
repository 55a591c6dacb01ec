//! One function registry for the cluster: every change to the functions,
//! versions and routes (an upload with its component, a switch of the
//! live version, a removal, a route) goes into a RabbitMQ stream,
//! `N.registry`, and every node applies the stream in its order. A node
//! keeps the position of the last change it applied in its catalog, so a
//! restart reads on from there, and a node started later (an empty state
//! directory) reads the stream from its start: no shared disk, no copy by
//! hand.
//!
//! A change made through a node's management API is checked there first
//! (an upload is compiled), then put in the stream; the API answers once
//! that node applied it, with what applying it did (a change that a
//! change before it in the stream made impossible is refused there as on
//! every node).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::lock;
use crate::config::{ClusterSettings, QueueSettings};
use crate::store::{Applied, Catalog, CatalogError, Change, ChangeLog};

/// Changes taken from the stream before the first is acknowledged.
const PREFETCH: u16 = 8;

/// Longest a change made here waits to be applied here (an upload is
/// compiled again only when its artifact is gone, so this is mostly the
/// broker's time).
const APPLY_WAIT: Duration = Duration::from_secs(120);

/// The longest pause between attempts to reach the broker.
const MAX_RECONNECT_INTERVAL: Duration = Duration::from_secs(30);

/// The cluster's log of catalog changes.
pub struct RegistryLog {
    /// `N.registry`.
    stream: String,
    node: String,
    /// What every change carries as its `user_id` (see
    /// [`super::broker_user`]).
    user: String,
    catalog: Arc<Catalog>,
    /// Where changes are published, while the link is up.
    channel: Mutex<Option<Channel>>,
    /// Changes made here, waiting to be applied here, by change id.
    pending: Mutex<HashMap<String, oneshot::Sender<Result<Applied, CatalogError>>>>,
    /// Woken when publishing failed: the link is made again (a channel
    /// the broker closed, e.g. over its largest message, is not reused).
    broken: tokio::sync::Notify,
}

impl RegistryLog {
    /// Share `catalog`'s changes through the cluster's stream from now on,
    /// and apply the stream's changes to it until `shutdown`. The receiver
    /// turns true once this node has applied every change the stream held
    /// when it connected.
    pub fn start(
        settings: &ClusterSettings,
        queue: QueueSettings,
        node: &str,
        catalog: Arc<Catalog>,
        shutdown: CancellationToken,
    ) -> (Arc<Self>, watch::Receiver<bool>) {
        let log = Arc::new(Self {
            stream: format!("{}.registry", settings.name),
            node: node.to_owned(),
            user: super::broker_user(&queue.url),
            catalog: catalog.clone(),
            channel: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            broken: tokio::sync::Notify::new(),
        });
        catalog.share_through(log.clone());
        let (caught_up, caught) = watch::channel(false);
        tokio::spawn(run(log.clone(), queue, caught_up, shutdown));
        (log, caught)
    }

    async fn put(&self, change: Change) -> Result<Applied, CatalogError> {
        let channel = lock(&self.channel).clone().ok_or_else(|| {
            CatalogError::Unshared("this node has no link to the cluster's broker now".into())
        })?;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let (applied, applying) = oneshot::channel();
        lock(&self.pending).insert(id.clone(), applied);
        let _forget = Forget(self, &id);
        let json = serde_json::to_string(&change)
            .map_err(|e| CatalogError::Unshared(format!("encoding the change: {e}")))?;
        let body = match &change {
            Change::Upload { wasm, .. } => wasm.clone(),
            _ => Default::default(),
        };
        let mut headers = FieldTable::default();
        headers.insert(
            "change".into(),
            AMQPValue::LongString(LongString::from(json)),
        );
        headers.insert(
            "change-id".into(),
            AMQPValue::LongString(LongString::from(id.as_str())),
        );
        headers.insert(
            "node".into(),
            AMQPValue::LongString(LongString::from(self.node.as_str())),
        );
        let published = channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(self.stream.as_str()),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                BasicProperties::default()
                    .with_headers(headers)
                    .with_delivery_mode(2)
                    .with_user_id(ShortString::from(self.user.as_str())),
            )
            .await;
        let confirmed = match published {
            Ok(confirm) => confirm.await,
            Err(e) => Err(e),
        };
        if confirmed.is_err() {
            self.broken.notify_one();
        }
        match confirmed {
            Ok(Confirmation::Ack(None)) => {}
            Ok(other) => {
                return Err(CatalogError::Unshared(format!(
                    "the broker did not take the change into {} ({other:?})",
                    self.stream
                )));
            }
            Err(e) => {
                return Err(CatalogError::Unshared(format!(
                    "publishing the change to {}: {e}",
                    self.stream
                )));
            }
        }
        match tokio::time::timeout(APPLY_WAIT, applying).await {
            Ok(Ok(result)) => result,
            _ => Err(CatalogError::Unshared(format!(
                "the change is in {} but was not applied on this node within {}s; it will be \
                 when the link is back",
                self.stream,
                APPLY_WAIT.as_secs()
            ))),
        }
    }
}

impl ChangeLog for RegistryLog {
    fn submit(&self, change: Change) -> BoxFuture<'_, Result<Applied, CatalogError>> {
        Box::pin(self.put(change))
    }
}

/// Forgets a change made here when its maker stops waiting.
struct Forget<'a>(&'a RegistryLog, &'a str);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(&self.0.pending).remove(self.1);
    }
}

/// Keep reading the stream until `shutdown`, reconnecting when the broker
/// is away.
async fn run(
    log: Arc<RegistryLog>,
    queue: QueueSettings,
    caught_up: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut pause = queue.reconnect_interval;
    loop {
        let mut linked = false;
        let read = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = log.broken.notified() => Err("publishing a change failed: linking again".to_owned()),
            read = follow(&log, &queue, &caught_up, &mut linked) => read,
        };
        *lock(&log.channel) = None;
        // Changes made here and not yet read back are answered now; they
        // are applied when the stream is read again.
        for (_, waiting) in lock(&log.pending).drain() {
            let _ = waiting.send(Err(CatalogError::Unshared(
                "the link to the cluster's registry broke before the change was read back: it \
                 is applied once the link is back, if the broker took it"
                    .into(),
            )));
        }
        if linked {
            pause = queue.reconnect_interval;
        }
        if let Err(error) = read {
            tracing::warn!(stream = %log.stream, "cluster registry: {error}; trying again in {pause:?}");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_RECONNECT_INTERVAL.max(queue.reconnect_interval));
    }
}

/// One life of the link: declare the stream, read on from the last change
/// applied here, apply each change in order.
async fn follow(
    log: &RegistryLog,
    queue: &QueueSettings,
    caught_up: &watch::Sender<bool>,
    linked: &mut bool,
) -> Result<(), String> {
    let connection =
        crate::broker::connect(queue, format!("tidegate {} registry", log.node)).await?;
    let applied = log.catalog.log_offset().await;
    if log.catalog.catching_up().await {
        // A new node: only what is live at the end is compiled.
        log.catalog
            .catch_up()
            .await
            .map_err(|e| format!("noting that this node catches up: {e}"))?;
    }
    let mark = uuid::Uuid::now_v7().simple().to_string();
    let setup = async {
        let publish = connection.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("stream")),
        );
        let declared = publish
            .queue_declare(
                log.stream.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await?;
        let read = connection.create_channel().await?;
        read.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-stream-offset".into(),
            match applied {
                Some(offset) => AMQPValue::LongLongInt(offset as i64 + 1),
                None => AMQPValue::LongString(LongString::from("first")),
            },
        );
        let consumer = read
            .basic_consume(
                log.stream.as_str().into(),
                format!("tidegate-{}-registry", log.node).as_str().into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await?;
        drop(declared);
        // A mark at the end of the stream: once it is read back, every
        // change the stream held is applied here.
        let mut headers = FieldTable::default();
        headers.insert(
            "mark".into(),
            AMQPValue::LongString(LongString::from(mark.as_str())),
        );
        headers.insert(
            "node".into(),
            AMQPValue::LongString(LongString::from(log.node.as_str())),
        );
        publish
            .basic_publish(
                ShortString::from(""),
                ShortString::from(log.stream.as_str()),
                BasicPublishOptions::default(),
                &[],
                BasicProperties::default()
                    .with_headers(headers)
                    .with_user_id(ShortString::from(log.user.as_str())),
            )
            .await?
            .await?;
        Ok::<_, lapin::Error>((publish, read, consumer))
    };
    let (publish, _read, mut consumer) = tokio::time::timeout(queue.connect_timeout, setup)
        .await
        .map_err(|_| "the broker did not finish the registry set-up in time".to_owned())?
        .map_err(|e| format!("declaring and reading stream {}: {e}", log.stream))?;
    *lock(&log.channel) = Some(publish);
    *linked = true;
    tracing::info!(stream = %log.stream, from = ?applied, "reading the cluster registry");
    let mut applied = applied;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(|e| format!("reading: {e}"))?;
        let header = |name: &str| {
            delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|headers| headers.inner().get(name).cloned())
        };
        let offset = match header("x-stream-offset") {
            Some(AMQPValue::LongLongInt(n)) => n as u64,
            Some(AMQPValue::LongUInt(n)) => u64::from(n),
            _ => return Err("a change without its x-stream-offset".into()),
        };
        // A read may start at the beginning of the chunk holding the
        // offset asked for.
        if applied.is_none_or(|done| offset > done) {
            let text = |value: Option<AMQPValue>| match value {
                Some(AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            };
            let id = text(header("change-id")).unwrap_or_default();
            let from = text(header("node")).unwrap_or_default();
            let marked = text(header("mark"));
            let from_a_node = delivery
                .properties
                .user_id()
                .as_ref()
                .is_some_and(|user| user.as_str() == log.user);
            if !from_a_node {
                tracing::warn!(
                    offset,
                    "an entry of the cluster registry not published by a node (its user_id is \
                     not {:?}): skipped",
                    log.user
                );
            }
            if marked.is_some() || !from_a_node {
                if marked.as_deref() == Some(mark.as_str()) {
                    // Kept, so that even a stream of no changes yet is
                    // read on from here (not from its start) next time.
                    log.catalog
                        .set_log_offset(offset)
                        .await
                        .map_err(|e| format!("keeping the registry position: {e}"))?;
                    log.catalog.caught_up().await;
                    caught_up.send_replace(true);
                }
                applied = Some(offset);
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| format!("acknowledging: {e}"))?;
                continue;
            }
            let result = match text(header("change"))
                .map(|json| serde_json::from_str::<Change>(&json))
            {
                Some(Ok(mut change)) => {
                    if let Change::Upload { wasm, .. } = &mut change {
                        *wasm = delivery.data.clone().into();
                    }
                    let kind = change.kind();
                    let result = log.catalog.apply(change).await;
                    if let Err(error) = &result
                        && passing(error)
                    {
                        // Not the change's fault: not skipped, read again
                        // (and applied) once the link is made again.
                        return Err(format!(
                            "applying change {offset} ({kind}) failed here for now: {error}"
                        ));
                    }
                    if let Err(error) = &result {
                        tracing::warn!(offset, from = %from, kind, "a change of the cluster registry was refused here: {error}");
                    } else {
                        tracing::info!(offset, from = %from, kind, "cluster registry change applied");
                    }
                    result
                }
                _ => {
                    tracing::warn!(offset, from = %from, "an entry of the cluster registry that is not a change: skipped");
                    Err(CatalogError::Unshared("not a change".into()))
                }
            };
            log.catalog
                .set_log_offset(offset)
                .await
                .map_err(|e| format!("keeping the registry position: {e}"))?;
            applied = Some(offset);
            if let Some(waiting) = lock(&log.pending).remove(&id) {
                let _ = waiting.send(result);
            }
        }
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| format!("acknowledging: {e}"))?;
    }
    Err("the broker ended the registry consumer".into())
}

/// Whether applying a change failed for a reason of this node's and of
/// the moment (every node would otherwise refuse it alike, and it is
/// skipped): it is tried again rather than skipped, so that the node does
/// not drift from the others.
fn passing(error: &CatalogError) -> bool {
    matches!(
        error,
        CatalogError::Busy
            | CatalogError::Disk(_)
            | CatalogError::Load(_)
            | CatalogError::Unloadable { .. }
            | CatalogError::Unshared(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::registry::VersionError;

    #[test]
    fn changes_refused_for_the_moment_are_read_again_and_the_rest_skipped() {
        assert!(passing(&CatalogError::Busy));
        assert!(passing(&CatalogError::Unshared("link".into())));
        assert!(!passing(&CatalogError::ConfigFunction("echo".into())));
        assert!(!passing(&CatalogError::Version(
            VersionError::UnknownFunction("f".into())
        )));
        assert!(!passing(&CatalogError::TooLarge { limit: 1 }));
    }
}
