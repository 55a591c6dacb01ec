//! The standard matrix: the broker's ceiling, the raw echo baselines and
//! Tidegate in its modes, measured one server at a time in the same run,
//! then a report with the ratios and a chart.
//!
//! Servers run as child processes. When `taskset` exists, servers are
//! pinned to CPU 1 and this load generator to CPU 0, so on a two-core
//! machine each side has one core.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::client::Target;
use crate::figures::Figures;
use crate::report;
use crate::scenario;

/// The fixed parameters of a run.
struct Plan {
    duration: Duration,
    warmup: Duration,
    idle_connections: usize,
    rounds: usize,
}

/// A server under test, killed on drop.
pub(crate) struct Server {
    child: Child,
    /// `wss://ADDR/` (or the baseline's URL).
    pub(crate) url: String,
    /// Tidegate's admin listener.
    pub(crate) admin: Option<SocketAddr>,
    /// Tidegate's queue, deleted when the server stops.
    queue: Option<String>,
    _state: Option<tempfile::TempDir>,
}

impl Server {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut exited = false;
        while !exited && std::time::Instant::now() < deadline {
            exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if !exited {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(queue) = self.queue.take() {
            // Drop may run inside the async runtime: delete on a thread.
            let _ = std::thread::spawn(move || delete_queue(&queue)).join();
        }
    }
}

/// Delete a queue the benchmark created.
pub(crate) fn delete_queue(queue: &str) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    runtime.block_on(async {
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        if let Ok(connection) =
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
        {
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel
                    .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
                    .await;
            }
            let _ = connection.close(200, "done".into()).await;
        }
    });
}

/// Three nodes of one cluster on the local broker, measured by
/// [`scenario::cluster`].
///
/// # Errors
/// When a node does not start or the scenario fails.
pub async fn cluster(
    tidegate: Option<PathBuf>,
    members: usize,
    rounds: usize,
    broadcasts: usize,
) -> anyhow::Result<Figures> {
    let tidegate = binary(tidegate)?;
    let name = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let token = format!("bench-token-{}", uuid::Uuid::now_v7().simple());
    let config = format!(
        "[functions.chat]\nwasm = \"{}\"\n[routes]\n\"/chat\" = \"chat\"\n",
        tidegate_functions::CHAT_PATH
    );
    let mut servers = Vec::new();
    for node in ["n1", "n2", "n3"] {
        let env = [
            ("TIDEGATE__SERVER__NODE_ID", node),
            ("TIDEGATE__CLUSTER__ENABLED", "true"),
            ("TIDEGATE__CLUSTER__NAME", name.as_str()),
            ("TIDEGATE__CLUSTER__HEARTBEAT_INTERVAL", "500ms"),
            ("TIDEGATE__ADMIN__TOKEN", token.as_str()),
            ("TIDEGATE__QUEUE__PUSH_QUEUE", ""),
        ];
        servers.push(start_tidegate_with(
            &tidegate,
            "off",
            &env,
            Some(&config),
            false,
        )?);
    }
    let nodes: Vec<scenario::cluster::Node> = servers
        .iter()
        .map(|server| scenario::cluster::Node {
            url: format!("{}chat", server.url),
            admin: server.admin.expect("tidegate has an admin listener"),
        })
        .collect();
    // Until each node sees the three.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for node in &nodes {
        while scenario::cold::value(
            &scenario::cold::metrics(node.admin).await?,
            "tidegate_cluster_nodes",
        ) != Some(3.0)
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the nodes did not see each other within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let options = scenario::cluster::Options {
        members,
        rounds,
        broadcasts,
        token,
    };
    let figures = scenario::cluster::run(&nodes, &options).await;
    drop(servers);
    delete_cluster(&name);
    figures
}

/// Delete what a benchmark cluster left on the broker.
pub(crate) fn delete_cluster(name: &str) {
    let name = name.to_owned();
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let connection = lapin::Connection::connect(
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                lapin::ConnectionProperties::default(),
            )
            .await?;
            let channel = connection.create_channel().await?;
            for kind in ["heartbeats", "nodes", "groups"] {
                let _ = channel
                    .exchange_delete(
                        format!("{name}.{kind}").as_str().into(),
                        lapin::options::ExchangeDeleteOptions::default(),
                    )
                    .await;
            }
            let _ = channel
                .queue_delete(
                    format!("{name}.registry").as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
            Ok::<_, anyhow::Error>(())
        })
    })
    .join();
}

/// The tidegate binary: `path`, or the one next to this benchmark.
pub(crate) fn binary(path: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match path {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("the benchmark binary has no directory")?
            .join("tidegate"),
    })
}

/// Run the matrix and write the report into `out`.
///
/// # Errors
/// When a server cannot be started or a scenario fails.
pub async fn run(out: &Path, tidegate: Option<PathBuf>, quick: bool) -> anyhow::Result<()> {
    let plan = if quick {
        Plan {
            duration: Duration::from_secs(2),
            warmup: Duration::from_millis(500),
            idle_connections: 1000,
            rounds: 5,
        }
    } else {
        Plan {
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            idle_connections: 10_000,
            rounds: 20,
        }
    };
    let tidegate = binary(tidegate)?;
    anyhow::ensure!(
        tidegate.exists(),
        "{} not found: build it first (cargo build --release --bin tidegate) or pass --tidegate",
        tidegate.display()
    );
    std::fs::create_dir_all(out)?;
    let pinned = pin_self();
    let mut results: Vec<Figures> = Vec::new();
    let mut keep = |figures: Figures| {
        figures.print();
        results.push(figures);
    };

    keep(scenario::instantiate::run(if quick { 200 } else { 2000 }).await?);
    // The broker's ceiling, with bare messages and with messages that
    // carry a gateway copy's properties.
    let publish = |copy_properties| scenario::publish::Options {
        url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        size: 64,
        in_flight: 1024,
        duration: plan.duration,
        warmup: plan.warmup,
        copy_properties,
    };
    for copy_properties in [false, true] {
        keep(
            scenario::publish::run(&publish(copy_properties))
                .await
                .context(
                    "measuring the broker's ceiling (is RabbitMQ running on 127.0.0.1:5672?)",
                )?,
        );
    }

    let echo = |pid| scenario::echo::Options {
        connections: 64,
        size: 64,
        window: 16,
        duration: plan.duration,
        warmup: plan.warmup,
        server_pid: Some(pid),
    };

    // Raw echo over TCP and over rustls.
    for (name, tls) in [("baseline ws", false), ("baseline wss", true)] {
        let server = start_baseline(tls, pinned)?;
        let target = Target::parse(&server.url)?;
        keep(scenario::echo::run(&target, name, &echo(server.pid())).await?);
    }

    // Tidegate, copies off: the function path alone.
    {
        let server = start_tidegate(&tidegate, "off", &[], pinned)?;
        let target = Target::parse(&server.url)?;
        keep(scenario::echo::run(&target, "tidegate (copies off)", &echo(server.pid())).await?);
    }

    // Tidegate, receipt mode: the default.
    let receipt_rate = {
        let server = start_tidegate(&tidegate, "receipt", &[], pinned)?;
        let target = Target::parse(&server.url)?;
        let figures =
            scenario::echo::run(&target, "tidegate (receipt)", &echo(server.pid())).await?;
        let rate = figures.get("msgs_per_s").unwrap_or(1000.0);
        keep(figures);
        rate
    };

    // Latency at half of the receipt mode's throughput, for both.
    let latency = scenario::latency::Options {
        connections: 16,
        rate: (receipt_rate / 2.0).max(100.0),
        size: 64,
        duration: plan.duration,
        warmup: plan.warmup,
    };
    {
        let server = start_baseline(true, pinned)?;
        let target = Target::parse(&server.url)?;
        keep(scenario::latency::run(&target, "baseline wss", &latency).await?);
    }
    // The broker's own confirm latency at that rate: the floor for a reply
    // that waits for its copy.
    for copy_properties in [false, true] {
        keep(scenario::publish::latency(&publish(copy_properties), latency.rate).await?);
    }
    {
        let server = start_tidegate(&tidegate, "receipt", &[], pinned)?;
        let target = Target::parse(&server.url)?;
        keep(scenario::latency::run(&target, "tidegate (receipt)", &latency).await?);
    }

    // Connection rate and memory per idle connection.
    let connect = |pid| scenario::connect::Options {
        concurrency: 8,
        duration: plan.duration.min(Duration::from_secs(5)),
        server_pid: Some(pid),
    };
    let idle = |pid| scenario::idle::Options {
        connections: plan.idle_connections,
        concurrency: 64,
        server_pid: pid,
        settle: Duration::from_secs(2),
    };
    {
        let server = start_baseline(true, pinned)?;
        let target = Target::parse(&server.url)?;
        keep(scenario::connect::run(&target, "baseline wss", &connect(server.pid())).await?);
        keep(scenario::idle::run(&target, "baseline wss", &idle(server.pid())).await?);
    }
    {
        let server = start_tidegate(&tidegate, "receipt", &[], pinned)?;
        let target = Target::parse(&server.url)?;
        keep(scenario::connect::run(&target, "tidegate (receipt)", &connect(server.pid())).await?);
        keep(scenario::idle::run(&target, "tidegate (receipt)", &idle(server.pid())).await?);
    }

    // Cold start end to end, with a gateway that scales down at once.
    {
        let server = start_tidegate(
            &tidegate,
            "receipt",
            &[
                ("TIDEGATE__RUNTIME__IDLE_TIMEOUT", "50ms"),
                ("TIDEGATE__RUNTIME__UNLOAD_AFTER", "100ms"),
            ],
            pinned,
        )?;
        let target = Target::parse(&server.url)?;
        let options = scenario::cold::Options {
            admin: server.admin.context("tidegate's admin address")?,
            function: "echo".into(),
            rounds: plan.rounds,
        };
        keep(scenario::cold::run(&target, "tidegate (receipt)", &options).await?);
    }

    // Isolation: well-behaved clients while other connections make the
    // function fail (copies off, so the function path alone is measured).
    {
        let config = format!(
            "[functions.faulty]\nwasm = \"{}\"\n[routes]\n\"/\" = \"faulty\"\n",
            tidegate_functions::FAULTY_PATH
        );
        let server = start_tidegate_with(
            &tidegate,
            "off",
            &[("TIDEGATE__RUNTIME__TIMEOUT", "1s")],
            Some(&config),
            pinned,
        )?;
        let target = Target::parse(&server.url)?;
        let options = scenario::isolation::Options {
            latency: scenario::latency::Options {
                connections: 16,
                rate: 2000.0,
                size: 64,
                duration: plan.duration,
                warmup: plan.warmup,
            },
            offenders: 2,
            faults: scenario::isolation::FAULTS
                .iter()
                .map(|f| f.to_string())
                .collect(),
        };
        keep(scenario::isolation::run(&target, "tidegate (copies off)", &options).await?);
    }

    // Three nodes of one cluster on the local broker.
    let (members, rounds, broadcasts) = if quick {
        (300, 200, 20)
    } else {
        (1000, 500, 50)
    };
    keep(cluster(Some(tidegate.clone()), members, rounds, broadcasts).await?);

    report::write(out, &results, quick)?;
    println!("report written to {}", out.join("report.md").display());
    Ok(())
}

/// Pin this process to CPU 0 when `taskset` exists; returns whether the
/// servers should be pinned to CPU 1.
fn pin_self() -> bool {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cpus < 2 {
        return false;
    }
    Command::new("taskset")
        .args(["-cp", "0", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn command(program: &Path, pinned: bool) -> Command {
    if pinned {
        let mut command = Command::new("taskset");
        command.arg("-c").arg("1").arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn start_baseline(tls: bool, pinned: bool) -> anyhow::Result<Server> {
    let mut command = command(&std::env::current_exe()?, pinned);
    command.args(["baseline", "--listen", "127.0.0.1:0"]);
    if tls {
        command.arg("--tls");
    }
    let (child, line) = spawn(command, "listening on ")?;
    Ok(Server {
        child,
        url: line,
        admin: None,
        queue: None,
        _state: None,
    })
}

fn start_tidegate(
    binary: &Path,
    mode: &str,
    env: &[(&str, &str)],
    pinned: bool,
) -> anyhow::Result<Server> {
    start_tidegate_with(binary, mode, env, None, pinned)
}

/// Start tidegate with a configuration file's contents too.
pub(crate) fn start_tidegate_with(
    binary: &Path,
    mode: &str,
    env: &[(&str, &str)],
    config: Option<&str>,
    pinned: bool,
) -> anyhow::Result<Server> {
    let state = tempfile::tempdir()?;
    let queue = format!("tidegate.bench.{}", uuid::Uuid::now_v7().simple());
    let mut command = command(binary, pinned);
    command
        .args(["serve", "--dev"])
        .env("RUST_LOG", "warn")
        .env("TIDEGATE__SERVER__LISTEN", "127.0.0.1:0")
        .env("TIDEGATE__ADMIN__LISTEN", "127.0.0.1:0")
        .env("TIDEGATE__SERVER__STATE_DIR", state.path())
        .env("TIDEGATE__SERVER__MAX_CONNECTIONS", "15000")
        // The load generator is one client sending as fast as it can.
        .env("TIDEGATE__SERVER__MAX_CONNECTIONS_PER_IP", "15000")
        .env("TIDEGATE__WEBSOCKET__MAX_MESSAGE_RATE", "1000000000")
        .env("TIDEGATE__QUEUE__QUEUE", &queue)
        .env("TIDEGATE__QUEUE__MODE", mode);
    for (key, value) in env {
        command.env(key, value);
    }
    if let Some(config) = config {
        let path = state.path().join("tidegate.toml");
        std::fs::write(&path, config)?;
        command.arg("--config").arg(path);
    }
    let (child, line) = spawn(command, "Tidegate listening on wss://")?;
    // "ADDR/ (admin http://ADDR/metrics)"
    let (wss, rest) = line
        .split_once("/ (admin http://")
        .context("tidegate's listening line")?;
    let admin = rest.trim_end_matches("/metrics)").parse()?;
    Ok(Server {
        child,
        url: format!("wss://{wss}/"),
        admin: Some(admin),
        queue: Some(queue),
        _state: Some(state),
    })
}

/// Start `command` and wait (up to a minute) for the stdout line starting
/// with `prefix`; returns the rest of that line.
fn spawn(mut command: Command, prefix: &str) -> anyhow::Result<(Child, String)> {
    command.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = prefix.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(&prefix) {
                let _ = tx.send(rest.to_owned());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) => Ok((child, line)),
        Err(_) => {
            let _ = child.kill();
            bail!("{command:?} did not start listening within a minute")
        }
    }
}
