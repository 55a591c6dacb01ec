//! One loaded function version: its component, its precompiled artifact
//! on disk, its pre-instantiated component (while loaded), and its pool of
//! instances.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{Histogram, IntCounter, IntGauge};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::Store;
use wasmtime::component::Component;

use crate::artifact::{self, Seal, Source};
use crate::background::Placed;
use crate::bindings::types::{ConnectDecision, Connection, Context, Effect, HandlerError, Payload};
use crate::bindings::{Handler, HandlerPre};
use crate::clock::{micros, millis};
use crate::config::RuntimeConfig;
use crate::engine::Engine;
use crate::error::{InvokeError, LoadError};
use crate::guest_log::GuestLog;
use crate::host::{CallerId, DeadlineExceeded, HostState, MemoryLimitExceeded};
use crate::metrics::RuntimeMetrics;
use crate::wall_clock;

/// A function version, ready to be invoked. Cheap to share: a call holds
/// an `Arc<Function>`, so an in-flight message finishes on the version it
/// started on even when another version goes live meanwhile.
pub struct Function {
    /// The function's name, as routes refer to it.
    name: Arc<str>,
    /// Content hash of the component (first 16 hex digits of its SHA-256).
    version: String,
    /// What its artifact is compiled from: the component's SHA-256 and the
    /// engine, checked before an artifact saved by an earlier run is used.
    source: Source,
    /// Calls of this version so far, whatever their outcome (listed by the
    /// management API without reading the metrics).
    invocations: AtomicU64,
    /// Shared engine and linker.
    engine: Arc<Engine>,
    /// Limits and timeouts.
    config: Arc<RuntimeConfig>,
    /// The component as uploaded, kept (in memory, or as a file read back
    /// and checked against its digest) to compile it again when its
    /// artifact is missing, damaged, replaced or cannot be loaded (so the
    /// function never stays broken until a restart).
    component: Kept,
    /// The component's size, in bytes.
    size: usize,
    /// Whether the version was deleted: its calls still running record no
    /// metric, so its series, once removed, do not come back.
    forgotten: AtomicBool,
    /// Where the precompiled component lives while it is unloaded.
    artifact: PathBuf,
    /// What the artifact was when this process wrote it (`None` when it
    /// could not be written): it is loaded only if it still is that. The
    /// lock also makes concurrent cold starts of unloaded code wait for one
    /// load instead of each reading (or compiling) the code.
    seal: tokio::sync::Mutex<Option<Seal>>,
    /// Where the guest's log lines go, escaped and rate-limited; shared by
    /// its instances.
    log: Arc<GuestLog>,
    /// Bounds the instances of this function alive at once.
    permits: Arc<Semaphore>,
    /// Calls waiting for a permit now.
    queued: AtomicUsize,
    /// The pool: loaded code, idle instances and counts.
    pool: Mutex<Pool>,
    /// Metric handles, resolved once for this function's labels.
    metrics: FunctionMetrics,
}

/// The mutable part of a function, behind one short-lived lock.
struct Pool {
    /// The pre-instantiated component; `None` once unloaded.
    pre: Option<HandlerPre<HostState>>,
    /// Idle instances, most recently used last.
    idle: Vec<IdleInstance>,
    /// Instances alive: idle plus leased.
    live: u32,
    /// When an instance was last released (or the function was loaded), in
    /// engine milliseconds.
    last_active: u64,
    /// Whether the version is no longer live: its instances are dropped
    /// as their calls end instead of kept idle, and its code once the last
    /// one is gone.
    retired: bool,
}

struct IdleInstance {
    instance: Instance,
    /// Engine millisecond of its release.
    since: u64,
}

/// One instance: a store and the bindings of the handler in it.
struct Instance {
    store: Store<HostState>,
    handler: Handler,
}

/// Which lifecycle event an invocation is.
#[derive(Debug, Clone, Copy)]
enum Event {
    Connect,
    Message,
    Disconnect,
}

impl Event {
    fn label(self) -> &'static str {
        match self {
            Event::Connect => "connect",
            Event::Message => "message",
            Event::Disconnect => "disconnect",
        }
    }
}

/// Where a call starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Priority {
    /// On the caller's thread; moved to the long-call threads if it
    /// runs past `runtime.long_call_after`.
    #[default]
    Normal,
    /// On the long-call threads from the start: for a client whose
    /// messages keep making the function fail, so its calls only get the
    /// CPU time everyone else leaves over.
    Low,
}

#[derive(Clone)]
struct FunctionMetrics {
    all: RuntimeMetrics,
    message_ok: IntCounter,
    message_duration: Histogram,
    instances: IntGauge,
    cold_starts: IntCounter,
    code_loaded: IntGauge,
    code_loads: IntCounter,
    compiles: IntCounter,
    recompiles: IntCounter,
    long_calls: IntCounter,
}

impl FunctionMetrics {
    fn new(all: &RuntimeMetrics, name: &str, version: &str) -> Self {
        let labels = [name, version];
        Self {
            all: all.clone(),
            message_ok: all
                .invocations
                .with_label_values(&[name, version, "message", "ok"]),
            message_duration: all
                .invocation_duration
                .with_label_values(&[name, "message"]),
            instances: all.instances.with_label_values(&labels),
            cold_starts: all.cold_starts.with_label_values(&labels),
            code_loaded: all.code_loaded.with_label_values(&labels),
            code_loads: all.code_loads.with_label_values(&labels),
            compiles: all.compiles.with_label_values(&labels),
            recompiles: all.recompiles.with_label_values(&labels),
            long_calls: all.long_calls.with_label_values(&labels),
        }
    }
}

/// When a function version's code is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Now: compiled and checked, or loaded from a sealed artifact of an
    /// earlier run (and compiled if that fails).
    Now,
    /// At its first call: a version that is not live is restored without
    /// reading its artifact, or compiling it when it has none.
    OnFirstUse,
}

/// Where a version's component is kept, to compile it again if its
/// artifact cannot be loaded.
#[derive(Debug, Clone)]
pub enum Keep {
    /// In memory, for as long as the version exists: for the few functions
    /// of a config file.
    InMemory,
    /// In this file, read back (and checked against the component's digest)
    /// only when the code must be compiled again: for uploaded versions,
    /// which may be many and large. The caller writes the file before the
    /// version is first called and keeps it for as long as the version
    /// exists.
    File(PathBuf),
}

/// The component as [`Keep`] says.
#[derive(Clone)]
enum Kept {
    InMemory(Bytes),
    /// The file, and the component's length.
    File {
        path: PathBuf,
        size: usize,
    },
}

impl Kept {
    /// The component's bytes: `component` is its SHA-256.
    fn read(&self, component: &[u8; 32]) -> Result<Bytes, String> {
        match self {
            Kept::InMemory(bytes) => Ok(bytes.clone()),
            &Kept::File { ref path, size } => {
                let bytes = read_regular(path, size).map_err(|e| {
                    format!("its component {} cannot be read ({e})", path.display())
                })?;
                if bytes.len() != size || Sha256::digest(&bytes).as_slice() != component {
                    return Err(format!(
                        "its component {} is damaged or was replaced (its SHA-256 is not the \
                         version's)",
                        path.display()
                    ));
                }
                Ok(bytes.into())
            }
        }
    }
}

/// At most `size + 1` bytes of the regular file at `path`, opened without
/// following a link and without waiting on a FIFO.
fn read_regular(path: &std::path::Path, size: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::with_capacity(size);
    file.take(size as u64 + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

impl Function {
    /// Make `wasm` function `name`'s version, keeping its code loaded
    /// when `readiness` is [`Readiness::Now`]: from the artifact an
    /// earlier run saved for this component and engine when its seal file
    /// vouches for it, else compiled (which checks that it is a Tidegate
    /// handler) and saved as a sealed artifact in `config.artifact_dir`.
    /// The component is kept as `keep` says, to compile it again if the
    /// artifact cannot be loaded later.
    ///
    /// # Errors
    /// [`LoadError::Invalid`] when the bytes are not a component of the
    /// `tidegate:gateway` handler world; [`LoadError::ArtifactDir`] or
    /// [`LoadError::Artifact`] when the artifact cannot be written.
    pub(crate) fn open(
        engine: Arc<Engine>,
        config: Arc<RuntimeConfig>,
        metrics: &RuntimeMetrics,
        name: &str,
        wasm: Bytes,
        keep: Keep,
        readiness: Readiness,
    ) -> Result<Self, LoadError> {
        let digest: [u8; 32] = Sha256::digest(&wasm).into();
        let version = artifact::hex(&digest[..8]);
        let source = Source {
            component: digest,
            engine: artifact::engine_fingerprint(&engine.engine),
        };
        let artifact_path = artifact::path_in(&config.artifact_dir, name, &version);
        // Whether the code came from the artifact, or was compiled.
        let (mut from_artifact, mut compiled) = (false, false);
        let saved = artifact::saved_seal(&artifact_path, source).and_then(|seal| {
            if readiness == Readiness::OnFirstUse {
                return Ok((None, seal));
            }
            let component = load_checked(&engine, &artifact_path, seal)?;
            let pre = instantiate_pre(&engine, &component)
                .map_err(|e| format!("could not be linked ({e:#})"))?;
            from_artifact = true;
            Ok((Some(pre), seal))
        });
        let (pre, seal) = match saved {
            Ok((pre, seal)) => (pre, Some(seal)),
            // Not compiled before this version is used (see `reload`).
            Err(_) if readiness == Readiness::OnFirstUse => (None, None),
            Err(why) => {
                tracing::debug!(function = name, version, "the artifact {why}: compiling");
                let invalid = |e: wasmtime::Error| LoadError::Invalid {
                    name: name.to_owned(),
                    reason: format!("{e:#}"),
                };
                let component = Component::new(&engine.engine, &wasm).map_err(invalid)?;
                let pre = instantiate_pre(&engine, &component).map_err(invalid)?;
                let bytes = component.serialize().map_err(invalid)?;
                let seal = artifact::write_sealed(
                    &config.artifact_dir,
                    &artifact_path,
                    name,
                    &bytes,
                    source,
                )?;
                compiled = true;
                (Some(pre), Some(seal))
            }
        };
        // Created only for a version that loads: a refused upload leaves
        // no series behind.
        let function_metrics = FunctionMetrics::new(metrics, name, &version);
        if from_artifact {
            function_metrics.code_loads.inc();
        }
        if compiled {
            function_metrics.compiles.inc();
        }
        let log = Arc::new(GuestLog::new(
            name.into(),
            version.as_str().into(),
            config.max_log_line,
            config.max_log_lines_per_second,
            engine.clock().clone(),
            metrics.log_lines_dropped.with_label_values(&[name]),
        ));
        function_metrics.code_loaded.set(i64::from(pre.is_some()));
        function_metrics.instances.set(0);
        let loaded_at = engine.now_millis();
        Ok(Self {
            name: name.into(),
            version,
            source,
            invocations: AtomicU64::new(0),
            log,
            permits: Arc::new(Semaphore::new(config.max_instances.get() as usize)),
            queued: AtomicUsize::new(0),
            engine,
            config,
            size: wasm.len(),
            component: match keep {
                Keep::InMemory => Kept::InMemory(wasm),
                Keep::File(path) => Kept::File {
                    path,
                    size: wasm.len(),
                },
            },
            forgotten: AtomicBool::new(false),
            artifact: artifact_path,
            seal: tokio::sync::Mutex::new(seal),
            pool: Mutex::new(Pool {
                pre,
                idle: Vec::new(),
                live: 0,
                last_active: loaded_at,
                retired: false,
            }),
            metrics: function_metrics,
        })
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The function's version: a content hash of its component.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The component's SHA-256, in hexadecimal (its version is the first
    /// 16 digits).
    pub fn digest(&self) -> String {
        artifact::hex(&self.source.component)
    }

    /// The component's size, in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Calls of this version so far (every event, every outcome).
    pub fn invocations(&self) -> u64 {
        self.invocations.load(Ordering::Relaxed)
    }

    /// Load the compiled code now if it is not in memory (from the
    /// artifact, or compiled again), so that the next call does not wait
    /// for it. Before a version goes live.
    ///
    /// # Errors
    /// An [`InvokeError`] when the code cannot be loaded nor compiled.
    pub async fn preload(&self) -> Result<(), InvokeError> {
        if self.is_loaded() {
            return Ok(());
        }
        self.load().await.map(drop)
    }

    /// Instances alive now, idle or busy.
    pub fn live_instances(&self) -> u32 {
        self.lock().live
    }

    /// Whether the compiled code is in memory.
    pub fn is_loaded(&self) -> bool {
        self.lock().pre.is_some()
    }

    /// Run `on-connect` for a new connection.
    ///
    /// # Errors
    /// An [`InvokeError`] when the function could not run to completion.
    pub async fn on_connect(&self, conn: Arc<Connection>) -> Result<ConnectDecision, InvokeError> {
        self.invoke(
            Event::Connect,
            Priority::Normal,
            move |mut instance: Instance| async move {
                let Instance { store, handler } = &mut instance;
                store
                    .data()
                    .caller()
                    .set(Some(CallerId::Connection(conn.clone())));
                let result = handler.call_on_connect(&mut *store, &conn).await;
                store.data().caller().set(None);
                (instance, result)
            },
        )
        .await
    }

    /// Run `on-message` for one message. The inner `Result` is the
    /// function's own answer; the outer one says whether it ran at all.
    ///
    /// # Errors
    /// An [`InvokeError`] when the function could not run to completion.
    pub async fn on_message(
        &self,
        ctx: Arc<Context>,
        message: Payload,
        priority: Priority,
    ) -> Result<Result<Vec<Effect>, HandlerError>, InvokeError> {
        self.invoke(
            Event::Message,
            priority,
            move |mut instance: Instance| async move {
                let Instance { store, handler } = &mut instance;
                store
                    .data()
                    .caller()
                    .set(Some(CallerId::Context(ctx.clone())));
                let result = handler.call_on_message(&mut *store, &ctx, &message).await;
                store.data().caller().set(None);
                (instance, result)
            },
        )
        .await
    }

    /// Run `on-disconnect` once a connection has closed.
    ///
    /// # Errors
    /// An [`InvokeError`] when the function could not run to completion.
    pub async fn on_disconnect(
        &self,
        ctx: Arc<Context>,
        code: u16,
        reason: String,
    ) -> Result<Vec<Effect>, InvokeError> {
        self.invoke(
            Event::Disconnect,
            Priority::Normal,
            move |mut instance: Instance| async move {
                let Instance { store, handler } = &mut instance;
                store
                    .data()
                    .caller()
                    .set(Some(CallerId::Context(ctx.clone())));
                let result = handler
                    .call_on_disconnect(&mut *store, &ctx, code, &reason)
                    .await;
                store.data().caller().set(None);
                (instance, result)
            },
        )
        .await
    }

    /// Take an instance, run `call` in it under the deadline, and return
    /// the instance to the pool, or discard it if the call failed.
    ///
    /// The call starts on this thread (at [`Priority::Normal`]); if it is
    /// still running after `runtime.long_call_after`, it finishes on the
    /// long-call threads.
    async fn invoke<R, F, Fut>(
        &self,
        event: Event,
        priority: Priority,
        call: F,
    ) -> Result<R, InvokeError>
    where
        F: FnOnce(Instance) -> Fut,
        Fut: Future<Output = (Instance, wasmtime::Result<R>)> + Send + 'static,
        R: Send + 'static,
    {
        let started = Instant::now();
        let clock = self.engine.clock();
        let outcome = async {
            let (lease, mut instance) = self.checkout().await?;
            let now = clock.precise_micros();
            instance
                .store
                .data_mut()
                .set_deadline(now, self.config.timeout);
            instance.store.set_epoch_deadline(1);
            let _running = clock.running();
            let mut placed = match priority {
                Priority::Normal => {
                    let due = now.saturating_add(micros(self.config.long_call_after));
                    Placed::inline(call(instance), self.engine.background(), clock, due)
                }
                Priority::Low => Placed::background(call(instance), self.engine.background()),
            };
            // The epoch deadline only stops a guest while it runs wasm code;
            // one that waits in a host call (a WASI sleep or poll) is
            // stopped by the clock here. On expiry `placed` is dropped with
            // the call and its instance, which the lease uncounts. (This is
            // tokio's clock: under paused time it jumps ahead while the
            // caller's runtime is idle, e.g. waiting for a long call.) The
            // timer is only armed if the call has to wait.
            let finished = wall_clock::bounded(&mut placed, self.config.timeout, || {
                Duration::from_micros(clock.precise_micros().saturating_sub(now))
            })
            .await;
            if placed.moved() {
                self.metrics.long_calls.inc();
            }
            let (instance, result) = match finished {
                Ok(Ok(finished)) => finished,
                Err(_elapsed) => return Err(self.timeout()),
                Ok(Err(failed)) if failed.is_panic() => {
                    std::panic::resume_unwind(failed.into_panic())
                }
                Ok(Err(_)) => {
                    return Err(InvokeError::ShuttingDown {
                        function: self.name.to_string(),
                    });
                }
            };
            match result {
                Ok(value) => {
                    lease.release(instance);
                    Ok(value)
                }
                Err(error) => {
                    lease.discard(instance);
                    Err(self.classify(error))
                }
            }
        }
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        self.invocations.fetch_add(1, Ordering::Relaxed);
        match (&outcome, event) {
            (Ok(_), Event::Message) => {
                self.metrics.message_ok.inc();
                self.metrics.message_duration.observe(elapsed);
            }
            _ if self.forgotten.load(Ordering::Relaxed) => {}
            (result, _) => {
                let label = match result {
                    Ok(_) => "ok",
                    Err(e) => e.kind(),
                };
                self.metrics
                    .all
                    .invocations
                    .with_label_values(&[&*self.name, self.version.as_str(), event.label(), label])
                    .inc();
                self.metrics
                    .all
                    .invocation_duration
                    .with_label_values(&[&self.name, event.label()])
                    .observe(elapsed);
            }
        }
        if let Err(error) = &outcome {
            tracing::warn!(function = %self.name, version = %self.version, event = event.label(), "{error}");
        }
        outcome
    }

    /// The call ran past `runtime.timeout`, stopped by the epoch deadline
    /// (running wasm) or by the clock (waiting in a host call).
    fn timeout(&self) -> InvokeError {
        InvokeError::Timeout {
            function: self.name.to_string(),
            limit_ms: self.config.timeout.as_millis(),
        }
    }

    /// Map a wasmtime error from a call to what the gateway acts on.
    fn classify(&self, error: wasmtime::Error) -> InvokeError {
        let function = self.name.to_string();
        if error.downcast_ref::<DeadlineExceeded>().is_some() {
            self.timeout()
        } else if let Some(limit) = error.downcast_ref::<MemoryLimitExceeded>() {
            InvokeError::MemoryLimit {
                function,
                limit_bytes: limit.limit,
            }
        } else if let Some(trap) = error.downcast_ref::<wasmtime::Trap>() {
            match trap {
                wasmtime::Trap::StackOverflow => InvokeError::StackOverflow { function },
                wasmtime::Trap::UnreachableCodeReached => InvokeError::Panic { function },
                trap => InvokeError::Trap {
                    function,
                    reason: trap.to_string(),
                },
            }
        } else {
            InvokeError::Trap {
                function,
                reason: format!("{error:#}"),
            }
        }
    }

    /// Take an idle instance, or create one (loading the code first if it
    /// was unloaded). Waits while `max_instances` instances are busy, in a
    /// queue of at most `max_queued` calls; beyond that, refuses at once.
    async fn checkout(&self) -> Result<(Lease<'_>, Instance), InvokeError> {
        // Fast path without creating a future; wait only when every
        // instance is busy.
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let queued = self.queued.fetch_add(1, Ordering::Relaxed);
                let _waiting = Waiting(&self.queued);
                if queued >= self.config.max_queued {
                    return Err(InvokeError::Overloaded {
                        function: self.name.to_string(),
                        queued,
                    });
                }
                self.permits.clone().acquire_owned().await.map_err(|_| {
                    InvokeError::ShuttingDown {
                        function: self.name.to_string(),
                    }
                })?
            }
        };
        let pre = {
            let mut pool = self.lock();
            if let Some(idle) = pool.idle.pop() {
                return Ok((self.lease(permit), idle.instance));
            }
            // Count the instance now, so a concurrent scale-down does not
            // unload the code between here and instantiation.
            pool.live += 1;
            self.metrics.instances.set(i64::from(pool.live));
            pool.pre.clone()
        };
        // From here on, a failure must give back the count taken above.
        let created = async {
            let pre = match pre {
                Some(pre) => pre,
                None => self.load().await?,
            };
            self.instantiate(&pre).await
        }
        .await;
        match created {
            Ok(instance) => {
                self.metrics.cold_starts.inc();
                Ok((self.lease(permit), instance))
            }
            Err(error) => {
                self.forget_instance();
                Err(error)
            }
        }
    }

    /// Load the compiled code back from the artifact, or compile the
    /// component again when the artifact cannot be trusted or loaded.
    async fn load(&self) -> Result<HandlerPre<HostState>, InvokeError> {
        let mut seal = self.seal.lock().await;
        // Another call may have loaded the code while this one waited.
        if let Some(pre) = self.lock().pre.clone() {
            return Ok(pre);
        }
        let engine = self.engine.clone();
        let config = self.config.clone();
        let path = self.artifact.clone();
        let component = self.component.clone();
        let name = self.name.clone();
        let source = self.source;
        let expected = *seal;
        let reloaded = tokio::task::spawn_blocking(move || {
            reload(&engine, &config, &path, expected, &component, source, &name)
        })
        .await
        .map_err(|e| InvokeError::Instantiate {
            function: self.name.to_string(),
            reason: format!("loading task failed: {e}"),
        })??;
        match reloaded.recompiled {
            None => self.metrics.code_loads.inc(),
            Some(recompiled) => {
                *seal = recompiled.seal;
                self.metrics.recompiles.inc();
                self.metrics.compiles.inc();
                tracing::warn!(
                    function = %self.name,
                    version = %self.version,
                    artifact = %self.artifact.display(),
                    "the precompiled artifact {}: compiled the function again from its component",
                    recompiled.why
                );
            }
        }
        let mut pool = self.lock();
        let pre = pool.pre.get_or_insert(reloaded.pre).clone();
        // Kept for `runtime.unload_after` from now, not unloaded by the next
        // scale-down because its last instance went long ago.
        pool.last_active = self.engine.now_millis();
        self.metrics.code_loaded.set(1);
        Ok(pre)
    }

    async fn instantiate(&self, pre: &HandlerPre<HostState>) -> Result<Instance, InvokeError> {
        let state = HostState::new(
            self.log.clone(),
            self.engine.clock().clone(),
            self.config.memory_limit,
        );
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|state| state);
        store.epoch_deadline_callback(|mut ctx| ctx.data_mut().on_epoch());
        let now = self.engine.clock().precise_micros();
        store.data_mut().set_deadline(now, self.config.timeout);
        store.set_epoch_deadline(1);
        let _running = self.engine.clock().running();
        // Bounded by the clock as well as the epoch, as calls are (see
        // `invoke`).
        let instantiated =
            tokio::time::timeout(self.config.timeout, pre.instantiate_async(&mut store)).await;
        match instantiated {
            Ok(Ok(handler)) => Ok(Instance { store, handler }),
            Err(_elapsed) => {
                self.engine.drop_later(store);
                Err(self.timeout())
            }
            Ok(Err(error)) => Err(match self.classify(error) {
                InvokeError::Trap { function, reason } => {
                    InvokeError::Instantiate { function, reason }
                }
                other => other,
            }),
        }
    }

    /// Drop a failed instance off the async workers.
    fn discard(&self, instance: Instance) {
        self.engine.drop_later(instance);
    }

    fn lease(&self, permit: OwnedSemaphorePermit) -> Lease<'_> {
        Lease {
            function: self,
            released: false,
            _permit: permit,
        }
    }

    /// An instance was dropped (after a failure, or by scale-down).
    fn forget_instance(&self) {
        let mut pool = self.lock();
        pool.live = pool.live.saturating_sub(1);
        self.metrics.instances.set(i64::from(pool.live));
        let unloaded = self.unload_if_retired(&mut pool);
        drop(pool);
        drop(unloaded);
    }

    fn give_back(&self, instance: Instance) {
        let now = self.engine.now_millis();
        let mut pool = self.lock();
        pool.last_active = now;
        if !pool.retired {
            pool.idle.push(IdleInstance {
                instance,
                since: now,
            });
            return;
        }
        // No longer live: its instances go as their calls end.
        pool.live = pool.live.saturating_sub(1);
        self.metrics.instances.set(i64::from(pool.live));
        let unloaded = self.unload_if_retired(&mut pool);
        drop(pool);
        drop((instance, unloaded));
    }

    /// The code of a version no longer live, once its last instance is
    /// gone: taken out of the pool, to be dropped outside its lock.
    fn unload_if_retired(&self, pool: &mut Pool) -> Option<HandlerPre<HostState>> {
        if !pool.retired || pool.live > 0 {
            return None;
        }
        let unloaded = pool.pre.take();
        if unloaded.is_some() {
            self.metrics.code_loaded.set(0);
            tracing::debug!(function = %self.name, version = %self.version, "compiled code of a version no longer live unloaded");
        }
        unloaded
    }

    /// The version is no longer live: its idle instances go now, busy ones
    /// when their calls end, and its code with the last of them.
    pub(crate) fn retire(&self) {
        let (released, unloaded) = {
            let mut pool = self.lock();
            pool.retired = true;
            let released: Vec<IdleInstance> = pool.idle.drain(..).collect();
            pool.live = pool.live.saturating_sub(released.len() as u32);
            self.metrics.instances.set(i64::from(pool.live));
            let unloaded = self.unload_if_retired(&mut pool);
            (released, unloaded)
        };
        drop((released, unloaded));
    }

    /// The version is live (again): instances are kept idle for the next
    /// calls.
    pub(crate) fn revive(&self) {
        self.lock().retired = false;
    }

    /// The version is deleted: its metric series go.
    pub(crate) fn forget_metrics(&self) {
        self.forgotten.store(true, Ordering::Relaxed);
        self.metrics.all.remove_version(&self.name, &self.version);
    }

    /// The version is deleted: its artifact goes (a call still running on
    /// it has its code in memory, or compiles it again if it must).
    pub(crate) fn remove_artifact(&self) {
        artifact::remove(&self.artifact);
    }

    /// Release instances idle for longer than `runtime.idle_timeout`, and
    /// unload the code once the function has had no instance for
    /// `runtime.unload_after`. Called periodically by the registry.
    pub(crate) fn scale_down(&self) {
        let now = self.engine.now_millis();
        let released: Vec<IdleInstance> = {
            let mut pool = self.lock();
            let idle_timeout = millis(self.config.idle_timeout);
            let keep_from = pool
                .idle
                .iter()
                .position(|idle| now.saturating_sub(idle.since) < idle_timeout)
                .unwrap_or(pool.idle.len());
            let released: Vec<IdleInstance> = pool.idle.drain(..keep_from).collect();
            pool.live = pool.live.saturating_sub(released.len() as u32);
            self.metrics.instances.set(i64::from(pool.live));
            let unload_at = pool.last_active + millis(self.config.unload_after);
            if pool.live == 0 && pool.pre.is_some() && (pool.retired || now >= unload_at) {
                pool.pre = None;
                self.metrics.code_loaded.set(0);
                tracing::debug!(function = %self.name, "compiled code unloaded");
            }
            released
        };
        if !released.is_empty() {
            tracing::debug!(function = %self.name, released = released.len(), "idle instances released");
        }
        // Stores are dropped here, outside the lock.
        drop(released);
    }

    /// Drop every idle instance (used when the function is replaced or the
    /// node shuts down).
    pub(crate) fn release_idle(&self) {
        let released: Vec<IdleInstance> = {
            let mut pool = self.lock();
            let released: Vec<IdleInstance> = pool.idle.drain(..).collect();
            pool.live = pool.live.saturating_sub(released.len() as u32);
            self.metrics.instances.set(i64::from(pool.live));
            released
        };
        drop(released);
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        // A panic while holding this lock cannot leave the pool half
        // updated in a way that matters (counts are advisory), so a
        // poisoned lock is used as is.
        self.pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One call counted as waiting for an instance, until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The count and permit of an instance taken from the pool for one call
/// (the call holds the instance itself). Given back with the instance on
/// success; otherwise (the call failed, or was cancelled and its instance
/// dropped with it) the instance is uncounted, because a failed call may
/// have left it in any state.
struct Lease<'a> {
    function: &'a Function,
    released: bool,
    _permit: OwnedSemaphorePermit,
}

impl Lease<'_> {
    /// The call succeeded: the instance goes back to the pool.
    fn release(mut self, instance: Instance) {
        self.released = true;
        self.function.give_back(instance);
    }

    /// The call failed: the instance is dropped (and uncounted by `drop`).
    fn discard(self, instance: Instance) {
        self.function.discard(instance);
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if !self.released {
            self.function.forget_instance();
        }
    }
}

fn instantiate_pre(
    engine: &Engine,
    component: &Component,
) -> wasmtime::Result<HandlerPre<HostState>> {
    let pre = engine.linker.instantiate_pre(component)?;
    HandlerPre::new(pre)
}

/// Code loaded back into memory, and whether it had to be compiled again.
struct Reloaded {
    pre: HandlerPre<HostState>,
    recompiled: Option<Recompiled>,
}

/// Why the artifact was not loaded, and the seal of the one written in
/// its place.
struct Recompiled {
    why: String,
    seal: Option<Seal>,
}

/// Load function `name`'s code from its artifact at `path` if it is still
/// the file sealed by `seal`; otherwise compile `component` again and write
/// a new artifact.
fn reload(
    engine: &Engine,
    config: &RuntimeConfig,
    path: &std::path::Path,
    seal: Option<Seal>,
    component: &Kept,
    source: Source,
    name: &str,
) -> Result<Reloaded, InvokeError> {
    let failed = |e: wasmtime::Error| InvokeError::Instantiate {
        function: name.to_owned(),
        reason: format!("{e:#}"),
    };
    let why = match seal {
        None => "was not usable or could not be written when the function was loaded".to_owned(),
        Some(seal) => match load_checked(engine, path, seal) {
            Ok(loaded) => {
                return Ok(Reloaded {
                    pre: instantiate_pre(engine, &loaded).map_err(failed)?,
                    recompiled: None,
                });
            }
            Err(why) => why,
        },
    };
    let wasm = component
        .read(&source.component)
        .map_err(|reason| InvokeError::Instantiate {
            function: name.to_owned(),
            reason: format!("the artifact {why}, and {reason}"),
        })?;
    let compiled = Component::new(&engine.engine, &wasm).map_err(failed)?;
    drop(wasm);
    let bytes = compiled.serialize().map_err(failed)?;
    // The function works from the code compiled here even when no artifact
    // can be written; the next reload then compiles again.
    let seal = match artifact::write_sealed(&config.artifact_dir, path, name, &bytes, source) {
        Ok(seal) => Some(seal),
        Err(e) => {
            tracing::error!(function = name, "{e}");
            None
        }
    };
    Ok(Reloaded {
        pre: instantiate_pre(engine, &compiled).map_err(failed)?,
        recompiled: Some(Recompiled { why, seal }),
    })
}

/// Load the artifact at `path` if it is the one sealed by `seal`; why not
/// otherwise. The checked file itself is mapped, through its descriptor
/// (`/proc/self/fd/N` opens that file even if the path was swapped since),
/// so the code is not copied; without `/proc` it is read and copied.
fn load_checked(engine: &Engine, path: &std::path::Path, seal: Seal) -> Result<Component, String> {
    use std::os::fd::AsRawFd;
    let file = artifact::open_checked(path, seal).map_err(|stale| stale.to_string())?;
    let by_descriptor = std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let loaded = if by_descriptor.exists() {
        // SAFETY: as for `deserialize` below: the file mapped is the one
        // whose length and digest were just checked against the seal kept
        // since this process wrote it, opened without following links in a
        // directory only this user may write to; changing it in place needs
        // this user's rights on a 0600 file.
        #[expect(
            unsafe_code,
            reason = "wasmtime can only load precompiled code through an unsafe call"
        )]
        unsafe {
            Component::deserialize_file(&engine.engine, &by_descriptor)
        }
    } else {
        let bytes = artifact::read(path, seal).map_err(|stale| stale.to_string())?;
        deserialize(engine, &bytes)
    };
    // For example, compiled by an engine of other settings.
    loaded.map_err(|e| format!("could not be loaded ({e:#})"))
}

/// Load precompiled code from `bytes`, which [`artifact::read`] has checked
/// are the bytes this process serialized with this engine.
fn deserialize(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `Component::deserialize` trusts its input to be a component
    // serialized by a compatible engine, as it runs it as native code. These
    // bytes are exactly those `Component::serialize` gave this process from
    // this engine: read without following links from a directory only this
    // user may write to, and checked against the length and BLAKE3 digest kept in
    // memory when they were written. wasmtime still checks the header and
    // refuses an incompatible engine.
    #[expect(
        unsafe_code,
        reason = "wasmtime can only load precompiled code through an unsafe call"
    )]
    unsafe {
        Component::deserialize(&engine.engine, bytes)
    }
}
