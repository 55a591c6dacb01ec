//! Connection limits: each refuses or closes with its status or code, is
//! counted, and leaves the gateway serving well-behaved clients.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{
    Gateway, Options, SendText, close_frame, eventually, next_data, round_trip, still_serves,
};

fn gateway(env: &[(&str, &str)]) -> Gateway {
    let mut options = Options::default();
    for (key, value) in env {
        options = options.env(key, *value);
    }
    Gateway::start(options)
}

/// With `key` set to 2, a third connection is refused with `status`, and
/// closing one of the two gives its place back.
async fn refused_over_a_limit_of_two(key: &str, status: u16, reason: &str) {
    let env = format!("TIDEGATE__SERVER__{}", key.to_ascii_uppercase());
    let gateway = gateway(&[(&env, "2")]);
    let first = gateway.connect("/").await;
    let _second = gateway.connect("/").await;
    let (refused, body) = gateway
        .connect_with("/", &[])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused, status, "{body}");
    assert!(body.contains(&format!("server.{key}")), "{body}");
    gateway
        .metric_reaches(
            &format!("tidegate_connections_rejected_total{{reason=\"{reason}\"}}"),
            1.0,
        )
        .await;
    drop(first);
    eventually(
        "the place is given back",
        Duration::from_secs(10),
        || async { gateway.connect_with("/", &[]).await.is_ok() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_address_limit_get_429() {
    refused_over_a_limit_of_two("max_connections_per_ip", 429, "per_ip_limit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_total_limit_get_503() {
    refused_over_a_limit_of_two("max_connections", 503, "connection_limit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_request_head_over_the_limit_gets_431() {
    let gateway = gateway(&[("TIDEGATE__WEBSOCKET__MAX_REQUEST_HEAD", "1024")]);
    let padding = "p".repeat(2048);
    let (status, body) = gateway
        .connect_with("/", &[("x-padding", &padding)])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status, 431, "{body}");
    assert!(body.contains("websocket.max_request_head"), "{body}");
    still_serves(&gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_handshake_limit_clients_wait_their_turn() {
    let gateway = gateway(&[
        ("TIDEGATE__SERVER__MAX_HANDSHAKES", "1"),
        ("TIDEGATE__SERVER__TLS_HANDSHAKE_TIMEOUT", "1s"),
    ]);
    // A silent client takes the only handshake place...
    let _silent = TcpStream::connect(gateway.wss).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ... so the next one is not accepted until it is dropped, then served.
    let mut client = tokio::time::timeout(Duration::from_secs(30), gateway.connect("/"))
        .await
        .expect("served once the place is free");
    gateway
        .metric_reaches(
            "tidegate_connections_rejected_total{reason=\"tls_handshake_timeout\"}",
            1.0,
        )
        .await;
    assert_eq!(
        round_trip(&mut client, Message::Text("my turn".into())).await,
        Message::Text("my turn".into())
    );
}

/// Wait until the gateway closes `tcp`; how long that took since
/// `started` (taken before connecting: the gateway's clock starts at
/// accept, which can come before this task runs again).
async fn dropped_after(mut tcp: TcpStream, started: Instant) -> Duration {
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the gateway did not drop the connection");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_dropped_after_the_tls_handshake_timeout() {
    let gateway = gateway(&[("TIDEGATE__SERVER__TLS_HANDSHAKE_TIMEOUT", "500ms")]);
    let started = Instant::now();
    let tcp = TcpStream::connect(gateway.wss).await.unwrap();
    let took = dropped_after(tcp, started).await;
    assert!(took >= Duration::from_millis(400), "{took:?}");
    gateway
        .metric_reaches(
            "tidegate_connections_rejected_total{reason=\"tls_handshake_timeout\"}",
            1.0,
        )
        .await;
    still_serves(&gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_no_upgrade_request_is_dropped_after_the_handshake_timeout() {
    let gateway = gateway(&[("TIDEGATE__SERVER__HANDSHAKE_TIMEOUT", "500ms")]);
    // TLS completes, then nothing. (The gateway's clock starts at accept.)
    let started = Instant::now();
    let mut tls = crate::harness::tls_connect(&gateway).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf))
        .await
        .expect("the gateway drops the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    gateway
        .metric_reaches(
            "tidegate_connections_rejected_total{reason=\"handshake_timeout\"}",
            1.0,
        )
        .await;
    still_serves(&gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_with_1001_and_activity_keeps_it_open() {
    let gateway = gateway(&[("TIDEGATE__WEBSOCKET__IDLE_TIMEOUT", "2s")]);
    let mut idle = gateway.connect("/").await;
    let mut busy = gateway.connect("/").await;
    // Pings count as activity.
    for _ in 0..10 {
        busy.send(Message::Ping(vec![1].into())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, reason) = close_frame(&mut idle).await.expect("a close frame");
    assert_eq!(code, 1001);
    assert!(reason.contains("websocket.idle_timeout"), "{reason}");
    assert_eq!(
        round_trip(&mut busy, Message::Text("awake".into())).await,
        Message::Text("awake".into()),
        "3 s of pings every 300 ms kept it open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_arrives_while_the_gateway_is_stalled_is_activity_not_idleness() {
    let gateway = gateway(&[("TIDEGATE__WEBSOCKET__IDLE_TIMEOUT", "1s")]);
    let mut client = gateway.connect("/").await;
    // The connection is up and its idle timer running.
    round_trip(&mut client, Message::Text("first".into())).await;
    // The gateway stalls past the idle limit (stopped), while a message
    // reaches its socket: when it runs again, the message is there. (If
    // the test fails in between, dropping the gateway kills it, stopped
    // or not.)
    gateway.signal("STOP");
    client.send_text("still here").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gateway.signal("CONT");
    assert_eq!(
        next_data(&mut client).await,
        Message::Text("still here".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_with_1001_at_its_maximum_duration() {
    let gateway = gateway(&[("TIDEGATE__WEBSOCKET__MAX_DURATION", "1s")]);
    let mut client = gateway.connect("/").await;
    // Busy all along: the limit holds even for an active client.
    let closed = loop {
        client.send(Message::Text("tick".into())).await.ok();
        match tokio::time::timeout(Duration::from_millis(100), client.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) | Err(_) => continue,
            Ok(Some(Err(e))) => panic!("{e}"),
            Ok(None) => panic!("closed without a close frame"),
        }
    };
    let frame = closed.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1001);
    assert!(
        frame.reason.contains("websocket.max_duration"),
        "{}",
        frame.reason
    );
    still_serves(&gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_not_on_the_allow_list_gets_403() {
    let gateway = gateway(&[(
        "TIDEGATE__WEBSOCKET__ALLOWED_ORIGINS",
        "https://app.example.com,https://admin.example.com",
    )]);
    let (status, body) = gateway
        .connect_with("/", &[("origin", "https://evil.example")])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("websocket.allowed_origins"), "{body}");
    let mut allowed = gateway
        .connect_with("/", &[("origin", "https://admin.example.com")])
        .await
        .expect("an allowed origin connects");
    assert_eq!(
        round_trip(&mut allowed, Message::Text("hi".into())).await,
        Message::Text("hi".into())
    );
    // Clients that are not browsers send no Origin.
    still_serves(&gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_the_message_rate_is_closed_with_1008() {
    let gateway = gateway(&[("TIDEGATE__WEBSOCKET__MAX_MESSAGE_RATE", "20")]);
    let mut client = gateway.connect("/").await;
    for i in 0..200 {
        if client
            .feed(Message::Text(format!("{i}").into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = client.flush().await;
    let (code, reason) = close_frame(&mut client).await.expect("a close frame");
    assert_eq!(code, 1008);
    assert!(reason.contains("websocket.max_message_rate"), "{reason}");
    // Within the rate, all is well.
    let mut polite = gateway.connect("/").await;
    for i in 0..5 {
        let text = format!("polite {i}");
        assert_eq!(
            round_trip(&mut polite, Message::Text(text.clone().into())).await,
            Message::Text(text.into())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_dropped_as_a_slow_consumer() {
    let gateway = gateway(&[
        ("TIDEGATE__WEBSOCKET__SEND_TIMEOUT", "1s"),
        ("TIDEGATE__WEBSOCKET__SEND_QUEUE", "4"),
        ("TIDEGATE__WEBSOCKET__MAX_MESSAGE_RATE", "100000"),
    ]);
    let mut reader_less = gateway.connect("/").await;
    // Keep sending 64 KiB messages and never read a reply: the replies
    // fill the socket buffers, the gateway's queue fills, and the client
    // is dropped once a write has waited for 1 s.
    let payload = vec![7u8; 64 << 10];
    let sent = tokio::time::timeout(Duration::from_secs(60), async {
        let mut sent = 0u32;
        while reader_less
            .send(Message::Binary(payload.clone().into()))
            .await
            .is_ok()
        {
            sent += 1;
        }
        sent
    })
    .await
    .expect("the gateway drops a client that does not read");
    assert!(sent > 4, "only {sent} messages went out");
    gateway
        .metric_reaches("tidegate_closes_total{code=\"slow_consumer\"}", 1.0)
        .await;
    crate::harness::all_released(&gateway, Duration::from_secs(10)).await;
    still_serves(&gateway).await;
}

/// Wait until the gateway closes `tcp` without a byte; `None` if it is
/// still open after `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Option<()> {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(limit, tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Some(()),
        Ok(Ok(n)) => panic!("the gateway sent {n} bytes to a refused socket"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_every_handshake_place() {
    let gateway = gateway(&[
        ("TIDEGATE__SERVER__MAX_HANDSHAKES", "8"),
        ("TIDEGATE__SERVER__MAX_HANDSHAKES_PER_IP", "4"),
        ("TIDEGATE__SERVER__TLS_HANDSHAKE_TIMEOUT", "60s"),
    ]);
    // Eight silent sockets from one address: four hold handshake places,
    // the other four are closed at once, without TLS.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(crate::harness::tcp_from("127.0.0.1", gateway.wss).await);
    }
    let mut closed = 0;
    for tcp in &mut silent {
        if closed_within(tcp, Duration::from_millis(500))
            .await
            .is_some()
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 4, "sockets over the per-address limit are closed");
    gateway
        .metric_reaches(
            "tidegate_connections_rejected_total{reason=\"per_ip_handshake_limit\"}",
            4.0,
        )
        .await;
    // A client from another address still finds a place, long before the
    // silent sockets' TLS handshake timeout.
    let endpoint = gateway.endpoint();
    let mut client = tokio::time::timeout(Duration::from_secs(20), async {
        let tcp = crate::harness::tcp_from("127.0.0.2", gateway.wss).await;
        endpoint.connect_on(tcp, "/").await.expect("served")
    })
    .await
    .expect("a client from another address is served at once");
    assert_eq!(
        round_trip(&mut client, Message::Text("still here".into())).await,
        Message::Text("still here".into())
    );
}
