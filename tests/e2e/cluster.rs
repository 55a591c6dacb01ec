//! Three nodes, each its own `tidegate` process with its own state
//! directory, as one cluster through the real RabbitMQ: membership, a
//! connection on one node reached from the others (API, push queue,
//! function), groups across nodes, and a node that dies.

use std::time::{Duration, Instant};

use crate::cluster_harness::{
    Three, api, chat, client, count, live_version, member, member_options, nodes_seen, text_of,
    upload,
};
use crate::harness::{
    Client, Gateway, Options, SendText, chat_config, close_code, eventually, json, push, quiet,
    text,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_on_one_node_is_reached_from_every_other() {
    let three = Three::start().await;
    let [a, b, c] = &three.nodes[..] else {
        unreachable!()
    };
    let (mut on_a, id) = client(a).await;
    assert!(id.starts_with("a."), "{id}");

    // Through node B's API: send, describe.
    let (status, body) = api(b, "POST", &format!("/v1/connections/{id}"), b"via b").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(text_of(&mut on_a).await, "via b");
    let (status, body) = api(b, "GET", &format!("/@connections/{id}"), b"").await;
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (info["node"].as_str(), info["route"].as_str()),
        (Some("a"), Some("/chat"))
    );

    // Messages from one sender arrive in the order sent.
    for n in 0..20 {
        let (status, _) = api(
            b,
            "POST",
            &format!("/v1/connections/{id}"),
            format!("{n}").as_bytes(),
        )
        .await;
        assert_eq!(status, 200);
    }
    for n in 0..20 {
        assert_eq!(text_of(&mut on_a).await, n.to_string());
    }

    // Through node C's push queue.
    push(
        &format!("{}.push", c.queue),
        &[("connection-id", text(&id))],
        "text/plain",
        b"via c's push queue",
    )
    .await;
    assert_eq!(text_of(&mut on_a).await, "via c's push queue");

    // From a function running on node C.
    let (mut on_c, _) = client(c).await;
    chat(
        &mut on_c,
        serde_json::json!({"action": "nick", "name": "cleo"}),
    )
    .await;
    assert_eq!(json(&mut on_c).await["ok"], "nick");
    chat(
        &mut on_c,
        serde_json::json!({"action": "whisper", "to": id, "text": "psst"}),
    )
    .await;
    let whispered: serde_json::Value = serde_json::from_str(&text_of(&mut on_a).await).unwrap();
    assert_eq!(
        whispered,
        serde_json::json!({"from": "cleo", "text": "psst"})
    );

    // A message that did not come from a node (no user_id of the
    // cluster's broker user) is dropped, however well it is formed.
    forge_send(&three.name, "a", &id, b"forged").await;
    eventually(
        "node a drops the forged message",
        Duration::from_secs(5),
        || async {
            a.metrics()
                .await
                .iter()
                .any(|(series, value)| series.contains("kind=\"foreign\"") && *value >= 1.0)
        },
    )
    .await;
    quiet(&mut on_a).await;

    // A close from node B.
    let (status, body) = api(
        b,
        "DELETE",
        &format!("/v1/connections/{id}?code=4000&reason=from%20b"),
        b"",
    )
    .await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(close_code(&mut on_a).await, Some(4000));
    eventually(
        "the closed connection is gone for node b",
        Duration::from_secs(5),
        || async { api(b, "GET", &format!("/v1/connections/{id}"), b"").await.0 == 410 },
    )
    .await;
    // A node that is not in the cluster: 410 at once.
    let (status, body) = api(b, "POST", "/v1/connections/nowhere.0123", b"x").await;
    assert_eq!(status, 410, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_reaches_the_members_on_every_node_once() {
    let three = Three::start().await;
    let mut members = Vec::new();
    for node in &three.nodes {
        let (mut member, _) = client(node).await;
        chat(
            &mut member,
            serde_json::json!({"action": "join", "room": "r"}),
        )
        .await;
        assert_eq!(json(&mut member).await["ok"], "join");
        members.push(member);
    }
    let (mut outsider, _) = client(&three.nodes[0]).await;
    let b = &three.nodes[1];

    // Through node B's API.
    let (status, body) = api(b, "POST", "/v1/groups/r/messages", b"to all").await;
    assert_eq!(status, 200, "{body}");
    for member in &mut members {
        assert_eq!(text_of(member).await, "to all");
    }
    // From the function on node A, for a member there.
    chat(
        &mut members[0],
        serde_json::json!({"action": "send", "room": "r", "text": "hi"}),
    )
    .await;
    for member in &mut members {
        let line: serde_json::Value = serde_json::from_str(&text_of(member).await).unwrap();
        assert_eq!(line["text"], "hi");
    }
    // Exactly once each; nothing for the outsider.
    for member in &mut members {
        quiet(member).await;
    }
    quiet(&mut outsider).await;

    // Leaving stops it, on that node only.
    chat(
        &mut members[2],
        serde_json::json!({"action": "leave", "room": "r"}),
    )
    .await;
    assert_eq!(json(&mut members[2]).await["ok"], "leave");
    let before = broadcasts_in(&three.nodes[2]).await;
    let (status, _) = api(b, "POST", "/v1/groups/r/messages", b"after").await;
    assert_eq!(status, 200);
    assert_eq!(text_of(&mut members[0]).await, "after");
    assert_eq!(text_of(&mut members[1]).await, "after");
    quiet(&mut members[2]).await;
    // Node C has no member left: it unbound the group, so the broadcast
    // did not even reach it.
    assert_eq!(broadcasts_in(&three.nodes[2]).await, before);
}

/// Publish to node `node` of cluster `name` a well-formed `send` for
/// connection `id`, as a client of the broker that is not a node would.
async fn forge_send(name: &str, node: &str, id: &str, body: &[u8]) {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
    let connection = lapin::Connection::connect(
        crate::harness::BROKER,
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("broker");
    let channel = connection.create_channel().await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("connection-id"),
        AMQPValue::LongString(LongString::from(id)),
    );
    channel
        .basic_publish(
            ShortString::from(format!("{name}.nodes")),
            ShortString::from(node),
            BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default()
                .with_type(ShortString::from("send"))
                .with_content_type(ShortString::from("text/plain; charset=utf-8"))
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "bye".into()).await;
}

/// Broadcasts `gateway` took from the broker so far.
async fn broadcasts_in(gateway: &Gateway) -> f64 {
    gateway
        .metrics()
        .await
        .iter()
        .filter(|(series, _)| {
            series.starts_with("tidegate_cluster_messages_total")
                && series.contains("kind=\"broadcast\"")
                && series.contains("direction=\"in\"")
        })
        .map(|(_, value)| *value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_the_view_and_its_connections_answer_410_at_once() {
    // Nodes leave the view by expiry only after 8 s: what happens sooner
    // is the queue going with the node, and the goodbye.
    let mut three = Three::start_with(&[("TIDEGATE__CLUSTER__NODE_EXPIRY", "8s")]).await;
    let (_on_a, id) = client(&three.nodes[0]).await;
    three.nodes[0].kill();
    let b = &three.nodes[1];
    // At once: the request may race with the broker dropping the queue;
    // then it is answered once the timeout (2 s) passed and the broker
    // says the queue is gone.
    let started = Instant::now();
    let (status, body) = api(b, "POST", &format!("/v1/connections/{id}"), b"x").await;
    assert_eq!(status, 410, "{body}");
    assert!(
        started.elapsed() < Duration::from_millis(3500),
        "{:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Its queue goes with its broker connection, and it leaves the view
    // within cluster.node_expiry: 410, before cluster.request_timeout (2s).
    let started = Instant::now();
    let (status, body) = api(b, "POST", &format!("/v1/connections/{id}"), b"x").await;
    assert_eq!(status, 410, "{body}");
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );
    eventually(
        "node a leaves b's view",
        Duration::from_secs(12),
        || async { !nodes_seen(b).await.contains(&"a".to_owned()) },
    )
    .await;

    // A clean stop says goodbye: it leaves the view at once.
    let left = Instant::now();
    three.nodes[2].terminate();
    let b = &three.nodes[1];
    eventually("node c leaves b's view", Duration::from_secs(2), || async {
        nodes_seen(b).await == vec!["b".to_owned()]
    })
    .await;
    assert!(
        left.elapsed() < Duration::from_secs(4),
        "{:?}",
        left.elapsed()
    );
}

/// When each of `clients` gets its close frame, and its code.
async fn closes(clients: Vec<Client>) -> Vec<(Instant, Option<u16>)> {
    let waiting = clients.into_iter().map(|mut client| {
        tokio::spawn(async move {
            let code = close_code(&mut client).await;
            (Instant::now(), code)
        })
    });
    let mut closes = Vec::new();
    for close in waiting.collect::<Vec<_>>() {
        closes.push(close.await.unwrap());
    }
    closes.sort_by_key(|(at, _)| *at);
    closes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_not_ready_at_once_and_spreads_its_1001s_over_the_drain_window() {
    let gateway = Gateway::start(
        Options::default()
            .config(&chat_config())
            .env("TIDEGATE__SERVER__DRAIN_WINDOW", "2s")
            .env("TIDEGATE__SERVER__SHUTDOWN_GRACE_PERIOD", "10s"),
    );
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(gateway.connect("/chat").await);
    }
    let endpoint = gateway.endpoint();
    let admin = gateway.admin;
    let signalled = Instant::now();
    gateway.signal("TERM");
    // Not ready as soon as the drain starts (the signal takes a moment).
    eventually("/readyz says 503", Duration::from_millis(500), || async {
        crate::harness::http_get(admin, "/readyz", &[]).await.0 == 503
    })
    .await;
    let closed = closes(clients).await;
    assert!(
        closed.iter().all(|(_, code)| *code == Some(1001)),
        "{closed:?}"
    );
    let first = closed.first().unwrap().0.duration_since(signalled);
    let last = closed.last().unwrap().0.duration_since(signalled);
    // Spread over the window, not all at once.
    assert!(
        last - first >= Duration::from_millis(1200) && last < Duration::from_secs(5),
        "first close after {first:?}, last after {last:?}"
    );
    assert!(
        endpoint.connect("/chat").await.is_err(),
        "no new connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_more_than_its_share_sheds_the_excess_with_1012_at_its_rate() {
    let name = format!("cluster-test-{}", uuid::Uuid::now_v7().simple());
    let node = |id: &str, rebalance: bool| {
        Gateway::start(
            member_options(&name, id)
                .env("TIDEGATE__CLUSTER__REBALANCE", rebalance.to_string())
                .env("TIDEGATE__CLUSTER__REBALANCE_RATE", "4"),
        )
    };
    let crowded = node("a", true);
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(crowded.connect("/chat").await);
    }
    // Alone, it keeps them all.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(count(&crowded).await, 10);

    // A node with room joins (a scale-out).
    let three = Three {
        nodes: vec![crowded, node("b", true)],
        name,
    };
    let (crowded, roomy) = (&three.nodes[0], &three.nodes[1]);
    let started = Instant::now();
    // Each client shed reconnects, as through a load balancer, to the
    // node with room, and stays.
    let (shed_tx, mut shed_rx) = tokio::sync::mpsc::unbounded_channel();
    let watchers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let shed_tx = shed_tx.clone();
            let roomy = roomy.endpoint();
            tokio::spawn(async move {
                let code = close_code(&mut client).await;
                let _reconnected = roomy.connect("/chat").await.expect("reconnect");
                shed_tx.send((started.elapsed(), code)).unwrap();
                std::future::pending::<()>().await;
            })
        })
        .collect();
    eventually("the nodes even out", Duration::from_secs(15), || async {
        count(crowded).await <= 6 && count(roomy).await >= 4
    })
    .await;
    // And stay so: no shedding back and forth.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut shed = Vec::new();
    while let Ok(event) = shed_rx.try_recv() {
        shed.push(event);
    }
    assert_eq!(count(crowded).await + count(roomy).await, 10);
    for watcher in watchers {
        watcher.abort();
    }
    assert!(shed.iter().all(|(_, code)| *code == Some(1012)), "{shed:?}");
    // Heartbeat counts lag an interval: one more may go.
    assert!((4..=6).contains(&shed.len()), "{shed:?}");
    // At most 4 a second: the last one at least (n - 1) / 4 s after the
    // first, less one heartbeat interval of jitter.
    let spread = shed.last().unwrap().0 - shed.first().unwrap().0;
    let least = Duration::from_millis(250 * (shed.len() as u64 - 1)) - Duration::from_millis(250);
    assert!(spread >= least, "{shed:?}");
}

/// Connections open on `gateway`, as its management API lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_registry_for_the_cluster_reaches_every_node_and_a_later_one() {
    let name = format!("cluster-test-{}", uuid::Uuid::now_v7().simple());
    let mut three = Three {
        nodes: vec![member(&name, "a"), member(&name, "b")],
        name: name.clone(),
    };
    let echo = tidegate_functions::ECHO;
    let router = std::fs::read(tidegate_functions::ROUTER_PATH).unwrap();

    // An upload on A reaches B; its route too.
    let uploaded = Instant::now();
    let first = upload(&three.nodes[0], "shared", echo).await;
    let answered = uploaded.elapsed();
    eventually("b serves the upload", Duration::from_secs(10), || async {
        live_version(&three.nodes[1], "shared").await.as_deref() == Some(first.as_str())
    })
    .await;
    println!(
        "registry propagation: upload answered in {answered:?}, served by every node {:?} after the 201",
        uploaded.elapsed() - answered
    );
    let (status, body) = api(
        &three.nodes[0],
        "PUT",
        "/v1/routes",
        br#"{"path": "/shared", "function": "shared"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // A node started afterwards, on an empty state directory, serves it.
    three.nodes.push(member(&name, "c"));
    let c = &three.nodes[2];
    assert_eq!(c.admin_get("/readyz").await.0, 200, "caught up, ready");
    assert_eq!(
        live_version(c, "shared").await.as_deref(),
        Some(first.as_str())
    );
    let mut client = c.connect("/shared").await;
    client.send_text("hello c").await;
    assert_eq!(text_of(&mut client).await, "hello c");

    // A new version on A, rolled back on B: every node ends on the first.
    let second = upload(&three.nodes[0], "shared", &router).await;
    assert_ne!(first, second);
    let (status, body) = api(
        &three.nodes[1],
        "PUT",
        "/v1/functions/shared/live",
        format!(r#"{{"version": "{first}"}}"#).as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for node in &three.nodes {
        eventually(
            "every node rolled back",
            Duration::from_secs(10),
            || async { live_version(node, "shared").await.as_deref() == Some(first.as_str()) },
        )
        .await;
    }
    // A change refused on the node it was made on is refused as the API
    // says: the live version cannot be deleted.
    let (status, _) = api(
        &three.nodes[2],
        "DELETE",
        &format!("/v1/functions/shared/versions/{first}"),
        b"",
    )
    .await;
    assert_eq!(status, 409);
}

/// Compilations of function `name`'s versions on `gateway` so far.
async fn compiles(gateway: &Gateway, name: &str) -> f64 {
    gateway
        .metric(&format!(
            "tidegate_function_compiles_total{{function=\"{name}\"}}"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_catching_up_compiles_only_the_versions_live_at_the_end() {
    let name = format!("cluster-test-{}", uuid::Uuid::now_v7().simple());
    let mut three = Three {
        nodes: vec![member(&name, "a")],
        name: name.clone(),
    };
    // A history: four versions, each live in turn, a rollback, a deletion.
    let mut versions = Vec::new();
    for path in [
        tidegate_functions::ECHO_PATH,
        tidegate_functions::ROUTER_PATH,
        tidegate_functions::CHAT_PATH,
        tidegate_functions::FAULTY_PATH,
    ] {
        let wasm = std::fs::read(path).unwrap();
        versions.push(upload(&three.nodes[0], "history", &wasm).await);
    }
    let a = &three.nodes[0];
    let (status, body) = api(
        a,
        "PUT",
        "/v1/functions/history/live",
        format!(r#"{{"version": "{}"}}"#, versions[0]).as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api(
        a,
        "DELETE",
        &format!("/v1/functions/history/versions/{}", versions[3]),
        b"",
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = api(
        a,
        "PUT",
        "/v1/routes",
        br#"{"path": "/history", "function": "history"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // A node started afterwards records every version that is left, and
    // compiles only the live one.
    let started = Instant::now();
    three.nodes.push(member(&name, "b"));
    let b = &three.nodes[1];
    eventually("b is ready", Duration::from_secs(30), || async {
        b.admin_get("/readyz").await.0 == 200
    })
    .await;
    println!(
        "catch-up: a new node read 7 changes (4 uploads) and was ready {:?} after its start",
        started.elapsed()
    );
    assert_eq!(live_version(b, "history").await, Some(versions[0].clone()));
    let (status, body) = api(b, "GET", "/v1/functions/history", b"").await;
    assert_eq!(status, 200, "{body}");
    let shown: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(shown["versions"].as_array().unwrap().len(), 3, "{shown}");
    assert_eq!(compiles(b, "history").await, 1.0, "only the live version");
    let mut client = b.connect("/history").await;
    client.send_text("from the history").await;
    assert_eq!(text_of(&mut client).await, "from the history");
    // Another version goes live on the new node: compiled then.
    let (status, body) = api(
        b,
        "PUT",
        "/v1/functions/history/live",
        format!(r#"{{"version": "{}"}}"#, versions[1]).as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(compiles(b, "history").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_caught_up_once_serves_at_once_after_a_restart_even_without_the_broker() {
    let name = format!("cluster-test-{}", uuid::Uuid::now_v7().simple());
    let state = tempfile::tempdir().unwrap();
    // A cluster whose registry holds no change yet: the node caught up
    // when it read its own mark back.
    let mut three = Three {
        nodes: vec![Gateway::start(
            member_options(&name, "a").state(state.path()),
        )],
        name: name.clone(),
    };
    eventually("ready", Duration::from_secs(30), || async {
        three.nodes[0].admin_get("/readyz").await.0 == 200
    })
    .await;
    three.nodes[0].terminate();

    // Restarted with the broker unreachable: it does not wait to catch up.
    let proxy = crate::proxy::BrokerProxy::closed().await;
    let started = Instant::now();
    three.nodes[0] = Gateway::start(
        member_options(&name, "a")
            .state(state.path())
            .env("TIDEGATE__QUEUE__URL", proxy.url()),
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "listening without waiting for the registry: {:?}",
        started.elapsed()
    );
    eventually("ready", Duration::from_secs(10), || async {
        three.nodes[0].admin_get("/readyz").await.0 == 200
    })
    .await;
}
