//! Three nodes of one cluster, each its own `tidegate` process with its
//! own state directory, and what the cluster tests do with them.

use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::Message;

use crate::harness::{
    Client, Gateway, Options, SendText, chat_config, delete_exchanges, eventually, next_data,
};

pub const TOKEN: &str = "0123456789abcdef-cluster-token";

/// Three nodes `a`, `b`, `c` of one cluster (a name of their own), each
/// serving the chat function on `/chat`; waits until each sees all three.
pub struct Three {
    pub nodes: Vec<Gateway>,
    pub name: String,
}

/// Node `node` of cluster `name`, serving chat on `/chat` and echo on `/`.
pub fn member(name: &str, node: &str) -> Gateway {
    member_with(name, node, &[])
}

/// [`member`] with more `TIDEGATE__*` settings.
pub fn member_with(name: &str, node: &str, settings: &[(&str, &str)]) -> Gateway {
    let mut options = member_options(name, node);
    for (key, value) in settings {
        options = options.env(key, *value);
    }
    Gateway::start(options)
}

/// How [`member`] starts node `node` of cluster `name`.
pub fn member_options(name: &str, node: &str) -> Options {
    Options::default()
        .config(&format!(
            "{}\n[functions.echo]\nwasm = \"{}\"\n",
            chat_config().replace("[routes]", "[routes]\n\"/\" = \"echo\""),
            tidegate_functions::ECHO_PATH
        ))
        .env("TIDEGATE__ADMIN__TOKEN", TOKEN)
        .env("TIDEGATE__SERVER__NODE_ID", node)
        .env("TIDEGATE__CLUSTER__ENABLED", "true")
        .env("TIDEGATE__CLUSTER__NAME", name)
        .env("TIDEGATE__CLUSTER__HEARTBEAT_INTERVAL", "250ms")
        .env("TIDEGATE__CLUSTER__REQUEST_TIMEOUT", "2s")
}

/// Wait until each of `nodes` sees `ids` (and no other node).
pub async fn see_each_other(nodes: &[Gateway], ids: &[&str]) {
    for node in nodes {
        eventually(
            "every node sees the others",
            Duration::from_secs(60),
            || async move {
                let mut seen = nodes_seen(node).await;
                seen.sort();
                seen == ids
            },
        )
        .await;
    }
}

impl Three {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(settings: &[(&str, &str)]) -> Self {
        let name = format!("cluster-test-{}", uuid::Uuid::now_v7().simple());
        let nodes: Vec<Gateway> = ["a", "b", "c"]
            .into_iter()
            .map(|node| member_with(&name, node, settings))
            .collect();
        let three = Self { nodes, name };
        see_each_other(&three.nodes, &["a", "b", "c"]).await;
        three
    }
}

impl Drop for Three {
    /// The nodes stop first (their queues go with them), then the
    /// cluster's exchanges are deleted, also when the test failed.
    fn drop(&mut self) {
        self.nodes.clear();
        let exchanges: Vec<String> = ["heartbeats", "nodes", "groups"]
            .iter()
            .map(|kind| format!("{}.{kind}", self.name))
            .collect();
        let registry = format!("{}.registry", self.name);
        // Its own thread: Drop runs inside the test's runtime.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    delete_exchanges(&exchanges).await;
                    crate::harness::delete_queue(&registry).await;
                });
        })
        .join();
    }
}

/// The ids of the nodes `gateway` has in its view.
pub async fn nodes_seen(gateway: &Gateway) -> Vec<String> {
    let (status, body) = api(gateway, "GET", "/v1/nodes", b"").await;
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    listed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap().to_owned())
        .collect()
}

pub async fn api(gateway: &Gateway, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    gateway
        .admin_request(method, path, TOKEN, "text/plain", body)
        .await
}

/// A client on `/chat` of `gateway`, and its connection id.
pub async fn client(gateway: &Gateway) -> (Client, String) {
    let (status, before) = api(gateway, "GET", "/v1/connections?route=/chat", b"").await;
    assert_eq!(status, 200);
    let client = gateway.connect("/chat").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = api(gateway, "GET", "/v1/connections?route=/chat", b"").await;
        let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
        let new = listed["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .find(|id| !before.contains(id.as_str()));
        if let Some(id) = new {
            return (client, id);
        }
        assert!(Instant::now() < deadline, "the connection is never listed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn chat(client: &mut Client, message: serde_json::Value) {
    client.send_text(&message.to_string()).await;
}

pub async fn text_of(client: &mut Client) -> String {
    match next_data(client).await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

pub async fn count(gateway: &Gateway) -> usize {
    let (status, body) = api(gateway, "GET", "/v1/connections?route=/chat", b"").await;
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    listed["connections"].as_array().unwrap().len()
}

/// The live version of function `name` on `gateway`, if it has one.
pub async fn live_version(gateway: &Gateway, name: &str) -> Option<String> {
    let (status, body) = api(gateway, "GET", &format!("/v1/functions/{name}"), b"").await;
    if status != 200 {
        return None;
    }
    let shown: serde_json::Value = serde_json::from_str(&body).unwrap();
    shown["live"].as_str().map(str::to_owned)
}

pub async fn upload(gateway: &Gateway, name: &str, wasm: &[u8]) -> String {
    let (status, body) = gateway
        .admin_request(
            "PUT",
            &format!("/v1/functions/{name}"),
            TOKEN,
            "application/wasm",
            wasm,
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    answer["version"].as_str().unwrap().to_owned()
}
