//! The gateway's Prometheus metrics, registered in one registry that is
//! passed down (never global). Labels are bounded: routes and functions
//! come from the configuration, outcomes and reasons from fixed lists.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Confirm latency buckets, in seconds: 50 µs to 5 s.
const CONFIRM_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// Every metric of the gateway, plus the runtime's.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Open WebSocket connections by route.
    pub connections_open: IntGaugeVec,
    /// `server.max_connections`, for alerts on the share in use.
    pub connections_max: IntGauge,
    /// Accepted WebSocket connections by route.
    pub connections: IntCounterVec,
    /// Connections refused before or during the upgrade, by reason.
    pub connections_rejected: IntCounterVec,
    /// Connections closed by the gateway, by close code.
    pub closes: IntCounterVec,
    /// Messages received from clients, by route.
    pub messages_received: IntCounterVec,
    /// Payload bytes received from clients, by route.
    pub bytes_received: IntCounterVec,
    /// Messages sent to clients, by route.
    pub messages_sent: IntCounterVec,
    /// Payload bytes sent to clients, by route.
    pub bytes_sent: IntCounterVec,
    /// Effects carried out, by effect.
    pub effects: IntCounterVec,
    /// `effects`, resolved once per effect (counted per message).
    pub effect_counts: EffectCounts,
    /// Messages for a connection other than the caller's (`send`,
    /// `broadcast`, the API, the push queue), by outcome.
    pub deliveries: IntCounterVec,
    /// Push queue messages, by outcome.
    pub push: IntCounterVec,
    /// Nodes in this node's view of the cluster, itself included.
    pub cluster_nodes: IntGauge,
    /// 1 while the cluster link to the broker is up.
    pub cluster_connected: IntGauge,
    /// Messages between nodes, by kind and direction.
    pub cluster_messages: IntCounterVec,
    /// Messages the function failed on, by route and kind.
    pub message_failures: IntCounterVec,
    /// Certificate reloads after a file change, by outcome.
    pub tls_reloads: IntCounterVec,
    /// JWKS file reloads after it changed, by outcome.
    pub jwks_reloads: IntCounterVec,
    /// Queue copies by outcome: confirmed, spooled, replayed, refused, lost.
    pub queue_publishes: IntCounterVec,
    /// Time from publishing a copy to the broker's confirm.
    pub queue_confirm_duration: Histogram,
    /// 1 while the broker connection is up.
    pub queue_connected: IntGauge,
    /// Copies waiting in the spool.
    pub spool_messages: IntGauge,
    /// Bytes of copies waiting in the spool.
    pub spool_bytes: IntGauge,
    /// The runtime's metrics.
    pub runtime: runtime::RuntimeMetrics,
}

impl Metrics {
    /// Create and register every metric in a new registry.
    ///
    /// # Errors
    /// When two metrics share a name (a programming error).
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let connections_open = IntGaugeVec::new(
            Opts::new("tidegate_connections_open", "Open WebSocket connections."),
            &["route"],
        )?;
        registry.register(Box::new(connections_open.clone()))?;
        let queue_confirm_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tidegate_queue_confirm_duration_seconds",
                "Time from publishing a message copy to the broker's confirm.",
            )
            .buckets(CONFIRM_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(queue_confirm_duration.clone()))?;
        let effects = counter(
            "tidegate_effects_total",
            "Effects of functions carried out, by effect.",
            &["effect"],
        )?;
        Ok(Self {
            connections_open,
            connections_max: gauge(
                "tidegate_connections_max",
                "Connections the gateway takes at once, open or in handshake (server.max_connections).",
            )?,
            connections: counter(
                "tidegate_connections_total",
                "WebSocket connections accepted.",
                &["route"],
            )?,
            connections_rejected: counter(
                "tidegate_connections_rejected_total",
                "Connections refused before or during the WebSocket upgrade.",
                &["reason"],
            )?,
            closes: counter(
                "tidegate_closes_total",
                "Connections closed by the gateway, by WebSocket close code.",
                &["code"],
            )?,
            messages_received: counter(
                "tidegate_messages_received_total",
                "WebSocket messages received from clients.",
                &["route"],
            )?,
            bytes_received: counter(
                "tidegate_received_bytes_total",
                "Payload bytes received from clients.",
                &["route"],
            )?,
            messages_sent: counter(
                "tidegate_messages_sent_total",
                "WebSocket messages sent to clients.",
                &["route"],
            )?,
            bytes_sent: counter(
                "tidegate_sent_bytes_total",
                "Payload bytes sent to clients.",
                &["route"],
            )?,
            effect_counts: EffectCounts::new(&effects),
            effects,
            deliveries: counter(
                "tidegate_deliveries_total",
                "Messages for a connection from elsewhere (send, broadcast, the API, the push queue), by outcome (delivered; gone: no such connection; full: its send queue was full; forwarded: handed to the broker for the connection's node; unreachable: its node cannot be reached now).",
                &["outcome"],
            )?,
            push: counter(
                "tidegate_push_total",
                "Push queue messages, by outcome (delivered, gone, full, malformed).",
                &["outcome"],
            )?,
            cluster_nodes: gauge(
                "tidegate_cluster_nodes",
                "Nodes in this node's view of the cluster, itself included (0 without a cluster).",
            )?,
            cluster_connected: gauge(
                "tidegate_cluster_connected",
                "1 while the cluster's link to the broker is up and this node hears its own heartbeats through it.",
            )?,
            cluster_messages: counter(
                "tidegate_cluster_messages_total",
                "Messages between nodes, by kind (heartbeat, bye, send, close, info, broadcast, answer; foreign: not from a node, dropped; unknown) and direction (out, in, unroutable: no node to take it, unreachable: not sent, no link or too much waiting).",
                &["kind", "direction"],
            )?,
            tls_reloads: counter(
                "tidegate_tls_reloads_total",
                "Certificate reloads after their files changed, by outcome (ok, error: the certificates in use were kept).",
                &["outcome"],
            )?,
            jwks_reloads: counter(
                "tidegate_jwks_reloads_total",
                "JWKS file (auth.jwt.jwks_file) reloads after it changed, by outcome (ok, error: the keys in use were kept).",
                &["outcome"],
            )?,
            message_failures: counter(
                "tidegate_message_failures_total",
                "Messages the function failed on, by route and kind (trap, panic, stack_overflow, timeout, memory_limit, reply_too_large, overloaded, ...).",
                &["route", "kind"],
            )?,
            queue_publishes: counter(
                "tidegate_queue_publishes_total",
                "Message copies by outcome: confirmed by the broker, spooled, replayed from the spool, refused, or lost (in doubt and refused by the disk until shutdown).",
                &["outcome"],
            )?,
            queue_confirm_duration,
            queue_connected: gauge(
                "tidegate_queue_connected",
                "1 while the connection to the broker is up.",
            )?,
            spool_messages: gauge(
                "tidegate_spool_messages",
                "Message copies waiting in the on-disk spool.",
            )?,
            spool_bytes: gauge(
                "tidegate_spool_bytes",
                "Bytes of message copies waiting in the on-disk spool.",
            )?,
            runtime: runtime::RuntimeMetrics::register(&registry)?,
            registry,
        })
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
    }
}

/// `tidegate_effects_total` for each effect, resolved once.
#[derive(Clone)]
pub struct EffectCounts([prometheus::IntCounter; 8]);

impl EffectCounts {
    /// The effect names, as the WIT spells them, in [`EffectCounts::get`]'s
    /// order.
    const NAMES: [&'static str; 8] = [
        "reply",
        "send",
        "join",
        "leave",
        "broadcast",
        "publish",
        "set-state",
        "close",
    ];

    fn new(effects: &IntCounterVec) -> Self {
        Self(Self::NAMES.map(|name| effects.with_label_values(&[name])))
    }

    /// The counter of `effect`.
    pub fn get(&self, effect: &runtime::Effect) -> &prometheus::IntCounter {
        use runtime::Effect;
        &self.0[match effect {
            Effect::Reply(_) => 0,
            Effect::Send(_) => 1,
            Effect::Join(_) => 2,
            Effect::Leave(_) => 3,
            Effect::Broadcast(_) => 4,
            Effect::Publish(_) => 5,
            Effect::SetState(_) => 6,
            Effect::Close(_) => 7,
        }]
    }
}
