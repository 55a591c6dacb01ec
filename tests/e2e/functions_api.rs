//! The functions and routes of the management API: uploads, versions,
//! rollback, deletes, refusals that change nothing, the token on every
//! path, a restart that keeps (and does not recompile) everything, and a
//! deploy under load that drops no socket and no message.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Client, Gateway, Options, eventually, next_data, round_trip};

const TOKEN: &str = "0123456789abcdef-functions-api";

/// The management API of a gateway, with or without the token.
struct Api {
    client: reqwest::Client,
    base: String,
    token: Option<&'static str>,
}

impl Api {
    fn of(gateway: &Gateway) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            // A connection per request: one answered 401 before its body
            // was read is closed by the gateway, not reused.
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("an HTTP client"),
            base: format!("http://{}", gateway.admin),
            token: Some(TOKEN),
        }
    }

    fn with_token(&self, token: Option<&'static str>) -> Self {
        Self {
            client: self.client.clone(),
            base: self.base.clone(),
            token,
        }
    }

    /// Status and JSON body (`null` when empty).
    async fn call(&self, method: Method, path: &str, body: impl Into<Vec<u8>>) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .body(body.into());
        if let Some(token) = self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("the admin API answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
        };
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, Vec::new()).await
    }

    async fn put(&self, path: &str, body: impl Into<Vec<u8>>) -> (u16, Value) {
        self.call(Method::PUT, path, body).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(Method::DELETE, path, Vec::new()).await
    }

    /// Upload a component; 201 or 200 expected. Its version.
    async fn upload(&self, name: &str, wasm: &[u8]) -> String {
        let (status, body) = self.put(&format!("/v1/functions/{name}"), wasm).await;
        assert!(status == 201 || status == 200, "{status} {body}");
        body["version"].as_str().expect("a version").to_owned()
    }

    async fn route(&self, path: &str, function: &str) {
        let spec = json!({ "path": path, "function": function }).to_string();
        let (status, body) = self.put("/v1/routes", spec).await;
        assert!(status == 201 || status == 200, "{status} {body}");
    }
}

fn echo() -> Vec<u8> {
    std::fs::read(tidegate_functions::ECHO_PATH).expect("echo component")
}

/// A second handler that answers differently: `{"function":"router",...}`.
fn router() -> Vec<u8> {
    std::fs::read(tidegate_functions::ROUTER_PATH).expect("router component")
}

fn with_token() -> Options {
    Options::default().env("TIDEGATE__ADMIN__TOKEN", TOKEN)
}

/// Which version answered `sent`: the echo (`echo`) or the router
/// (`router`); panics on any other answer.
fn answered_by(sent: &str, reply: &Message) -> &'static str {
    let Message::Text(text) = reply else {
        panic!("{reply:?} answered {sent:?}");
    };
    if text.as_str() == sent {
        return "echo";
    }
    let value: Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("{text} for {sent}"));
    assert_eq!(value["function"], "router", "{text}");
    assert_eq!(
        value["echo"], sent,
        "the reply is to this very message: {text}"
    );
    "router"
}

async fn say(client: &mut Client, text: &str) -> &'static str {
    let reply = round_trip(client, Message::Text(text.into())).await;
    answered_by(text, &reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_is_uploaded_invoked_rolled_back_and_deleted() {
    let gateway = Gateway::start(with_token());
    let api = Api::of(&gateway);

    let (status, first) = api.put("/v1/functions/hello", echo()).await;
    assert_eq!(status, 201, "{first}");
    let v1 = first["version"].as_str().unwrap().to_owned();
    assert_eq!(v1.len(), 16);
    assert!(first["digest"].as_str().unwrap().starts_with(&v1));
    assert_eq!(first["size"], echo().len());
    assert_eq!(first["name"], "hello");
    assert!(first["created"].as_str().unwrap().ends_with('Z'));
    let (status, again) = api.put("/v1/functions/hello", echo()).await;
    assert_eq!(status, 200, "the same digest is the same version: {again}");
    assert_eq!(again["version"], v1.as_str());

    let (status, route) = api
        .put("/v1/routes", r#"{"path": "/hello", "function": "hello"}"#)
        .await;
    assert_eq!((status, &route["origin"]), (201, &json!("api")), "{route}");
    let mut client = gateway.connect("/hello").await;
    assert_eq!(say(&mut client, "one").await, "echo");

    // A new version is live at once, for the same socket's next message.
    let v2 = api.upload("hello", &router()).await;
    assert_ne!(v1, v2);
    assert_eq!(say(&mut client, "two").await, "router");
    let (_, listed) = api.get("/v1/functions").await;
    let hello = listed["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "hello")
        .expect("listed")
        .clone();
    assert_eq!(hello["live"], v2.as_str());
    assert_eq!(hello["versions"], 2);
    assert_eq!(hello["origin"], "api");
    let (_, shown) = api.get("/v1/functions/hello").await;
    let versions = shown["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "{shown}");
    assert_eq!(versions[0]["version"], v1.as_str());
    assert_eq!(versions[0]["live"], false);
    assert!(versions[0]["invocations"].as_u64().unwrap() >= 2, "{shown}");
    assert_eq!(versions[1]["live"], true);

    // Rolled back.
    let (status, body) = api
        .put(
            "/v1/functions/hello/live",
            json!({ "version": v1 }).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(say(&mut client, "three").await, "echo");

    let (status, body) = api
        .delete(&format!("/v1/functions/hello/versions/{v1}"))
        .await;
    assert_eq!(status, 409, "the live version stays: {body}");
    let (status, _) = api
        .delete(&format!("/v1/functions/hello/versions/{v2}"))
        .await;
    assert_eq!(status, 204);
    let (status, body) = api
        .put(
            "/v1/functions/hello/live",
            json!({ "version": v2 }).to_string(),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = api.delete("/v1/functions/hello").await;
    assert_eq!(status, 409, "a route uses it: {body}");
    assert!(
        body["message"].as_str().unwrap().contains("/hello"),
        "{body}"
    );
    assert_eq!(api.delete("/v1/routes?path=/hello").await.0, 204);
    assert_eq!(api.delete("/v1/routes?path=/hello").await.0, 404);
    // The open connection still runs on the deleted route's function.
    let (status, body) = api.delete("/v1/functions/hello").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(say(&mut client, "four").await, "echo");
    client.close(None).await.expect("close");
    eventually(
        "the function can go once its last connection closed",
        Duration::from_secs(10),
        || async { api.delete("/v1/functions/hello").await.0 == 204 },
    )
    .await;
    assert_eq!(api.get("/v1/functions/hello").await.0, 404);

    // The config file's function and route are not the API's to change.
    for (method, path, body) in [
        (Method::PUT, "/v1/functions/echo", echo()),
        (Method::DELETE, "/v1/functions/echo", Vec::new()),
        (
            Method::PUT,
            "/v1/functions/echo/live",
            br#"{"version": "0000000000000000"}"#.to_vec(),
        ),
        (Method::DELETE, "/v1/routes?path=/", Vec::new()),
        (
            Method::PUT,
            "/v1/routes",
            br#"{"path": "/", "function": "echo"}"#.to_vec(),
        ),
    ] {
        let (status, answer) = api.call(method.clone(), path, body).await;
        assert_eq!(status, 409, "{method} {path}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("config file"),
            "{answer}"
        );
    }
    let (_, routes) = api.get("/v1/routes").await;
    assert_eq!(
        routes,
        json!({"routes": [{"path": "/", "function": "echo", "origin": "config"}]})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_upload_gets_its_4xx_and_changes_nothing() {
    let gateway = Gateway::start(with_token().env("TIDEGATE__ADMIN__MAX_UPLOAD_SIZE", "200000"));
    let api = Api::of(&gateway);
    let (_, before) = api.get("/v1/functions").await;
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    // A valid component that exports nothing: not of the handler world.
    let other_world = b"\0asm\x0d\0\x01\0".to_vec();
    for (name, body, status, kind) in [
        ("f", b"not wasm at all".to_vec(), 400, "invalid-component"),
        ("f", core_module, 400, "invalid-component"),
        ("f", other_world, 400, "invalid-component"),
        ("f", Vec::new(), 400, "invalid-component"),
        ("f", vec![0u8; 200_001], 413, "too-large"),
        ("Bad_Name", echo(), 400, "bad-request"),
        (&"a".repeat(64), echo(), 400, "bad-request"),
        ("-leading-dash", echo(), 400, "bad-request"),
    ] {
        let (got, answer) = api.put(&format!("/v1/functions/{name}"), body).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(kind)),
            "{name}: {answer}"
        );
        assert!(!answer["message"].as_str().unwrap().is_empty());
    }
    let (_, after) = api.get("/v1/functions").await;
    assert_eq!(before, after);
    let metrics = gateway.metrics().await;
    assert!(
        !metrics
            .keys()
            .any(|series| series.contains("function=\"f\"")),
        "a refused upload leaves no series"
    );
    assert!(
        !gateway
            .state
            .path()
            .join("functions")
            .join("index.json")
            .exists(),
        "nothing was written"
    );
    // Bad route bodies and queries.
    for body in [
        "{",
        r#"{"path": "/x"}"#,
        r#"{"path": "x", "function": "echo"}"#,
        r#"{"path": "/x", "function": "echo", "fucntion": "y"}"#,
    ] {
        let (status, answer) = api.put("/v1/routes", body).await;
        assert_eq!(status, 400, "{body}: {answer}");
    }
    let (status, answer) = api
        .put("/v1/routes", r#"{"path": "/x", "function": "nope"}"#)
        .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("nope"),
        "{answer}"
    );
    assert_eq!(api.delete("/v1/routes").await.0, 400);
    assert_eq!(api.put("/v1/functions/echo/live", "{}").await.0, 400);
    assert_eq!(api.put("/v1/functions/f?live=maybe", echo()).await.0, 400);
    assert_eq!(
        api.call(Method::POST, "/v1/functions/f", Vec::new())
            .await
            .0,
        405
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_management_path_needs_the_token() {
    let gateway = Gateway::start(with_token());
    let api = Api::of(&gateway);
    for token in [None, Some("wrong-token-0123456789")] {
        let api = api.with_token(token);
        for (method, path) in [
            (Method::GET, "/v1/functions"),
            (Method::PUT, "/v1/functions/f"),
            (Method::GET, "/v1/functions/echo"),
            (Method::DELETE, "/v1/functions/echo"),
            (Method::PUT, "/v1/functions/echo/live"),
            (
                Method::DELETE,
                "/v1/functions/echo/versions/0123456789abcdef",
            ),
            (Method::GET, "/v1/routes"),
            (Method::PUT, "/v1/routes"),
            (Method::DELETE, "/v1/routes?path=/"),
            (Method::GET, "/v1/nothing-here"),
        ] {
            let (status, answer) = api.call(method.clone(), path, echo()).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {answer}");
            assert_eq!(answer["error"], "unauthorized");
        }
    }
    let (_, functions) = api.get("/v1/functions").await;
    assert_eq!(
        functions["functions"].as_array().unwrap().len(),
        1,
        "{functions}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_routes_survive_a_restart_without_compiling_again() {
    let state = tempfile::tempdir().unwrap();
    let options = with_token().state(state.path());
    let mut gateway = Gateway::start(options.clone());
    let api = Api::of(&gateway);
    let v1 = api.upload("kept", &echo()).await;
    let (status, _) = api.put("/v1/functions/kept?live=false", router()).await;
    assert_eq!(status, 201);
    api.route("/kept", "kept").await;
    assert!(gateway.terminate().success());

    let gateway = Gateway::start(options);
    let api = Api::of(&gateway);
    let (_, shown) = api.get("/v1/functions/kept").await;
    assert_eq!(shown["live"], v1.as_str(), "{shown}");
    assert_eq!(shown["versions"].as_array().unwrap().len(), 2, "{shown}");
    let (_, routes) = api.get("/v1/routes").await;
    assert!(
        routes["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["path"] == "/kept" && r["origin"] == "api"),
        "{routes}"
    );
    let mut client = gateway.connect("/kept").await;
    assert_eq!(say(&mut client, "still here").await, "echo");
    // Loaded from the artifacts the first run sealed: nothing compiled,
    // neither the upload nor the config file's echo.
    let metrics = gateway.metrics().await;
    let compiles: f64 = metrics
        .iter()
        .filter(|(series, _)| {
            series.starts_with("tidegate_function_compiles_total{") && series.contains("version=")
        })
        .map(|(_, value)| value)
        .sum();
    assert_eq!(compiles, 0.0, "{metrics:?}");
    assert_eq!(
        metrics
            [&format!("tidegate_function_code_loads_total{{function=\"kept\",version=\"{v1}\"}}")],
        1.0
    );
    assert!(
        gateway
            .log()
            .contains("uploaded functions and API routes restored")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_under_load_drops_no_socket_and_no_message() {
    const CLIENTS: usize = 20;
    let gateway = Gateway::start(with_token());
    let api = Api::of(&gateway);
    let old = api.upload("hot", &echo()).await;
    api.route("/hot", "hot").await;

    // Each client sends, waits for the reply to that very message, and
    // goes on until it has seen the new version answer 20 times.
    let (warm_tx, mut warm_rx) = tokio::sync::mpsc::channel(CLIENTS);
    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        let mut client = gateway.connect("/hot").await;
        let warm = warm_tx.clone();
        clients.push(tokio::spawn(async move {
            let (mut sent, mut by_new) = (0usize, 0usize);
            let mut switched_at = None;
            while by_new < 20 {
                let text = format!("client {id} message {sent}");
                client
                    .send(Message::Text(text.clone().into()))
                    .await
                    .expect("open");
                let reply = next_data(&mut client).await;
                assert!(!reply.is_close(), "client {id} closed: {reply:?}");
                match answered_by(&text, &reply) {
                    "router" => {
                        switched_at.get_or_insert(sent);
                        by_new += 1;
                    }
                    _ => assert!(
                        switched_at.is_none(),
                        "client {id} went back to the old version"
                    ),
                }
                sent += 1;
                if sent == 5 {
                    let _ = warm.send(()).await;
                }
                assert!(sent < 100_000, "client {id} never saw the new version");
            }
            // Nothing more arrives: no reply was sent twice.
            let extra = tokio::time::timeout(Duration::from_millis(200), client.next()).await;
            assert!(extra.is_err(), "client {id} got more: {extra:?}");
            client.close(None).await.expect("close");
            sent
        }));
    }
    for _ in 0..CLIENTS {
        warm_rx.recv().await.expect("every client under way");
    }
    let new = api.upload("hot", &router()).await;
    let mut total = 0;
    for client in clients {
        total += client.await.expect("no client failed");
    }
    assert!(total >= CLIENTS * 25);
    // Each message ran once, on one version or the other.
    let ran = gateway
        .metric("tidegate_invocations_total{event=\"message\",function=\"hot\",outcome=\"ok\"}")
        .await;
    assert_eq!(ran, total as f64);

    // The old version's instances go, and its code with them.
    eventually(
        "the old version holds no instance and no code",
        Duration::from_secs(10),
        || async {
            let metrics = gateway.metrics().await;
            let series = |name: &str, version: &str| {
                metrics
                    .get(&format!("{name}{{function=\"hot\",version=\"{version}\"}}"))
                    .copied()
            };
            series("tidegate_function_instances", &old) == Some(0.0)
                && series("tidegate_function_code_loaded", &old) == Some(0.0)
                && series("tidegate_function_instances", &new) >= Some(1.0)
        },
    )
    .await;
}
