//! The runtime against real components built from `functions/`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime::{Connection, Effect, LoadError, Payload, Registry, RuntimeConfig, RuntimeMetrics};

fn registry(config: RuntimeConfig) -> (Registry, prometheus::Registry, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = RuntimeConfig {
        artifact_dir: dir.path().join("artifacts"),
        max_total_instances: NonZeroU32::new(16).unwrap(),
        ..config
    };
    let prometheus = prometheus::Registry::new();
    let metrics = RuntimeMetrics::register(&prometheus).expect("metrics");
    (
        Registry::new(config, metrics).expect("engine"),
        prometheus,
        dir,
    )
}

fn connection() -> Connection {
    Connection {
        id: "node-1.conn-1".into(),
        route: "/".into(),
        path: "/".into(),
        query: vec![],
        headers: vec![],
        subprotocol: None,
        remote_addr: "127.0.0.1:50000".into(),
        claims: vec![],
        state: None,
    }
}

fn counter(registry: &prometheus::Registry, name: &str, function: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .filter(|metric| {
            metric
                .get_label()
                .iter()
                .any(|label| label.name() == "function" && label.value() == function)
        })
        // A metric is either a counter or a gauge; the other reads 0.
        .map(|metric| metric.get_counter().get_value() + metric.get_gauge().get_value())
        .sum()
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn echo_replies_with_text_and_binary_unchanged() {
    let (registry, _metrics, _dir) = registry(RuntimeConfig::default());
    let echo = registry
        .load("echo", tidegate_functions::ECHO.to_vec())
        .await
        .expect("echo loads");
    let conn = connection();

    let decision = echo.on_connect(&conn).await.expect("on-connect runs");
    assert!(decision.accept);

    for message in [
        Payload::Text("hello, tidegate ✓".into()),
        Payload::Binary(vec![0, 1, 2, 255, 254]),
        Payload::Text(String::new()),
    ] {
        let effects = echo
            .on_message(&conn, &message)
            .await
            .expect("runs")
            .expect("no handler error");
        match (effects.as_slice(), &message) {
            ([Effect::Reply(Payload::Text(got))], Payload::Text(sent)) => assert_eq!(got, sent),
            ([Effect::Reply(Payload::Binary(got))], Payload::Binary(sent)) => {
                assert_eq!(got, sent)
            }
            (other, _) => panic!("unexpected effects {other:?} for {message:?}"),
        }
    }
    let effects = echo.on_disconnect(&conn, 1000, "bye").await.expect("runs");
    assert!(effects.is_empty());
    // One instance served all of it.
    assert_eq!(echo.live_instances(), 1);
}

#[tokio::test]
async fn idle_function_scales_to_zero_and_unloads_then_cold_starts() {
    let (registry, metrics, _dir) = registry(RuntimeConfig {
        idle_timeout: Duration::from_millis(100),
        unload_after: Duration::from_millis(300),
        ..RuntimeConfig::default()
    });
    let echo = registry
        .load("echo", tidegate_functions::ECHO.to_vec())
        .await
        .expect("echo loads");
    let conn = connection();
    let message = Payload::Text("ping".into());
    echo.on_message(&conn, &message).await.unwrap().unwrap();
    assert_eq!(echo.live_instances(), 1);
    assert_eq!(
        counter(&metrics, "tidegate_function_cold_starts_total", "echo"),
        1.0
    );

    wait_until("the instance is released", || {
        registry.scale_down();
        echo.live_instances() == 0
    })
    .await;
    assert_eq!(
        counter(&metrics, "tidegate_function_instances", "echo"),
        0.0
    );
    wait_until("the code is unloaded", || {
        registry.scale_down();
        !echo.is_loaded()
    })
    .await;
    assert_eq!(
        counter(&metrics, "tidegate_function_code_loaded", "echo"),
        0.0
    );

    // The next message reloads the code from the artifact and cold-starts.
    let effects = echo.on_message(&conn, &message).await.unwrap().unwrap();
    assert!(matches!(effects.as_slice(), [Effect::Reply(Payload::Text(t))] if t == "ping"));
    assert!(echo.is_loaded());
    assert_eq!(
        counter(&metrics, "tidegate_function_cold_starts_total", "echo"),
        2.0
    );
    assert_eq!(
        counter(&metrics, "tidegate_function_code_loads_total", "echo"),
        1.0
    );
}

#[tokio::test]
async fn concurrent_invocations_are_bounded_by_max_instances() {
    let (registry, _metrics, _dir) = registry(RuntimeConfig {
        max_instances: NonZeroU32::new(3).unwrap(),
        ..RuntimeConfig::default()
    });
    let echo = registry
        .load("echo", tidegate_functions::ECHO.to_vec())
        .await
        .expect("echo loads");
    let conn = Arc::new(connection());
    let mut tasks = Vec::new();
    for i in 0..40 {
        let echo = echo.clone();
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let message = Payload::Text(format!("message {i}"));
            echo.on_message(&conn, &message).await.unwrap().unwrap()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().len(), 1);
    }
    assert!(
        echo.live_instances() <= 3,
        "{} instances",
        echo.live_instances()
    );
}

#[tokio::test]
async fn bytes_that_are_not_a_component_are_refused_with_the_function_name() {
    let (registry, _metrics, _dir) = registry(RuntimeConfig::default());
    let error = registry
        .load("broken", b"not wasm at all".to_vec())
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&error, LoadError::Invalid { name, .. } if name == "broken"),
        "{error}"
    );
    assert!(registry.get("broken").is_none());
}
