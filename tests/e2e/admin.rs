//! The admin listener: metrics that pass promtool, health, readiness, and
//! the token-protected management API.

use tokio_tungstenite::tungstenite::Message;

use std::time::Duration;

use crate::harness::{Gateway, Options, eventually, round_trip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_name_the_essentials() {
    let gateway = Gateway::start(Options::default());
    let mut client = gateway.connect("/").await;
    round_trip(&mut client, Message::Text("count me".into())).await;
    let (status, body) = gateway.admin_get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "tidegate_connections_open",
        "tidegate_messages_received_total",
        "tidegate_messages_sent_total",
        "tidegate_received_bytes_total",
        "tidegate_sent_bytes_total",
        "tidegate_invocations_total",
        "tidegate_invocation_duration_seconds_bucket",
        "tidegate_function_cold_starts_total",
        "tidegate_function_instances",
        "tidegate_queue_publishes_total",
        "tidegate_spool_messages",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    // The limit alerts compare open connections with (the dev default).
    assert!(
        body.contains("\ntidegate_connections_max 10000\n"),
        "tidegate_connections_max missing or not server.max_connections"
    );
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt install prometheus) must be installed");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && findings.trim().is_empty(),
        "promtool: {findings}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_answer() {
    let gateway = Gateway::start(Options::default());
    assert_eq!(gateway.admin_get("/healthz").await.0, 200);
    let (status, body) = gateway.admin_get("/readyz").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_needs_the_bearer_token() {
    let token = "0123456789abcdef-test-token";
    let gateway = Gateway::start(Options::default().env("TIDEGATE__ADMIN__TOKEN", token));
    let bearer = format!("Bearer {token}");
    for path in [
        "/v1/connections",
        "/v1/groups/g",
        "/v1/nope",
        "/@connections/x",
    ] {
        let (status, body) = gateway.admin_get(path).await;
        assert_eq!(status, 401, "{path}: {body}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"], "unauthorized", "{path}: {body}");
        let (status, _) = gateway
            .admin_get_with(path, &[("Authorization", "Bearer wrong-token-0000000")])
            .await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, body) = gateway
        .admin_get_with("/v1/connections", &[("Authorization", &bearer)])
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"connections":[]}"#);
    let (status, body) = gateway
        .admin_get_with("/v1/nope", &[("Authorization", &bearer)])
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not-found"), "{body}");
    // Probes and scrapers send no token.
    assert_eq!(gateway.admin_get("/metrics").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_route_is_refused_with_404_before_upgrading() {
    let gateway = Gateway::start(Options::default().config(
        r#"
        [functions.echo]
        wasm = "builtin:echo"
        [routes]
        "/chat" = "echo"
        "#,
    ));
    let mut client = gateway.connect("/chat/room-1").await;
    assert_eq!(
        round_trip(&mut client, Message::Text("routed".into())).await,
        Message::Text("routed".into())
    );
    let error = gateway
        .try_connect("/elsewhere", None)
        .await
        .expect_err("refused");
    match error {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status().as_u16(), 404)
        }
        other => panic!("expected HTTP 404, got {other}"),
    }
    // Counted once the refusal is written, so possibly just after the
    // client read it.
    eventually("the refusal is counted", Duration::from_secs(5), || async {
        gateway
            .metric("tidegate_connections_rejected_total{reason=\"no_route\"}")
            .await
            == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_listener_beyond_loopback_without_a_token_is_warned_about() {
    let gateway = Gateway::start(Options::default().env("TIDEGATE__ADMIN__LISTEN", "0.0.0.0:0"));
    eventually("the warning is logged", Duration::from_secs(10), || async {
        gateway.log().contains("has no admin.token")
    })
    .await;
    let (status, _) = gateway.admin_get("/healthz").await;
    assert_eq!(status, 200);
}
