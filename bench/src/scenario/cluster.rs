//! Three nodes of one cluster, each serving the chat function on `/chat`:
//!
//! - a send to a connection on the same node against one to a connection
//!   on another node (chat's `whisper`, from the sender's message to the
//!   receiver's frame), p50 and p99;
//! - a broadcast to members spread evenly over the three nodes: messages
//!   delivered per second, and the messages the broker carried per
//!   broadcast (the nodes' `tidegate_cluster_messages_total` for
//!   broadcasts);
//! - registry propagation: from an upload's answer on the first node to
//!   the last node listing the function.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Target, Ws, spread_source};
use crate::figures::Figures;
use crate::scenario::cold::{metrics, value};

/// One node: its `/chat` URL and admin address.
pub struct Node {
    /// `wss://ADDR/chat`.
    pub url: String,
    /// The admin listener.
    pub admin: SocketAddr,
}

/// How much to measure.
pub struct Options {
    /// Members of the broadcast group, over the three nodes.
    pub members: usize,
    /// Whispers per latency figure.
    pub rounds: usize,
    /// Broadcasts.
    pub broadcasts: usize,
    /// The management API's token.
    pub token: String,
}

/// Measure `nodes` (three of one cluster).
///
/// # Errors
/// When a node does not answer as the chat function does.
pub async fn run(nodes: &[Node], options: &Options) -> anyhow::Result<Figures> {
    let mut figures = Figures::new(
        "cluster",
        "tidegate (3 nodes)",
        format!(
            "members={} rounds={} broadcasts={}",
            options.members, options.rounds, options.broadcasts
        ),
    );
    let targets: Vec<Target> = nodes
        .iter()
        .map(|node| Target::parse(&node.url))
        .collect::<anyhow::Result<_>>()?;

    // The receiver on node 0 learns its id from its own line in a room.
    let mut receiver = targets[0].connect(None).await?;
    act(&mut receiver, r#"{"action":"join","room":"probe"}"#).await?;
    next_text(&mut receiver).await?;
    act(
        &mut receiver,
        r#"{"action":"send","room":"probe","text":"me"}"#,
    )
    .await?;
    let line: serde_json::Value = serde_json::from_str(&next_text(&mut receiver).await?)?;
    let id = line["from"]
        .as_str()
        .context("a chat line's sender")?
        .to_owned();
    for (name, target) in [("same_node", &targets[0]), ("cross_node", &targets[1])] {
        let mut sender = target.connect(None).await?;
        let histogram = whispers(&mut sender, &mut receiver, &id, options.rounds).await?;
        figures.set(
            &format!("{name}_send_p50_us"),
            histogram.value_at_quantile(0.5) as f64,
        );
        figures.set(
            &format!("{name}_send_p99_us"),
            histogram.value_at_quantile(0.99) as f64,
        );
    }

    // Members spread over the three nodes, every one in the room.
    let mut members = Vec::with_capacity(options.members);
    for n in 0..options.members {
        let mut member = targets[n % 3].connect(Some(spread_source(n))).await?;
        act(&mut member, r#"{"action":"join","room":"all"}"#).await?;
        next_text(&mut member).await?;
        members.push(member);
    }
    let received = Arc::new(AtomicU64::new(0));
    let mut sender = members.pop().context("no members")?;
    let readers: Vec<_> = members
        .into_iter()
        .map(|mut member| {
            let received = received.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = member.next().await {
                    if message.is_text() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let broadcasts_before = broadcasts_on(nodes).await?;
    let expected = (options.members - 1) as u64 * options.broadcasts as u64;
    let started = Instant::now();
    for round in 0..options.broadcasts {
        let text = format!(r#"{{"action":"send","room":"all","text":"{round}"}}"#);
        act(&mut sender, &text).await?;
        // The sender's own copy.
        next_text(&mut sender).await?;
    }
    while received.load(Ordering::Relaxed) < expected {
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "{} of {expected} broadcast messages arrived in a minute",
                received.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    let broadcasts_after = broadcasts_on(nodes).await?;
    for reader in readers {
        reader.abort();
    }
    figures.set(
        "broadcast_deliveries_per_s",
        crate::scenario::rate(expected, elapsed),
    );
    let per = |before: f64, after: f64| (after - before) / options.broadcasts as f64;
    figures.set(
        "broker_publishes_per_broadcast",
        per(broadcasts_before.0, broadcasts_after.0),
    );
    figures.set(
        "broker_deliveries_per_broadcast",
        per(broadcasts_before.1, broadcasts_after.1),
    );

    figures.set(
        "registry_propagation_ms",
        propagation(nodes, &options.token).await?.as_secs_f64() * 1000.0,
    );
    Ok(figures)
}

async fn act(ws: &mut Ws, text: &str) -> anyhow::Result<()> {
    ws.send(Message::Text(text.into())).await?;
    Ok(())
}

async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no message within 10 s")?
            .context("the connection closed")??;
        if let Message::Text(text) = message {
            return Ok(text.to_string());
        }
    }
}

/// `rounds` whispers from `sender` to connection `id` (`receiver`), one at
/// a time: microseconds from the send to the frame.
async fn whispers(
    sender: &mut Ws,
    receiver: &mut Ws,
    id: &str,
    rounds: usize,
) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for round in 0..rounds {
        let text = serde_json::json!({"action": "whisper", "to": id, "text": round.to_string()});
        let sent = Instant::now();
        act(sender, &text.to_string()).await?;
        let line: serde_json::Value = serde_json::from_str(&next_text(receiver).await?)?;
        if line["text"].as_str() != Some(round.to_string().as_str()) {
            bail!("whisper {round} arrived as {line}");
        }
        histogram.record(sent.elapsed().as_micros().max(1) as u64)?;
    }
    Ok(histogram)
}

/// Broadcasts published to the broker, and taken from it, by all nodes.
async fn broadcasts_on(nodes: &[Node]) -> anyhow::Result<(f64, f64)> {
    let (mut out, mut taken) = (0.0, 0.0);
    for node in nodes {
        let page = metrics(node.admin).await?;
        let series = |direction: &str| {
            value(
                &page,
                &format!(
                    "tidegate_cluster_messages_total{{direction=\"{direction}\",kind=\"broadcast\"}}"
                ),
            )
            .unwrap_or(0.0)
        };
        out += series("out");
        taken += series("in");
    }
    Ok((out, taken))
}

/// From the answer to an upload on the first node to the last node
/// listing it.
async fn propagation(nodes: &[Node], token: &str) -> anyhow::Result<Duration> {
    let name = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let name = &name[..30];
    let path = format!("/v1/functions/{name}");
    let (status, body) = http(
        nodes[0].admin,
        "PUT",
        &path,
        token,
        tidegate_functions::ECHO,
    )
    .await?;
    if status != 201 {
        bail!("upload: {status} {body}");
    }
    let answered = Instant::now();
    for node in &nodes[1..] {
        while http(node.admin, "GET", &path, token, b"").await?.0 != 200 {
            if answered.elapsed() > Duration::from_secs(30) {
                bail!("the upload did not reach {} in 30 s", node.admin);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(answered.elapsed())
}

/// One request to the admin listener: its status and body.
pub(crate) async fn http(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(admin).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: {}\r\nContent-Type: application/wasm\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .context("an HTTP status")?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
