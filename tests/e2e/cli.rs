//! The `tidegate` CLI against a running gateway, as an author uses it:
//! deploy, list, route, talk to a connection, roll back, remove.

use std::process::{Command, Output};

use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Gateway, Options, SendText, close_code, next_data};

const TOKEN: &str = "0123456789abcdef-cli-token";

/// Run `tidegate ARGS` against `gateway`'s admin API.
fn tidegate(gateway: &Gateway, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(args)
        .env("TIDEGATE_ADMIN_URL", format!("http://{}", gateway.admin))
        .env("TIDEGATE_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("run tidegate")
}

/// Run and expect success; its standard output.
fn ok(gateway: &Gateway, args: &[&str]) -> String {
    let output = tidegate(gateway, args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "tidegate {args:?}: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The `version` of `name` in `fn show --json`'s versions, by digest prefix
/// order: the live one first.
fn versions(gateway: &Gateway, name: &str) -> Vec<(String, bool)> {
    let shown: serde_json::Value =
        serde_json::from_str(&ok(gateway, &["fn", "show", name, "--json"])).expect("JSON");
    shown["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| {
            (
                v["version"].as_str().unwrap().to_owned(),
                v["live"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_author_deploys_routes_talks_rolls_back_and_removes_with_the_cli() {
    let gateway = Gateway::start(Options::default().env("TIDEGATE__ADMIN__TOKEN", TOKEN));
    let deployed = ok(
        &gateway,
        &[
            "fn",
            "deploy",
            tidegate_functions::CHAT_PATH,
            "--name",
            "chat",
        ],
    );
    assert!(deployed.starts_with("deployed chat version "), "{deployed}");
    let listed = ok(&gateway, &["fn", "list"]);
    assert!(listed.lines().any(|l| l.starts_with("chat ")), "{listed}");
    ok(&gateway, &["route", "set", "/chat", "chat"]);
    assert!(ok(&gateway, &["route", "list"]).contains("/chat"));

    let mut client = gateway.connect("/chat").await;
    client
        .send_text(r#"{"action":"join","room":"lobby"}"#)
        .await;
    assert!(matches!(next_data(&mut client).await, Message::Text(t) if t.contains("join")));
    let conns: serde_json::Value = serde_json::from_str(&ok(
        &gateway,
        &["conn", "list", "--route", "/chat", "--json"],
    ))
    .unwrap();
    let id = conns["connections"][0]["id"].as_str().unwrap().to_owned();
    ok(&gateway, &["conn", "send", &id, "hello from the CLI"]);
    assert_eq!(
        next_data(&mut client).await,
        Message::Text("hello from the CLI".into())
    );
    ok(&gateway, &["group", "send", "lobby", "to the room"]);
    assert_eq!(
        next_data(&mut client).await,
        Message::Text("to the room".into())
    );
    assert!(ok(&gateway, &["conn", "info", &id]).contains("lobby"));

    // A second version, not live; then live; then back.
    let first = versions(&gateway, "chat")[0].0.clone();
    ok(
        &gateway,
        &[
            "fn",
            "deploy",
            tidegate_functions::ROUTER_PATH,
            "--name",
            "chat",
            "--no-live",
        ],
    );
    let both = versions(&gateway, "chat");
    assert_eq!(both.len(), 2);
    let second = both.iter().find(|(v, _)| *v != first).unwrap().0.clone();
    ok(&gateway, &["fn", "rollback", "chat", &second]);
    client.send_text(r#"{"action":"x"}"#).await;
    let answer = next_data(&mut client).await;
    assert!(
        matches!(&answer, Message::Text(t) if t.contains("\"function\":\"router\"")),
        "the next message runs on the new live version: {answer:?}"
    );
    ok(&gateway, &["fn", "rollback", "chat", &first]);
    client
        .send_text(r#"{"action":"join","room":"again"}"#)
        .await;
    assert!(matches!(next_data(&mut client).await, Message::Text(t) if t.contains("join")));

    // Refusals are shown as the API said them, with a failing status.
    let refused = tidegate(&gateway, &["fn", "rm", "chat"]);
    assert_eq!(refused.status.code(), Some(1));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("409") && said.contains("/chat"), "{said}");
    let unauthorized = Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["fn", "list"])
        .env("TIDEGATE_ADMIN_URL", format!("http://{}", gateway.admin))
        .env("TIDEGATE_ADMIN_TOKEN", "wrong-token-00000000")
        .output()
        .unwrap();
    assert_eq!(unauthorized.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unauthorized.stderr).contains("401"));

    ok(&gateway, &["conn", "close", &id, "--code", "4000"]);
    assert_eq!(close_code(&mut client).await, Some(4000));
    ok(&gateway, &["route", "rm", "/chat"]);
    ok(&gateway, &["fn", "rm", "chat"]);
    assert!(!ok(&gateway, &["fn", "list"]).contains("chat "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_refused_unread_is_shown_as_the_api_refused_it() {
    let gateway = Gateway::start(
        Options::default()
            .env("TIDEGATE__ADMIN__TOKEN", TOKEN)
            .env("TIDEGATE__ADMIN__MAX_UPLOAD_SIZE", "100000"),
    );
    // Far more than socket buffers hold: the gateway answers before it
    // has read the body.
    let dir = tempfile::tempdir().expect("temp dir");
    let big = dir.path().join("big.wasm");
    std::fs::write(&big, vec![0u8; 24 << 20]).expect("written");
    let big = big.to_str().unwrap();

    let refused = tidegate(&gateway, &["fn", "deploy", big]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(
        said.contains("413") && said.contains("admin.max_upload_size"),
        "{said}"
    );

    let unauthorized = Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["fn", "deploy", big])
        .env("TIDEGATE_ADMIN_URL", format!("http://{}", gateway.admin))
        .env("TIDEGATE_ADMIN_TOKEN", "wrong-token-00000000")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&unauthorized.stderr);
    assert_eq!(unauthorized.status.code(), Some(1), "{said}");
    assert!(said.contains("401"), "{said}");
}
