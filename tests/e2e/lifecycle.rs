//! Scale to zero, shutdown, and start-up errors.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Gateway, Options, bodies, close_code, drain_queue, eventually, round_trip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_function_scales_to_zero_and_the_next_message_cold_starts() {
    let gateway = Gateway::start(
        Options::default()
            .env("TIDEGATE__RUNTIME__IDLE_TIMEOUT", "300ms")
            .env("TIDEGATE__RUNTIME__UNLOAD_AFTER", "600ms"),
    );
    let mut client = gateway.connect("/").await;
    round_trip(&mut client, Message::Text("warm up".into())).await;
    let cold_starts = gateway
        .metric("tidegate_function_cold_starts_total{function=\"echo\"}")
        .await;
    assert!(cold_starts >= 1.0);

    eventually("no instance is left", Duration::from_secs(10), || async {
        gateway
            .metric("tidegate_function_instances{function=\"echo\"}")
            .await
            == 0.0
    })
    .await;
    eventually(
        "the compiled code is unloaded",
        Duration::from_secs(10),
        || async {
            gateway
                .metric("tidegate_function_code_loaded{function=\"echo\"}")
                .await
                == 0.0
        },
    )
    .await;

    // The socket stayed open through scale-down; the next message reloads
    // the code and cold-starts an instance.
    assert_eq!(
        round_trip(&mut client, Message::Text("after the nap".into())).await,
        Message::Text("after the nap".into())
    );
    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics["tidegate_function_cold_starts_total{function=\"echo\"}"],
        cold_starts + 1.0
    );
    assert_eq!(
        metrics["tidegate_function_code_loads_total{function=\"echo\"}"],
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sockets_with_1001_and_loses_no_replied_message() {
    let mut gateway = Gateway::start(Options::default());
    // Copies taken while the broker link is still coming up wait in the
    // spool (for the next start) rather than reach the queue: this test
    // reads the queue, so it starts once the link is up.
    gateway
        .metric_reaches("tidegate_queue_connected", 1.0)
        .await;
    let mut idle = gateway.connect("/").await;
    let busy = gateway.connect("/").await;
    let (mut sink, mut stream) = busy.split();
    for i in 0..300 {
        sink.feed(Message::Text(format!("{i}").into()))
            .await
            .unwrap();
    }
    sink.flush().await.unwrap();
    // Let the first replies arrive, so the shutdown finds work in flight.
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first, Message::Text("0".into()));
    let queue = gateway.queue.clone();

    let status = tokio::task::spawn_blocking(move || {
        let status = gateway.terminate();
        (status, gateway)
    });
    let mut replied = vec!["0".to_owned()];
    let code = loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => replied.push(text.to_string()),
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("the connection ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(1001));
    assert_eq!(close_code(&mut idle).await, Some(1001));
    let (status, gateway) = status.await.unwrap();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        gateway.log()
    );

    // Replies came in order, and every replied message is in the queue.
    let expected: Vec<String> = (0..replied.len()).map(|i| i.to_string()).collect();
    assert_eq!(replied, expected);
    let copies = drain_queue(&queue, replied.len(), Duration::from_secs(5)).await;
    let stored = bodies(&copies);
    assert!(
        stored.len() >= replied.len() && stored[..replied.len()] == replied[..],
        "{} replied, {} stored",
        replied.len(),
        stored.len()
    );
    drop(gateway);
}

#[test]
fn a_bad_setting_stops_start_up_with_exit_64_naming_the_key() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["serve", "--dev"])
        .env("TIDEGATE__QUEUE__MODE", "whenever")
        .output()
        .expect("run tidegate");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("queue.mode"), "{stderr}");
}

#[test]
fn without_a_certificate_outside_dev_mode_start_up_says_what_to_set() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tidegate.toml");
    std::fs::write(
        &config,
        "[functions.echo]\nwasm = \"builtin:echo\"\n[routes]\n\"/\" = \"echo\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .expect("run tidegate");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tls.cert"), "{stderr}");
}

#[test]
fn binding_a_privileged_port_without_permission_says_how_to_fix_it() {
    use std::os::unix::fs::PermissionsExt;
    let unprivileged_from: u16 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1024);
    if unprivileged_from <= 443 {
        eprintln!(
            "net.ipv4.ip_unprivileged_port_start is {unprivileged_from}: anyone may bind 443 here"
        );
        return;
    }
    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(1) == Some("0"));
    // A copy of the binary and a state directory an unprivileged user can use.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let binary = dir.path().join("tidegate");
    std::fs::copy(env!("CARGO_BIN_EXE_tidegate"), &binary).unwrap();
    let mut command = if is_root {
        let mut command = std::process::Command::new("setpriv");
        command
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .args(["--bounding-set=-all", "--"])
            .arg(&binary);
        command
    } else {
        std::process::Command::new(&binary)
    };
    let output = command
        .args(["serve", "--dev"])
        .env("TIDEGATE__SERVER__LISTEN", "127.0.0.1:443")
        .env("TIDEGATE__ADMIN__LISTEN", "127.0.0.1:0")
        .env("TIDEGATE__SERVER__STATE_DIR", dir.path().join("state"))
        .env("TIDEGATE__QUEUE__URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .output()
        .expect("run tidegate");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("permission denied")
            && stderr.contains("CAP_NET_BIND_SERVICE")
            && stderr.contains("server.listen"),
        "{stderr}"
    );
}
