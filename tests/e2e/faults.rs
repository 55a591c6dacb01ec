//! A misbehaving function fails only the message that made it misbehave.

use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Gateway, Options, SendText, close_code, round_trip};

fn faulty_gateway() -> Gateway {
    Gateway::start(
        Options::default()
            .config(&format!(
                r#"
                [functions.faulty]
                wasm = "{}"
                [routes]
                "/" = "faulty"
                "#,
                tidegate_functions::FAULTY_PATH
            ))
            .env("TIDEGATE__RUNTIME__TIMEOUT", "300ms"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_or_a_timeout_closes_with_1011_and_others_are_still_served() {
    let gateway = faulty_gateway();
    let mut bystander = gateway.connect("/").await;
    for command in ["panic", "loop"] {
        let mut offender = gateway.connect("/").await;
        offender.send_text(command).await;
        assert_eq!(close_code(&mut offender).await, Some(1011), "{command}");
        assert_eq!(
            round_trip(&mut bystander, Message::Text("still fine".into())).await,
            Message::Text("still fine".into()),
            "after {command}"
        );
    }
    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics["tidegate_invocations_total{event=\"message\",function=\"faulty\",outcome=\"trap\"}"],
        1.0
    );
    assert_eq!(
        metrics["tidegate_invocations_total{event=\"message\",function=\"faulty\",outcome=\"timeout\"}"],
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_error_is_sent_as_an_error_message_and_the_connection_stays() {
    let gateway = faulty_gateway();
    let mut client = gateway.connect("/").await;
    let reply = round_trip(&mut client, Message::Text("bad".into())).await;
    assert_eq!(
        reply,
        Message::Text(r#"{"error":"bad-request","message":"asked to refuse"}"#.into())
    );
    assert_eq!(
        round_trip(&mut client, Message::Text("log".into())).await,
        Message::Text("log".into())
    );
    // Function output lands in the gateway's log, tagged with its name.
    crate::harness::eventually(
        "the function's lines are logged",
        std::time::Duration::from_secs(5),
        || {
            let log = gateway.log();
            async move {
                log.contains("a line on stdout")
                    && log.contains("a line through the logging import")
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_followed_by_a_message_without_reply_is_not_held_back() {
    use futures_util::{SinkExt, StreamExt};
    let gateway = faulty_gateway();
    let mut client = gateway.connect("/").await;
    // Both in one write, so the gateway reads them together.
    client.feed(Message::Text("first".into())).await.unwrap();
    client.feed(Message::Text("silent".into())).await.unwrap();
    client.flush().await.unwrap();
    let reply = tokio::time::timeout(std::time::Duration::from_secs(5), client.next())
        .await
        .expect("the reply to the first message is not held back")
        .unwrap()
        .unwrap();
    assert_eq!(reply, Message::Text("first".into()));
}
