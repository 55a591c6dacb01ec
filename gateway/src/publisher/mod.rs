//! The copy path: every inbound message is published to RabbitMQ with
//! publisher confirms, or, while the broker is unreachable, fsync'ed to the
//! spool and replayed in order when it returns.
//!
//! One task owns the broker link and the spool; connections hand it copies
//! through a bounded channel and get a [`Receipt`] that resolves once the
//! copy is durable (in async mode, once it is accepted: spooled, or
//! published with spool room reserved for it, so it is never dropped after
//! its reply). Publishes are pipelined (up to `queue.max_in_flight`
//! unconfirmed), so throughput is not bounded by one round trip, and they
//! leave in the order they were handed in, which keeps each connection's
//! copies in order.
//!
//! - [`message`]: the copy ([`QueueMessage`]).
//! - [`broker`]: the link to the broker (RabbitMQ, or in unit tests a
//!   scripted one).
//! - [`spool`]: the on-disk spool.

pub mod broker;
pub mod message;
#[cfg(test)]
pub(crate) mod scripted;
pub mod spool;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
// Tokio's clock, so tests can run the publisher under paused time.
use tokio::time::Instant;

pub use message::QueueMessage;
pub use spool::{Spool, SpoolError, record_bound};

use crate::config::{QueueMode, QueueSettings};
use crate::metrics::Metrics;
use broker::{Broker, Confirm, Confirming, Link, LinkError, redact};

/// Most spooled copies written (and fsync'ed) together.
const SPOOL_BATCH: usize = 512;

/// How a copy became durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// RabbitMQ confirmed it.
    Confirmed,
    /// It is fsync'ed in the spool and will be replayed.
    Spooled,
}

/// Why a copy could not be made durable. The client must not get a reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The copy cannot go straight to the broker (it is unreachable, or
    /// the spool is being replayed) and the spool is full.
    #[error("the spool is full and the broker cannot take the message now")]
    SpoolFull,
    /// The spool could not be written.
    #[error("the spool could not be written: {0}")]
    SpoolFailed(String),
    /// The publisher has stopped (the gateway is shutting down).
    #[error("the gateway is shutting down")]
    Closed,
    /// The copy was published but the broker link broke before its
    /// confirm: it may or may not be in the queue. It is kept in the spool
    /// and published again (a consumer may then see it twice, with the
    /// same `message_id`), so the client gets no reply: duplicates only
    /// ever belong to messages whose reply was never delivered.
    #[error(
        "the broker connection broke before it confirmed this message; it is kept and may \
         reach the queue twice (same message_id)"
    )]
    InDoubt,
}

/// What becomes of one copy: its reply waits for [`Receipt::ready`].
pub struct Receipt {
    /// Resolves once the copy is accepted: appended to the spool, or
    /// published with spool room reserved for it. Only in async mode,
    /// where the reply waits for this rather than for durability.
    accepted: Option<oneshot::Receiver<Result<(), PublishError>>>,
    /// Resolves once the copy is durable (or could not be made so).
    durable: oneshot::Receiver<Result<Durability, PublishError>>,
}

impl Receipt {
    /// Whether the reply may be sent, if already known: in receipt mode
    /// once the copy is durable, in async mode once it is accepted.
    pub fn try_ready(&mut self) -> Option<Result<(), PublishError>> {
        match &mut self.accepted {
            Some(accepted) => outcome(accepted.try_recv()),
            None => outcome(self.durable.try_recv()).map(|r| r.map(|_| ())),
        }
    }

    /// Wait until the reply may be sent (see [`Receipt::try_ready`]).
    ///
    /// # Errors
    /// A [`PublishError`] when the copy was refused: the client must get
    /// no reply.
    pub async fn ready(self) -> Result<(), PublishError> {
        match self.accepted {
            Some(accepted) => accepted.await.unwrap_or(Err(PublishError::Closed)),
            None => self.durable().await.map(|_| ()),
        }
    }

    /// The outcome, if it is already known.
    pub fn try_durable(&mut self) -> Option<Result<Durability, PublishError>> {
        outcome(self.durable.try_recv())
    }

    /// Wait for the copy to be confirmed or spooled.
    ///
    /// # Errors
    /// A [`PublishError`] when the copy is not durable.
    pub async fn durable(self) -> Result<Durability, PublishError> {
        self.durable.await.unwrap_or(Err(PublishError::Closed))
    }
}

/// A receipt's answer, if there is one yet; a publisher gone without
/// answering has stopped.
fn outcome<T>(
    received: Result<Result<T, PublishError>, oneshot::error::TryRecvError>,
) -> Option<Result<T, PublishError>> {
    match received {
        Ok(result) => Some(result),
        Err(oneshot::error::TryRecvError::Empty) => None,
        Err(oneshot::error::TryRecvError::Closed) => Some(Err(PublishError::Closed)),
    }
}

/// A copy handed in, with the other ends of its receipt.
struct Request {
    /// The copy.
    message: Arc<QueueMessage>,
    /// Told once the copy is accepted (async mode only).
    accepted: Option<oneshot::Sender<Result<(), PublishError>>>,
    /// Told once the copy is durable or refused.
    done: oneshot::Sender<Result<Durability, PublishError>>,
}

impl Request {
    /// The copy will not be dropped from here on: its reply may go in
    /// async mode.
    fn accept(&mut self) {
        if let Some(accepted) = self.accepted.take() {
            let _ = accepted.send(Ok(()));
        }
    }

    /// Tell the receipt the copy's outcome (its acceptance too, when that
    /// was not told yet).
    fn answer(mut self, result: Result<Durability, PublishError>) {
        if let Some(accepted) = self.accepted.take() {
            let _ = accepted.send(result.clone().map(|_| ()));
        }
        let _ = self.done.send(result);
    }
}

/// What the rest of the gateway can read about the copy path.
#[derive(Default)]
struct Status {
    /// Whether the broker link is up.
    connected: AtomicBool,
    /// Whether a new copy would be taken: it can go straight to the broker,
    /// or the spool has room for it.
    ready: AtomicBool,
}

/// A handle to the copy path. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    /// Where copies are handed in.
    requests: mpsc::Sender<Request>,
    /// What the worker publishes about itself.
    status: Arc<Status>,
    /// Async mode: receipts are ready once their copy is accepted.
    ready_on_accept: bool,
}

/// The running publisher task; [`PublisherTask::flush`] ends it.
pub struct PublisherTask {
    /// Tells the task to flush, with the deadline.
    close: oneshot::Sender<Instant>,
    /// The task, awaited by [`PublisherTask::flush`].
    handle: JoinHandle<()>,
}

impl Publisher {
    /// Open the spool and start the publisher task. The broker is
    /// connected in the background; until it is, copies go to the spool.
    ///
    /// # Errors
    /// A [`SpoolError`] when the spool cannot be opened.
    pub fn start(
        settings: QueueSettings,
        node: String,
        metrics: Metrics,
    ) -> Result<(Self, PublisherTask), SpoolError> {
        let spool = Spool::open(&settings.spool_dir, settings.spool_max_bytes)?;
        Ok(Self::start_with(
            settings,
            node,
            metrics,
            Broker::Amqp,
            spool,
        ))
    }

    /// A publisher on a scripted broker (reachable), for tests of what
    /// waits for copies.
    #[cfg(test)]
    pub(crate) fn scripted(
        settings: QueueSettings,
        metrics: Metrics,
    ) -> (Self, PublisherTask, scripted::Control) {
        let (broker, control) = scripted::broker();
        let spool = Spool::open(&settings.spool_dir, settings.spool_max_bytes).expect("spool");
        let (publisher, task) = Self::start_with(
            settings,
            "node".into(),
            metrics,
            Broker::Scripted(broker),
            spool,
        );
        (publisher, task, control)
    }

    /// [`Publisher::start`] with the broker to reach and the spool opened.
    fn start_with(
        settings: QueueSettings,
        node: String,
        metrics: Metrics,
        broker: Broker,
        spool: Spool,
    ) -> (Self, PublisherTask) {
        let status = Arc::new(Status::default());
        let ready_on_accept = settings.mode == QueueMode::Async;
        let (requests, receiver) = mpsc::channel(settings.max_in_flight.get());
        let (close, closing) = oneshot::channel();
        let worker = Worker {
            replay_from: (!spool.is_empty()).then(|| spool.head()),
            settings,
            node,
            spool,
            broker,
            link: None,
            in_flight: VecDeque::new(),
            waiting: None,
            stranded: Vec::new(),
            requests: receiver,
            status: status.clone(),
            metrics,
            next_attempt: Instant::now(),
            failures: 0,
        };
        worker.update_status();
        let handle = tokio::spawn(worker.run(closing));
        (
            Self {
                requests,
                status,
                ready_on_accept,
            },
            PublisherTask { close, handle },
        )
    }

    /// Hand a copy to the publisher. Waits while the publisher is saturated
    /// (backpressure); returns a [`Receipt`] for the copy's durability.
    ///
    /// # Errors
    /// [`PublishError::Closed`] when the publisher has stopped.
    pub async fn publish(&self, message: QueueMessage) -> Result<Receipt, PublishError> {
        let (done, durable) = oneshot::channel();
        let (accepted, accepted_receiver) = if self.ready_on_accept {
            let (sender, receiver) = oneshot::channel();
            (Some(sender), Some(receiver))
        } else {
            (None, None)
        };
        self.requests
            .send(Request {
                message: Arc::new(message),
                accepted,
                done,
            })
            .await
            .map_err(|_| PublishError::Closed)?;
        Ok(Receipt {
            accepted: accepted_receiver,
            durable,
        })
    }

    /// Whether a new copy would be taken now: it can go straight to the
    /// broker (connected, nothing spooled), or the spool has room for it
    /// (counting the room reserved for copies awaiting their confirm).
    pub fn is_ready(&self) -> bool {
        self.status.ready.load(Ordering::Relaxed)
    }

    /// Whether the broker is connected.
    pub fn is_connected(&self) -> bool {
        self.status.connected.load(Ordering::Relaxed)
    }
}

impl PublisherTask {
    /// Stop taking copies, wait (until `deadline`) for outstanding confirms,
    /// spool whatever is still unconfirmed, and close the broker link.
    pub async fn flush(self, deadline: std::time::Instant) {
        let _ = self.close.send(Instant::from_std(deadline));
        if let Err(e) = self.handle.await {
            tracing::error!("the publisher task failed: {e}");
        }
    }
}

/// A copy published and not yet confirmed.
struct InFlight {
    /// Its confirm to come.
    confirming: Confirming,
    /// Whose copy it is.
    origin: Origin,
    /// When it was published, for `queue.confirm_timeout` and the metric.
    published: Instant,
}

enum Origin {
    /// Handed in by a connection; its receipt is still open, and
    /// `reserved` bytes of spool room are held for it.
    Direct {
        /// The copy and its receipt.
        request: Request,
        /// Spool room held until it is confirmed or spooled.
        reserved: u64,
    },
    /// Replayed from the spool, where it stays until confirmed.
    Replay { next: u64 },
}

struct Worker {
    /// The `queue.*` settings.
    settings: QueueSettings,
    /// This node's id, in the link's name.
    node: String,
    /// Where copies wait while the broker is away.
    spool: Spool,
    /// How to reach the broker.
    broker: Broker,
    /// The open link, if any.
    link: Option<Link>,
    /// Copies published and not yet confirmed, oldest first.
    in_flight: VecDeque<InFlight>,
    /// A copy to publish straight to the broker once confirms free spool
    /// room to reserve for it. No other copy is taken meanwhile.
    waiting: Option<Request>,
    /// Copies in doubt (published, link lost before their confirm) that
    /// the disk refused to spool: kept here, at most `max_in_flight`, and
    /// written again at each health check. While any is here, new copies
    /// are refused, so none can overtake them.
    stranded: Vec<Arc<QueueMessage>>,
    /// While replaying: the spool offset of the next record to publish.
    /// New copies go to the spool while this is set, to keep the order.
    replay_from: Option<u64>,
    /// Copies handed in by connections.
    requests: mpsc::Receiver<Request>,
    /// What [`Publisher`] handles read.
    status: Arc<Status>,
    /// The gateway's metrics.
    metrics: Metrics,
    /// When to try to reach the broker again.
    next_attempt: Instant,
    /// Consecutive failed connection attempts (for quieter logs).
    failures: u32,
}

impl Worker {
    async fn run(mut self, mut closing: oneshot::Receiver<Instant>) {
        let mut deadline: Option<Instant> = None;
        let mut requests_open = true;
        let mut health = tokio::time::interval(Duration::from_millis(250));
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if deadline.is_none() {
                self.fill_replay_window().await;
            }
            if let Some(request) = self.waiting.take() {
                self.publish_direct(request).await;
            }
            self.update_status();
            if deadline.is_some()
                && !requests_open
                && self.in_flight.is_empty()
                && self.waiting.is_none()
            {
                break;
            }
            let window_open = self.waiting.is_none()
                && (self.link.is_none()
                    || self.replay_from.is_some()
                    || self.in_flight.len() < self.settings.max_in_flight.get());
            let wait_for_link = self.link.is_none() && deadline.is_none();
            tokio::select! {
                biased;
                confirmed = front_confirm(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    self.on_confirm(confirmed).await;
                }
                request = self.requests.recv(), if requests_open && window_open => match request {
                    Some(request) => self.on_request(request).await,
                    None => {
                        // Closed and drained: nothing more will come.
                        requests_open = false;
                        deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(5));
                    }
                },
                at = &mut closing, if deadline.is_none() => {
                    deadline = Some(at.unwrap_or_else(|_| Instant::now()));
                    // Copies already handed in are still received.
                    self.requests.close();
                }
                _ = tokio::time::sleep_until(self.next_attempt), if wait_for_link => {
                    self.connect().await;
                }
                _ = health.tick() => {
                    self.check_link().await;
                    if !self.spool.has_room() {
                        // A disk that refused a write may have room again.
                        self.spool.retry();
                    }
                    // A log left full of confirmed records because its
                    // head could not be saved is emptied once it can be.
                    if let Err(e) = self.spool.empty_if_done() {
                        tracing::debug!("the confirmed spool still cannot be emptied: {e}");
                    }
                    self.write_stranded();
                }
                _ = sleep_until_opt(deadline) => {
                    tracing::warn!(
                        unconfirmed = self.in_flight.len(),
                        "shutdown grace period over: spooling the copies the broker has not confirmed"
                    );
                    break;
                }
            }
        }
        // Whatever is still unconfirmed goes to the spool, so nothing is
        // lost; it is replayed on the next start.
        self.spool_in_flight();
        self.requests.close();
        while let Ok(request) = self.requests.try_recv() {
            if self.write_stranded() {
                self.spool_requests(vec![request]);
            } else {
                let error = PublishError::SpoolFailed(
                    "copies in doubt wait for the disk to take them".to_owned(),
                );
                self.refuse(vec![(request, error)]);
            }
        }
        if !self.write_stranded() {
            self.metrics
                .queue_publishes
                .with_label_values(&["lost"])
                .inc_by(self.stranded.len() as u64);
            tracing::error!(
                lost = self.stranded.len(),
                "copies in doubt could not be written to the spool before shutdown and are lost"
            );
        }
        if let Some(link) = self.link.take() {
            let _ = tokio::time::timeout(self.settings.connect_timeout, link.close()).await;
        }
        self.status.connected.store(false, Ordering::Relaxed);
        self.metrics.queue_connected.set(0);
        tracing::info!(spooled = self.spool.messages(), "copy path flushed");
    }

    /// Whether copies go straight to the broker: the link is up and
    /// nothing older waits (in the spool, or stranded).
    fn direct(&self) -> bool {
        self.link.is_some()
            && self.replay_from.is_none()
            && self.spool.is_empty()
            && self.stranded.is_empty()
    }

    async fn on_request(&mut self, request: Request) {
        if !self.write_stranded() {
            let error = PublishError::SpoolFailed(
                "copies in doubt wait for the disk to take them".to_owned(),
            );
            self.refuse(vec![(request, error)]);
            return;
        }
        if !self.direct() {
            let mut batch = vec![request];
            while batch.len() < SPOOL_BATCH {
                match self.requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.spool_requests(batch);
            return;
        }
        self.publish_direct(request).await;
    }

    /// Publish a copy straight to the broker once spool room is reserved
    /// for it: if the link drops before its confirm, it is spooled into
    /// that room, so a copy once accepted is never refused for lack of
    /// room. Without room, it waits for confirms to free some.
    async fn publish_direct(&mut self, mut request: Request) {
        if !self.direct() {
            // The link dropped while it waited: it goes to the spool,
            // behind the copies that were in flight.
            self.spool_requests(vec![request]);
            return;
        }
        let reserved = record_bound(&request.message);
        if !self.spool.reserve(reserved) {
            if self.in_flight.is_empty() {
                // No confirm will free room: the copy could not be kept if
                // the link dropped.
                self.refuse(vec![(request, PublishError::SpoolFull)]);
            } else {
                self.waiting = Some(request);
            }
            return;
        }
        request.accept();
        let message = request.message.clone();
        let origin = Origin::Direct { request, reserved };
        if let Err(e) = self.start_publish(message, origin).await {
            // The copy went to the spool with the rest of the in-flight ones.
            self.drop_link(&format!("publishing failed: {e}")).await;
        }
    }

    /// Hand a copy to the link and keep it in flight. It is not awaited
    /// here: one poll puts its frames in the link's queue (keeping the
    /// order), so many copies can be on their way at once.
    async fn start_publish(
        &mut self,
        message: Arc<QueueMessage>,
        origin: Origin,
    ) -> Result<(), LinkError> {
        let Some(link) = &self.link else {
            return Err(LinkError::new("the link is closed"));
        };
        let mut confirming = link.publish(message);
        let first = poll_fn(|cx| Poll::Ready(confirming.as_mut().poll(cx))).await;
        let result = match first {
            Poll::Pending => Ok(()),
            Poll::Ready(result) => {
                // Keep the outcome for its turn: confirms are taken in
                // publish order.
                let error = result.as_ref().err().cloned();
                confirming = Box::pin(std::future::ready(result));
                error.map_or(Ok(()), Err)
            }
        };
        self.in_flight.push_back(InFlight {
            confirming,
            origin,
            published: Instant::now(),
        });
        result
    }

    async fn on_confirm(&mut self, confirmed: Result<Confirm, LinkError>) {
        let failure = match &confirmed {
            Ok(Confirm::Ack) => None,
            Ok(Confirm::Unroutable) => Some(format!(
                "the broker could not route a copy to queue {:?} (was it deleted?)",
                self.settings.queue
            )),
            Ok(Confirm::Nack) => Some("the broker refused a copy (nack)".to_owned()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(reason) = failure {
            // The copy stays at the front; dropping the link spools it.
            self.drop_link(&reason).await;
            return;
        }
        let Some(entry) = self.in_flight.pop_front() else {
            return;
        };
        self.metrics
            .queue_confirm_duration
            .observe(entry.published.elapsed().as_secs_f64());
        match entry.origin {
            Origin::Direct { request, reserved } => {
                self.spool.release(reserved);
                self.metrics
                    .queue_publishes
                    .with_label_values(&["confirmed"])
                    .inc();
                request.answer(Ok(Durability::Confirmed));
            }
            Origin::Replay { next } => {
                self.metrics
                    .queue_publishes
                    .with_label_values(&["replayed"])
                    .inc();
                if let Err(e) = self.spool.confirm_until(next, 1) {
                    tracing::error!(
                        "{e}; the spool keeps its confirmed copies (they may be published again \
                         after a restart) and stores new ones after them"
                    );
                }
                self.update_status();
            }
        }
    }

    /// While connected and replaying, keep up to `max_in_flight` spooled
    /// copies published. Once all are confirmed, replay ends.
    async fn fill_replay_window(&mut self) {
        let Some(mut offset) = self.replay_from else {
            return;
        };
        if self.link.is_none() {
            return;
        }
        while self.in_flight.len() < self.settings.max_in_flight.get() {
            let record = match self.spool.read_at(offset) {
                Ok(record) => record,
                Err(e) => {
                    tracing::error!("replaying the spool stopped: {e}");
                    self.replay_from = Some(offset);
                    self.drop_link("the spool could not be read").await;
                    return;
                }
            };
            let Some((message, next)) = record else { break };
            if let Err(e) = self
                .start_publish(Arc::new(message), Origin::Replay { next })
                .await
            {
                self.drop_link(&format!("replaying: {e}")).await;
                return;
            }
            offset = next;
        }
        self.replay_from = Some(offset);
        if offset >= self.spool.end() && self.in_flight.is_empty() {
            self.replay_from = None;
            self.update_status();
            tracing::info!("spool replayed: every spooled copy is confirmed by the broker");
        }
    }

    /// Write requests to the spool in one fsync; answer those written as
    /// spooled, the others with why they could not be.
    fn spool_requests(&mut self, batch: Vec<Request>) {
        let mut written = Vec::with_capacity(batch.len());
        let mut refused = Vec::new();
        for request in batch {
            match self.spool.append(&request.message) {
                Ok(()) => written.push(request),
                Err(SpoolError::Full { .. }) => refused.push((request, PublishError::SpoolFull)),
                Err(e) => {
                    // The disk refused: the batch so far is dropped with
                    // this record, and none of it will be replayed.
                    let error = PublishError::SpoolFailed(e.to_string());
                    refused.extend(written.drain(..).map(|r| (r, error.clone())));
                    refused.push((request, error));
                }
            }
        }
        // Readiness and the spool gauges change before any client hears
        // the answer, so what a refused client then reads agrees with it.
        self.update_status();
        if !written.is_empty() {
            match self.spool.sync() {
                Ok(()) => {
                    self.update_status();
                    self.metrics
                        .queue_publishes
                        .with_label_values(&["spooled"])
                        .inc_by(written.len() as u64);
                    for request in written {
                        request.answer(Ok(Durability::Spooled));
                    }
                }
                Err(e) => {
                    tracing::error!("{e}");
                    let error = PublishError::SpoolFailed(e.to_string());
                    refused.extend(written.into_iter().map(|r| (r, error.clone())));
                }
            }
        }
        self.refuse(refused);
    }

    /// Answer copies that could not be kept; their clients get no reply.
    fn refuse(&mut self, refused: Vec<(Request, PublishError)>) {
        let Some((_, first)) = refused.first() else {
            return;
        };
        self.update_status();
        self.metrics
            .queue_publishes
            .with_label_values(&["refused"])
            .inc_by(refused.len() as u64);
        tracing::warn!(refused = refused.len(), "copies refused: {first}");
        for (request, error) in refused {
            request.answer(Err(error));
        }
    }

    /// Write the stranded copies (in doubt, refused by the disk earlier)
    /// to the spool, all in one fsync. Returns whether none is left.
    fn write_stranded(&mut self) -> bool {
        if self.stranded.is_empty() {
            return true;
        }
        let mut written = Ok(());
        for message in &self.stranded {
            written = self.spool.append(message);
            if written.is_err() {
                break;
            }
        }
        let written = written.and_then(|()| self.spool.sync());
        match written {
            Ok(()) => {
                tracing::info!(
                    copies = self.stranded.len(),
                    "copies in doubt that the disk refused earlier are spooled"
                );
                self.metrics
                    .queue_publishes
                    .with_label_values(&["spooled"])
                    .inc_by(self.stranded.len() as u64);
                self.stranded.clear();
                if self.replay_from.is_none() && self.link.is_some() {
                    self.replay_from = Some(self.spool.head());
                }
                self.update_status();
                true
            }
            Err(e) => {
                // All or none: they stay in order, ahead of anything newer.
                self.spool.drop_batch();
                tracing::debug!("copies in doubt still wait for the disk: {e}");
                self.update_status();
                false
            }
        }
    }

    /// The link failed or is being closed: unconfirmed direct copies go to
    /// the spool (in order, ahead of anything newer), unconfirmed replayed
    /// copies are still in the spool and will be replayed again.
    async fn drop_link(&mut self, reason: &str) {
        self.spool_in_flight();
        if let Some(link) = self.link.take() {
            // Closing waits for the broker; do not hold up the copy path,
            // and do not wait forever for a broker that no longer answers.
            let timeout = self.settings.connect_timeout;
            tokio::spawn(async move {
                let _ = tokio::time::timeout(timeout, link.close()).await;
            });
            tracing::warn!("lost the broker: {reason}; copies go to the spool until it is back");
            self.next_attempt = Instant::now() + self.settings.reconnect_interval;
        }
        self.status.connected.store(false, Ordering::Relaxed);
        self.metrics.queue_connected.set(0);
        self.update_status();
    }

    /// Move unconfirmed direct copies to the spool (in order, ahead of
    /// anything newer); unconfirmed replayed copies are still in the spool,
    /// so replay restarts from its head. The direct ones may already be in
    /// the queue, so their clients get no reply ([`PublishError::InDoubt`]).
    fn spool_in_flight(&mut self) {
        let mut in_doubt = Vec::new();
        for entry in self.in_flight.drain(..) {
            if let Origin::Direct { request, reserved } = entry.origin {
                // Its room is released just before it is appended: the
                // append can then not be refused for lack of room.
                self.spool.release(reserved);
                in_doubt.push(request);
            }
        }
        if !in_doubt.is_empty() {
            self.stranded
                .extend(in_doubt.iter().map(|request| request.message.clone()));
            if !self.write_stranded() {
                tracing::error!(
                    copies = self.stranded.len(),
                    "the spool could not take copies in doubt; they are kept in memory and \
                     written again at each check, and new copies are refused meanwhile"
                );
            }
            // Kept (spooled, or in memory until the disk takes them): they
            // were accepted, so in async mode their replies may be gone.
            for request in in_doubt {
                request.answer(Err(PublishError::InDoubt));
            }
        }
        if let Some(request) = self.waiting.take() {
            // Newer than those in flight; never accepted, so it may still
            // be refused.
            self.spool_requests(vec![request]);
        }
        self.replay_from = (!self.spool.is_empty()).then(|| self.spool.head());
    }

    async fn connect(&mut self) {
        match self.broker.open(&self.settings, &self.node).await {
            Ok(link) => {
                tracing::info!(
                    broker = %redact(&self.settings.url),
                    queue = %self.settings.queue,
                    "connected to the broker"
                );
                self.link = Some(link);
                self.failures = 0;
                self.status.connected.store(true, Ordering::Relaxed);
                self.metrics.queue_connected.set(1);
                if !self.spool.is_empty() {
                    self.replay_from = Some(self.spool.head());
                    tracing::info!(messages = self.spool.messages(), "replaying the spool");
                }
                self.update_status();
            }
            Err(reason) => {
                if self.failures == 0 {
                    tracing::warn!(
                        "the broker is unreachable ({reason}); message copies go to the spool at {} \
                         and are replayed in order when it is back",
                        self.settings.spool_dir.display()
                    );
                } else {
                    tracing::debug!("the broker is still unreachable: {reason}");
                }
                self.failures = self.failures.saturating_add(1);
                self.next_attempt = Instant::now() + self.settings.reconnect_interval;
            }
        }
    }

    /// Notice a dead connection even when no copy is being published, and
    /// a broker that stops confirming.
    async fn check_link(&mut self) {
        let Some(link) = &self.link else { return };
        if !link.is_connected() {
            self.drop_link("the connection closed").await;
            return;
        }
        if let Some(front) = self.in_flight.front() {
            let waited = front.published.elapsed();
            if waited > self.settings.confirm_timeout {
                self.drop_link(&format!(
                    "no confirm for {waited:?} (queue.confirm_timeout)"
                ))
                .await;
            }
        }
    }

    /// Publish the spool gauges and readiness ([`Publisher::is_ready`]).
    fn update_status(&self) {
        self.metrics
            .spool_messages
            .set(self.spool.messages() as i64);
        self.metrics.spool_bytes.set(self.spool.bytes() as i64);
        let ready = self.stranded.is_empty() && (self.direct() || self.spool.has_room());
        self.status.ready.store(ready, Ordering::Relaxed);
    }
}

/// The oldest in-flight copy's confirm. Confirms are awaited in publish
/// order, so a receipt never resolves before those of earlier copies.
async fn front_confirm(in_flight: &mut VecDeque<InFlight>) -> Result<Confirm, LinkError> {
    poll_fn(|cx| match in_flight.front_mut() {
        Some(entry) => entry.confirming.as_mut().poll(cx),
        None => Poll::Pending,
    })
    .await
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
