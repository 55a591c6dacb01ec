//! One loaded function version: its precompiled artifact on disk, its
//! pre-instantiated component (while loaded), and its pool of instances.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use prometheus::{Histogram, IntCounter, IntGauge};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::Store;
use wasmtime::component::Component;

use crate::background::Placed;
use crate::bindings::types::{ConnectDecision, Connection, Context, Effect, HandlerError, Payload};
use crate::bindings::{Handler, HandlerPre};
use crate::clock::{micros, millis};
use crate::config::RuntimeConfig;
use crate::engine::Engine;
use crate::error::{InvokeError, LoadError};
use crate::host::{DeadlineExceeded, HostState, MemoryLimitExceeded};
use crate::metrics::RuntimeMetrics;

/// A function version, ready to be invoked. Cheap to share: connections hold
/// an `Arc<Function>` so in-flight messages finish on the version they
/// started on even when a new version replaces it.
pub struct Function {
    /// The function's name, as routes refer to it.
    name: Arc<str>,
    /// Content hash of the component (first 16 hex digits of its SHA-256).
    version: String,
    /// Shared engine and linker.
    engine: Arc<Engine>,
    /// Limits and timeouts.
    config: Arc<RuntimeConfig>,
    /// Where the precompiled component lives while it is unloaded.
    artifact: PathBuf,
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
    long_calls: IntCounter,
}

impl FunctionMetrics {
    fn new(all: &RuntimeMetrics, name: &str) -> Self {
        Self {
            all: all.clone(),
            message_ok: all.invocations.with_label_values(&[name, "message", "ok"]),
            message_duration: all
                .invocation_duration
                .with_label_values(&[name, "message"]),
            instances: all.instances.with_label_values(&[name]),
            cold_starts: all.cold_starts.with_label_values(&[name]),
            code_loaded: all.code_loaded.with_label_values(&[name]),
            code_loads: all.code_loads.with_label_values(&[name]),
            long_calls: all.long_calls.with_label_values(&[name]),
        }
    }
}

impl Function {
    /// Compile `wasm`, check that it is a Tidegate handler, write its
    /// precompiled artifact to `config.artifact_dir` and keep it loaded.
    ///
    /// # Errors
    /// [`LoadError::Invalid`] when the bytes are not a component of the
    /// `tidegate:gateway` handler world; [`LoadError::Artifact`] when the
    /// artifact cannot be written.
    pub(crate) fn compile(
        engine: Arc<Engine>,
        config: Arc<RuntimeConfig>,
        metrics: &RuntimeMetrics,
        name: &str,
        wasm: &[u8],
    ) -> Result<Self, LoadError> {
        let digest = Sha256::digest(wasm);
        let version: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let invalid = |e: wasmtime::Error| LoadError::Invalid {
            name: name.to_owned(),
            reason: format!("{e:#}"),
        };
        let component = Component::new(&engine.engine, wasm).map_err(invalid)?;
        let pre = instantiate_pre(&engine, &component).map_err(invalid)?;
        let artifact = config.artifact_dir.join(format!("{name}-{version}.cwasm"));
        let bytes = component.serialize().map_err(invalid)?;
        write_artifact(&config.artifact_dir, &artifact, &bytes).map_err(|source| {
            LoadError::Artifact {
                name: name.to_owned(),
                path: artifact.clone(),
                source,
            }
        })?;
        let metrics = FunctionMetrics::new(metrics, name);
        metrics.code_loaded.set(1);
        metrics.instances.set(0);
        let loaded_at = engine.now_millis();
        Ok(Self {
            name: name.into(),
            version,
            permits: Arc::new(Semaphore::new(config.max_instances.get() as usize)),
            queued: AtomicUsize::new(0),
            engine,
            config,
            artifact,
            pool: Mutex::new(Pool {
                pre: Some(pre),
                idle: Vec::new(),
                live: 0,
                last_active: loaded_at,
            }),
            metrics,
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
                let result = handler.call_on_connect(store, &conn).await;
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
                let result = handler.call_on_message(store, &ctx, &message).await;
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
                let result = handler.call_on_disconnect(store, &ctx, code, &reason).await;
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
            // caller's runtime is idle, e.g. waiting for a long call.)
            let finished = tokio::time::timeout(self.config.timeout, &mut placed).await;
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
                    return Err(InvokeError::Instantiate {
                        function: self.name.to_string(),
                        reason: "the runtime is shutting down".into(),
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
        match (&outcome, event) {
            (Ok(_), Event::Message) => {
                self.metrics.message_ok.inc();
                self.metrics.message_duration.observe(elapsed);
            }
            (result, _) => {
                let label = match result {
                    Ok(_) => "ok",
                    Err(e) => e.kind(),
                };
                self.metrics
                    .all
                    .invocations
                    .with_label_values(&[&self.name, event.label(), label])
                    .inc();
                self.metrics
                    .all
                    .invocation_duration
                    .with_label_values(&[&self.name, event.label()])
                    .observe(elapsed);
            }
        }
        if let Err(error) = &outcome {
            tracing::warn!(function = %self.name, event = event.label(), "{error}");
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
                    InvokeError::Instantiate {
                        function: self.name.to_string(),
                        reason: "the function is shutting down".into(),
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

    /// Load the compiled code back from the artifact.
    async fn load(&self) -> Result<HandlerPre<HostState>, InvokeError> {
        let engine = self.engine.clone();
        let path = self.artifact.clone();
        let name = self.name.to_string();
        let loaded = tokio::task::spawn_blocking(move || load_artifact(&engine, &path, &name))
            .await
            .map_err(|e| InvokeError::Instantiate {
                function: self.name.to_string(),
                reason: format!("loading task failed: {e}"),
            })??;
        let mut pool = self.lock();
        let pre = pool.pre.get_or_insert(loaded).clone();
        self.metrics.code_loads.inc();
        self.metrics.code_loaded.set(1);
        Ok(pre)
    }

    async fn instantiate(&self, pre: &HandlerPre<HostState>) -> Result<Instance, InvokeError> {
        let state = HostState::new(
            self.name.clone(),
            self.engine.clock().clone(),
            self.config.memory_limit,
            self.config.max_log_line,
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
    }

    fn give_back(&self, instance: Instance) {
        let now = self.engine.now_millis();
        let mut pool = self.lock();
        pool.idle.push(IdleInstance {
            instance,
            since: now,
        });
        pool.last_active = now;
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
            if pool.live == 0 && pool.pre.is_some() && now >= unload_at {
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

/// Write the artifact atomically (temporary file, then rename), readable
/// by this user only.
fn write_artifact(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn load_artifact(
    engine: &Engine,
    path: &Path,
    name: &str,
) -> Result<HandlerPre<HostState>, InvokeError> {
    // SAFETY: `deserialize_file` trusts the file to be a component compiled
    // by a compatible engine. The artifact was written by `Function::compile`
    // of this process, from this engine, into the artifact directory that
    // only Tidegate writes; wasmtime still checks its header and engine
    // compatibility and refuses a mismatch.
    #[expect(
        unsafe_code,
        reason = "wasmtime can only load precompiled code through an unsafe call"
    )]
    let component = unsafe { Component::deserialize_file(&engine.engine, path) };
    let component = component.map_err(|e| InvokeError::Instantiate {
        function: name.to_owned(),
        reason: format!("reloading artifact {}: {e:#}", path.display()),
    })?;
    instantiate_pre(engine, &component).map_err(|e| InvokeError::Instantiate {
        function: name.to_owned(),
        reason: format!("{e:#}"),
    })
}
