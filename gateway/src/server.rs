//! Wiring: build every part from the settings, serve until SIGTERM or
//! SIGINT, then drain within the grace period.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use runtime::Registry;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::auth::JwtVerifier;
use crate::config::{
    AuthSettings, FunctionSource, OnError, QueueMode, Settings, TlsSettings, WebSocketSettings,
};
use crate::limits::Admission;
use crate::metrics::Metrics;
use crate::publisher::Publisher;
use crate::router::Router;
use crate::{dev, listener, tls};

/// What every connection shares.
pub struct Shared {
    /// This node's id, carried by connection ids and queue headers.
    pub node_id: String,
    /// WebSocket sizes and buffers.
    pub websocket: WebSocketSettings,
    /// The same limits, as tungstenite takes them.
    pub ws_config: WebSocketConfig,
    /// Longest the TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// Longest the upgrade request may take after TLS.
    pub handshake_timeout: Duration,
    /// Connection limits.
    pub admission: Admission,
    /// Balancers whose connections start with a PROXY protocol header.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Where tokens are, and the authorizer function.
    pub auth: AuthSettings,
    /// JWT validation, when configured.
    pub jwt: Option<JwtVerifier>,
    /// Whether replies wait for the copy.
    pub queue_mode: QueueMode,
    /// What a client sees when the function fails on its message.
    pub on_error: OnError,
    /// Longest pause before reading a client whose messages keep failing.
    pub fault_backoff: Duration,
    /// Path to function.
    pub router: Router,
    /// The functions.
    pub registry: Arc<Registry>,
    /// The copy path; `None` when `queue.mode = "off"`.
    pub publisher: Option<Publisher>,
    /// Metrics.
    pub metrics: Metrics,
    /// Cancelled once, when the gateway starts shutting down.
    pub shutdown: CancellationToken,
}

/// Run the gateway until a termination signal, then drain.
///
/// # Errors
/// When a part cannot be set up (certificate, functions, spool, ports);
/// the error says which and why.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let metrics = Metrics::new().context("registering metrics")?;
    raise_file_limit(settings.server.max_connections.get());

    crate::state_dir::prepare(&settings.server.state_dir)?;
    let tls_settings = match &settings.tls {
        Some(tls) => tls.clone(),
        None => {
            let dir = settings.server.state_dir.join("tls");
            let cert = dev::generate_certificate(&dir)
                .context("generating the development certificate")?;
            println!(
                "Tidegate --dev: self-signed certificate for localhost, 127.0.0.1 and ::1 written to {} \
                 (key {}), SHA-256 fingerprint {}",
                cert.files.cert.display(),
                cert.files.key.display(),
                cert.fingerprint
            );
            TlsSettings {
                default: cert.files,
                sni: Vec::new(),
                reload_interval: TlsSettings::RELOAD_INTERVAL,
            }
        }
    };
    let tls = tls::server_config(&tls_settings)?;
    let acceptor = TlsAcceptor::from(tls.config.clone());
    let jwt = settings
        .auth
        .jwt
        .as_ref()
        .map(JwtVerifier::new)
        .transpose()?;

    let registry = Arc::new(
        Registry::new(settings.runtime.clone(), metrics.runtime.clone())
            .context("setting up the function runtime")?,
    );
    for (name, source) in &settings.functions {
        let wasm = match source {
            FunctionSource::Builtin(builtin) => builtin_function(builtin)?.to_vec(),
            FunctionSource::File(path) => std::fs::read(path).with_context(|| {
                format!("functions.{name}.wasm: cannot read {}", path.display())
            })?,
        };
        registry
            .load(name, wasm)
            .await
            .with_context(|| format!("functions.{name}"))?;
    }

    let (publisher, publisher_task) = if settings.queue.mode == QueueMode::Off {
        tracing::warn!("queue.mode = \"off\": messages are not copied to the queue");
        (None, None)
    } else {
        let (publisher, task) = Publisher::start(
            settings.queue.clone(),
            settings.server.node_id.clone(),
            metrics.clone(),
        )?;
        (Some(publisher), Some(task))
    };

    let listener = listener::bind(
        settings.server.listen,
        "server.listen (TIDEGATE__SERVER__LISTEN)",
    )
    .await?;
    let local = listener.local_addr()?;
    let plain_listener = match settings.server.plain_listen {
        Some(addr) => Some(
            listener::bind(addr, "server.plain_listen (TIDEGATE__SERVER__PLAIN_LISTEN)").await?,
        ),
        None => None,
    };
    let admin_listener = tokio::net::TcpListener::bind(settings.admin.listen)
        .await
        .with_context(|| {
            format!(
                "admin.listen: cannot listen on {} (set admin.listen or TIDEGATE__ADMIN__LISTEN to a free address)",
                settings.admin.listen
            )
        })?;
    let admin_local = admin_listener.local_addr()?;

    let shutdown = CancellationToken::new();
    let jwks_watch = jwt
        .as_ref()
        .and_then(JwtVerifier::jwks_watch)
        .map(|watch| tokio::spawn(watch.run(metrics.jwks_reloads.clone(), shutdown.clone())));
    let shared = Arc::new(Shared {
        node_id: settings.server.node_id.clone(),
        ws_config: ws_config(&settings.websocket),
        websocket: settings.websocket.clone(),
        tls_handshake_timeout: settings.server.tls_handshake_timeout,
        handshake_timeout: settings.server.handshake_timeout,
        admission: Admission::new(&settings.server),
        proxy_protocol_from: settings.server.proxy_protocol_from.clone(),
        auth: settings.auth.clone(),
        jwt,
        queue_mode: settings.queue.mode,
        on_error: settings.on_error,
        fault_backoff: settings.fault_backoff,
        router: Router::new(&settings.routes),
        registry: registry.clone(),
        publisher: publisher.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    });

    let accepting = Arc::new(AtomicBool::new(false));
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        AdminState {
            metrics: metrics.clone(),
            publisher: publisher.clone(),
            registry: registry.clone(),
            accepting: accepting.clone(),
            token: settings.admin.token.as_deref().map(Arc::from),
        },
        admin::AdminLimits {
            max_connections: settings.admin.max_connections.get(),
            header_timeout: settings.admin.header_timeout,
        },
        admin_stop.clone(),
    ));
    if let Some(warning) = admin::exposure_warning(admin_local, settings.admin.token.as_deref()) {
        tracing::warn!("{warning}");
    }
    let scaler = tokio::spawn(scale_down_loop(registry.clone(), shutdown.clone()));
    let tls_watch = tokio::spawn(tls::watch(
        tls_settings,
        tls.resolver.clone(),
        metrics.tls_reloads.clone(),
        shutdown.clone(),
    ));

    let tracker = TaskTracker::new();
    let mut accept_loops = vec![tokio::spawn(listener::serve(
        listener,
        Some(acceptor),
        shared.clone(),
        tracker.clone(),
    ))];
    if let Some(plain) = plain_listener {
        let addr = plain.local_addr()?;
        accept_loops.push(tokio::spawn(listener::serve(
            plain,
            None,
            shared.clone(),
            tracker.clone(),
        )));
        println!("Tidegate listening on ws://{addr}/ (no TLS: server.plain_listen)");
        tracing::warn!(ws = %addr, "plain WebSocket listener without TLS: keep it behind a TLS-terminating proxy");
    }
    accepting.store(true, Ordering::Relaxed);
    if settings.queue.mode == QueueMode::Async {
        tracing::warn!(
            "queue.mode = \"async\": replies do not wait for the copy to be stored; a crash can lose copies of replied messages"
        );
    }
    println!("Tidegate listening on wss://{local}/ (admin http://{admin_local}/metrics)");
    tracing::info!(wss = %local, admin = %admin_local, node = %shared.node_id, "tidegate is ready");

    let signal = wait_for_signal().await;
    let started = Instant::now();
    let grace = settings.server.shutdown_grace_period;
    tracing::info!(signal, grace = ?grace, "shutting down: no new connections, finishing in-flight messages");
    accepting.store(false, Ordering::Relaxed);
    shutdown.cancel();
    for accept_loop in accept_loops {
        let _ = accept_loop.await;
    }
    tracker.close();
    // Connections get most of the grace period; the copy path keeps the
    // rest to flush.
    let connections_deadline = started + grace.mul_f64(0.8);
    if tokio::time::timeout_at(connections_deadline.into(), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "grace period: connections still open are cut"
        );
    }
    if let Some(task) = publisher_task {
        task.flush(started + grace).await;
    }
    scaler.abort();
    tls_watch.abort();
    if let Some(task) = jwks_watch {
        task.abort();
    }
    registry.release_all_idle();
    admin_stop.cancel();
    let _ = admin_task.await;
    tracing::info!(took = ?started.elapsed(), "shutdown complete");
    Ok(())
}

/// Every connection is a file descriptor: raise the soft limit to the hard
/// one, and say so when even that is below `server.max_connections`.
fn raise_file_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < max_connections as u64 + 64 => tracing::warn!(
            limit,
            max_connections,
            "the open-file limit is below server.max_connections: raise it (ulimit -n, LimitNOFILE=)"
        ),
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}

fn builtin_function(name: &str) -> anyhow::Result<&'static [u8]> {
    match name {
        "echo" => Ok(tidegate_functions::ECHO),
        other => anyhow::bail!("no builtin function {other:?}"),
    }
}

fn ws_config(settings: &WebSocketSettings) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(settings.read_buffer_size)
        .write_buffer_size(settings.write_buffer_size)
        // Outgoing messages are at most a reply of max_message_size plus
        // the frames already buffered.
        .max_write_buffer_size(settings.write_buffer_size + settings.max_message_size + (64 << 10))
        .max_message_size(Some(settings.max_message_size))
        .max_frame_size(Some(settings.max_frame_size))
}

async fn scale_down_loop(registry: Arc<Registry>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(registry.scale_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => registry.scale_down(),
        }
    }
}

/// Wait for SIGTERM or SIGINT; returns its name.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
