//! Several nodes as one platform, tied together through the broker every
//! deployment already runs (`queue.url`), with nothing else shared.
//!
//! On the broker, under the cluster's name `N` (`cluster.name`):
//! - exchange `N.heartbeats` (fanout): each node announces itself every
//!   `cluster.heartbeat_interval` (id, admin URL, open connections, the
//!   functions and versions it serves, start time) and says goodbye when it
//!   stops; every node keeps a view of the others, dropping one not heard
//!   from for `cluster.node_expiry`;
//! - exchange `N.nodes` (direct, routing key = node id): what one node asks
//!   of another about one of its connections (send, close, describe) and
//!   the answers;
//! - exchange `N.groups` (direct, routing key = group): a broadcast, sent
//!   once and delivered once to each node with members of the group (a node
//!   binds a group while it has members);
//! - queue `N.node.<node id>` per node, exclusive to its connection: when a
//!   node dies or loses the broker, its queue goes, and what is sent to it
//!   comes back unroutable at once (a 410 for the management API) rather
//!   than waiting for a node that is not coming; and queue
//!   `N.node.<node id>.heartbeats` for the heartbeats it takes, apart, so
//!   that a backlog of other messages does not hold them back.
//!
//! The [`Hub`] sends through [`Cluster`] (its [`Remote`]) what is for a
//! connection of another node (a connection id names its node) or for a
//! group's members elsewhere. All of it goes out in one ordered stream over
//! one channel, so messages from one sender to one connection arrive in the
//! order sent.

mod link;
pub mod registry;
mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use runtime::Registry;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::close::Close;
use crate::config::{ClusterSettings, QueueSettings};
use crate::hub::{ConnectionInfo, Delivery, Hub, Remote};
use crate::metrics::Metrics;

pub use wire::Announcement;

/// Most messages waiting to go out to other nodes; beyond, a send is
/// counted `unreachable` rather than buffered without bound.
const OUTGOING: usize = 16_384;

/// Most bytes of messages waiting to go out to other nodes (a slow broker
/// with large messages reaches this before [`OUTGOING`]).
const OUTGOING_BYTES: usize = 64 << 20;

/// What the management API asks of another node about one of its
/// connections.
#[derive(Debug, Clone)]
pub enum Request {
    /// Send a message to it.
    Send {
        /// The connection.
        id: String,
        /// The message.
        message: Message,
    },
    /// Close it.
    Close {
        /// The connection.
        id: String,
        /// The close to send.
        close: Close,
    },
    /// Describe it.
    Info {
        /// The connection.
        id: String,
    },
}

/// The other node's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Sent ([`Request::Send`]) or asked to close ([`Request::Close`]).
    Done,
    /// Its send queue is full.
    Full,
    /// No such connection there (or no such node in the cluster).
    Gone,
    /// What [`Request::Info`] asked for.
    Info(Box<ConnectionInfo>),
}

/// Why another node gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// No link to the broker now.
    #[error(
        "the cluster is unreachable: this node's link to the broker is down, or silent (it does \
         not hear its own heartbeats)"
    )]
    Unavailable,
    /// The node is in the view but did not answer in time.
    #[error("node {node} did not answer within {timeout:?} (cluster.request_timeout)")]
    Timeout {
        /// The node asked.
        node: String,
        /// `cluster.request_timeout`.
        timeout: Duration,
    },
}

/// One node as the view holds it.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    /// What it last announced.
    #[serde(flatten)]
    pub announced: Announcement,
    /// Milliseconds since it was last heard from.
    pub last_seen_ms: u64,
    /// Whether it is this node.
    #[serde(rename = "self")]
    pub this: bool,
}

/// Work for the link task, in the order it is to be done.
enum Outgoing {
    Send {
        node: String,
        id: String,
        message: Message,
    },
    Close {
        node: String,
        id: String,
        close: Close,
    },
    Broadcast {
        group: String,
        message: Message,
    },
    Bind {
        group: String,
        done: oneshot::Sender<()>,
    },
    Unbind {
        group: String,
    },
    /// Whether node `node`'s queue is still on the broker.
    Probe {
        node: String,
        exists: oneshot::Sender<bool>,
    },
    Ask {
        node: String,
        correlation: String,
        request: Request,
    },
}

/// Bytes held, up to a limit.
struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Hold `bytes` more, unless that would pass the limit.
    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// Let `bytes` held go.
    fn give(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl Outgoing {
    /// The bytes it holds, for [`OUTGOING_BYTES`].
    fn size(&self) -> usize {
        match self {
            Outgoing::Send { message, .. } | Outgoing::Broadcast { message, .. } => message.len(),
            Outgoing::Ask {
                request: Request::Send { message, .. },
                ..
            } => message.len(),
            _ => 0,
        }
    }
}

/// This node's part in the cluster.
pub struct Cluster {
    settings: ClusterSettings,
    node: String,
    /// The broker user of `queue.url`: every message a node publishes
    /// carries it as its AMQP `user_id`, which the broker checks against
    /// the user that logged in, and only messages that carry it are taken
    /// (see [`broker_user`]).
    user: String,
    /// Tells this run of the node from an earlier or a clashing one.
    instance: String,
    started_at: SystemTime,
    hub: Arc<Hub>,
    registry: Arc<Registry>,
    metrics: Metrics,
    outgoing: mpsc::Sender<Outgoing>,
    /// Bytes of the messages in `outgoing` (see [`OUTGOING_BYTES`]).
    queued: Arc<Budget>,
    /// Binds and unbinds of groups: never dropped (a group's broadcasts
    /// would miss this node until the next reconnect), and as many as
    /// groups gain or lose their members here.
    bindings: mpsc::UnboundedSender<Outgoing>,
    /// Whether the link to the broker is up.
    linked: AtomicBool,
    /// When this node last heard its own heartbeat come back through the
    /// broker: a link that is up but silent (cut without a word, until the
    /// AMQP heartbeats give it up) is told apart from other nodes being
    /// gone by this.
    heard_self: Mutex<Instant>,
    /// Whether this node is linked but not hearing itself (logged once).
    stalled: AtomicBool,
    /// Whether this node is shutting down.
    draining: AtomicBool,
    /// The other nodes, by id, with when each was last heard from.
    view: Mutex<HashMap<String, (Announcement, Instant)>>,
    /// Requests waiting for their answer, by correlation id, with the node
    /// asked.
    pending: Mutex<HashMap<String, (String, oneshot::Sender<Answer>)>>,
}

impl Cluster {
    /// Join the cluster: `hub` reaches other nodes through it from now on,
    /// and a task keeps the link to the broker of `queue` (reconnecting)
    /// until `shutdown`, when it says goodbye.
    pub fn start(
        settings: ClusterSettings,
        queue: QueueSettings,
        hub: Arc<Hub>,
        registry: Arc<Registry>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (outgoing, work) = mpsc::channel(OUTGOING);
        let (bindings, binds) = mpsc::unbounded_channel();
        let queued = Arc::new(Budget::new(OUTGOING_BYTES));
        let cluster = Arc::new(Self {
            settings,
            node: hub.node_id().to_owned(),
            user: broker_user(&queue.url),
            instance: uuid::Uuid::now_v7().simple().to_string(),
            started_at: SystemTime::now(),
            hub: hub.clone(),
            registry,
            metrics,
            outgoing,
            queued: queued.clone(),
            bindings,
            linked: AtomicBool::new(false),
            heard_self: Mutex::new(Instant::now()),
            stalled: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            view: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
        });
        hub.set_remote(cluster.clone());
        cluster.metrics.cluster_nodes.set(1);
        if cluster.settings.rebalance {
            tokio::spawn(rebalance(cluster.clone(), shutdown.clone()));
        }
        let work = link::Work {
            work,
            binds,
            queued,
        };
        let task = tokio::spawn(link::run(cluster.clone(), queue, work, shutdown));
        (cluster, task)
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Every node in the view, this one first, then by id.
    pub fn members(&self) -> Vec<Member> {
        let now = Instant::now();
        let mut others: Vec<Member> = lock(&self.view)
            .values()
            .filter(|(_, seen)| now.duration_since(*seen) < self.settings.node_expiry)
            .map(|(announced, seen)| Member {
                announced: announced.clone(),
                last_seen_ms: now.duration_since(*seen).as_millis() as u64,
                this: false,
            })
            .collect();
        others.sort_by(|a, b| a.announced.node.cmp(&b.announced.node));
        let mut members = vec![Member {
            announced: self.announcement(),
            last_seen_ms: 0,
            this: true,
        }];
        members.extend(others);
        members
    }

    /// This node is shutting down: its next heartbeats say so, and it
    /// sheds nothing more.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether node `node` (another one) is in the view.
    pub fn knows(&self, node: &str) -> bool {
        lock(&self.view)
            .get(node)
            .is_some_and(|(_, seen)| seen.elapsed() < self.settings.node_expiry)
    }

    /// Ask node `node` about connection `id` and wait for its answer, at
    /// most `cluster.request_timeout`. A node not in the view, or whose
    /// queue is gone (it died or lost the broker), answers
    /// [`Answer::Gone`] at once.
    ///
    /// # Errors
    /// [`ClusterError::Unavailable`] without a link to the broker;
    /// [`ClusterError::Timeout`] when the node is in the view and silent.
    pub async fn ask(&self, node: &str, request: Request) -> Result<Answer, ClusterError> {
        if !self.reachable() {
            return Err(ClusterError::Unavailable);
        }
        if !self.knows(node) {
            return Ok(Answer::Gone);
        }
        let correlation = uuid::Uuid::now_v7().simple().to_string();
        let (answer, answered) = oneshot::channel();
        lock(&self.pending).insert(correlation.clone(), (node.to_owned(), answer));
        let _forget = Forget(self, &correlation);
        let asked = self.push(Outgoing::Ask {
            node: node.to_owned(),
            correlation: correlation.clone(),
            request,
        });
        if !asked {
            return Err(ClusterError::Unavailable);
        }
        let timeout = self.settings.request_timeout;
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(answer)) => Ok(answer),
            // The link went down with the request unanswered.
            Ok(Err(_)) => Err(ClusterError::Unavailable),
            // Cut off meanwhile: the node may well be there.
            Err(_) if !self.reachable() => Err(ClusterError::Unavailable),
            Err(_) if !self.knows(node) => Ok(Answer::Gone),
            // Asked while it died: its queue took the request and went.
            Err(_) if self.probe(node).await == Some(false) => Ok(Answer::Gone),
            Err(_) => Err(ClusterError::Timeout {
                node: node.to_owned(),
                timeout,
            }),
        }
    }

    /// Whether node `node`'s queue is on the broker; `None` when that
    /// cannot be known now.
    async fn probe(&self, node: &str) -> Option<bool> {
        let (exists, found) = oneshot::channel();
        let asked = self.bindings.send(Outgoing::Probe {
            node: node.to_owned(),
            exists,
        });
        if asked.is_err() {
            return None;
        }
        tokio::time::timeout(self.settings.request_timeout, found)
            .await
            .ok()?
            .ok()
    }

    /// What this node announces now.
    fn announcement(&self) -> Announcement {
        let mut functions: Vec<wire::Served> = self
            .registry
            .list()
            .into_iter()
            .filter_map(|summary| {
                summary.live.map(|live| wire::Served {
                    name: summary.name,
                    version: live.version().to_owned(),
                })
            })
            .collect();
        functions.sort_by(|a, b| a.name.cmp(&b.name));
        Announcement {
            node: self.node.clone(),
            instance: self.instance.clone(),
            admin_url: self.settings.admin_url.clone(),
            connections: self.hub.connections(),
            functions,
            started_at: humantime::format_rfc3339_seconds(self.started_at).to_string(),
            draining: self.draining.load(Ordering::Relaxed),
        }
    }

    /// Whether this node can reach the others now: its link is up and its
    /// own heartbeats come back (within `cluster.node_expiry`). Without
    /// that, what it cannot reach is unavailable (503), not gone (410):
    /// the others may be there, this node just cannot tell.
    pub fn reachable(&self) -> bool {
        self.linked.load(Ordering::Relaxed)
            && lock(&self.heard_self).elapsed() < self.settings.node_expiry
    }

    /// A node announced itself.
    fn heard(&self, announced: Announcement) {
        if announced.node == self.node {
            if announced.instance == self.instance {
                *lock(&self.heard_self) = Instant::now();
            } else {
                tracing::error!(
                    node = %self.node,
                    "another gateway announces itself with this node's id: give every node its \
                     own server.node_id, or their connections get each other's messages"
                );
            }
            return;
        }
        let node = announced.node.clone();
        let new = lock(&self.view)
            .insert(node.clone(), (announced, Instant::now()))
            .is_none();
        if new {
            tracing::info!(node = %node, "node joined the cluster view");
        }
        self.count_nodes();
    }

    /// A node said goodbye. What it was asked is not given up at once: its
    /// last answers may still be on their way (the goodbye comes through
    /// another queue); they are waited for as any request, and one still
    /// unanswered then finds the node gone.
    fn left(&self, node: &str) {
        if lock(&self.view).remove(node).is_some() {
            tracing::info!(node, "node left the cluster (said goodbye)");
        }
        self.count_nodes();
    }

    /// Drop the nodes not heard from for `cluster.node_expiry`.
    fn expire(&self) {
        let expiry = self.settings.node_expiry;
        let stalled = lock(&self.heard_self).elapsed() >= expiry;
        if stalled != self.stalled.swap(stalled, Ordering::Relaxed) {
            if stalled {
                tracing::warn!(
                    "this node has not heard its own heartbeat for {expiry:?} \
                     (cluster.node_expiry): its link to the broker is stalled; what is for other \
                     nodes fails with cluster-unavailable until the link is back or given up \
                     (two queue.heartbeat periods of silence)"
                );
            } else {
                tracing::info!("this node hears its own heartbeat again");
            }
        }
        self.metrics
            .cluster_connected
            .set(i64::from(self.reachable()));
        let mut gone = Vec::new();
        lock(&self.view).retain(|node, (_, seen)| {
            let keep = seen.elapsed() < expiry;
            if !keep {
                gone.push(node.clone());
            }
            keep
        });
        for node in gone {
            self.forget_node(&node);
            tracing::warn!(
                node = %node,
                "node dropped from the cluster view: not heard from for {expiry:?} \
                 (cluster.node_expiry)"
            );
        }
        self.count_nodes();
    }

    fn count_nodes(&self) {
        let others = lock(&self.view).len();
        self.metrics.cluster_nodes.set(1 + others as i64);
    }

    fn set_linked(&self, linked: bool) {
        if linked {
            *lock(&self.heard_self) = Instant::now();
        }
        self.linked.store(linked, Ordering::Relaxed);
        self.metrics.cluster_connected.set(i64::from(linked));
        if !linked {
            // Nothing answers requests sent over a link that is gone.
            lock(&self.pending).clear();
        }
    }

    /// The answer to request `correlation` came.
    fn answered(&self, correlation: &str, answer: Answer) {
        if let Some((_, waiting)) = lock(&self.pending).remove(correlation) {
            let _ = waiting.send(answer);
        }
    }

    /// Node `node` left the view: what it was asked gets no answer, so its
    /// connections are gone now rather than at the request's timeout.
    fn forget_node(&self, node: &str) {
        let mut pending = lock(&self.pending);
        let asked: Vec<String> = pending
            .iter()
            .filter(|(_, (asked, _))| asked == node)
            .map(|(correlation, _)| correlation.clone())
            .collect();
        for correlation in asked {
            if let Some((_, waiting)) = pending.remove(&correlation) {
                let _ = waiting.send(Answer::Gone);
            }
        }
    }

    fn count(&self, kind: &str, direction: &str) {
        self.metrics
            .cluster_messages
            .with_label_values(&[kind, direction])
            .inc();
    }

    /// Queue work for the link task; false when it cannot take it now.
    fn queue(&self, work: Outgoing) -> bool {
        self.reachable() && self.push(work)
    }

    /// Put `work` in the outgoing queue unless it is full, in messages or
    /// in bytes.
    fn push(&self, work: Outgoing) -> bool {
        let size = work.size();
        if !self.queued.take(size) {
            return false;
        }
        if self.outgoing.try_send(work).is_err() {
            self.queued.give(size);
            return false;
        }
        true
    }
}

impl Remote for Cluster {
    fn send(&self, node: &str, id: &str, message: Message) -> Delivery {
        if !self.reachable() {
            return Delivery::Unreachable;
        }
        if !self.knows(node) {
            return Delivery::Gone;
        }
        let queued = self.queue(Outgoing::Send {
            node: node.to_owned(),
            id: id.to_owned(),
            message,
        });
        if queued {
            Delivery::Forwarded
        } else {
            Delivery::Unreachable
        }
    }

    fn close(&self, node: &str, id: &str, close: Close) -> bool {
        self.knows(node)
            && self.queue(Outgoing::Close {
                node: node.to_owned(),
                id: id.to_owned(),
                close,
            })
    }

    fn broadcast(&self, group: &str, message: &Message) {
        if !self.queue(Outgoing::Broadcast {
            group: group.to_owned(),
            message: message.clone(),
        }) {
            self.count("broadcast", "unreachable");
        }
    }

    fn bind(&self, group: &str) -> oneshot::Receiver<()> {
        let (done, bound) = oneshot::channel();
        // Always queued, even with the link down: the link task then
        // settles it, and binds every group with members when it is back.
        let _ = self.bindings.send(Outgoing::Bind {
            group: group.to_owned(),
            done,
        });
        bound
    }

    fn unbind(&self, group: &str) {
        let _ = self.bindings.send(Outgoing::Unbind {
            group: group.to_owned(),
        });
    }
}

/// With `cluster.rebalance`: every heartbeat interval, shed what this node
/// holds beyond its share of the cluster's connections (see [`excess`]),
/// at most `cluster.rebalance_rate` a second, closing each with 1012 at a
/// random time within the interval; their clients reconnect, through the
/// load balancer, to nodes with room.
async fn rebalance(cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let interval = cluster.settings.heartbeat_interval;
    let rate = cluster.settings.rebalance_rate.get() as f64;
    let budget = ((rate * interval.as_secs_f64()).round() as usize).max(1);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if !cluster.reachable() || cluster.draining.load(Ordering::Relaxed) {
            continue;
        }
        let members = cluster.members();
        let local = cluster.hub.connections();
        // A node shutting down takes no share: its clients are coming
        // over.
        let others: Vec<usize> = members
            .iter()
            .filter(|m| !m.this && !m.announced.draining)
            .map(|m| m.announced.connections)
            .collect();
        let shed = excess(local, &others).min(budget);
        if shed == 0 {
            continue;
        }
        tracing::info!(
            shed,
            local,
            nodes = members.len(),
            "rebalancing: this node holds more than its share of the cluster's connections"
        );
        let ids = cluster.hub.sample(shed);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = cluster.hub.close_spread(ids, interval, Close::Rebalance) => {}
        }
    }
}

/// How many of its `local` connections a node should shed, when the other
/// nodes hold `others`: what it holds beyond an even share (rounded up),
/// once that is more than a tenth of the share (at least one) above it,
/// so that small differences do not make connections move back and forth.
pub fn excess(local: usize, others: &[usize]) -> usize {
    if others.is_empty() {
        return 0;
    }
    let nodes = others.len() + 1;
    let total = local + others.iter().sum::<usize>();
    let share = total.div_ceil(nodes);
    let slack = (share / 10).max(1);
    if local > share + slack {
        local - share
    } else {
        0
    }
}

/// The user `url` logs in as (the broker's default, `guest`, when it
/// names none). The nodes of a cluster log in as one user that nothing
/// else uses: the broker refuses a message whose `user_id` is not the
/// sender's own, so a message carrying this user came from a node, not
/// from another client of the broker (a backend publishing to the push
/// queue, say).
pub fn broker_user(url: &str) -> String {
    url.parse::<lapin::uri::AMQPUri>()
        .map(|uri| uri.authority.userinfo.username)
        .unwrap_or_else(|_| "guest".into())
}

/// Forgets a pending request when its asker stops waiting.
struct Forget<'a>(&'a Cluster, &'a str);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(&self.0.pending).remove(self.1);
    }
}

/// A mutex's guard; a poisoned one is used as is (what the cluster keeps
/// behind its locks is whole after every statement).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::excess;

    #[test]
    fn the_outgoing_budget_holds_up_to_its_limit_and_gets_back_what_is_given() {
        let budget = super::Budget::new(100);
        assert!(budget.take(60));
        assert!(!budget.take(41), "over the limit");
        assert!(budget.take(40), "up to it");
        assert!(!budget.take(1));
        budget.give(60);
        assert!(budget.take(60));
        assert!(!budget.take(usize::MAX), "no overflow");
    }

    #[test]
    fn the_broker_user_is_the_urls_or_the_brokers_default() {
        use super::broker_user;
        assert_eq!(broker_user("amqp://tide:secret@10.0.0.1:5672/%2f"), "tide");
        assert_eq!(broker_user("amqps://gate@broker/vhost"), "gate");
        assert_eq!(broker_user("amqp://127.0.0.1:5672"), "guest");
    }

    #[test]
    fn a_node_sheds_what_it_holds_beyond_its_share_and_not_small_differences() {
        assert_eq!(excess(10, &[]), 0, "alone");
        assert_eq!(excess(10, &[0]), 5);
        assert_eq!(excess(100, &[0, 0]), 66);
        assert_eq!(
            excess(6, &[4]),
            0,
            "within a tenth (at least one) of the share"
        );
        assert_eq!(excess(7, &[3]), 2);
        assert_eq!(excess(110, &[90]), 0);
        assert_eq!(excess(120, &[80]), 20);
        assert_eq!(excess(0, &[50]), 0);
    }
}
