//! What functions can do beyond replying, end to end: chat rooms (join,
//! leave, broadcast, state kept while scaled to zero), custom routes by
//! `action` with a default, a `connect` function that refuses, a
//! `disconnect` function after an abrupt close, the connections API (both
//! path forms), group broadcasts through the API, and the push queue.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{
    BROKER, Client, Gateway, Options, SendText, chat_config, close_code, eventually, json,
    next_data, push, quiet, round_trip, text,
};

const TOKEN: &str = "0123456789abcdef-platform-token";

async fn act(client: &mut Client, message: serde_json::Value) {
    client.send_text(&message.to_string()).await;
}

fn chat_gateway() -> Gateway {
    Gateway::start(
        Options::default()
            .config(&chat_config())
            .env("TIDEGATE__RUNTIME__IDLE_TIMEOUT", "200ms")
            .env("TIDEGATE__RUNTIME__UNLOAD_AFTER", "400ms"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_rooms_reach_their_members_and_a_nickname_outlives_scaling_to_zero() {
    let gateway = chat_gateway();
    let mut members = Vec::new();
    for _ in 0..3 {
        let mut client = gateway.connect("/chat").await;
        act(
            &mut client,
            serde_json::json!({"action": "join", "room": "lobby"}),
        )
        .await;
        assert_eq!(json(&mut client).await["ok"], "join");
        members.push(client);
    }
    let mut outsider = gateway.connect("/chat").await;
    act(
        &mut members[0],
        serde_json::json!({"action": "nick", "name": "ada"}),
    )
    .await;
    assert_eq!(json(&mut members[0]).await["ok"], "nick");
    act(
        &mut members[0],
        serde_json::json!({"action": "send", "room": "lobby", "text": "hello"}),
    )
    .await;
    for member in &mut members {
        let seen = json(member).await;
        assert_eq!(
            (&seen["from"], &seen["room"], &seen["text"]),
            (
                &serde_json::json!("ada"),
                &serde_json::json!("lobby"),
                &serde_json::json!("hello")
            )
        );
    }
    quiet(&mut outsider).await;

    act(
        &mut members[1],
        serde_json::json!({"action": "leave", "room": "lobby"}),
    )
    .await;
    assert_eq!(json(&mut members[1]).await["ok"], "leave");

    // Scaled to zero: no instance, no code in memory; the nickname is the
    // gateway's to keep.
    eventually(
        "chat is scaled to zero",
        Duration::from_secs(20),
        || async {
            let metrics = gateway.metrics().await;
            let get = |series: &str| metrics.get(series).copied().unwrap_or(0.0);
            get("tidegate_function_instances{function=\"chat\"}") == 0.0
                && get("tidegate_function_code_loaded{function=\"chat\"}") == 0.0
        },
    )
    .await;
    act(
        &mut members[0],
        serde_json::json!({"action": "send", "room": "lobby", "text": "again"}),
    )
    .await;
    for index in [0, 2] {
        let seen = json(&mut members[index]).await;
        assert_eq!(seen["from"], "ada", "{seen}");
        assert_eq!(seen["text"], "again");
    }
    quiet(&mut members[1]).await;
    quiet(&mut outsider).await;
    assert!(
        gateway
            .metric("tidegate_effects_total{effect=\"broadcast\"}")
            .await
            >= 2.0
    );
}

fn routes_gateway() -> Gateway {
    Gateway::start(Options::default().config(&format!(
        r#"
        [functions.router]
        wasm = "{router}"
        [functions.echo]
        wasm = "builtin:echo"
        [routes."/r"]
        connect = "router"
        disconnect = "router"
        default = "echo"
        selection = "$request.body.action"
        routes = {{ join = "router", send = "router" }}
        [routes."/strict"]
        selection = "$request.body.action"
        routes = {{ join = "router" }}
        "#,
        router = tidegate_functions::ROUTER_PATH
    )))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_go_to_the_route_their_action_selects_and_the_rest_to_the_default() {
    let gateway = routes_gateway();
    let mut client = gateway.connect("/r").await;
    act(
        &mut client,
        serde_json::json!({"action": "join", "room": "x"}),
    )
    .await;
    let answer = json(&mut client).await;
    assert_eq!(
        (&answer["function"], &answer["action"]),
        (&"router".into(), &"join".into())
    );
    act(&mut client, serde_json::json!({"action": "send"})).await;
    assert_eq!(json(&mut client).await["action"], "send");
    // Another action, no JSON, binary: the default (echo).
    let other = serde_json::json!({"action": "other"}).to_string();
    assert_eq!(
        round_trip(&mut client, Message::Text(other.clone().into())).await,
        Message::Text(other.into())
    );
    assert_eq!(
        round_trip(&mut client, Message::Text("not json".into())).await,
        Message::Text("not json".into())
    );
    assert_eq!(
        round_trip(&mut client, Message::Binary(vec![1, 2].into())).await,
        Message::Binary(vec![1, 2].into())
    );

    // No default: a message no key selects is told so, and stays.
    let mut strict = gateway.connect("/strict").await;
    strict.send_text("{\"action\":\"nope\"}").await;
    assert_eq!(json(&mut strict).await["error"], "no-route");
    act(&mut strict, serde_json::json!({"action": "join"})).await;
    assert_eq!(json(&mut strict).await["function"], "router");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_function_refuses_with_its_status_and_disconnect_runs_after_an_abrupt_close() {
    let gateway = routes_gateway();
    for status in [403, 429] {
        let refused = gateway
            .connect_with(&format!("/r?refuse={status}"), &[])
            .await
            .err()
            .map(|(status, _)| status);
        assert_eq!(refused, Some(status));
    }

    let mut watcher = gateway.connect("/r?notify=watchers").await;
    let watched = gateway.connect("/r?notify=watchers").await;
    // Dropped without a close frame: the TCP connection just ends.
    drop(watched);
    let notice = json(&mut watcher).await;
    assert_eq!(notice["function"], "router", "{notice}");
    assert_eq!(notice["code"], 1006, "an abrupt close is 1006: {notice}");
    assert!(notice["disconnected"].as_str().is_some(), "{notice}");
}

fn api_gateway() -> Gateway {
    Gateway::start(
        Options::default()
            .config(&format!(
                r#"
                [functions.router]
                wasm = "{}"
                [functions.echo]
                wasm = "builtin:echo"
                [routes]
                "/" = "echo"
                "/watch" = "router"
                "#,
                tidegate_functions::ROUTER_PATH
            ))
            .env("TIDEGATE__ADMIN__TOKEN", TOKEN),
    )
}

/// The ids of the connections on `route`.
async fn ids(gateway: &Gateway, route: &str) -> Vec<String> {
    let (status, body) = gateway
        .admin_request(
            "GET",
            &format!("/v1/connections?route={route}"),
            TOKEN,
            "text/plain",
            b"",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The id of the one connection on `route`, once it is registered (a
/// client's handshake ends just before its connection is).
async fn only_id(gateway: &Gateway, route: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(id) = ids(gateway, route).await.pop() {
            return id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no connection on {route}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_api_sends_describes_and_closes_in_both_path_forms() {
    let gateway = api_gateway();
    let mut client = gateway.connect("/").await;
    let id = only_id(&gateway, "/").await;

    let (status, body) = gateway
        .admin_request(
            "POST",
            &format!("/v1/connections/{id}"),
            TOKEN,
            "text/plain",
            b"from the API",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        next_data(&mut client).await,
        Message::Text("from the API".into())
    );
    let (status, _) = gateway
        .admin_request(
            "POST",
            &format!("/@connections/{id}"),
            TOKEN,
            "application/octet-stream",
            &[0, 1, 2],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        next_data(&mut client).await,
        Message::Binary(vec![0, 1, 2].into())
    );

    // Over websocket.max_message_size: 413, as JSON, and nothing sent.
    let (status, body) = gateway
        .admin_request(
            "POST",
            &format!("/v1/connections/{id}"),
            TOKEN,
            "application/octet-stream",
            &vec![0; 200 << 10],
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("\"error\":\"too-large\""), "{body}");
    let (status, body) = gateway
        .admin_request("GET", &format!("/@connections/{id}"), TOKEN, "", b"")
        .await;
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["id"], id.as_str());
    assert_eq!(info["route"], "/");
    assert!(
        info["remote_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    for field in ["connected_at", "last_active_at", "node", "path", "groups"] {
        assert!(!info[field].is_null(), "{field} missing: {info}");
    }

    let (status, _) = gateway
        .admin_request(
            "DELETE",
            &format!("/v1/connections/{id}?code=4001&reason=bye"),
            TOKEN,
            "",
            b"",
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(close_code(&mut client).await, Some(4001));

    for (method, path) in [
        ("POST", format!("/v1/connections/{id}")),
        ("GET", format!("/v1/connections/{id}")),
        ("DELETE", format!("/@connections/{id}")),
        ("POST", "/@connections/nobody.0".to_owned()),
    ] {
        let mut gone = (0, String::new());
        // The close is asynchronous: the connection leaves the hub once its
        // reader stops.
        for _ in 0..100 {
            gone = gateway
                .admin_request(method, &path, TOKEN, "text/plain", b"x")
                .await;
            if gone.0 == 410 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(gone.0, 410, "{method} {path}: {}", gone.1);
        assert!(gone.1.contains("\"error\":\"gone\""), "{}", gone.1);
    }
    let (status, body) = gateway
        .admin_request("DELETE", "/v1/connections/x?code=1001", TOKEN, "", b"")
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_gets_broadcasts_through_the_api() {
    let gateway = api_gateway();
    let mut first = gateway.connect("/watch?notify=room").await;
    let mut second = gateway.connect("/watch?notify=room").await;
    let mut other = gateway.connect("/").await;
    let (status, body) = gateway
        .admin_request("GET", "/v1/groups/room", TOKEN, "", b"")
        .await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"group":"room","members":2}"#)
    );
    let (status, body) = gateway
        .admin_request(
            "POST",
            "/v1/groups/room/messages",
            TOKEN,
            "application/json",
            br#"{"news":1}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"delivered\":2"), "{body}");
    for member in [&mut first, &mut second] {
        assert_eq!(
            next_data(member).await,
            Message::Text(r#"{"news":1}"#.into())
        );
    }
    quiet(&mut other).await;
    assert_eq!(ids(&gateway, "/watch").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_queue_delivers_to_connections_and_groups_and_counts_the_rest() {
    let gateway = api_gateway();
    let queue = format!("{}.push", gateway.queue);
    let mut client = gateway.connect("/").await;
    let mut member = gateway.connect("/watch?notify=team").await;
    let id = only_id(&gateway, "/").await;
    // The consumer is up once the queue has it.
    eventually(
        "the push queue is consumed",
        Duration::from_secs(20),
        || async { gateway.log().contains("consuming the push queue") },
    )
    .await;

    push(
        &queue,
        &[("connection-id", text(&id))],
        "text/plain",
        b"pushed",
    )
    .await;
    assert_eq!(next_data(&mut client).await, Message::Text("pushed".into()));
    push(
        &queue,
        &[("group", text("team"))],
        "application/octet-stream",
        &[9],
    )
    .await;
    assert_eq!(
        next_data(&mut member).await,
        Message::Binary(vec![9].into())
    );
    push(
        &queue,
        &[("connection-id", text("nobody.0"))],
        "text/plain",
        b"x",
    )
    .await;
    push(&queue, &[], "text/plain", b"no target").await;
    push(
        &queue,
        &[
            ("connection-id", text(&id)),
            ("close", AMQPValue::LongInt(4002)),
        ],
        "text/plain",
        b"",
    )
    .await;
    assert_eq!(close_code(&mut client).await, Some(4002));
    for (outcome, count) in [
        ("delivered", 2.0),
        ("gone", 1.0),
        ("malformed", 1.0),
        ("closed", 1.0),
    ] {
        gateway
            .metric_reaches(
                &format!("tidegate_push_total{{outcome=\"{outcome}\"}}"),
                count,
            )
            .await;
    }
    // Every message was acknowledged: none is left, none waits.
    let connection = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            ShortString::from(queue.as_str()),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 0);
    let _ = connection.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_message_reaches_a_queue_bound_to_the_exchange_before_the_reply() {
    let gateway = Gateway::start(Options::default().config(&format!(
        r#"
        [functions.faulty]
        wasm = "{}"
        [routes]
        "/" = "faulty"
        "#,
        tidegate_functions::FAULTY_PATH
    )));
    let bound = crate::harness::unique_queue();
    let key = format!("orders.{}", uuid::Uuid::now_v7().simple());
    let connection = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            ShortString::from(bound.as_str()),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            ShortString::from(bound.as_str()),
            ShortString::from("amq.topic"),
            ShortString::from(key.as_str()),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut client = gateway.connect("/").await;
    let command = format!("publish {key} order 17");
    // The reply comes once the published message is confirmed.
    assert_eq!(
        round_trip(&mut client, Message::Text(command.clone().into())).await,
        Message::Text(command.into())
    );
    let published = crate::harness::drain_queue(&bound, 1, Duration::from_secs(10)).await;
    assert_eq!(crate::harness::bodies(&published), vec!["order 17"]);
    let headers = &published[0].headers;
    assert_eq!(headers.get("function").map(String::as_str), Some("faulty"));
    assert!(headers.contains_key("connection-id"), "{headers:?}");
    assert!(published[0].persistent);
    assert_eq!(
        gateway
            .metric("tidegate_effects_total{effect=\"publish\"}")
            .await,
        1.0
    );
    crate::harness::delete_queue(&bound).await;
    let _ = connection.close(200, "bye".into()).await;
}
