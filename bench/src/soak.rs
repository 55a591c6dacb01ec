//! The soak: three nodes of one cluster on the local broker for a long,
//! bounded run with connection churn, steady messages, a function deploy
//! every few minutes and one broker restart (`rabbitmqctl stop_app` and
//! `start_app`, so run it as root or as a user rabbitmqctl accepts).
//!
//! Every few seconds it samples each node's resident memory, open files
//! and spool, and the copies queue's depth, writes them to
//! `samples.jsonl` and plots them to `soak.png`. At the end it checks that
//! none of them grew without bound (the last quarter of the run against
//! the second) and that every message a client got a reply for has its
//! copy in the queue, and prints the figures the sizing table uses.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Target, spread_source};
use crate::matrix::{self, Server};
use crate::process;
use crate::scenario::cluster::http;
use crate::scenario::cold::{metrics, value};

/// What the soak does.
pub struct Options {
    /// How long the load runs.
    pub duration: Duration,
    /// Client connections open at once, over the three nodes.
    pub connections: usize,
    /// Messages per second per connection.
    pub rate: f64,
    /// A connection lives between these two, then closes and reconnects.
    pub lifetime: (Duration, Duration),
    /// A new version of the function every this long.
    pub deploy_every: Duration,
    /// How long the broker stays down, at the middle of the run.
    pub broker_down: Duration,
    /// How often to sample.
    pub sample_every: Duration,
    /// Where samples.jsonl, soak.png and summary.md go.
    pub out: PathBuf,
}

/// One sample of one node.
#[derive(serde::Serialize, Clone, Copy, Default)]
pub struct NodeSample {
    /// Resident memory.
    pub rss_bytes: u64,
    /// Open file descriptors.
    pub open_files: u64,
    /// `tidegate_spool_messages`.
    pub spool_messages: f64,
    /// `tidegate_connections_open`.
    pub connections: f64,
    /// `tidegate_messages_received_total`.
    pub received: f64,
    /// CPU time so far.
    pub cpu_seconds: f64,
}

/// One sample of the whole run.
#[derive(serde::Serialize, Clone)]
pub struct Sample {
    /// Since the load started.
    pub seconds: f64,
    /// Each node's.
    pub nodes: Vec<NodeSample>,
    /// Copies ready in the queue.
    pub queue_depth: u64,
    /// Messages that got their reply so far.
    pub replied: u64,
    /// Copies taken from the queue so far.
    pub copies: u64,
    /// Whether the broker was up.
    pub broker_up: bool,
}

/// The name of the copies queue, the cluster, the token: one run's own.
struct Names {
    queue: String,
    cluster: String,
    token: String,
}

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The function the clients talk to; a new version every `deploy_every`.
const FUNCTION: &str = "soak";

/// Run the soak with `tidegate` (default: next to this binary).
///
/// # Errors
/// When a node does not start, the broker cannot be restarted, or a check
/// fails (the message says which).
pub async fn run(tidegate: Option<PathBuf>, options: &Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.out)?;
    process::raise_file_limit();
    let tidegate = matrix::binary(tidegate)?;
    let id = uuid::Uuid::now_v7().simple().to_string();
    let names = Names {
        queue: format!("tidegate.soak.{id}"),
        cluster: format!("soak-{id}"),
        token: format!("soak-token-{id}"),
    };
    let mut nodes = Vec::new();
    for node in ["s1", "s2", "s3"] {
        let env = [
            ("TIDEGATE__SERVER__NODE_ID", node),
            ("TIDEGATE__CLUSTER__ENABLED", "true"),
            ("TIDEGATE__CLUSTER__NAME", names.cluster.as_str()),
            ("TIDEGATE__ADMIN__TOKEN", names.token.as_str()),
            ("TIDEGATE__QUEUE__QUEUE", names.queue.as_str()),
            ("TIDEGATE__QUEUE__PUSH_QUEUE", ""),
            ("TIDEGATE__WEBSOCKET__MAX_MESSAGE_RATE", "1000"),
        ];
        nodes.push(matrix::start_tidegate_with(
            &tidegate, "receipt", &env, None, false,
        )?);
    }
    let result = soak(&nodes, &names, options).await;
    drop(nodes);
    matrix::delete_cluster(&names.cluster);
    // Its own thread: delete_queue runs a runtime of its own.
    let queue = names.queue.clone();
    let _ = std::thread::spawn(move || matrix::delete_queue(&queue)).join();
    result
}

async fn soak(nodes: &[Server], names: &Names, options: &Options) -> anyhow::Result<()> {
    let admins: Vec<_> = nodes
        .iter()
        .map(|node| node.admin.context("tidegate has an admin listener"))
        .collect::<anyhow::Result<_>>()?;
    // The function and its route, through the first node: every node has
    // them through the cluster's registry.
    deploy(admins[0], &names.token, 0).await?;
    let route = serde_json::json!({"path": "/soak", "function": FUNCTION}).to_string();
    let (status, body) = http(
        admins[0],
        "PUT",
        "/v1/routes",
        &names.token,
        route.as_bytes(),
    )
    .await?;
    anyhow::ensure!(status == 201 || status == 200, "route: {status} {body}");
    for admin in &admins {
        wait_for(*admin, &names.token, "/v1/routes", "/soak").await?;
    }

    let copies = Arc::new(Mutex::new(HashSet::<u64>::new()));
    let replied = Arc::new(Mutex::new(HashSet::<u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let depth = Arc::new(AtomicU64::new(0));
    let consumer = tokio::spawn(consume(
        names.queue.clone(),
        copies.clone(),
        depth.clone(),
        stop.clone(),
    ));
    let targets: Vec<Target> = nodes
        .iter()
        .map(|node| Target::parse(&format!("{}soak", node.url)))
        .collect::<anyhow::Result<_>>()?;
    let clients: Vec<_> = (0..options.connections)
        .map(|n| {
            tokio::spawn(client(
                n,
                targets.clone(),
                options.rate,
                options.lifetime,
                replied.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut deploys = 1;
    let mut broker = BrokerState::Up;
    let half = options.duration / 2;
    let mut lines = std::fs::File::create(options.out.join("samples.jsonl"))?;
    while started.elapsed() < options.duration {
        tokio::time::sleep(options.sample_every).await;
        let elapsed = started.elapsed();
        if elapsed >= options.deploy_every * deploys {
            // A deploy answers only while the broker is up (it goes through
            // the registry stream); during the restart it waits its turn.
            if broker == BrokerState::Up || broker == BrokerState::Back {
                deploy(admins[deploys as usize % 3], &names.token, deploys).await?;
                deploys += 1;
            }
        }
        broker = match broker {
            BrokerState::Up if elapsed >= half => {
                rabbitmqctl("stop_app")?;
                BrokerState::Down(Instant::now())
            }
            BrokerState::Down(since) if since.elapsed() >= options.broker_down => {
                rabbitmqctl("start_app")?;
                BrokerState::Back
            }
            other => other,
        };
        let sample = sample(
            nodes,
            &admins,
            elapsed,
            &depth,
            &replied,
            &copies,
            !matches!(broker, BrokerState::Down(_)),
        )
        .await?;
        use std::io::Write;
        writeln!(lines, "{}", serde_json::to_string(&sample)?)?;
        print_sample(&sample);
        samples.push(sample);
    }
    anyhow::ensure!(
        broker == BrokerState::Back,
        "the run ended before the broker restart finished: give it a longer --duration"
    );
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await??;
    }
    // Every replied message's copy, once the spools have emptied.
    let replied = replied.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    let missing = loop {
        let missing = replied
            .difference(&copies.lock().unwrap())
            .copied()
            .collect::<Vec<_>>();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let final_sample = sample(
        nodes,
        &admins,
        started.elapsed(),
        &depth,
        &Mutex::new(replied.clone()),
        &copies,
        true,
    )
    .await?;
    consumer.abort();
    crate::soak_plot::plot(&options.out.join("soak.png"), &samples)?;
    let verdict = verdict(
        &samples,
        &final_sample,
        &replied,
        &missing,
        deploys,
        options,
    );
    std::fs::write(options.out.join("summary.md"), &verdict.text)?;
    println!("{}", verdict.text);
    if !verdict.passed {
        bail!(
            "the soak failed: see {}",
            options.out.join("summary.md").display()
        );
    }
    Ok(())
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum BrokerState {
    Up,
    Down(Instant),
    Back,
}

fn rabbitmqctl(what: &str) -> anyhow::Result<()> {
    let status = Command::new("rabbitmqctl")
        .args(["-q", what])
        .status()
        .context("rabbitmqctl (the soak restarts the local broker)")?;
    anyhow::ensure!(status.success(), "rabbitmqctl {what}: {status}");
    if what == "start_app" {
        let status = Command::new("rabbitmqctl")
            .args(["-q", "await_startup"])
            .status()?;
        anyhow::ensure!(status.success(), "rabbitmqctl await_startup: {status}");
    }
    println!("broker: rabbitmqctl {what}");
    Ok(())
}

/// Upload version `n` of the soak function (the echo component with a
/// custom section naming `n`, so that each is a new version) through
/// `admin`; it goes live at once on every node.
async fn deploy(admin: std::net::SocketAddr, token: &str, n: u32) -> anyhow::Result<()> {
    let mut wasm = tidegate_functions::ECHO.to_vec();
    let name = b"tidegate-soak";
    let payload = n.to_le_bytes();
    let mut section = Vec::new();
    leb128(&mut section, name.len() as u64);
    section.extend_from_slice(name);
    section.extend_from_slice(&payload);
    wasm.push(0);
    leb128(&mut wasm, section.len() as u64);
    wasm.extend_from_slice(&section);
    let path = format!("/v1/functions/{FUNCTION}");
    let started = Instant::now();
    loop {
        let (status, body) = http(admin, "PUT", &path, token, &wasm).await?;
        match status {
            200 | 201 => break,
            // The cluster's registry is away (the broker restart): again.
            503 if started.elapsed() < Duration::from_secs(120) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            _ => bail!("deploy {n}: {status} {body}"),
        }
    }
    println!("deploy: version {n} of {FUNCTION} through {admin}");
    Ok(())
}

fn leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Wait until `path` on `admin` mentions `what`.
async fn wait_for(
    admin: std::net::SocketAddr,
    token: &str,
    path: &str,
    what: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while !http(admin, "GET", path, token, b"").await?.1.contains(what) {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "{path} on {admin} did not list {what} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// One client slot: connect to a node (the next one each time), send
/// `rate` messages a second for a random lifetime, each carrying a unique
/// number, note the numbers that got their reply, close, and again.
async fn client(
    slot: usize,
    targets: Vec<Target>,
    rate: f64,
    lifetime: (Duration, Duration),
    replied: Arc<Mutex<HashSet<u64>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut seq: u64 = 0;
    let mut round = slot;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let target = &targets[round % targets.len()];
        let Ok(mut ws) = target.connect(Some(spread_source(slot))).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let life = lifetime.0 + (lifetime.1 - lifetime.0).mul_f64(fastrand::f64());
        let opened = Instant::now();
        while opened.elapsed() < life && !stop.load(Ordering::Relaxed) {
            seq += 1;
            let number = ((slot as u64) << 40) | seq;
            let text = number.to_string();
            if ws.send(Message::Text(text.clone().into())).await.is_err() {
                break;
            }
            // A reply within 10 s, or the connection is given up (a close
            // 1013 for a copy in doubt counts as no reply).
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(reply)))) if reply.as_str() == text => {
                    replied.lock().unwrap().insert(number);
                }
                _ => break,
            }
            tokio::time::sleep(interval).await;
        }
        let _ = ws.close(None).await;
    }
    Ok(())
}

/// Take every copy from the queue (reconnecting across the broker
/// restart), noting each one's number, and the queue's depth.
async fn consume(
    queue: String,
    copies: Arc<Mutex<HashSet<u64>>>,
    depth: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
    };
    loop {
        let attempt = async {
            let connection =
                lapin::Connection::connect(BROKER, lapin::ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            channel.basic_qos(1000, BasicQosOptions::default()).await?;
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await?;
            depth.store(u64::from(declared.message_count()), Ordering::Relaxed);
            let mut consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "soak".into(),
                    // Acknowledged once noted: a copy in flight when the
                    // broker stops is delivered again, not lost to the count.
                    BasicConsumeOptions::default(),
                    lapin::types::FieldTable::default(),
                )
                .await?;
            let mut last_depth = Instant::now();
            while let Some(delivery) = consumer.next().await {
                let delivery = delivery?;
                if let Some(number) = std::str::from_utf8(&delivery.data)
                    .ok()
                    .and_then(|text| text.parse::<u64>().ok())
                {
                    copies.lock().unwrap().insert(number);
                }
                delivery.ack(BasicAckOptions::default()).await?;
                if last_depth.elapsed() > Duration::from_secs(1) {
                    last_depth = Instant::now();
                    let declared = channel
                        .queue_declare(
                            queue.as_str().into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..QueueDeclareOptions::default()
                            },
                            lapin::types::FieldTable::default(),
                        )
                        .await?;
                    depth.store(u64::from(declared.message_count()), Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        };
        if let Err(e) = attempt.await
            && !stop.load(Ordering::Relaxed)
        {
            eprintln!("consumer: {e}; reconnecting");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn sample(
    nodes: &[Server],
    admins: &[std::net::SocketAddr],
    elapsed: Duration,
    depth: &AtomicU64,
    replied: &Mutex<HashSet<u64>>,
    copies: &Mutex<HashSet<u64>>,
    broker_up: bool,
) -> anyhow::Result<Sample> {
    let mut samples = Vec::new();
    for (node, admin) in nodes.iter().zip(admins) {
        let pid = node.pid();
        // A node whose admin port does not answer fails the run, rather than
        // reading as an empty spool.
        let page = metrics(*admin)
            .await
            .with_context(|| format!("the metrics of node {admin}"))?;
        samples.push(NodeSample {
            rss_bytes: process::rss_bytes(pid)?,
            open_files: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64,
            spool_messages: value(&page, "tidegate_spool_messages").unwrap_or(0.0),
            connections: value(&page, "tidegate_connections_open{route=\"/soak\"}").unwrap_or(0.0),
            received: value(&page, "tidegate_messages_received_total{route=\"/soak\"}")
                .unwrap_or(0.0),
            cpu_seconds: process::cpu_seconds(pid)?,
        });
    }
    Ok(Sample {
        seconds: elapsed.as_secs_f64(),
        nodes: samples,
        queue_depth: depth.load(Ordering::Relaxed),
        replied: replied.lock().unwrap().len() as u64,
        copies: copies.lock().unwrap().len() as u64,
        broker_up,
    })
}

fn print_sample(sample: &Sample) {
    let nodes: Vec<String> = sample
        .nodes
        .iter()
        .map(|n| {
            format!(
                "{:.0} MiB {} fds {} spooled {} conns",
                n.rss_bytes as f64 / 1048576.0,
                n.open_files,
                n.spool_messages,
                n.connections
            )
        })
        .collect();
    println!(
        "{:>6.0} s  {}  queue {}  replied {}  copies {}{}",
        sample.seconds,
        nodes.join(" | "),
        sample.queue_depth,
        sample.replied,
        sample.copies,
        if sample.broker_up {
            ""
        } else {
            "  (broker down)"
        }
    );
}

/// What the growth check reads of a node's sample.
type Measure = fn(&NodeSample) -> f64;

struct Verdict {
    passed: bool,
    text: String,
}

/// Mean of `f` over the samples in `[from, to)` fractions of the run.
fn mean(samples: &[Sample], from: f64, to: f64, f: impl Fn(&Sample) -> f64) -> f64 {
    let n = samples.len() as f64;
    let window: Vec<f64> = samples
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            let at = *i as f64 / n;
            at >= from && at < to
        })
        .map(|(_, s)| f(s))
        .collect();
    window.iter().sum::<f64>() / window.len().max(1) as f64
}

/// The least-squares slope of `f` over the samples in `[from, to)`
/// fractions of the run, per hour.
fn slope_per_hour(samples: &[Sample], from: f64, to: f64, f: impl Fn(&Sample) -> f64) -> f64 {
    let n = samples.len() as f64;
    let points: Vec<(f64, f64)> = samples
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            let at = *i as f64 / n;
            at >= from && at < to
        })
        .map(|(_, s)| (s.seconds / 3600.0, f(s)))
        .collect();
    let count = points.len() as f64;
    if count < 2.0 {
        return 0.0;
    }
    let (mean_x, mean_y) = (
        points.iter().map(|p| p.0).sum::<f64>() / count,
        points.iter().map(|p| p.1).sum::<f64>() / count,
    );
    let covariance: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let variance: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if variance == 0.0 {
        0.0
    } else {
        covariance / variance
    }
}

fn verdict(
    samples: &[Sample],
    last: &Sample,
    replied: &HashSet<u64>,
    missing: &[u64],
    deploys: u32,
    options: &Options,
) -> Verdict {
    let mut passed = true;
    let mut text = String::from("# Soak\n\n");
    text += &format!(
        "{} s, {} connections over 3 nodes at {}/s each, lifetimes {:?}-{:?}, a deploy every {:?} \
         ({deploys} versions), the broker down for {:?} at the middle.\n\n",
        options.duration.as_secs(),
        options.connections,
        options.rate,
        options.lifetime.0,
        options.lifetime.1,
        options.deploy_every,
        options.broker_down,
    );
    text += "| what | second quarter | last quarter (trend) | bound | verdict |\n|---|---|---|---|---|\n";
    let nodes = last.nodes.len();
    // Growth, per node: the last quarter (the broker restart is at the
    // half) against the second, with a little absolute room for noise; and
    // the trend over the second half, once the restart has settled, which
    // must not climb faster than `per_hour` (a steady leak passes the first
    // check in a short run, not this one).
    for node in 0..nodes {
        let checks: [(&str, Measure, f64, f64, f64); 2] = [
            (
                "RSS (MiB)",
                |n| n.rss_bytes as f64 / 1048576.0,
                1.10,
                8.0,
                16.0,
            ),
            ("open files", |n| n.open_files as f64, 1.10, 32.0, 32.0),
        ];
        for (what, measure, ratio, room, per_hour) in checks {
            let f = |s: &Sample| measure(&s.nodes[node]);
            let second = mean(samples, 0.25, 0.5, f);
            let fourth = mean(samples, 0.75, 1.0, f);
            let bound = second * ratio + room;
            let trend = slope_per_hour(samples, 0.55, 1.0, f);
            let ok = fourth <= bound && trend <= per_hour;
            passed &= ok;
            text += &format!(
                "| node {} {what} | {second:.1} | {fourth:.1} ({trend:+.1}/h) | {bound:.1} ({per_hour:+.0}/h) | {} |\n",
                node + 1,
                if ok { "ok" } else { "GREW" }
            );
        }
    }
    let spooled: f64 = last.nodes.iter().map(|n| n.spool_messages).sum();
    let spool_ok = spooled == 0.0;
    passed &= spool_ok;
    text += &format!(
        "| spool at the end (all nodes) | | {spooled} | 0 | {} |\n",
        if spool_ok { "ok" } else { "LEFT" }
    );
    let peak_spool = samples
        .iter()
        .map(|s| s.nodes.iter().map(|n| n.spool_messages).sum::<f64>())
        .fold(0.0, f64::max);
    let peak_depth = samples.iter().map(|s| s.queue_depth).max().unwrap_or(0);
    text += &format!(
        "| spool peak (broker down) | | {peak_spool} | | |\n| queue depth peak | | {peak_depth} | | |\n"
    );
    // A run that answered nothing, or never read the queue, proves nothing.
    // (Fewer than 8 samples leave the quarters empty: nothing compared.)
    // Every node served clients, too.
    let exercised = !replied.is_empty()
        && last.copies > 0
        && deploys >= 2
        && samples.len() >= 8
        && last.nodes.iter().all(|node| node.received > 0.0);
    passed &= exercised;
    text += &format!(
        "| messages answered, copies read, versions deployed | | {}, {}, {deploys} | > 0, > 0, >= 2 | {} |\n",
        replied.len(),
        last.copies,
        if exercised { "ok" } else { "NOT EXERCISED" }
    );
    let missing_ok = missing.is_empty();
    passed &= missing_ok;
    text += &format!(
        "| replied messages without a copy | | {} of {} | 0 | {} |\n\n",
        missing.len(),
        replied.len(),
        if missing_ok { "ok" } else { "MISSING" }
    );
    // Sizing: CPU per message over the whole run, memory per connection.
    let cpu: f64 = last.nodes.iter().map(|n| n.cpu_seconds).sum();
    let messages = replied.len() as f64;
    let connections = mean(samples, 0.25, 1.0, |s| {
        s.nodes.iter().map(|n| n.connections).sum::<f64>()
    });
    let rss = mean(samples, 0.25, 1.0, |s| {
        s.nodes.iter().map(|n| n.rss_bytes as f64).sum::<f64>()
    });
    text += &format!(
        "Sizing: {messages:.0} messages answered in {cpu:.1} CPU-seconds of the three nodes: \
         {:.0} messages per CPU-second (with copies confirmed by the broker, churn and the \
         cluster's heartbeats); {:.0} connections open on average, {:.1} MiB resident per node \
         on average.\n",
        messages / cpu.max(0.001),
        connections,
        rss / nodes as f64 / 1048576.0,
    );
    text += &format!("\nVerdict: {}\n", if passed { "passed" } else { "FAILED" });
    Verdict { passed, text }
}
