//! The runtime against real components built from `functions/`.

use std::num::NonZeroU32;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime::{
    Connection, Context, Effect, LoadError, Payload, Priority, Registry, RuntimeConfig,
    RuntimeMetrics,
};

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

fn context() -> Context {
    Context {
        id: "node-1.conn-1".into(),
        route: "/".into(),
        claims: vec![],
        state: None,
    }
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

    let decision = echo
        .on_connect(Arc::new(conn))
        .await
        .expect("on-connect runs");
    let ctx = Arc::new(context());
    assert!(decision.accept);

    for message in [
        Payload::Text("hello, tidegate ✓".into()),
        Payload::Binary(vec![0, 1, 2, 255, 254]),
        Payload::Text(String::new()),
    ] {
        let effects = echo
            .on_message(ctx.clone(), message.clone(), Priority::Normal)
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
    let effects = echo
        .on_disconnect(ctx, 1000, "bye".into())
        .await
        .expect("runs");
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
    let conn = Arc::new(context());
    let message = Payload::Text("ping".into());
    echo.on_message(conn.clone(), message.clone(), Priority::Normal)
        .await
        .unwrap()
        .unwrap();
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
    let effects = echo
        .on_message(conn, message, Priority::Normal)
        .await
        .unwrap()
        .unwrap();
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
    let conn = Arc::new(context());
    let mut tasks = Vec::new();
    for i in 0..40 {
        let echo = echo.clone();
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let message = Payload::Text(format!("message {i}"));
            echo.on_message(conn, message, Priority::Normal)
                .await
                .unwrap()
                .unwrap()
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

async fn faulty(config: RuntimeConfig) -> (Registry, Arc<runtime::Function>, tempfile::TempDir) {
    let (registry, _metrics, dir) = registry(config);
    let wasm = std::fs::read(tidegate_functions::FAULTY_PATH).expect("faulty.wasm");
    let function = registry.load("faulty", wasm).await.expect("faulty loads");
    (registry, function, dir)
}

async fn send(
    function: &runtime::Function,
    text: &str,
) -> Result<Result<Vec<Effect>, runtime::HandlerError>, runtime::InvokeError> {
    function
        .on_message(
            Arc::new(context()),
            Payload::Text(text.into()),
            Priority::Normal,
        )
        .await
}

fn is_echo(
    result: Result<Result<Vec<Effect>, runtime::HandlerError>, runtime::InvokeError>,
    text: &str,
) -> bool {
    matches!(result, Ok(Ok(effects)) if matches!(effects.as_slice(), [Effect::Reply(Payload::Text(t))] if t == text))
}

#[tokio::test]
async fn a_function_that_loops_is_stopped_at_its_time_limit_and_the_pool_recovers() {
    let (_registry, function, _dir) = faulty(RuntimeConfig {
        timeout: Duration::from_millis(200),
        ..RuntimeConfig::default()
    })
    .await;
    let started = Instant::now();
    let error = send(&function, "loop").await.expect_err("stopped");
    assert!(
        matches!(error, runtime::InvokeError::Timeout { .. }),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // The instance that looped was discarded; a fresh one serves the next message.
    wait_until("the looping instance is uncounted", || {
        function.live_instances() == 0
    })
    .await;
    assert!(is_echo(send(&function, "after").await, "after"));
}

#[tokio::test(flavor = "current_thread")]
async fn a_looping_function_yields_so_other_messages_still_run_on_the_same_thread() {
    let (_registry, function, _dir) = faulty(RuntimeConfig {
        timeout: Duration::from_secs(3),
        ..RuntimeConfig::default()
    })
    .await;
    let looping = tokio::spawn({
        let function = function.clone();
        async move { send(&function, "loop").await.err() }
    });
    tokio::task::yield_now().await;
    let started = Instant::now();
    assert!(is_echo(send(&function, "meanwhile").await, "meanwhile"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a well-behaved message waited {:?} behind a loop",
        started.elapsed()
    );
    assert!(
        !looping.is_finished(),
        "the loop is still running when the other message is done"
    );
    assert!(matches!(
        looping.await.unwrap(),
        Some(runtime::InvokeError::Timeout { .. })
    ));
}

/// The nice values of this process's threads named `name`.
fn nice_of_threads(name: &str) -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| {
            let task = task.ok()?.path();
            let comm = std::fs::read_to_string(task.join("comm")).ok()?;
            // The kernel keeps the first 15 bytes of a thread name.
            if comm.trim() != &name[..name.len().min(15)] {
                return None;
            }
            let stat = std::fs::read_to_string(task.join("stat")).ok()?;
            // After the parenthesised name, field 19 of stat is the nice value.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            fields.get(16)?.parse().ok()
        })
        .collect()
}

#[tokio::test]
async fn a_call_that_runs_long_finishes_on_the_lowest_priority_threads() {
    let (registry, metrics, _dir) = registry(RuntimeConfig {
        timeout: Duration::from_millis(300),
        // Long enough that a short call stalled by a loaded machine stays.
        long_call_after: Duration::from_millis(50),
        ..RuntimeConfig::default()
    });
    let wasm = std::fs::read(tidegate_functions::FAULTY_PATH).expect("faulty.wasm");
    let function = registry.load("faulty", wasm).await.expect("faulty loads");
    assert!(is_echo(send(&function, "short").await, "short"));
    assert_eq!(
        counter(&metrics, "tidegate_function_long_calls_total", "faulty"),
        0.0,
        "a short call stays where it started"
    );
    let error = send(&function, "loop").await.expect_err("stopped");
    assert!(
        matches!(error, runtime::InvokeError::Timeout { .. }),
        "{error}"
    );
    assert_eq!(
        counter(&metrics, "tidegate_function_long_calls_total", "faulty"),
        1.0,
        "the loop moved"
    );
    // A thread that has just started (to free the loop's instance) is
    // named a moment before it lowers its priority.
    wait_until("every long-call thread is at nice 19", || {
        let nice = nice_of_threads("tidegate-long-calls");
        !nice.is_empty() && nice.iter().all(|&n| n == 19)
    })
    .await;
    // The pool is healthy: the looping instance was dropped, and the next
    // call runs in a fresh one.
    assert_eq!(function.live_instances(), 0);
    assert!(is_echo(send(&function, "after").await, "after"));
}

#[tokio::test]
async fn a_low_priority_call_runs_on_the_long_call_threads_from_the_start() {
    let (registry, metrics, _dir) = registry(RuntimeConfig::default());
    let echo = registry
        .load("echo", tidegate_functions::ECHO.to_vec())
        .await
        .expect("echo loads");
    let effects = echo
        .on_message(
            Arc::new(context()),
            Payload::Text("low".into()),
            Priority::Low,
        )
        .await
        .expect("runs")
        .expect("no handler error");
    assert!(matches!(effects.as_slice(), [Effect::Reply(Payload::Text(t))] if t == "low"));
    assert_eq!(
        counter(&metrics, "tidegate_function_long_calls_total", "echo"),
        1.0
    );
    // Its instance went back to the pool like any other.
    assert_eq!(echo.live_instances(), 1);
}

#[tokio::test]
async fn a_call_after_an_idle_spell_is_timed_from_its_real_start() {
    // While no call runs, the engine's coarse clock ticks only every 10 ms,
    // so it can be that old when a call starts. The call must be timed from
    // when it really started: neither moved nor stopped before it has run
    // that long. (Timed from the last tick, an 8 ms call would be moved or
    // stopped at any idle tick that falls within it.)
    let timeout = Duration::from_micros(9_500);
    let long_call_after = Duration::from_millis(9);
    let (registry, metrics, _dir) = registry(RuntimeConfig {
        timeout,
        long_call_after,
        ..RuntimeConfig::default()
    });
    let wasm = std::fs::read(tidegate_functions::FAULTY_PATH).expect("faulty.wasm");
    let function = registry.load("faulty", wasm).await.expect("faulty loads");
    for round in 0..12 {
        // Long enough for the clock to go back to idle ticks; each round
        // starts at another point between two of them.
        tokio::time::sleep(Duration::from_micros(15_000 + round * 800)).await;
        let moved_before = counter(&metrics, "tidegate_function_long_calls_total", "faulty");
        let started = std::time::Instant::now();
        let result = send(&function, "spin 8").await;
        let took = started.elapsed();
        // A loaded machine may stall the call past a limit; only a call
        // that really took that long may be moved or stopped.
        if counter(&metrics, "tidegate_function_long_calls_total", "faulty") > moved_before {
            assert!(took >= long_call_after, "moved after {took:?}");
        }
        match result {
            Ok(reply) => assert!(is_echo(Ok(reply), "spin 8")),
            Err(error) => assert!(
                matches!(error, runtime::InvokeError::Timeout { .. }) && took >= timeout,
                "{error} after {took:?}"
            ),
        }
    }
}

#[tokio::test]
async fn a_long_call_dropped_by_its_caller_is_stopped_and_uncounted() {
    for long_call_after in [Duration::from_millis(1), Duration::from_secs(60)] {
        // Moved to the long-call threads, then still inline, when dropped.
        a_call_dropped_by_its_caller_is_stopped(long_call_after).await;
    }
}

async fn a_call_dropped_by_its_caller_is_stopped(long_call_after: Duration) {
    let (_registry, function, _dir) = faulty(RuntimeConfig {
        timeout: Duration::from_secs(30),
        long_call_after,
        ..RuntimeConfig::default()
    })
    .await;
    let looping = tokio::spawn({
        let function = function.clone();
        async move { send(&function, "loop").await }
    });
    wait_until("the loop runs", || function.live_instances() == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The caller goes away (its connection closed) while the call runs in
    // the background: the call is dropped and its instance uncounted.
    looping.abort();
    wait_until("the instance is gone", || function.live_instances() == 0).await;
    assert!(is_echo(send(&function, "after").await, "after"));
}

#[tokio::test]
async fn a_memory_bomb_hits_the_memory_limit() {
    let (_registry, function, _dir) = faulty(RuntimeConfig {
        memory_limit: 8 << 20,
        ..RuntimeConfig::default()
    })
    .await;
    let error = send(&function, "alloc").await.expect_err("stopped");
    assert!(
        matches!(error, runtime::InvokeError::MemoryLimit { limit_bytes, .. } if limit_bytes == 8 << 20),
        "{error}"
    );
    assert!(is_echo(send(&function, "after").await, "after"));
}

#[tokio::test]
async fn panics_and_stack_overflows_trap_only_their_own_message() {
    let (_registry, function, _dir) = faulty(RuntimeConfig::default()).await;
    for (command, kind) in [("panic", "panic"), ("recurse", "stack_overflow")] {
        let error = send(&function, command).await.expect_err("trapped");
        assert_eq!(error.kind(), kind, "{command}: {error}");
        assert!(
            is_echo(send(&function, "fine").await, "fine"),
            "after {command}"
        );
    }
}

#[tokio::test]
async fn a_handler_error_is_the_function_answer_not_a_fault() {
    let (_registry, function, _dir) = faulty(RuntimeConfig::default()).await;
    let result = send(&function, "bad").await.expect("ran");
    assert!(matches!(result, Err(runtime::HandlerError::BadRequest(m)) if m == "asked to refuse"));
    assert_eq!(function.live_instances(), 1, "the instance is kept");
    assert!(is_echo(send(&function, "log").await, "log"));
}

/// A faulty function with a short time limit, for calls that wait in the
/// host (a WASI sleep) far longer than that.
async fn sleepy() -> (Registry, Arc<runtime::Function>, tempfile::TempDir) {
    faulty(RuntimeConfig {
        timeout: Duration::from_millis(200),
        ..RuntimeConfig::default()
    })
    .await
}

/// How long a call that sleeps 5 s may take to be stopped by a 200 ms time
/// limit on a loaded machine.
const STOPPED_WITHIN: Duration = Duration::from_secs(2);

#[tokio::test]
async fn a_message_call_asleep_in_the_host_is_stopped_at_its_time_limit() {
    let (_registry, function, _dir) = sleepy().await;
    let started = Instant::now();
    let error = send(&function, "sleep 5000").await.expect_err("stopped");
    assert!(
        matches!(error, runtime::InvokeError::Timeout { .. }),
        "{error}"
    );
    assert!(
        started.elapsed() < STOPPED_WITHIN,
        "took {:?}",
        started.elapsed()
    );
    // The sleeping instance was discarded; a fresh one serves the next message.
    wait_until("the sleeping instance is uncounted", || {
        function.live_instances() == 0
    })
    .await;
    assert!(is_echo(send(&function, "after").await, "after"));
}

#[tokio::test]
async fn on_connect_asleep_in_the_host_is_stopped_at_its_time_limit() {
    let (_registry, function, _dir) = sleepy().await;
    let conn = Connection {
        query: vec![("sleep".into(), "5000".into())],
        ..connection()
    };
    let started = Instant::now();
    let error = function
        .on_connect(Arc::new(conn))
        .await
        .expect_err("stopped");
    assert!(
        matches!(error, runtime::InvokeError::Timeout { .. }),
        "{error}"
    );
    assert!(
        started.elapsed() < STOPPED_WITHIN,
        "took {:?}",
        started.elapsed()
    );
    let decision = function
        .on_connect(Arc::new(connection()))
        .await
        .expect("a fresh instance runs");
    assert!(decision.accept);
}

#[tokio::test]
async fn on_disconnect_asleep_in_the_host_is_stopped_at_its_time_limit() {
    let (_registry, function, _dir) = sleepy().await;
    let started = Instant::now();
    let error = function
        .on_disconnect(Arc::new(context()), 1000, "sleep 5000".into())
        .await
        .expect_err("stopped");
    assert!(
        matches!(error, runtime::InvokeError::Timeout { .. }),
        "{error}"
    );
    assert!(
        started.elapsed() < STOPPED_WITHIN,
        "took {:?}",
        started.elapsed()
    );
    let effects = function
        .on_disconnect(Arc::new(context()), 1000, "bye".into())
        .await
        .expect("a fresh instance runs");
    assert!(effects.is_empty());
}

/// The precompiled artifact of the function called `name` in `dir`.
fn artifact_of(dir: &Path, name: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("artifact dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            file.starts_with(&format!("{name}-")) && file.ends_with(".cwasm")
        })
        .collect();
    assert_eq!(found.len(), 1, "artifacts of {name}: {found:?}");
    found.into_iter().next().expect("one")
}

/// A registry serving `faulty` and `echo` whose code has been unloaded, so
/// that the next call of `faulty` loads its artifact from disk.
struct Unloaded {
    registry: Registry,
    metrics: prometheus::Registry,
    dir: tempfile::TempDir,
    faulty: Arc<runtime::Function>,
}

impl Unloaded {
    async fn new() -> Self {
        let (registry, metrics, dir) = registry(RuntimeConfig {
            idle_timeout: Duration::from_millis(20),
            unload_after: Duration::from_millis(50),
            ..RuntimeConfig::default()
        });
        let wasm = std::fs::read(tidegate_functions::FAULTY_PATH).expect("faulty.wasm");
        let faulty = registry.load("faulty", wasm).await.expect("faulty loads");
        registry
            .load("echo", tidegate_functions::ECHO.to_vec())
            .await
            .expect("echo loads");
        let unloaded = Self {
            registry,
            metrics,
            dir,
            faulty,
        };
        unloaded.unload().await;
        unloaded
    }

    async fn unload(&self) {
        wait_until("faulty's code is unloaded", || {
            self.registry.scale_down();
            !self.faulty.is_loaded()
        })
        .await;
    }

    fn artifact(&self, name: &str) -> PathBuf {
        artifact_of(&self.dir.path().join("artifacts"), name)
    }

    fn recompiles(&self) -> f64 {
        counter(
            &self.metrics,
            "tidegate_function_recompiles_total",
            "faulty",
        )
    }

    /// Whether the code that runs is faulty's own: `bad` gets its handler
    /// error (echo's code would echo it).
    async fn runs_its_own_code(&self) -> bool {
        let result = send(&self.faulty, "bad").await;
        let own = matches!(&result, Ok(Err(runtime::HandlerError::BadRequest(_))));
        if !own {
            eprintln!("faulty answered `bad` with {result:?}");
        }
        own
    }
}

#[tokio::test]
async fn a_replaced_artifact_is_not_loaded_and_the_function_is_compiled_again() {
    let unloaded = Unloaded::new().await;
    // Valid code of this engine, but another function's: planted by
    // someone who could write to the artifact.
    std::fs::copy(unloaded.artifact("echo"), unloaded.artifact("faulty")).expect("replaced");
    assert!(unloaded.runs_its_own_code().await, "the planted code ran");
    assert_eq!(unloaded.recompiles(), 1.0);
}

#[tokio::test]
async fn a_symbolic_link_in_place_of_an_artifact_is_not_followed() {
    let unloaded = Unloaded::new().await;
    let planted = unloaded.dir.path().join("planted.cwasm");
    std::fs::copy(unloaded.artifact("echo"), &planted).expect("copied");
    let artifact = unloaded.artifact("faulty");
    std::fs::remove_file(&artifact).expect("removed");
    std::os::unix::fs::symlink(&planted, &artifact).expect("linked");
    assert!(
        unloaded.runs_its_own_code().await,
        "the code behind the link ran"
    );
    assert_eq!(unloaded.recompiles(), 1.0);
    // The new artifact replaced the link; nothing was written through it.
    let meta = std::fs::symlink_metadata(&artifact).expect("artifact");
    assert!(meta.is_file(), "{meta:?}");
    assert_eq!(
        std::fs::read(&planted).expect("planted"),
        std::fs::read(unloaded.artifact("echo")).expect("echo")
    );
}

#[tokio::test]
async fn a_damaged_or_missing_artifact_is_compiled_again_and_the_function_keeps_working() {
    let unloaded = Unloaded::new().await;
    // Cut in half (a full disk, a crash while copying), then gone.
    let artifact = unloaded.artifact("faulty");
    let bytes = std::fs::read(&artifact).expect("artifact");
    std::fs::write(&artifact, &bytes[..bytes.len() / 2]).expect("damaged");
    assert!(is_echo(send(&unloaded.faulty, "after").await, "after"));
    assert_eq!(unloaded.recompiles(), 1.0);

    unloaded.unload().await;
    std::fs::remove_file(unloaded.artifact("faulty")).expect("removed");
    assert!(is_echo(send(&unloaded.faulty, "again").await, "again"));
    assert_eq!(unloaded.recompiles(), 2.0);
    // The artifact written in its place loads as such next time.
    unloaded.unload().await;
    assert!(unloaded.runs_its_own_code().await);
    assert_eq!(unloaded.recompiles(), 2.0);
    assert_eq!(
        counter(
            &unloaded.metrics,
            "tidegate_function_code_loads_total",
            "faulty"
        ),
        1.0
    );
}

#[tokio::test]
async fn the_artifact_directory_and_artifacts_are_private_to_the_gateway_user() {
    let (registry, _metrics, dir) = registry(RuntimeConfig::default());
    registry
        .load("echo", tidegate_functions::ECHO.to_vec())
        .await
        .expect("echo loads");
    let artifacts = dir.path().join("artifacts");
    let mode = |path: &Path| {
        std::fs::metadata(path)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&artifacts), 0o700);
    assert_eq!(mode(&artifact_of(&artifacts, "echo")), 0o600);
}

fn registry_in(artifact_dir: PathBuf) -> Result<Registry, LoadError> {
    let config = RuntimeConfig {
        artifact_dir,
        max_total_instances: NonZeroU32::new(16).unwrap(),
        ..RuntimeConfig::default()
    };
    let metrics = RuntimeMetrics::register(&prometheus::Registry::new()).expect("metrics");
    Registry::new(config, metrics)
}

#[tokio::test]
async fn an_artifact_directory_others_can_write_to_is_refused() {
    let base = tempfile::tempdir().expect("temp dir");
    let shared = base.path().join("shared");
    std::fs::create_dir(&shared).expect("created");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let error = registry_in(shared.clone()).err().expect("refused");
    assert!(
        matches!(&error, LoadError::ArtifactDir { path, .. } if *path == shared),
        "{error}"
    );
}

#[tokio::test]
async fn an_artifact_directory_of_another_user_is_refused() {
    let base = tempfile::tempdir().expect("temp dir");
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).expect("created");
    // Root can give it away; anyone else tries a directory root owns.
    let theirs = match std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)) {
        Ok(()) => theirs,
        Err(_) => PathBuf::from("/"),
    };
    let error = registry_in(theirs.clone()).err().expect("refused");
    assert!(
        matches!(&error, LoadError::ArtifactDir { path, .. } if *path == theirs),
        "{error}"
    );
    assert!(error.to_string().contains("owned by uid"), "{error}");
    // And says what to do.
    assert!(error.to_string().contains("subdirectory"), "{error}");
}

#[tokio::test]
async fn an_artifact_directory_its_group_may_write_to_is_made_private_again() {
    // What the kubelet does to every directory of a volume with an fsGroup
    // at each mount: the gateway's own directory comes back 2770.
    let base = tempfile::tempdir().expect("temp dir");
    let artifacts = base.path().join("artifacts");
    std::fs::create_dir(&artifacts).expect("created");
    std::fs::set_permissions(&artifacts, std::fs::Permissions::from_mode(0o2770)).expect("chmod");
    let registry = registry_in(artifacts.clone()).expect("a group-writable directory of ours");
    let mode = std::fs::metadata(&artifacts)
        .expect("exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    registry
        .load("echo", tidegate_functions::ECHO.to_vec())
        .await
        .expect("echo loads");
}

/// Log records written on this thread while it is alive, as text.
#[derive(Clone, Default)]
struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLog {
    /// Capture the log of this thread until the guard is dropped.
    fn start(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            // wasmtime's own debug records quote the guest's output too.
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log")).into_owned()
    }
}

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLog {
    type Writer = CapturedLog;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Calls stay on the test's thread (never moved to the long-call threads),
/// where its log is captured.
fn on_this_thread(config: RuntimeConfig) -> RuntimeConfig {
    RuntimeConfig {
        long_call_after: Duration::from_secs(60),
        ..config
    }
}

#[tokio::test(flavor = "current_thread")]
async fn guest_log_lines_cannot_forge_gateway_log_lines() {
    let (registry, _metrics, _dir) = registry(on_this_thread(RuntimeConfig::default()));
    let wasm = std::fs::read(tidegate_functions::FAULTY_PATH).expect("faulty.wasm");
    let function = registry.load("faulty", wasm).await.expect("faulty loads");
    let log = CapturedLog::default();
    let capturing = log.start();
    assert!(is_echo(send(&function, "forge").await, "forge"));
    drop(capturing);
    let text = log.text();
    // Each guest line is one record of the function's, its control
    // characters shown escaped.
    assert!(
        text.lines().all(|line| !line.starts_with("1999")),
        "a forged record:\n{text}"
    );
    assert!(
        !text.contains(['\r', '\u{1b}']),
        "raw control characters: {text:?}"
    );
    assert!(
        text.contains("harmless\\n1999-12-31T23:59:59.999999Z  INFO tidegate: forged by log"),
        "{text}"
    );
    assert!(
        text.contains(
            "harmless\\r\\u{1b}[2K1999-12-31T23:59:59.999999Z  INFO tidegate: forged by stdout"
        ),
        "{text}"
    );
    assert_eq!(text.lines().count(), 2, "{text}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_line_a_call_leaves_unfinished_is_logged_under_that_calls_connection() {
    let (registry, _metrics, _dir) = registry(on_this_thread(RuntimeConfig::default()));
    let wasm = std::fs::read(tidegate_functions::FAULTY_PATH).expect("faulty.wasm");
    let function = registry.load("faulty", wasm).await.expect("faulty loads");
    let log = CapturedLog::default();
    let capturing = log.start();
    let from = |id: &str, text: &str| {
        let context = Context {
            id: id.into(),
            ..context()
        };
        function.on_message(
            Arc::new(context),
            Payload::Text(text.into()),
            Priority::Normal,
        )
    };
    // One instance serves both calls, one after the other.
    from("node-1.first", "print begun-")
        .await
        .expect("ran")
        .expect("echo");
    from("node-1.second", "print ended\n")
        .await
        .expect("ran")
        .expect("echo");
    drop(capturing);
    let text = log.text();
    let line = text
        .lines()
        .find(|line| line.contains("begun-ended"))
        .unwrap_or_else(|| panic!("no joined line:\n{text}"));
    assert!(
        line.contains("node-1.first") && !line.contains("node-1.second"),
        "{line}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_function_that_floods_the_log_is_cut_to_its_lines_per_second() {
    let (registry, metrics, _dir) = registry(on_this_thread(RuntimeConfig {
        max_log_lines_per_second: NonZeroU32::new(50).unwrap(),
        ..RuntimeConfig::default()
    }));
    let wasm = std::fs::read(tidegate_functions::FAULTY_PATH).expect("faulty.wasm");
    let function = registry.load("faulty", wasm).await.expect("faulty loads");
    let log = CapturedLog::default();
    let capturing = log.start();
    assert!(is_echo(send(&function, "flood 400").await, "flood 400"));
    drop(capturing);
    let text = log.text();
    let logged = text
        .lines()
        .filter(|line| line.contains("flood line"))
        .count();
    // 50 in a second; the flood may straddle two.
    assert!((50..=100).contains(&logged), "{logged} lines logged");
    assert_eq!(
        counter(
            &metrics,
            "tidegate_function_log_lines_dropped_total",
            "faulty"
        ),
        (400 - logged) as f64
    );
    // The log says so once, not once per dropped line.
    let told = text
        .lines()
        .filter(|line| line.contains("further lines are dropped"))
        .count();
    assert_eq!(told, 1, "{text}");
}
