//! A misbehaving function fails only the message that made it misbehave.

use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Gateway, Options, SendText, close_code, next_data, round_trip};

fn faulty_gateway() -> Gateway {
    faulty_gateway_with(Options::default())
}

/// The faulty function on `/` (its own configuration file); `options`'
/// variables win over the defaults set here.
fn faulty_gateway_with(options: Options) -> Gateway {
    assert!(
        options.config.is_none(),
        "the faulty gateway has its own file"
    );
    let defaults = Options::default()
        .config(&format!(
            r#"
                [functions.faulty]
                wasm = "{}"
                [routes]
                "/" = "faulty"
                "#,
            tidegate_functions::FAULTY_PATH
        ))
        // Long enough for a memory bomb to reach the limit on a loaded
        // machine.
        .env("TIDEGATE__RUNTIME__TIMEOUT", "2s")
        .env("TIDEGATE__RUNTIME__MEMORY_LIMIT", "8388608")
        // At the lowest priority, a bomb that other busy processes
        // starve (RabbitMQ, the other tests' gateways) could run into
        // the time limit instead; that priority has its own test.
        .env("TIDEGATE__RUNTIME__LONG_CALL_PRIORITY", "normal");
    Gateway::start(Options {
        env: [defaults.env, options.env].concat(),
        config: defaults.config,
        ..options
    })
}

/// Each fault command and the kind it is counted as.
const FAULTS: &[(&str, &str)] = &[
    ("panic", "panic"),
    ("loop", "timeout"),
    ("alloc", "memory_limit"),
    ("recurse", "stack_overflow"),
    ("big", "reply_too_large"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_fails_only_its_message_with_an_error_reply_and_is_counted_by_kind() {
    let gateway = faulty_gateway();
    let mut client = gateway.connect("/").await;
    for (command, kind) in FAULTS {
        let reply = round_trip(&mut client, Message::Text((*command).into())).await;
        let Message::Text(body) = reply else {
            panic!("{command}: expected an error reply, got {reply:?}");
        };
        let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
        assert_eq!(error["error"], "function-failed", "{command}: {body}");
        assert_eq!(error["kind"], *kind, "{command}: {body}");
        // The kind and a short message; wasmtime's words, file paths and
        // the gateway's internals stay in its log.
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("the function")
                && !message.contains("wasm")
                && !message.contains('/'),
            "{command}: a short message without internals: {body}"
        );
        // The same connection goes on, served by a healthy instance.
        assert_eq!(
            round_trip(&mut client, Message::Text("still fine".into())).await,
            Message::Text("still fine".into()),
            "after {command}"
        );
    }
    let metrics = gateway.metrics().await;
    for (command, kind) in FAULTS {
        assert_eq!(
            metrics
                .get(&format!(
                    "tidegate_message_failures_total{{kind=\"{kind}\",route=\"/\"}}"
                ))
                .copied(),
            Some(1.0),
            "{command} counted as {kind}"
        );
    }
    // Failed instances were discarded, not leaked: one serves the client.
    assert!(metrics["tidegate_function_instances{function=\"faulty\"}"] <= 1.0);
    // The loop finished on the long-call threads, and so did each
    // message right after a failure (the client was under suspicion).
    let long_calls = metrics["tidegate_function_long_calls_total{function=\"faulty\"}"];
    assert!(long_calls >= 1.0 + FAULTS.len() as f64, "{long_calls}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_error_close_a_fault_closes_with_1011_and_others_are_still_served() {
    let gateway =
        faulty_gateway_with(Options::default().env("TIDEGATE__RUNTIME__ON_ERROR", "close"));
    let mut bystander = gateway.connect("/").await;
    for (command, _) in FAULTS {
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
        metrics["tidegate_invocations_total{event=\"message\",function=\"faulty\",outcome=\"panic\"}"],
        1.0
    );
    assert_eq!(
        metrics["tidegate_invocations_total{event=\"message\",function=\"faulty\",outcome=\"timeout\"}"],
        1.0
    );
    assert_eq!(metrics["tidegate_closes_total{code=\"1011\"}"], 5.0);
}

/// One instance, no waiting room: while it spins, other messages are
/// refused at once instead of queueing.
fn overloadable(options: Options) -> Gateway {
    faulty_gateway_with(
        options
            .env("TIDEGATE__RUNTIME__MAX_INSTANCES", "1")
            .env("TIDEGATE__RUNTIME__MAX_QUEUED", "0"),
    )
}

/// Occupy the only instance with a spin of `runtime.timeout` (5 s, long
/// enough that a stalled test still acts while it spins). Other
/// clients must connect first: `on-connect` needs an instance too.
async fn occupy(gateway: &Gateway) -> crate::harness::Client {
    let mut spinner = gateway.connect("/").await;
    spinner.send_text("loop").await;
    // The function says so before it spins.
    crate::harness::eventually(
        "the function spins",
        std::time::Duration::from_secs(30),
        || async { gateway.log().contains("spinning") },
    )
    .await;
    spinner
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_instance_is_busy_and_the_queue_is_full_a_message_is_refused_at_once() {
    let gateway = overloadable(Options::default().env("TIDEGATE__RUNTIME__TIMEOUT", "5s"));
    let mut client = gateway.connect("/").await;
    let mut spinner = occupy(&gateway).await;
    let reply = round_trip(&mut client, Message::Text("hello".into())).await;
    let Message::Text(body) = reply else {
        panic!("expected an error reply, got {reply:?}");
    };
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"], "overloaded", "{body}");
    assert_eq!(error["kind"], "overloaded", "{body}");
    // Refused, not queued: had it waited for the instance it would have
    // been echoed after the spin.
    // Once the spin ends, the same client is served again.
    let _ = next_data(&mut spinner).await;
    assert_eq!(
        round_trip(&mut client, Message::Text("hello".into())).await,
        Message::Text("hello".into())
    );
    assert_eq!(
        gateway
            .metric("tidegate_message_failures_total{kind=\"overloaded\",route=\"/\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_error_close_an_overloaded_message_closes_with_1013() {
    let gateway = overloadable(
        Options::default()
            .env("TIDEGATE__RUNTIME__TIMEOUT", "5s")
            .env("TIDEGATE__RUNTIME__ON_ERROR", "close"),
    );
    let mut client = gateway.connect("/").await;
    let mut spinner = occupy(&gateway).await;
    client.send_text("hello").await;
    assert_eq!(close_code(&mut client).await, Some(1013));
    drop(client);
    assert_eq!(close_code(&mut spinner).await, Some(1011));
    drop(spinner);
    // Both connections' on-disconnect calls are over (the first was
    // refused: the spinner held the only instance); a new client would
    // otherwise race the second for that instance.
    crate::harness::eventually(
        "both on-disconnect calls are over",
        std::time::Duration::from_secs(10),
        || async {
            let disconnects: f64 = gateway
                .metrics()
                .await
                .iter()
                .filter(|(series, _)| {
                    // Each outcome's total over the versions (see
                    // `harness::parse_metrics`), not its versions too.
                    series.starts_with(
                        "tidegate_invocations_total{event=\"disconnect\",function=\"faulty\",",
                    ) && !series.contains("version=")
                })
                .map(|(_, value)| value)
                .sum();
            disconnects == 2.0
        },
    )
    .await;
    let mut after = gateway.connect("/").await;
    assert_eq!(
        round_trip(&mut after, Message::Text("hello".into())).await,
        Message::Text("hello".into())
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
    // Each with the function, its version and the connection it was about.
    let log = gateway.log();
    for text in ["a line on stdout", "a line through the logging import"] {
        let line = log
            .lines()
            .find(|line| line.contains(text))
            .expect("logged");
        assert!(line.contains("function=\"faulty\""), "{line}");
        assert!(line.contains("route=\"/\""), "{line}");
        assert!(line.contains("version=\""), "{line}");
        assert!(
            line.contains("connection=\"") && !line.contains("connection=\"\""),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_log_format_json_every_line_is_a_json_object_with_its_fields() {
    let gateway = faulty_gateway_with(Options::default().env("TIDEGATE__LOG__FORMAT", "json"));
    let mut client = gateway.connect("/").await;
    for command in ["log", "forge"] {
        assert_eq!(
            round_trip(&mut client, Message::Text(command.into())).await,
            Message::Text(command.into())
        );
    }
    crate::harness::eventually(
        "the function's lines are logged",
        std::time::Duration::from_secs(5),
        || {
            let log = gateway.log();
            async move { log.contains("a line through the logging import") && log.contains("forged") }
        },
    )
    .await;
    let log = gateway.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
        })
        .collect();
    assert!(!log.contains('\u{1b}'), "no terminal escapes: {log}");
    for line in &lines {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(line.get(field).is_some(), "{field} in {line}");
        }
    }
    // A function's line: its function, version, connection and route as
    // fields.
    let guest = lines
        .iter()
        .find(|line| line["message"] == "a line through the logging import")
        .expect("the function's line");
    assert_eq!(guest["function"], "faulty", "{guest}");
    assert_eq!(guest["route"], "/", "{guest}");
    assert_eq!(guest["version"].as_str().map(str::len), Some(16), "{guest}");
    assert!(
        guest["connection"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{guest}"
    );
    assert_eq!(guest["level"], "WARN", "{guest}");
    // A line a function forges stays inside its message.
    assert!(
        lines
            .iter()
            .all(|line| line["target"] != "tidegate" || line["message"] != "forged by log"),
        "{log}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_messages_keep_failing_is_slowed_down() {
    use futures_util::{SinkExt, StreamExt};
    let gateway =
        faulty_gateway_with(Options::default().env("TIDEGATE__RUNTIME__FAULT_BACKOFF", "1s"));
    let mut client = gateway.connect("/").await;
    let started = std::time::Instant::now();
    // Four failures in a row, then a good message, all in one write.
    for _ in 0..4 {
        client.feed(Message::Text("panic".into())).await.unwrap();
    }
    client.feed(Message::Text("fine".into())).await.unwrap();
    client.flush().await.unwrap();
    let mut replies = Vec::new();
    while replies.len() < 5 {
        match client.next().await.unwrap().unwrap() {
            Message::Text(text) => replies.push(text.to_string()),
            _ => continue,
        }
    }
    // Pauses of 10, 20, 40 and 80 ms before reading the next message: at
    // least 150 ms in all (a lower bound, whatever the machine's load).
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    assert!(
        replies[..4].iter().all(|r| r.contains("function-failed")),
        "{replies:?}"
    );
    assert_eq!(replies[4], "fine");
}

/// The nice values of the gateway's long-call threads.
fn long_call_nice(gateway: &Gateway) -> Vec<i32> {
    let tasks = format!("/proc/{}/task", gateway.pid());
    std::fs::read_dir(tasks)
        .expect("/proc/PID/task")
        .filter_map(|task| {
            let task = task.ok()?.path();
            let comm = std::fs::read_to_string(task.join("comm")).ok()?;
            // The kernel keeps the first 15 bytes of a thread name.
            if comm.trim() != "tidegate-long-c" {
                return None;
            }
            // After the parenthesised name, field 19 of stat is the nice value.
            let stat = std::fs::read_to_string(task.join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            fields.get(16)?.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_calls_run_at_the_configured_priority() {
    for (priority, nice) in [("lowest", 19), ("normal", 0)] {
        let gateway = faulty_gateway_with(
            Options::default().env("TIDEGATE__RUNTIME__LONG_CALL_PRIORITY", priority),
        );
        let mut client = gateway.connect("/").await;
        // A loop runs long: it finishes on the long-call threads. (So may
        // the connect call, if a loaded machine stalls it for 1 ms.)
        let reply = round_trip(&mut client, Message::Text("loop".into())).await;
        assert!(
            matches!(&reply, Message::Text(body) if body.contains("timeout")),
            "{reply:?}"
        );
        gateway
            .metric_reaches_at_least(
                "tidegate_function_long_calls_total{function=\"faulty\"}",
                1.0,
            )
            .await;
        // A thread that has just started (to free the loop's instance) is
        // named a moment before it lowers its priority.
        crate::harness::eventually(
            &format!("every long-call thread is at nice {nice}"),
            std::time::Duration::from_secs(5),
            || async {
                let threads = long_call_nice(&gateway);
                !threads.is_empty() && threads.iter().all(|&n| n == nice)
            },
        )
        .await;
        crate::harness::still_serves(&gateway).await;
    }
}
