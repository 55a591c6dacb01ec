//! What this node does for a connection id or a group: deliver a message
//! to a connection, close it, describe it, and keep groups of connections
//! to broadcast to. Function effects (`send`, `join`, `leave`,
//! `broadcast`), the connections API and the push queue all go through
//! the [`Hub`]. A connection or group member on another node is reached
//! through the [`Remote`] the cluster sets ([`Hub::set_remote`]): a
//! connection id names its node (`<node>.<id>`), and a group spans every
//! node with members.
//!
//! A message delivered to a connection goes into the same queue as its
//! replies, bounded by the same `websocket.send_queue_bytes`: a connection
//! whose client does not read has its deliveries refused (counted as
//! `full`), so one slow client cannot make the gateway buffer without
//! bound, nor hold up the sender.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_channel::mpsc;
use prometheus::IntCounter;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::close::Close;
use crate::dispatch::{ByteBudget, Outbound};
use crate::metrics::Metrics;

/// The longest group name, in bytes.
pub const MAX_GROUP_NAME: usize = 128;

/// What became of a message for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the client.
    Delivered,
    /// No such connection on this node (never was, or closed).
    Gone,
    /// The connection's send queue is full: its client is not reading.
    Full,
    /// Handed to the broker for the connection's node, another one.
    Forwarded,
    /// On another node that cannot be reached now (no link to the broker).
    Unreachable,
}

impl Delivery {
    /// The `outcome` label of `tidegate_deliveries_total`.
    pub fn label(self) -> &'static str {
        match self {
            Delivery::Delivered => "delivered",
            Delivery::Gone => "gone",
            Delivery::Full => "full",
            Delivery::Forwarded => "forwarded",
            Delivery::Unreachable => "unreachable",
        }
    }
}

/// The way to connections and groups on other nodes: the cluster.
pub trait Remote: Send + Sync {
    /// Forward `message` to connection `id` on node `node` (not this one):
    /// [`Delivery::Forwarded`], [`Delivery::Gone`] when no such node is in
    /// the cluster, or [`Delivery::Unreachable`].
    fn send(&self, node: &str, id: &str, message: Message) -> Delivery;
    /// Ask connection `id` on node `node` to close; false when the node is
    /// not in the cluster or cannot be reached.
    fn close(&self, node: &str, id: &str, close: Close) -> bool;
    /// Deliver `message` to the members of `group` on every other node.
    fn broadcast(&self, group: &str, message: &Message);
    /// This node has its first member of `group`: make the group's
    /// broadcasts reach it. Done when the receiver resolves.
    fn bind(&self, group: &str) -> oneshot::Receiver<()>;
    /// This node has no member of `group` left.
    fn unbind(&self, group: &str);
}

/// The node a connection id names: what comes before its first `.`.
pub fn node_of(id: &str) -> Option<&str> {
    id.split_once('.').map(|(node, _)| node)
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The group name is empty, too long or not printable.
    #[error(
        "a group name is 1 to {MAX_GROUP_NAME} bytes of printable characters, without spaces: {0:?}"
    )]
    BadName(String),
    /// The connection is in `websocket.max_groups` groups already.
    #[error("a connection may be in at most {0} groups (websocket.max_groups)")]
    TooMany(usize),
}

/// Whether `name` is a group name.
pub fn check_group(name: &str) -> Result<(), GroupError> {
    if name.is_empty()
        || name.len() > MAX_GROUP_NAME
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(GroupError::BadName(
            name.chars().take(MAX_GROUP_NAME).collect(),
        ));
    }
    Ok(())
}

/// What the connections API tells about a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// The connection's id.
    pub id: String,
    /// The route it connected to.
    pub route: String,
    /// The request path.
    pub path: String,
    /// The client's address.
    pub remote_addr: String,
    /// When it connected (RFC 3339).
    pub connected_at: String,
    /// When it last received a message (RFC 3339).
    pub last_active_at: String,
    /// The groups it is in.
    pub groups: Vec<String>,
    /// The node holding it.
    pub node: String,
}

/// What a connection registers about itself.
pub struct Registering {
    /// Its id.
    pub id: String,
    /// The route it connected to.
    pub route: Arc<str>,
    /// The request path.
    pub path: String,
    /// The client's address.
    pub remote_addr: String,
    /// Its writer's queue.
    pub outbound: mpsc::Sender<Outbound>,
    /// Its writer's byte budget.
    pub budget: Arc<ByteBudget>,
}

/// One open connection, as the hub sees it.
pub struct Handle {
    id: Arc<str>,
    route: Arc<str>,
    /// Exactly sized: kept for the connection's life.
    path: Box<str>,
    remote_addr: Box<str>,
    /// Unix milliseconds.
    connected_at: u64,
    /// Unix milliseconds of the last message received.
    last_active: AtomicU64,
    /// Its writer's queue; `None` once unregistered, so the writer sees
    /// the queue end when the connection's own sender goes.
    outbound: Mutex<Option<mpsc::Sender<Outbound>>>,
    budget: Arc<ByteBudget>,
    /// Its groups.
    groups: Mutex<Vec<Arc<str>>>,
    /// A close asked for from outside (the API, the push queue).
    close: Mutex<Option<Close>>,
    /// Woken when `close` is set.
    closing: Notify,
}

impl Handle {
    /// The connection's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Note a message received now.
    pub fn touch(&self) {
        self.last_active.store(unix_millis(), Ordering::Relaxed);
    }

    /// Wait until a close is asked for from outside; returns it.
    pub async fn closed_from_outside(&self) -> Close {
        loop {
            let notified = self.closing.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(close) = lock(&self.close).take() {
                return close;
            }
            notified.await;
        }
    }

    /// The groups the connection is in.
    pub fn groups(&self) -> Vec<String> {
        lock(&self.groups).iter().map(|g| g.to_string()).collect()
    }

    fn deliver(&self, message: Message) -> Delivery {
        let mut outbound = lock(&self.outbound);
        let Some(sender) = outbound.as_mut() else {
            return Delivery::Gone;
        };
        let bytes = message.len();
        if !self.budget.try_take(bytes) {
            return Delivery::Full;
        }
        match sender.try_send(Outbound::Message {
            receipt: None,
            message,
            bytes,
        }) {
            Ok(()) => Delivery::Delivered,
            Err(error) => {
                self.budget.give_back(bytes);
                if error.is_disconnected() {
                    Delivery::Gone
                } else {
                    Delivery::Full
                }
            }
        }
    }

    fn info(&self, node: &str) -> ConnectionInfo {
        ConnectionInfo {
            id: self.id.to_string(),
            route: self.route.to_string(),
            path: self.path.to_string(),
            remote_addr: self.remote_addr.to_string(),
            connected_at: rfc3339(self.connected_at),
            last_active_at: rfc3339(self.last_active.load(Ordering::Relaxed)),
            groups: self.groups(),
            node: node.to_owned(),
        }
    }
}

/// A connection's place in the hub: dropping it removes the connection
/// and its group memberships.
pub struct Registration {
    hub: Arc<Hub>,
    handle: Arc<Handle>,
}

impl Registration {
    /// The connection's handle.
    pub fn handle(&self) -> &Arc<Handle> {
        &self.handle
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(&self.handle);
    }
}

/// The connections and groups of this node.
pub struct Hub {
    /// This node's id, in every [`ConnectionInfo`].
    node_id: String,
    /// Most groups per connection (`websocket.max_groups`).
    max_groups: usize,
    /// Open connections by id.
    connections: RwLock<HashMap<Arc<str>, Arc<Handle>>>,
    /// Members of each group with at least one.
    groups: RwLock<HashMap<Arc<str>, HashSet<Arc<str>>>>,
    /// Connections and groups on other nodes, once the cluster is up.
    remote: OnceLock<Arc<dyn Remote>>,
    /// `tidegate_deliveries_total` by outcome.
    delivered: IntCounter,
    gone: IntCounter,
    full: IntCounter,
    forwarded: IntCounter,
    unreachable: IntCounter,
}

impl Hub {
    /// An empty hub for node `node_id`.
    pub fn new(node_id: &str, max_groups: usize, metrics: &Metrics) -> Self {
        let outcome = |o| metrics.deliveries.with_label_values(&[o]);
        Self {
            node_id: node_id.to_owned(),
            max_groups,
            connections: RwLock::new(HashMap::new()),
            groups: RwLock::new(HashMap::new()),
            remote: OnceLock::new(),
            delivered: outcome("delivered"),
            gone: outcome("gone"),
            full: outcome("full"),
            forwarded: outcome("forwarded"),
            unreachable: outcome("unreachable"),
        }
    }

    /// Reach connections and groups on other nodes through `remote` (set
    /// once, by the cluster).
    pub fn set_remote(&self, remote: Arc<dyn Remote>) {
        let _ = self.remote.set(remote);
    }

    /// The node holding connection `id` when it is another node of the
    /// cluster; `None` for this node's connections (and any id when there
    /// is no cluster).
    pub fn remote_node<'a>(&self, id: &'a str) -> Option<&'a str> {
        self.remote.get()?;
        node_of(id).filter(|node| *node != self.node_id)
    }

    /// Open connections on this node.
    pub fn connections(&self) -> usize {
        read(&self.connections).len()
    }

    /// Up to `n` of this node's connections, picked at random.
    pub fn sample(&self, n: usize) -> Vec<String> {
        let mut ids: Vec<String> = read(&self.connections)
            .keys()
            .map(|id| id.to_string())
            .collect();
        fastrand::shuffle(&mut ids);
        ids.truncate(n);
        ids
    }

    /// Close connections `ids` of this node with `close`, one by one in
    /// their order, spread evenly over `window` with jitter (each at a
    /// random time in its own slice of the window), so that their clients
    /// do not all come back at once. Returns how many were asked to close.
    pub async fn close_spread(&self, ids: Vec<String>, window: Duration, close: Close) -> usize {
        let count = ids.len();
        let started = tokio::time::Instant::now();
        for (slice, id) in ids.into_iter().enumerate() {
            let at = window.mul_f64((slice as f64 + fastrand::f64()) / count as f64);
            tokio::time::sleep_until(started + at).await;
            self.close_here(&id, close.clone());
        }
        count
    }

    /// The groups with members on this node.
    pub fn local_groups(&self) -> Vec<String> {
        read(&self.groups).keys().map(|g| g.to_string()).collect()
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Add an open connection.
    pub fn register(self: &Arc<Self>, connection: Registering) -> Registration {
        let now = unix_millis();
        let handle = Arc::new(Handle {
            id: connection.id.into(),
            route: connection.route,
            path: connection.path.into_boxed_str(),
            remote_addr: connection.remote_addr.into_boxed_str(),
            connected_at: now,
            last_active: AtomicU64::new(now),
            outbound: Mutex::new(Some(connection.outbound)),
            budget: connection.budget,
            groups: Mutex::new(Vec::new()),
            close: Mutex::new(None),
            closing: Notify::new(),
        });
        write(&self.connections).insert(handle.id.clone(), handle.clone());
        Registration {
            hub: self.clone(),
            handle,
        }
    }

    fn unregister(&self, handle: &Arc<Handle>) {
        write(&self.connections).remove(&handle.id);
        lock(&handle.outbound).take();
        let groups = std::mem::take(&mut *lock(&handle.groups));
        if !groups.is_empty() {
            let mut all = write(&self.groups);
            for group in groups {
                self.remove_member(&mut all, &group, &handle.id);
            }
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Handle>> {
        read(&self.connections).get(id).cloned()
    }

    /// Queue `message` for connection `id`, on this node or, through the
    /// cluster, on the node its id names.
    pub fn send(&self, id: &str, message: Message) -> Delivery {
        let delivery = match (self.remote_node(id), self.remote.get()) {
            (Some(node), Some(remote)) => remote.send(node, id, message),
            _ => self.deliver(id, message),
        };
        self.count(delivery);
        delivery
    }

    /// Queue `message` for connection `id` of this node (a message the
    /// cluster brought from another node; counted there).
    pub fn deliver(&self, id: &str, message: Message) -> Delivery {
        match self.get(id) {
            Some(handle) => handle.deliver(message),
            None => Delivery::Gone,
        }
    }

    /// Queue `message` for every member of `group`, on this node and
    /// through the cluster on the others; returns how many on this node
    /// got it and how many had a full queue.
    pub fn broadcast(&self, group: &str, message: &Message) -> (usize, usize) {
        if let Some(remote) = self.remote.get() {
            remote.broadcast(group, message);
        }
        self.broadcast_here(group, message)
    }

    /// [`Hub::broadcast`] to the members on this node only.
    pub fn broadcast_here(&self, group: &str, message: &Message) -> (usize, usize) {
        let members: Vec<Arc<Handle>> = {
            let groups = read(&self.groups);
            let Some(ids) = groups.get(group) else {
                return (0, 0);
            };
            let connections = read(&self.connections);
            ids.iter()
                .filter_map(|id| connections.get(id).cloned())
                .collect()
        };
        let (mut delivered, mut full) = (0, 0);
        for member in members {
            match member.deliver(message.clone()) {
                Delivery::Delivered => delivered += 1,
                Delivery::Full => full += 1,
                Delivery::Gone | Delivery::Forwarded | Delivery::Unreachable => {}
            }
        }
        self.delivered.inc_by(delivered as u64);
        self.full.inc_by(full as u64);
        (delivered, full)
    }

    /// Ask connection `id` to close, on this node or through the cluster;
    /// `false` when it is gone (or its node cannot be reached).
    pub fn close(&self, id: &str, close: Close) -> bool {
        if let (Some(node), Some(remote)) = (self.remote_node(id), self.remote.get()) {
            return remote.close(node, id, close);
        }
        self.close_here(id, close)
    }

    /// [`Hub::close`] for a connection of this node.
    pub fn close_here(&self, id: &str, close: Close) -> bool {
        let Some(handle) = self.get(id) else {
            return false;
        };
        *lock(&handle.close) = Some(close);
        handle.closing.notify_one();
        true
    }

    /// What the connections API tells about `id`.
    pub fn info(&self, id: &str) -> Option<ConnectionInfo> {
        self.get(id).map(|handle| handle.info(&self.node_id))
    }

    /// Connections on `route` (if given) in `group` (if given), at most
    /// `limit`, ordered by id.
    pub fn list(
        &self,
        route: Option<&str>,
        group: Option<&str>,
        limit: usize,
    ) -> Vec<ConnectionInfo> {
        let handles: Vec<Arc<Handle>> = match group {
            Some(group) => {
                let groups = read(&self.groups);
                let connections = read(&self.connections);
                groups
                    .get(group)
                    .map(|ids| {
                        ids.iter()
                            .filter_map(|id| connections.get(id).cloned())
                            .collect()
                    })
                    .unwrap_or_default()
            }
            None => read(&self.connections).values().cloned().collect(),
        };
        let mut handles: Vec<Arc<Handle>> = handles
            .into_iter()
            .filter(|handle| route.is_none_or(|route| &*handle.route == route))
            .collect();
        handles.sort_by(|a, b| a.id.cmp(&b.id));
        handles
            .iter()
            .take(limit)
            .map(|handle| handle.info(&self.node_id))
            .collect()
    }

    /// Members of `group` on this node.
    pub fn group_size(&self, group: &str) -> usize {
        read(&self.groups).get(group).map_or(0, HashSet::len)
    }

    /// Put `handle` in `group` (no change if it is a member already).
    /// When it is the group's first member on this node and there is a
    /// cluster, broadcasts from other nodes reach it once the returned
    /// receiver resolves.
    ///
    /// # Errors
    /// [`GroupError`] for a bad name or a connection in too many groups.
    pub fn join(
        &self,
        handle: &Handle,
        group: &str,
    ) -> Result<Option<oneshot::Receiver<()>>, GroupError> {
        check_group(group)?;
        let mut groups = lock(&handle.groups);
        if groups.iter().any(|g| &**g == group) {
            return Ok(None);
        }
        if groups.len() >= self.max_groups {
            return Err(GroupError::TooMany(self.max_groups));
        }
        // Only while still registered: a connection that closed joins
        // nothing.
        if lock(&handle.outbound).is_none() {
            return Ok(None);
        }
        let group: Arc<str> = group.into();
        groups.push(group.clone());
        let mut all = write(&self.groups);
        let members = all.entry(group.clone()).or_default();
        members.insert(handle.id.clone());
        // Asked under the groups' lock, as unbinds are: the cluster sees
        // binds and unbinds of a group in the order they happened here.
        Ok(match self.remote.get() {
            Some(remote) if members.len() == 1 => Some(remote.bind(&group)),
            _ => None,
        })
    }

    /// Take `handle` out of `group` (no change if it is not a member).
    pub fn leave(&self, handle: &Handle, group: &str) {
        let mut groups = lock(&handle.groups);
        let Some(index) = groups.iter().position(|g| &**g == group) else {
            return;
        };
        let group = groups.swap_remove(index);
        self.remove_member(&mut write(&self.groups), &group, &handle.id);
    }

    /// Take `id` out of `group`; the cluster hears when that leaves the
    /// group with no member on this node (under the groups' lock).
    fn remove_member(
        &self,
        groups: &mut HashMap<Arc<str>, HashSet<Arc<str>>>,
        group: &str,
        id: &str,
    ) {
        if let Some(members) = groups.get_mut(group)
            && members.remove(id)
            && members.is_empty()
        {
            groups.remove(group);
            if let Some(remote) = self.remote.get() {
                remote.unbind(group);
            }
        }
    }

    /// Most groups per connection.
    pub fn max_groups(&self) -> usize {
        self.max_groups
    }

    fn count(&self, delivery: Delivery) {
        match delivery {
            Delivery::Delivered => self.delivered.inc(),
            Delivery::Gone => self.gone.inc(),
            Delivery::Full => self.full.inc(),
            Delivery::Forwarded => self.forwarded.inc(),
            Delivery::Unreachable => self.unreachable.inc(),
        }
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn rfc3339(millis: u64) -> String {
    let at = time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(millis as i64);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn hub(max_groups: usize) -> Arc<Hub> {
        Arc::new(Hub::new("n1", max_groups, &Metrics::new().unwrap()))
    }

    fn open(hub: &Arc<Hub>, id: &str, budget: usize) -> (Registration, mpsc::Receiver<Outbound>) {
        let (outbound, queue) = mpsc::channel(16);
        let registration = hub.register(Registering {
            id: id.into(),
            route: "/chat".into(),
            path: "/chat/x".into(),
            remote_addr: "127.0.0.1:1".into(),
            outbound,
            budget: Arc::new(ByteBudget::new(budget)),
        });
        (registration, queue)
    }

    fn text(outbound: Option<Outbound>) -> String {
        match outbound {
            Some(Outbound::Message { message, .. }) => message.into_text().unwrap().to_string(),
            _ => panic!("expected a message"),
        }
    }

    #[tokio::test]
    async fn a_group_broadcast_reaches_its_members_only_and_leave_works() {
        let hub = hub(8);
        let (a, mut qa) = open(&hub, "n1.a", 1 << 20);
        let (b, mut qb) = open(&hub, "n1.b", 1 << 20);
        let (_c, mut qc) = open(&hub, "n1.c", 1 << 20);
        hub.join(a.handle(), "room").unwrap();
        hub.join(b.handle(), "room").unwrap();
        hub.join(b.handle(), "room").unwrap();
        assert_eq!(hub.group_size("room"), 2);
        assert_eq!(hub.broadcast("room", &Message::text("hi")), (2, 0));
        assert_eq!(text(qa.next().await), "hi");
        assert_eq!(text(qb.next().await), "hi");
        assert!(qc.try_recv().is_err());
        hub.leave(b.handle(), "room");
        assert_eq!(hub.broadcast("room", &Message::text("2")), (1, 0));
        assert_eq!(hub.list(None, Some("room"), 10).len(), 1);
        drop(a);
        assert_eq!(hub.group_size("room"), 0, "closing leaves every group");
        assert_eq!(hub.broadcast("room", &Message::text("3")), (0, 0));
    }

    #[tokio::test]
    async fn sends_to_unknown_or_closed_connections_are_gone_and_full_queues_refuse() {
        let hub = hub(8);
        assert_eq!(hub.send("n1.nope", Message::text("x")), Delivery::Gone);
        let (a, _qa) = open(&hub, "n1.a", 10);
        assert_eq!(
            hub.send("n1.a", Message::text("12345678")),
            Delivery::Delivered
        );
        assert_eq!(hub.send("n1.a", Message::text("12345678")), Delivery::Full);
        let info = hub.info("n1.a").unwrap();
        assert_eq!((info.route.as_str(), info.node.as_str()), ("/chat", "n1"));
        drop(a);
        assert_eq!(hub.send("n1.a", Message::text("x")), Delivery::Gone);
        assert!(hub.info("n1.a").is_none());
        assert!(!hub.close("n1.a", Close::Shutdown));
    }

    #[tokio::test]
    async fn groups_per_connection_are_bounded_and_names_checked() {
        let hub = hub(2);
        let (a, _qa) = open(&hub, "n1.a", 1 << 20);
        hub.join(a.handle(), "g1").unwrap();
        hub.join(a.handle(), "g2").unwrap();
        assert_eq!(
            hub.join(a.handle(), "g3").unwrap_err(),
            GroupError::TooMany(2)
        );
        assert!(matches!(
            hub.join(a.handle(), "has space"),
            Err(GroupError::BadName(_))
        ));
        assert!(matches!(
            hub.join(a.handle(), ""),
            Err(GroupError::BadName(_))
        ));
        hub.leave(a.handle(), "g1");
        hub.join(a.handle(), "g3").unwrap();
        let mut groups = a.handle().groups();
        groups.sort();
        assert_eq!(groups, vec!["g2", "g3"]);
    }

    #[tokio::test]
    async fn a_close_from_outside_wakes_the_connection() {
        let hub = hub(2);
        let (a, _qa) = open(&hub, "n1.a", 1 << 20);
        let handle = a.handle().clone();
        let waiting = tokio::spawn(async move { handle.closed_from_outside().await });
        tokio::task::yield_now().await;
        assert!(hub.close(
            "n1.a",
            Close::ByFunction {
                code: 4000,
                reason: "bye".into()
            }
        ));
        assert_eq!(waiting.await.unwrap().code(), 4000);
    }

    /// What the hub asked of the cluster, in order.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<String>>);

    impl Remote for Recorded {
        fn send(&self, node: &str, id: &str, _: Message) -> Delivery {
            lock(&self.0).push(format!("send {node} {id}"));
            if node == "n2" {
                Delivery::Forwarded
            } else {
                Delivery::Gone
            }
        }
        fn close(&self, node: &str, id: &str, _: Close) -> bool {
            lock(&self.0).push(format!("close {node} {id}"));
            true
        }
        fn broadcast(&self, group: &str, _: &Message) {
            lock(&self.0).push(format!("broadcast {group}"));
        }
        fn bind(&self, group: &str) -> oneshot::Receiver<()> {
            lock(&self.0).push(format!("bind {group}"));
            oneshot::channel().1
        }
        fn unbind(&self, group: &str) {
            lock(&self.0).push(format!("unbind {group}"));
        }
    }

    #[tokio::test]
    async fn other_nodes_are_reached_through_the_remote_and_groups_bound_while_they_have_members() {
        let hub = hub(8);
        let remote = Arc::new(Recorded::default());
        hub.set_remote(remote.clone());
        let (a, mut qa) = open(&hub, "n1.a", 1 << 20);
        let (b, _qb) = open(&hub, "n1.b", 1 << 20);
        assert_eq!(hub.remote_node("n2.x"), Some("n2"));
        assert_eq!(hub.remote_node("n1.a"), None);
        assert_eq!(hub.send("n2.x", Message::text("hi")), Delivery::Forwarded);
        assert_eq!(hub.send("n3.y", Message::text("hi")), Delivery::Gone);
        assert_eq!(hub.send("n1.a", Message::text("here")), Delivery::Delivered);
        assert_eq!(text(qa.next().await), "here");
        assert!(hub.close("n2.x", Close::by_function(1000, String::new()).unwrap()));
        // Bound with the first member here, unbound with the last.
        assert!(hub.join(a.handle(), "room").unwrap().is_some());
        assert!(hub.join(b.handle(), "room").unwrap().is_none());
        hub.broadcast("room", &Message::text("all"));
        hub.leave(a.handle(), "room");
        drop(b);
        assert!(hub.join(a.handle(), "other").unwrap().is_some());
        drop(a);
        assert_eq!(
            *lock(&remote.0),
            vec![
                "send n2 n2.x",
                "send n3 n3.y",
                "close n2 n2.x",
                "bind room",
                "broadcast room",
                "unbind room",
                "bind other",
                "unbind other",
            ]
        );
        assert!(hub.local_groups().is_empty());
    }
}
