//! No loss, proven: the gateway is killed with SIGKILL under load, and the
//! broker is restarted under load; afterwards every message whose reply a
//! client received is in the queue, and the only duplicates are messages
//! whose reply was never delivered, carrying the same `message_id`.
//!
//! A test binary of its own: restarting the broker would disturb the other
//! end-to-end tests, and Cargo runs test binaries one after another. The
//! tests here take turns too.

#[expect(
    dead_code,
    reason = "shared by the e2e and no_loss binaries; each uses part"
)]
#[path = "../e2e/cluster_harness.rs"]
mod cluster_harness;
#[expect(
    dead_code,
    reason = "shared by the e2e and no_loss binaries; each uses part"
)]
#[path = "../e2e/harness.rs"]
mod harness;
#[path = "../e2e/proxy.rs"]
mod proxy;

mod cluster;
mod netns;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use harness::{
    Copy, Endpoint, Gateway, Options, delete_queue, drain_queue, eventually, unique_queue,
};
use proxy::BrokerProxy;

/// One test at a time: the broker restart affects every gateway.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Clients per load.
const CLIENTS: usize = 4;
/// Messages written before reading their replies.
const BATCH: usize = 16;

/// What the clients of a load sent and had replies to.
#[derive(Default)]
struct Seen {
    sent: Vec<String>,
    replied: Vec<String>,
}

impl Seen {
    fn merge(&mut self, other: Seen) {
        self.sent.extend(other.sent);
        self.replied.extend(other.replied);
    }
}

/// One client: batches of `BATCH` messages, then their replies (counted in
/// `replies` as they come), until `stop` or until the connection ends; with
/// `reconnect`, it connects again (until `stop`) when the gateway closes it,
/// and to the next of `endpoints` (the nodes of a cluster, say) when one
/// cannot be reached.
async fn client(
    endpoints: Vec<Endpoint>,
    tag: String,
    stop: Arc<AtomicBool>,
    replies: Arc<AtomicUsize>,
    reconnect: bool,
) -> Seen {
    let mut seen = Seen::default();
    let mut seq = 0u64;
    let mut current = 0;
    'connections: while !stop.load(Ordering::Relaxed) {
        let endpoint = &endpoints[current % endpoints.len()];
        let Ok(mut ws) = endpoint.connect("/").await else {
            // That one is gone: the next.
            current += 1;
            if reconnect {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            break;
        };
        while !stop.load(Ordering::Relaxed) {
            let mut expected = Vec::with_capacity(BATCH);
            for _ in 0..BATCH {
                let text = format!("{tag}-{seq}");
                seq += 1;
                if ws.feed(Message::Text(text.clone().into())).await.is_err() {
                    break;
                }
                seen.sent.push(text.clone());
                expected.push(text);
            }
            if ws.flush().await.is_err() {
                if reconnect {
                    continue 'connections;
                }
                break 'connections;
            }
            for text in expected {
                match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                    Ok(Some(Ok(Message::Text(reply)))) => {
                        assert_eq!(reply.as_str(), text, "replies come in order");
                        seen.replied.push(text);
                        replies.fetch_add(1, Ordering::Relaxed);
                    }
                    // Closed (1013 for copies in doubt, 1001 on shutdown),
                    // reset, or killed.
                    _ if reconnect => continue 'connections,
                    _ => break 'connections,
                }
            }
        }
    }
    seen
}

/// `CLIENTS` clients running against a gateway.
struct Load {
    clients: Vec<tokio::task::JoinHandle<Seen>>,
    /// Replies received so far.
    replies: Arc<AtomicUsize>,
}

/// Run `CLIENTS` clients against `endpoints` (the first, then the next
/// when reconnecting) until `stop`.
fn start_load(endpoints: &[Endpoint], tag: &str, stop: &Arc<AtomicBool>, reconnect: bool) -> Load {
    let replies = Arc::new(AtomicUsize::new(0));
    let clients = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(client(
                endpoints.to_vec(),
                format!("{tag}{i}"),
                stop.clone(),
                replies.clone(),
                reconnect,
            ))
        })
        .collect();
    Load { clients, replies }
}

impl Load {
    /// Replies received so far.
    fn replies(&self) -> usize {
        self.replies.load(Ordering::Relaxed)
    }

    /// Wait until the clients have had `replies` replies, then a while more
    /// (a slow start must not leave a phase without load).
    async fn running(&self, replies: usize, more: Duration) {
        eventually("the load runs", Duration::from_secs(60), || async {
            self.replies.load(Ordering::Relaxed) >= replies
        })
        .await;
        tokio::time::sleep(more).await;
    }
}

async fn finish_load(load: Load) -> Seen {
    let mut seen = Seen::default();
    for client in load.clients {
        seen.merge(client.await.expect("client task"));
    }
    seen
}

/// Wait until the gateway is connected and its spool replayed.
async fn settled(gateway: &Gateway) {
    eventually(
        "the broker is connected and the spool replayed",
        Duration::from_secs(60),
        || async {
            gateway.metric("tidegate_queue_connected").await == 1.0
                && gateway.metric("tidegate_spool_messages").await == 0.0
        },
    )
    .await;
}

/// Check that `gateway` spooled copies (while the broker was down).
async fn spooled_some(gateway: &Gateway) {
    assert!(
        gateway
            .metric("tidegate_queue_publishes_total{outcome=\"spooled\"}")
            .await
            > 0.0,
        "copies were spooled while the broker was down"
    );
}

/// Check the queue against what the clients saw, and print the figures.
fn check(what: &str, seen: &Seen, copies: &[Copy]) {
    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut ids: HashMap<&str, HashSet<&str>> = HashMap::new();
    for copy in copies {
        let body = std::str::from_utf8(&copy.body).expect("text body");
        *count.entry(body).or_default() += 1;
        ids.entry(body)
            .or_default()
            .insert(copy.message_id.as_str());
    }
    let missing: Vec<&String> = seen
        .replied
        .iter()
        .filter(|text| !count.contains_key(text.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} replied messages are not in the queue, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let replied: HashSet<&str> = seen.replied.iter().map(String::as_str).collect();
    let duplicated: Vec<&str> = count
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(body, _)| *body)
        .collect();
    for body in &duplicated {
        assert!(
            !replied.contains(body),
            "{what}: {body:?} was replied to and is in the queue more than once"
        );
        assert_eq!(
            ids[body].len(),
            1,
            "{what}: the copies of {body:?} carry one message_id"
        );
    }
    let sent: HashSet<&str> = seen.sent.iter().map(String::as_str).collect();
    assert!(
        count.keys().all(|body| sent.contains(body)),
        "{what}: the queue holds only messages the clients sent"
    );
    println!(
        "{what}: sent {}, replies received {}, messages in the queue {} ({} distinct, {} duplicated, none of them replied)",
        seen.sent.len(),
        seen.replied.len(),
        copies.len(),
        count.len(),
        duplicated.len()
    );
}

fn options(state: &std::path::Path, queue: &str) -> Options {
    Options::default()
        .state(state)
        .queue(queue)
        .env("TIDEGATE__QUEUE__RECONNECT_INTERVAL", "200ms")
        .env("TIDEGATE__WEBSOCKET__MAX_MESSAGE_RATE", "100000")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_replied_message() {
    let _turn = TURN.lock().await;
    let queue = unique_queue();
    let state = tempfile::tempdir().unwrap();
    let mut seen = Seen::default();

    // 1. The broker is unreachable: copies are spooled. Killed under load.
    let proxy = BrokerProxy::closed().await;
    let mut spooling =
        Gateway::start(options(state.path(), &queue).env("TIDEGATE__QUEUE__URL", proxy.url()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&[spooling.endpoint()], "spooled", &stop, false);
    load.running(CLIENTS * BATCH, Duration::from_millis(1500))
        .await;
    assert!(spooling.metric("tidegate_spool_messages").await > 0.0);
    tokio::task::block_in_place(|| spooling.kill());
    let phase = finish_load(load).await;
    assert!(!phase.replied.is_empty(), "the load ran");
    seen.merge(phase);

    // 2. Restarted on the same spool with the broker reachable: the spool
    // is replayed, then copies go to the broker directly. Killed under load.
    let mut direct = Gateway::start(options(state.path(), &queue));
    settled(&direct).await;
    let load = start_load(&[direct.endpoint()], "direct", &stop, false);
    load.running(CLIENTS * BATCH, Duration::from_millis(1500))
        .await;
    tokio::task::block_in_place(|| direct.kill());
    let phase = finish_load(load).await;
    assert!(!phase.replied.is_empty(), "the load ran");
    seen.merge(phase);

    // 3. Started again: whatever the killed gateway had spooled is replayed.
    let after = Gateway::start(options(state.path(), &queue));
    settled(&after).await;
    let copies = drain_queue(&queue, seen.replied.len(), Duration::from_secs(30)).await;
    delete_queue(&queue).await;
    check("SIGKILL", &seen, &copies);
    drop((spooling, direct, after));
}

/// Restarts the broker's application; starts it again even if the test
/// fails half-way.
struct BrokerStopped;

impl BrokerStopped {
    fn stop() -> Self {
        rabbitmqctl(&["stop_app"]);
        BrokerStopped
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    }
}

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .status()
        .expect(
            "rabbitmqctl (the broker restart test runs it; run as root or as the rabbitmq user)",
        );
    assert!(status.success(), "rabbitmqctl {args:?}: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_under_load_loses_no_replied_message() {
    let _turn = TURN.lock().await;
    let queue = unique_queue();
    let state = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(options(state.path(), &queue));
    settled(&gateway).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&[gateway.endpoint()], "restart", &stop, true);
    load.running(CLIENTS * BATCH, Duration::from_secs(1)).await;

    let stopped = tokio::task::block_in_place(BrokerStopped::stop);
    eventually("the gateway notices", Duration::from_secs(30), || async {
        gateway.metric("tidegate_queue_connected").await == 0.0
    })
    .await;
    // The load goes on into the spool.
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| drop(stopped));
    eventually(
        "the gateway reconnects",
        Duration::from_secs(60),
        || async { gateway.metric("tidegate_queue_connected").await == 1.0 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = finish_load(load).await;
    settled(&gateway).await;
    spooled_some(&gateway).await;
    let copies = drain_queue(&queue, seen.replied.len(), Duration::from_secs(30)).await;
    delete_queue(&queue).await;
    check("broker restart", &seen, &copies);
}
