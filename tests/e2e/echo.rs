//! Echo through the bundled function: byte-exact, in order, in parallel,
//! within the size limits.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::harness::{Gateway, Options, close_code, round_trip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_binary_echo_are_byte_exact_and_keep_their_type() {
    let gateway = Gateway::start(Options::default());
    let mut client = gateway.connect("/").await;

    let text = "héllo, tidegate ✓ \u{1F30A}";
    assert_eq!(
        round_trip(&mut client, Message::Text(text.into())).await,
        Message::Text(text.into())
    );

    let binary: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    assert_eq!(
        round_trip(&mut client, Message::Binary(binary.clone().into())).await,
        Message::Binary(binary.into())
    );

    assert_eq!(
        round_trip(&mut client, Message::Text("".into())).await,
        Message::Text("".into())
    );
    assert_eq!(
        round_trip(&mut client, Message::Binary(Vec::new().into())).await,
        Message::Binary(Vec::new().into())
    );

    // Exactly at the limit still passes.
    let largest = "x".repeat(128 * 1024);
    assert_eq!(
        round_trip(&mut client, Message::Text(largest.clone().into())).await,
        Message::Text(largest.into())
    );

    // Pings are answered.
    client
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(10), client.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(b"are you there".to_vec().into()));

    client.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pipelined_messages_come_back_in_order() {
    let gateway = Gateway::start(Options::default());
    let client = gateway.connect("/").await;
    let (mut sink, mut stream) = client.split();
    let sender = tokio::spawn(async move {
        for i in 0..1000 {
            sink.feed(Message::Text(format!("message {i}").into()))
                .await
                .unwrap();
        }
        sink.flush().await.unwrap();
    });
    for i in 0..1000 {
        let reply = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("reply in time")
            .expect("open")
            .expect("frame");
        assert_eq!(
            reply,
            Message::Text(format!("message {i}").into()),
            "reply {i}"
        );
    }
    sender.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_connections_each_get_their_own_replies() {
    let gateway = Gateway::start(Options::default());
    let mut clients = Vec::new();
    for c in 0..50 {
        clients.push((c, gateway.connect("/").await));
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(c, mut client)| {
            tokio::spawn(async move {
                for i in 0..20 {
                    let message = format!("client {c} message {i}");
                    let reply =
                        round_trip(&mut client, Message::Text(message.clone().into())).await;
                    assert_eq!(reply, Message::Text(message.into()));
                }
                client.close(None).await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        gateway
            .metric("tidegate_messages_received_total{route=\"/\"}")
            .await,
        1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_closes_with_1009_and_others_are_still_served() {
    let gateway = Gateway::start(Options::default());
    let mut bystander = gateway.connect("/").await;
    let mut offender = gateway.connect("/").await;

    offender
        .send(Message::Binary(vec![1u8; 128 * 1024 + 1].into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut offender).await, Some(1009));

    // A message split over frames is limited as a whole.
    let mut fragmented = gateway.connect("/").await;
    let half = "y".repeat(70 * 1024);
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let first = Frame::message(half.clone().into_bytes(), OpCode::Data(Data::Text), false);
    let second = Frame::message(half.into_bytes(), OpCode::Data(Data::Continue), true);
    fragmented.send(Message::Frame(first)).await.unwrap();
    fragmented.send(Message::Frame(second)).await.unwrap();
    assert_eq!(close_code(&mut fragmented).await, Some(1009));

    assert_eq!(
        round_trip(&mut bystander, Message::Text("still here".into())).await,
        Message::Text("still here".into())
    );
    let mut newcomer = gateway.connect("/").await;
    assert_eq!(
        round_trip(&mut newcomer, Message::Text("hello".into())).await,
        Message::Text("hello".into())
    );
    gateway
        .metric_reaches("tidegate_closes_total{code=\"1009\"}", 2.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_size_limit_is_configurable() {
    let gateway =
        Gateway::start(Options::default().env("TIDEGATE__WEBSOCKET__MAX_MESSAGE_SIZE", "1024"));
    let mut client = gateway.connect("/").await;
    let fits = "z".repeat(1024);
    assert_eq!(
        round_trip(&mut client, Message::Text(fits.clone().into())).await,
        Message::Text(fits.into())
    );
    client
        .send(Message::Text("z".repeat(1025).into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut client).await, Some(1009));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered_and_the_function_sees_connect_and_disconnect() {
    let gateway = Gateway::start(Options::default());
    let mut client = gateway.connect("/").await;
    round_trip(&mut client, Message::Text("hi".into())).await;
    client
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        })))
        .await
        .unwrap();
    // The gateway answers with a close frame of its own, then the stream ends.
    let answer = tokio::time::timeout(Duration::from_secs(10), client.next())
        .await
        .expect("an answer in time");
    assert!(
        matches!(&answer, Some(Ok(Message::Close(Some(frame)))) if frame.code == CloseCode::Normal),
        "{answer:?}"
    );
    let end = tokio::time::timeout(Duration::from_secs(10), client.next())
        .await
        .expect("the end in time");
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");

    crate::harness::eventually("on-disconnect has run", Duration::from_secs(10), || async {
        gateway
            .metric(
                "tidegate_invocations_total{event=\"disconnect\",function=\"echo\",outcome=\"ok\"}",
            )
            .await
            == 1.0
    })
    .await;
    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics["tidegate_invocations_total{event=\"connect\",function=\"echo\",outcome=\"ok\"}"],
        1.0
    );
    assert_eq!(metrics["tidegate_connections_open{route=\"/\"}"], 0.0);
}
