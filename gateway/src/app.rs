//! The whole gateway: [`App::build`] sets every part up from the settings
//! and binds the listeners (their addresses are known before anything is
//! served); [`App::run`] serves until the shutdown future completes, then
//! drains within the grace period. The CLI passes the signal; tests pass a
//! channel and run the gateway in-process on `127.0.0.1:0`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use runtime::Registry;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminLimits, AdminState};
use crate::auth::JwtVerifier;
use crate::close::Close;
use crate::cluster::Cluster;
use crate::cluster::registry::RegistryLog;
use crate::config::{self, FunctionSource, QueueMode, Settings, TlsSettings, WebSocketSettings};
use crate::connection::ConnectionSettings;
use crate::dispatch::DispatchSettings;
use crate::handshake::Upgrader;
use crate::hub::Hub;
use crate::limits::Admission;
use crate::listener::{self, Intake};
use crate::metrics::Metrics;
use crate::publisher::{Publisher, PublisherTask};
use crate::push;
use crate::router::{Entry, Origin, RouteTable, Router};
use crate::store::{Catalog, Limits};
use crate::{dev, tls};

/// Longest a cluster node waits at start to have applied the changes the
/// cluster's registry already holds.
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Where a built gateway listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The WebSocket listener over TLS (`server.listen`).
    pub wss: SocketAddr,
    /// The WebSocket listener without TLS (`server.plain_listen`), if any.
    pub plain: Option<SocketAddr>,
    /// The admin listener (`admin.listen`).
    pub admin: SocketAddr,
}

/// A gateway set up and bound, not yet serving.
pub struct App {
    /// The validated settings (the grace period, the TLS files to watch).
    settings: Settings,
    /// Where it listens.
    addresses: Addresses,
    /// Counters and gauges of every part.
    metrics: Metrics,
    /// The functions; idle instances are released at shutdown.
    registry: Arc<Registry>,
    /// The copy path's task, flushed last at shutdown.
    publisher_task: Option<PublisherTask>,
    /// What the WebSocket listeners need.
    intake: Arc<Intake>,
    /// TLS for `server.listen`.
    tls: tls::Tls,
    /// The TLS certificates in use (generated in `--dev`).
    tls_settings: TlsSettings,
    /// The bound listeners.
    wss: TcpListener,
    plain: Option<TcpListener>,
    admin: TcpListener,
    /// What the admin endpoints read.
    admin_state: AdminState,
    /// Cancelled once, when shutdown starts; every loop selects on it.
    shutdown: CancellationToken,
    /// The cluster's link, when `cluster.enabled`.
    cluster_task: Option<tokio::task::JoinHandle<()>>,
    /// Stops the cluster's link (with a goodbye) once connections drained.
    cluster_stop: CancellationToken,
    /// Closes every connection still open (1001) at the end of the drain
    /// window.
    connections_stop: CancellationToken,
}

impl App {
    /// Set every part up and bind the listeners.
    ///
    /// # Errors
    /// When a part cannot be set up (a private directory, certificate,
    /// functions, spool, ports); the error says which and why.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let metrics = Metrics::new().context("registering metrics")?;
        metrics
            .connections_max
            .set(i64::try_from(settings.server.max_connections.get()).unwrap_or(i64::MAX));
        raise_file_limit(settings.server.max_connections.get());
        // Only what is used is prepared: the state directory is the
        // operator's, and each private directory under it is checked where
        // it is used (see `state_dir`).
        let tls_settings = match &settings.tls {
            Some(tls) => tls.clone(),
            None => {
                let dir = crate::state_dir::dev_certificate_dir(&settings.server.state_dir)?;
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
                FunctionSource::Builtin(builtin) => config::builtin(builtin)
                    .with_context(|| format!("no builtin function {builtin:?}"))?
                    .to_vec(),
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

        let wss = listener::bind(
            settings.server.listen,
            "server.listen (TIDEGATE__SERVER__LISTEN)",
        )
        .await?;
        let plain = match settings.server.plain_listen {
            Some(addr) => Some(
                listener::bind(addr, "server.plain_listen (TIDEGATE__SERVER__PLAIN_LISTEN)")
                    .await?,
            ),
            None => None,
        };
        let admin = TcpListener::bind(settings.admin.listen)
            .await
            .with_context(|| {
                format!(
                    "admin.listen: cannot listen on {} (set admin.listen or TIDEGATE__ADMIN__LISTEN to a free address)",
                    settings.admin.listen
                )
            })?;
        let addresses = Addresses {
            wss: wss.local_addr()?,
            plain: plain.as_ref().map(TcpListener::local_addr).transpose()?,
            admin: admin.local_addr()?,
        };

        let shutdown = CancellationToken::new();
        // Closes the connections still open once the drain window is over.
        let connections_stop = CancellationToken::new();
        let websocket = &settings.websocket;
        let hub = Arc::new(Hub::new(
            &settings.server.node_id,
            websocket.max_groups.get(),
            &metrics,
        ));
        // The config file's routes; the API adds its own.
        let routes = Arc::new(RouteTable::new(Router::new(settings.routes.iter().map(
            |route| Entry {
                route: Arc::new(route.clone()),
                origin: Origin::Config,
            },
        ))));
        // The functions and routes uploaded through the API, back from
        // server.state_dir; a damaged catalog stops start-up naming the file.
        let (catalog, restored) = Catalog::open(
            &settings.server.state_dir,
            registry.clone(),
            routes.clone(),
            settings.functions.keys().cloned().collect(),
            Limits {
                max_upload_size: settings.admin.max_upload_size,
                max_versions: settings.admin.max_versions,
            },
        )
        .await
        .context("restoring the functions and routes uploaded through the management API")?;
        tracing::info!(?restored, "uploaded functions and API routes restored");
        let dispatch = Arc::new(DispatchSettings {
            node_id: settings.server.node_id.clone(),
            queue_mode: settings.queue.mode,
            publisher: publisher.clone(),
            on_error: settings.on_error,
            fault_backoff: settings.fault_backoff,
            max_reply_size: websocket.max_message_size,
            send_queue_bytes: websocket.send_queue_bytes,
            max_state_size: settings.max_state_size,
            max_effects: settings.max_effects,
            hub: hub.clone(),
            metrics: metrics.clone(),
        });
        let connections = Arc::new(ConnectionSettings {
            idle_timeout: websocket.idle_timeout,
            max_duration: websocket.max_duration,
            max_message_rate: websocket.max_message_rate,
            send_queue: websocket.send_queue,
            send_timeout: websocket.send_timeout,
            max_frame_size: websocket.max_frame_size,
            dispatch,
            metrics: metrics.clone(),
            shutdown: connections_stop.clone(),
        });
        let intake = Arc::new(Intake {
            admission: Admission::new(&settings.server),
            proxy_protocol_from: settings.server.proxy_protocol_from.clone(),
            tls_handshake_timeout: settings.server.tls_handshake_timeout,
            handshake_timeout: settings.server.handshake_timeout,
            upgrader: Upgrader {
                node_id: settings.server.node_id.clone(),
                routes: routes.clone(),
                registry: registry.clone(),
                auth: settings.auth.clone(),
                jwt,
                ws_config: ws_config(websocket),
                max_request_head: websocket.max_request_head,
                forward_headers: websocket.forward_headers.clone(),
                allowed_origins: websocket.allowed_origins.clone(),
            },
            connections,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        });
        // Stopped after the connections drained, so that what they send to
        // other nodes meanwhile still goes out; then it says goodbye.
        let cluster_stop = CancellationToken::new();
        let catalog = Arc::new(catalog);
        let cluster = settings.cluster.enabled.then(|| {
            Cluster::start(
                settings.cluster.clone(),
                settings.queue.clone(),
                hub.clone(),
                registry.clone(),
                metrics.clone(),
                cluster_stop.clone(),
            )
        });
        let mut catching_up = None;
        if settings.cluster.enabled {
            // A node that never read the cluster's registry to its end (a
            // new one, or one stopped before it got there) applies every
            // change it holds before it serves, so that it serves what the
            // others do. One that did serves what it kept at once, and
            // reads on.
            let first_start = catalog.catching_up().await;
            let (_log, mut caught_up) = RegistryLog::start(
                &settings.cluster,
                settings.queue.clone(),
                &settings.server.node_id,
                catalog.clone(),
                cluster_stop.clone(),
            );
            if first_start {
                catching_up = Some(caught_up.clone());
            }
            let waited = tokio::time::timeout(CATCH_UP_WAIT, caught_up.wait_for(|done| *done));
            if first_start && waited.await.is_err() {
                tracing::warn!(
                    "the cluster's registry is not read to its end after {CATCH_UP_WAIT:?}: \
                     not ready until it is, reading on"
                );
            }
        }
        let admin_state = AdminState {
            metrics: metrics.clone(),
            publisher,
            registry: registry.clone(),
            routes,
            hub,
            cluster: cluster.as_ref().map(|(cluster, _)| cluster.clone()),
            max_message_size: websocket.max_message_size,
            body_timeout: settings.admin.header_timeout,
            accepting: Arc::new(AtomicBool::new(false)),
            token: settings.admin.token.as_deref().map(Arc::from),
            catalog,
            caught_up: catching_up,
        };
        Ok(Self {
            settings,
            addresses,
            metrics,
            registry,
            publisher_task,
            intake,
            tls,
            tls_settings,
            wss,
            plain,
            admin,
            admin_state,
            shutdown,
            cluster_task: cluster.map(|(_, task)| task),
            cluster_stop,
            connections_stop,
        })
    }

    /// Where the gateway listens (ports chosen by the system when the
    /// settings said 0).
    pub fn addresses(&self) -> Addresses {
        self.addresses
    }

    /// Serve until `shutdown` completes, then drain: stop accepting, let
    /// connections finish what they read (closing them with 1001) within
    /// most of `server.shutdown_grace_period`, flush the copy path in the
    /// rest.
    ///
    /// # Errors
    /// None today; kept for the parts that will need to report one.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            settings,
            addresses,
            metrics,
            registry,
            publisher_task,
            intake,
            tls,
            tls_settings,
            wss,
            plain,
            admin,
            admin_state,
            shutdown: stopping,
            cluster_task,
            cluster_stop,
            connections_stop,
        } = self;
        let accepting = admin_state.accepting.clone();
        let hub = admin_state.hub.clone();
        let cluster = admin_state.cluster.clone();
        // Ready before the admin endpoints answer: the listeners are bound
        // (clients wait in the backlog until the accept loops below start),
        // and whoever saw the CLI's "listening" line may ask /readyz at once.
        accepting.store(true, Ordering::Relaxed);
        let admin_stop = CancellationToken::new();
        let admin_task = tokio::spawn(admin::serve(
            admin,
            admin_state,
            AdminLimits {
                max_connections: settings.admin.max_connections.get(),
                header_timeout: settings.admin.header_timeout,
            },
            admin_stop.clone(),
        ));
        if let Some(warning) =
            admin::exposure_warning(addresses.admin, settings.admin.token.as_deref())
        {
            tracing::warn!("{warning}");
        }
        let scaler = tokio::spawn(scale_down_loop(registry.clone(), stopping.clone()));
        // Stops taking pushes as soon as shutdown starts: what is not
        // acknowledged goes back to the queue, for another node.
        let push = match (&settings.queue.push_queue, settings.queue.mode) {
            (Some(queue), mode) if mode != QueueMode::Off => Some(tokio::spawn(push::run(
                settings.queue.clone(),
                queue.clone(),
                settings.websocket.max_message_size,
                hub.clone(),
                metrics.clone(),
                stopping.clone(),
            ))),
            _ => None,
        };
        let tls_watch = tokio::spawn(tls::watch(
            tls_settings,
            tls.resolver.clone(),
            metrics.tls_reloads.clone(),
            stopping.clone(),
        ));
        let jwks_watch = intake
            .upgrader
            .jwt
            .as_ref()
            .and_then(JwtVerifier::jwks_watch)
            .map(|watch| tokio::spawn(watch.run(metrics.jwks_reloads.clone(), stopping.clone())));

        let tracker = TaskTracker::new();
        let mut accept_loops = vec![tokio::spawn(listener::serve(
            wss,
            Some(TlsAcceptor::from(tls.config.clone())),
            intake.clone(),
            tracker.clone(),
        ))];
        if let Some(plain) = plain {
            accept_loops.push(tokio::spawn(listener::serve(
                plain,
                None,
                intake.clone(),
                tracker.clone(),
            )));
            tracing::warn!(
                ws = ?addresses.plain,
                "plain WebSocket listener without TLS: keep it behind a TLS-terminating proxy"
            );
        }
        if settings.queue.mode == QueueMode::Async {
            tracing::warn!(
                "queue.mode = \"async\": replies do not wait for the copy to be confirmed; a crash can lose copies of replied messages"
            );
        }
        tracing::info!(
            wss = %addresses.wss,
            admin = %addresses.admin,
            node = %settings.server.node_id,
            "tidegate is ready"
        );

        shutdown.await;
        let started = Instant::now();
        let grace = settings.server.shutdown_grace_period;
        tracing::info!(grace = ?grace, "shutting down: no new connections, finishing in-flight messages");
        accepting.store(false, Ordering::Relaxed);
        if let Some(cluster) = &cluster {
            cluster.drain();
        }
        stopping.cancel();
        for accept_loop in accept_loops {
            let _ = accept_loop.await;
        }
        // Closed one by one over the drain window (each finishes the
        // message in hand first), then whatever is left at once.
        let window = settings.server.drain_window;
        if !window.is_zero() {
            let all = hub.sample(usize::MAX);
            let closing = hub.close_spread(all, window, Close::Shutdown).await;
            tracing::info!(closing, window = ?window, "connections closed over the drain window");
        }
        connections_stop.cancel();
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
        cluster_stop.cancel();
        if let Some(task) = cluster_task
            && tokio::time::timeout_at((started + grace).into(), task)
                .await
                .is_err()
        {
            tracing::warn!("grace period: the cluster link did not say goodbye in time");
        }
        if let Some(task) = publisher_task {
            task.flush(started + grace).await;
        }
        scaler.abort();
        tls_watch.abort();
        if let Some(task) = push {
            let _ = task.await;
        }
        if let Some(task) = jwks_watch {
            task.abort();
        }
        registry.release_all_idle();
        admin_stop.cancel();
        let _ = admin_task.await;
        tracing::info!(took = ?started.elapsed(), "shutdown complete");
        Ok(())
    }
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
