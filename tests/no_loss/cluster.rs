//! A cluster under faults: a node killed under load, the broker restarted
//! under load, and a node cut off from the broker (not from its clients)
//! by taking its network link down. Each time the nodes' clients keep
//! their replies, what is for a node that cannot be reached fails fast with
//! the right status, the cluster heals by itself, and every replied
//! message's copy is in the queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cluster_harness::{
    Three, api, chat, client, member_options, nodes_seen, see_each_other, text_of,
};
use crate::harness::{
    Gateway, SendText, delete_queue, drain_queue, eventually, json, next_data, unique_queue,
};
use tokio_tungstenite::tungstenite::Message;

use crate::netns::Island;
use crate::proxy::BrokerProxy;
use crate::{
    BrokerStopped, CLIENTS, Seen, TURN, check, finish_load, settled, spooled_some, start_load,
};

/// A fresh cluster name.
fn cluster_name() -> String {
    format!("cluster-test-{}", uuid::Uuid::now_v7().simple())
}

/// Node `node` of cluster `name`, copying to `queue`, with `state`, and
/// quick to reconnect.
fn node(name: &str, node: &str, queue: &str, state: &std::path::Path) -> crate::harness::Options {
    member_options(name, node)
        .queue(queue)
        .state(state)
        .env("TIDEGATE__QUEUE__RECONNECT_INTERVAL", "200ms")
        .env("TIDEGATE__WEBSOCKET__MAX_MESSAGE_RATE", "100000")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_no_replied_message_and_its_connections_answer_410() {
    let _turn = TURN.lock().await;
    let name = cluster_name();
    let queue = unique_queue();
    let states: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // Node A reaches the broker through a proxy the test can cut.
    let proxy = BrokerProxy::closed().await;
    proxy.open();
    let a_options =
        node(&name, "a", &queue, states[0].path()).env("TIDEGATE__QUEUE__URL", proxy.url());
    let mut three = Three {
        nodes: vec![
            Gateway::start(a_options),
            Gateway::start(node(&name, "b", &queue, states[1].path())),
            Gateway::start(node(&name, "c", &queue, states[2].path())),
        ],
        name: name.clone(),
    };
    see_each_other(&three.nodes, &["a", "b", "c"]).await;
    let (_on_a, on_a_id) = client(&three.nodes[0]).await;

    // Load on node A; its clients move to B, then C, when it dies.
    let endpoints: Vec<_> = three.nodes.iter().map(Gateway::endpoint).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&endpoints, "cluster-kill", &stop, true);
    load.running(CLIENTS * 16, Duration::from_millis(500)).await;
    // A loses the broker (copies go to its spool), then is killed.
    proxy.close();
    eventually("node a spools", Duration::from_secs(30), || async {
        three.nodes[0].metric("tidegate_spool_messages").await > 0.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_kill = load.replies();
    tokio::task::block_in_place(|| three.nodes[0].kill());

    // Its connections answer 410 through B within the request timeout
    // (its queue went with its broker connection).
    let asked = Instant::now();
    let (status, body) = api(
        &three.nodes[1],
        "POST",
        &format!("/v1/connections/{on_a_id}"),
        b"x",
    )
    .await;
    println!(
        "killed node: a send to its connection answered {status} in {:?}",
        asked.elapsed()
    );
    assert_eq!(status, 410, "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "within the 2 s timeout"
    );
    // Its clients go on with B and C.
    load.running(before_kill + CLIENTS * 16, Duration::from_millis(500))
        .await;
    stop.store(true, Ordering::Relaxed);
    let seen = finish_load(load).await;

    // Restarted on its state directory, node A replays its spool.
    three.nodes[0] = Gateway::start(node(&name, "a", &queue, states[0].path()));
    for gateway in &three.nodes {
        settled(gateway).await;
    }
    see_each_other(&three.nodes, &["a", "b", "c"]).await;
    let copies = drain_queue(&queue, seen.replied.len(), Duration::from_secs(30)).await;
    delete_queue(&queue).await;
    check("cluster, a node killed", &seen, &copies);
    drop(three);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_under_load_keeps_every_node_serving_and_the_cluster_heals() {
    let _turn = TURN.lock().await;
    let name = cluster_name();
    let queue = unique_queue();
    let states: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let three = Three {
        nodes: ["a", "b", "c"]
            .iter()
            .zip(&states)
            .map(|(id, state)| Gateway::start(node(&name, id, &queue, state.path())))
            .collect(),
        name: name.clone(),
    };
    let [a, b, c] = &three.nodes[..] else {
        unreachable!()
    };
    see_each_other(&three.nodes, &["a", "b", "c"]).await;
    let mut chat_sent = Vec::new();
    let (mut on_a, on_a_id) = client(a).await;
    let (mut on_c, _) = client(c).await;
    // As many rooms as a chat connection may join: node A binds them all
    // again after the restart. Joins told apart by a field the function
    // ignores: two copies of one text would read as a duplicate.
    let rooms: Vec<String> = (0..16).map(|n| format!("r{n}")).collect();
    for (who, member) in [("a", &mut on_a), ("c", &mut on_c)] {
        for room in &rooms {
            let join = serde_json::json!({"action": "join", "room": room, "who": who});
            chat_sent.push(join.to_string());
            chat(member, join).await;
            assert_eq!(json(member).await["ok"], "join");
        }
    }
    let endpoints: Vec<_> = three.nodes.iter().map(Gateway::endpoint).collect();
    let stop = Arc::new(AtomicBool::new(false));
    // One load per node, each starting there.
    let loads: Vec<_> = (0..3)
        .map(|i| {
            let mut rotated = endpoints.clone();
            rotated.rotate_left(i);
            start_load(&rotated, &format!("cluster-restart-{i}-"), &stop, true)
        })
        .collect();
    for load in &loads {
        load.running(CLIENTS * 16, Duration::from_millis(200)).await;
    }

    let stopped = tokio::task::block_in_place(BrokerStopped::stop);
    for gateway in &three.nodes {
        eventually("every node notices", Duration::from_secs(30), || async {
            gateway.metric("tidegate_cluster_connected").await == 0.0
                && gateway.metric("tidegate_queue_connected").await == 0.0
        })
        .await;
    }
    // What is for another node fails at once, and says why.
    let asked = Instant::now();
    let (status, body) = api(b, "POST", &format!("/v1/connections/{on_a_id}"), b"x").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cluster-unavailable"), "{body}");
    assert!(asked.elapsed() < Duration::from_secs(1), "at once");
    // Every node goes on serving its own clients (copies spooled).
    let during: Vec<usize> = loads.iter().map(|load| load.replies()).collect();
    for (load, before) in loads.iter().zip(&during) {
        load.running(before + CLIENTS * 16, Duration::from_millis(200))
            .await;
    }
    tokio::task::block_in_place(|| drop(stopped));

    // The cluster heals by itself: the view, sends across nodes, groups.
    let healing = Instant::now();
    see_each_other(&three.nodes, &["a", "b", "c"]).await;
    println!(
        "broker restart: every node sees the others {:?} after the broker is back",
        healing.elapsed()
    );
    sends_reach_again(b, &on_a_id, &mut on_a).await;
    // Node A's groups are bound again: a broadcast from C to each reaches
    // it.
    for room in &rooms {
        let text = format!("after, in {room}");
        let line = serde_json::json!({"action": "send", "room": room, "text": text});
        chat_sent.push(line.to_string());
        chat(&mut on_c, line).await;
        assert_eq!(broadcast_heard(&mut on_a, &text).await["room"], *room);
    }

    stop.store(true, Ordering::Relaxed);
    let mut seen = Seen::default();
    for load in loads {
        seen.merge(finish_load(load).await);
    }
    seen.sent.extend(chat_sent);
    for gateway in &three.nodes {
        settled(gateway).await;
        spooled_some(gateway).await;
    }
    let copies = drain_queue(&queue, seen.replied.len(), Duration::from_secs(30)).await;
    delete_queue(&queue).await;
    check("cluster, broker restart", &seen, &copies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_broker_keeps_its_clients_and_rejoins() {
    let _turn = TURN.lock().await;
    let island = Island::new().await;
    let name = cluster_name();
    let queue = unique_queue();
    let states: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // Node A in a network of its own: clients reach it on one link, it
    // reaches the broker over another, which the test takes down. AMQP
    // heartbeats of 1 s: a silent link is given up after 2 s.
    let inside = format!("{}:0", island.address);
    let a_options = node(&name, "a", &queue, states[0].path())
        .netns(&island.name)
        .env("TIDEGATE__SERVER__LISTEN", inside.as_str())
        .env("TIDEGATE__ADMIN__LISTEN", inside.as_str())
        .env("TIDEGATE__QUEUE__URL", island.broker_url())
        .env("TIDEGATE__QUEUE__HEARTBEAT", "1s");
    let three = Three {
        nodes: vec![
            Gateway::start(a_options),
            Gateway::start(node(&name, "b", &queue, states[1].path())),
            Gateway::start(node(&name, "c", &queue, states[2].path())),
        ],
        name: name.clone(),
    };
    let [a, b, c] = &three.nodes[..] else {
        unreachable!()
    };
    see_each_other(&three.nodes, &["a", "b", "c"]).await;
    let mut echo = a.connect("/").await;
    let (mut on_a, on_a_id) = client(a).await;
    let (mut on_b, on_b_id) = client(b).await;
    let mut sent = Vec::new();
    for (who, member) in [("a", &mut on_a), ("b", &mut on_b)] {
        let join = serde_json::json!({"action": "join", "room": "r", "who": who});
        sent.push(join.to_string());
        chat(member, join).await;
        assert_eq!(json(member).await["ok"], "join");
    }
    let mut seen = Seen {
        sent,
        replied: Vec::new(),
    };
    assert!(echo_once(a, &mut echo, "before the cut", &mut seen).await);

    island.cut();
    let cut = Instant::now();
    // The others drop A from their view.
    for other in [b, c] {
        eventually("the others drop a", Duration::from_secs(30), || async {
            !nodes_seen(other).await.contains(&"a".to_owned())
        })
        .await;
    }
    println!(
        "cut off: out of the others' view {:?} after the cut",
        cut.elapsed()
    );
    // A's clients keep their echo: copies are spooled once the link is
    // given up (2 s of silence at most); a copy published into the silent
    // link meanwhile is in doubt, and its client is closed with 1013.
    let mut answered = Vec::new();
    for n in 0..6 {
        let started = Instant::now();
        let replied = echo_once(a, &mut echo, &format!("during the cut {n}"), &mut seen).await;
        println!(
            "cut off: echo {n}: replied {replied} in {:?}",
            started.elapsed()
        );
        answered.push(replied);
    }
    assert!(
        answered[answered.len() - 3..]
            .iter()
            .all(|replied| *replied),
        "once the link is given up, every message is answered: {answered:?}"
    );
    eventually("node a spools", Duration::from_secs(30), || async {
        a.metric("tidegate_spool_messages").await > 0.0
    })
    .await;
    // For A, B's connection is unavailable, not gone; for B, A's is gone.
    let (status, body) = api(a, "POST", &format!("/v1/connections/{on_b_id}"), b"x").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cluster-unavailable"), "{body}");
    let (status, body) = api(b, "POST", &format!("/v1/connections/{on_a_id}"), b"x").await;
    assert_eq!(status, 410, "{body}");
    // A change made meanwhile reaches A when it is back.
    let (status, body) = api(
        b,
        "PUT",
        "/v1/routes",
        br#"{"path": "/late", "function": "echo"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");

    island.mend();
    let mended = Instant::now();
    see_each_other(&three.nodes, &["a", "b", "c"]).await;
    println!(
        "cut off: back in every view {:?} after the link came back",
        mended.elapsed()
    );
    settled(a).await;
    eventually(
        "node a has the change made meanwhile",
        Duration::from_secs(30),
        || async {
            let (status, body) = api(a, "GET", "/v1/routes", b"").await;
            status == 200 && body.contains("/late")
        },
    )
    .await;
    let mut late = a.connect("/late").await;
    assert!(echo_once(a, &mut late, "late", &mut seen).await);
    // Across nodes again: a send through B, a broadcast from B.
    sends_reach_again(b, &on_a_id, &mut on_a).await;
    let line = serde_json::json!({"action": "send", "room": "r", "text": "mended"});
    seen.sent.push(line.to_string());
    on_b.send_text(&line.to_string()).await;
    assert_eq!(broadcast_heard(&mut on_a, "mended").await["room"], "r");
    let _ = next_data(&mut on_b).await;

    // Every replied message of node A's clients has its copy.
    let copies = drain_queue(&queue, seen.replied.len() + 2, Duration::from_secs(30)).await;
    delete_queue(&queue).await;
    check("cluster, a node cut off", &seen, &copies);
    drop(three);
    drop(island);
}

/// Send `text` on `echo` (of `gateway`, path `/`): true when its echo came
/// back; false when the gateway closed the connection with 1013 (the copy
/// is in doubt), which is then opened again.
async fn echo_once(
    gateway: &Gateway,
    echo: &mut crate::harness::Client,
    text: &str,
    seen: &mut Seen,
) -> bool {
    echo.send_text(text).await;
    seen.sent.push(text.to_owned());
    match next_data(echo).await {
        Message::Text(reply) => {
            assert_eq!(reply.as_str(), text);
            seen.replied.push(text.to_owned());
            true
        }
        Message::Close(frame) => {
            let code = frame.map(|frame| u16::from(frame.code));
            assert_eq!(code, Some(1013), "in doubt");
            *echo = gateway.connect("/").await;
            false
        }
        other => panic!("expected the echo or a close, got {other:?}"),
    }
}

/// Read `member`'s messages up to the chat line saying `text` (a send
/// retried through the API may have come twice before it).
async fn broadcast_heard(member: &mut crate::harness::Client, text: &str) -> serde_json::Value {
    loop {
        let message = text_of(member).await;
        if let Ok(line) = serde_json::from_str::<serde_json::Value>(&message)
            && line["text"] == text
        {
            return line;
        }
    }
}

/// Once the cluster is whole again, a send through `through`'s API
/// reaches connection `id` (`client`).
async fn sends_reach_again(through: &Gateway, id: &str, client: &mut crate::harness::Client) {
    eventually(
        "a send through another node reaches the connection again",
        Duration::from_secs(30),
        || async {
            api(through, "POST", &format!("/v1/connections/{id}"), b"again")
                .await
                .0
                == 200
        },
    )
    .await;
    assert_eq!(text_of(client).await, "again");
}
