//! The queue copy: one durable AMQP message per inbound message, with the
//! contract's properties, kept through a broker outage.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Gateway, Options, bodies, drain_queue, eventually, round_trip};
use crate::proxy::BrokerProxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_copied_to_the_queue_with_its_properties() {
    let gateway = Gateway::start(Options::default().env("TIDEGATE__SERVER__NODE_ID", "node-7"));
    let mut client = gateway.connect("/rooms/1?user=ada").await;
    let text = "héllo ✓";
    let binary = vec![0u8, 1, 2, 254, 255];
    round_trip(&mut client, Message::Text(text.into())).await;
    round_trip(&mut client, Message::Binary(binary.clone().into())).await;

    // The reply is a receipt: the copies are in the queue, or in the spool
    // on their way there if the broker link was still coming up.
    let copies = drain_queue(&gateway.queue, 2, Duration::from_secs(10)).await;
    assert_eq!(copies.len(), 2, "{copies:?}");
    let (first, second) = (&copies[0], &copies[1]);
    assert_eq!(first.body, text.as_bytes());
    assert_eq!(first.content_type, "text/plain; charset=utf-8");
    assert_eq!(second.body, binary);
    assert_eq!(second.content_type, "application/octet-stream");

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for copy in &copies {
        assert!(copy.persistent, "copies are persistent");
        assert!(
            copy.timestamp.abs_diff(now) < 120,
            "timestamp {}",
            copy.timestamp
        );
        assert_eq!(copy.headers["route"], "/");
        assert_eq!(copy.headers["function"], "echo");
        assert_eq!(copy.headers["node"], "node-7");
        assert_eq!(copy.headers["function-version"].len(), 16);
        assert!(copy.headers["connection-id"].starts_with("node-7."));
    }
    assert_eq!(
        first.headers["connection-id"],
        second.headers["connection-id"]
    );
    assert_ne!(first.message_id, second.message_id);
    assert!(!first.message_id.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_pipelined_messages_are_in_the_queue_in_order() {
    let gateway = Gateway::start(Options::default());
    let client = gateway.connect("/").await;
    let (mut sink, mut stream) = client.split();
    for i in 0..500 {
        sink.feed(Message::Text(format!("{i}").into()))
            .await
            .unwrap();
    }
    sink.flush().await.unwrap();
    for _ in 0..500 {
        stream.next().await.unwrap().unwrap();
    }
    let copies = drain_queue(&gateway.queue, 500, Duration::from_secs(10)).await;
    let stored = bodies(&copies);
    let expected: Vec<String> = (0..500).map(|i| i.to_string()).collect();
    assert_eq!(stored, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_broker_is_down_messages_are_spooled_then_replayed_in_order_exactly_once() {
    let proxy = BrokerProxy::closed().await;
    let gateway = Gateway::start(
        Options::default()
            .env("TIDEGATE__QUEUE__URL", proxy.url())
            .env("TIDEGATE__QUEUE__RECONNECT_INTERVAL", "200ms")
            .env("TIDEGATE__QUEUE__CONNECT_TIMEOUT", "2s"),
    );
    let (status, body) = gateway.admin_get("/readyz").await;
    assert_eq!(status, 200, "ready while spooling: {body}");
    assert!(body.contains("spooling"), "{body}");

    let mut client = gateway.connect("/").await;
    for i in 0..200 {
        let message = format!("outage {i}");
        assert_eq!(
            round_trip(&mut client, Message::Text(message.clone().into())).await,
            Message::Text(message.into())
        );
    }
    assert_eq!(gateway.metric("tidegate_spool_messages").await, 200.0);
    assert_eq!(gateway.metric("tidegate_queue_connected").await, 0.0);

    proxy.open();
    eventually("the spool is replayed", Duration::from_secs(30), || async {
        gateway.metric("tidegate_spool_messages").await == 0.0
            && gateway.metric("tidegate_queue_connected").await == 1.0
    })
    .await;
    for i in 200..250 {
        let message = format!("outage {i}");
        round_trip(&mut client, Message::Text(message.into())).await;
    }

    let copies = drain_queue(&gateway.queue, 250, Duration::from_secs(10)).await;
    let stored = bodies(&copies);
    let expected: Vec<String> = (0..250).map(|i| format!("outage {i}")).collect();
    assert_eq!(stored, expected, "every message exactly once, in order");
    let ids: HashSet<&str> = copies.iter().map(|c| c.message_id.as_str()).collect();
    assert_eq!(ids.len(), 250);
    assert_eq!(
        gateway
            .metric("tidegate_queue_publishes_total{outcome=\"replayed\"}")
            .await,
        200.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_messages_with_1013_instead_of_dropping_them() {
    let proxy = BrokerProxy::closed().await;
    let gateway = Gateway::start(
        Options::default()
            .env("TIDEGATE__QUEUE__URL", proxy.url())
            .env("TIDEGATE__QUEUE__SPOOL_MAX_BYTES", (1u64 << 20).to_string()),
    );
    let mut client = gateway.connect("/").await;
    let chunk = "s".repeat(100 * 1024);
    let mut echoed = 0;
    let code = loop {
        client
            .send(Message::Text(chunk.clone().into()))
            .await
            .unwrap();
        match client.next().await {
            Some(Ok(Message::Text(_))) => echoed += 1,
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            other => panic!("unexpected {other:?}"),
        }
        assert!(echoed < 20, "the spool never filled");
    };
    assert_eq!(code, Some(1013));
    assert!(echoed >= 9, "{echoed} messages fit in 1 MiB");
    assert_eq!(
        gateway.metric("tidegate_spool_messages").await,
        echoed as f64
    );
    let (status, body) = gateway.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_async_mode_replies_do_not_wait_but_every_copy_still_arrives_in_order() {
    let gateway = Gateway::start(Options::default().env("TIDEGATE__QUEUE__MODE", "async"));
    let client = gateway.connect("/").await;
    let (mut sink, mut stream) = client.split();
    for i in 0..300 {
        sink.feed(Message::Text(format!("async {i}").into()))
            .await
            .unwrap();
    }
    sink.flush().await.unwrap();
    for i in 0..300 {
        let reply = stream.next().await.unwrap().unwrap();
        assert_eq!(reply, Message::Text(format!("async {i}").into()));
    }
    let copies = drain_queue(&gateway.queue, 300, Duration::from_secs(10)).await;
    let stored = bodies(&copies);
    let expected: Vec<String> = (0..300).map(|i| format!("async {i}")).collect();
    assert_eq!(stored, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_copies_off_messages_only_go_through_the_function() {
    let gateway = Gateway::start(Options::default().env("TIDEGATE__QUEUE__MODE", "off"));
    let mut client = gateway.connect("/").await;
    assert_eq!(
        round_trip(&mut client, Message::Text("no copy".into())).await,
        Message::Text("no copy".into())
    );
    let (status, body) = gateway.admin_get("/readyz").await;
    assert_eq!(status, 200);
    assert!(body.contains("copies off"), "{body}");
    let metrics = gateway.metrics().await;
    assert!(
        !metrics
            .keys()
            .any(|series| series.starts_with("tidegate_queue_publishes_total{")),
        "nothing is published"
    );
}
