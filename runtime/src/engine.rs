//! The wasmtime engine every function shares, and the epoch ticker that
//! drives invocation deadlines.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::background::Background;
use crate::bindings::Handler;
use crate::config::RuntimeConfig;
use crate::error::LoadError;
use crate::host::HostState;

/// How often the epoch advances while a function runs. A running function
/// yields to the async executor at every tick and its deadline is checked,
/// so once the ticker runs at this pace (at most [`IDLE_TICK`] after a
/// call starts) this is the longest a function that runs long (or loops)
/// holds a worker thread before other connections get it back: it bounds
/// what a misbehaving function costs everyone else.
pub const EPOCH_TICK: Duration = Duration::from_micros(100);

/// How often the ticker wakes while no function runs (to keep the coarse
/// clock going without costing an idle gateway CPU). A call that starts
/// while the ticker waits gets its first tick (its first deadline check,
/// yield and chance to move) within this time; [`EPOCH_TICK`]s follow.
///
/// Measured alternatives, both dearer on the fast path (short calls, where
/// the ticker mostly waits because it rarely sees a call running): an idle
/// tick of 1 ms (+0.4 to 0.7 us of gateway CPU per message), and waking
/// the ticker whenever a call starts while none runs (+0.5 us).
pub const IDLE_TICK: Duration = Duration::from_millis(10);

/// The engine, the linker with the host's imports, and the epoch ticker.
pub struct Engine {
    /// Compiles and runs every function of this node.
    pub(crate) engine: wasmtime::Engine,
    /// WASI (with nothing granted) and the `tidegate:gateway` imports.
    pub(crate) linker: Linker<HostState>,
    /// Where calls that run past `runtime.long_call_after` finish. Shut
    /// down before the ticker stops (fields drop in order), so a call still
    /// running there sees one more tick, yields, and is dropped.
    background: Background,
    /// Where failed instances are freed once [`LOW_PRIORITY_DROPS`] are
    /// already waiting on the long-call threads: the runtime the engine was
    /// created in (normal priority).
    reaper: Option<tokio::runtime::Handle>,
    /// Instances waiting to be freed on the long-call threads.
    pending_drops: Arc<AtomicUsize>,
    /// Advances the epoch; stopped when the engine is dropped.
    ticker: EpochTicker,
}

impl Engine {
    /// Build the engine: component model, async calls, epoch interruption,
    /// and a pooling allocator sized for `max_total_instances` instances
    /// with copy-on-write memory images.
    ///
    /// # Errors
    /// [`LoadError::Engine`] when wasmtime rejects the configuration (for
    /// example when the pool's virtual memory cannot be reserved).
    pub fn new(config: &RuntimeConfig) -> Result<Arc<Self>, LoadError> {
        let total = config.max_total_instances.get();
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(total)
            // A Rust component is made of a few core instances (the main
            // module plus adapter shims), with one memory and a few tables.
            .total_core_instances(total.saturating_mul(8))
            .total_memories(total.saturating_mul(2))
            .total_tables(total.saturating_mul(4))
            .total_stacks(total)
            .max_memory_size(config.memory_limit)
            // Reset the first bytes of a released slot by memset instead of
            // unmapping them, so the next instance does not fault them in
            // again (a Rust guest's stack and first heap pages live there).
            .linear_memory_keep_resident(config.keep_resident)
            .table_keep_resident(16 << 10);

        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .max_wasm_stack(config.max_stack)
            // The fiber a call runs on holds the wasm stack and the host
            // frames below and above it.
            .async_stack_size(config.max_stack + (1 << 20))
            .epoch_interruption(true)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));

        let engine =
            wasmtime::Engine::new(&wasm).map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| LoadError::Engine(format!("linking WASI: {e:#}")))?;
        Handler::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(|e| LoadError::Engine(format!("linking the gateway imports: {e:#}")))?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let background = Background::start(threads, config.long_call_lowest_priority)
            .map_err(|e| LoadError::Engine(format!("starting the long-call threads: {e}")))?;
        let ticker = EpochTicker::start(engine.clone());
        Ok(Arc::new(Self {
            engine,
            linker,
            background,
            reaper: tokio::runtime::Handle::try_current().ok(),
            pending_drops: Arc::default(),
            ticker,
        }))
    }

    /// Milliseconds since the engine started: a coarse clock (it advances
    /// at every tick) that costs an atomic load instead of a clock read.
    pub fn now_millis(&self) -> u64 {
        self.ticker.clock.now_millis()
    }

    /// The shared clock, for instances' deadlines.
    pub(crate) fn clock(&self) -> &Arc<Clock> {
        &self.ticker.clock
    }

    /// The executor long calls move to.
    pub(crate) fn background(&self) -> &tokio::runtime::Handle {
        self.background.handle()
    }

    /// Drop `value` (a failed instance) off the async workers. Freeing an
    /// instance that grew to its memory limit costs the kernel
    /// milliseconds, which socket I/O should not wait for: it is done on
    /// the long-call threads, at their low priority. Each instance waiting
    /// there still holds a pool slot and its memory, so beyond
    /// [`LOW_PRIORITY_DROPS`] of them the rest are freed at normal priority.
    pub(crate) fn drop_later<T: Send + 'static>(&self, value: T) {
        let waiting = self.pending_drops.fetch_add(1, Ordering::Relaxed);
        let pending = PendingDrop(self.pending_drops.clone());
        let threads = match &self.reaper {
            Some(reaper) if waiting >= LOW_PRIORITY_DROPS => reaper,
            _ => self.background.handle(),
        };
        threads.spawn_blocking(move || {
            drop(value);
            drop(pending);
        });
    }
}

/// Most failed instances waiting to be freed at low priority; more are freed
/// at normal priority.
pub const LOW_PRIORITY_DROPS: usize = 8;

/// One instance waiting to be freed, until dropped (also when its task is
/// dropped unrun at shutdown).
struct PendingDrop(Arc<AtomicUsize>);

impl Drop for PendingDrop {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whole milliseconds in `duration`.
pub fn millis(duration: Duration) -> u64 {
    duration.as_millis().try_into().unwrap_or(u64::MAX)
}

/// Whole microseconds in `duration`.
pub(crate) fn micros(duration: Duration) -> u64 {
    duration.as_micros().try_into().unwrap_or(u64::MAX)
}

/// The ticker's coarse clock, and how many calls are running (the ticker
/// ticks fast only while some are).
///
/// The coarse reading is only as fresh as the last tick, which is up to
/// [`IDLE_TICK`] old when no call was running. It is never ahead of the
/// time, so it is right for checks ("has the deadline passed?"), made at
/// ticks, where it is fresh. Starting points of intervals are read with
/// [`Clock::precise_micros`]: a stale start would make a call that has
/// just begun look as if it had run for up to an idle tick.
#[derive(Debug)]
pub(crate) struct Clock {
    started: Instant,
    micros: AtomicU64,
    running: AtomicUsize,
}

impl Clock {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            micros: AtomicU64::new(0),
            running: AtomicUsize::new(0),
        }
    }

    /// The coarse clock: microseconds since the engine started, as of the
    /// last tick.
    pub(crate) fn now_micros(&self) -> u64 {
        self.micros.load(Ordering::Relaxed)
    }

    pub(crate) fn now_millis(&self) -> u64 {
        self.now_micros() / 1_000
    }

    /// The time now (a clock read), on the coarse clock's scale.
    pub(crate) fn precise_micros(&self) -> u64 {
        micros(self.started.elapsed())
    }

    /// Advance the coarse clock to now.
    fn tick(&self) {
        self.micros.store(self.precise_micros(), Ordering::Relaxed);
    }

    /// Count a call as running until the guard is dropped.
    pub(crate) fn running(&self) -> Running<'_> {
        self.running.fetch_add(1, Ordering::Relaxed);
        Running(self)
    }
}

/// A running call, for the ticker.
pub(crate) struct Running<'a>(&'a Clock);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A thread that advances the engine's epoch every [`EPOCH_TICK`] while
/// calls run (every [`IDLE_TICK`] otherwise) and keeps the coarse clock. A
/// plain thread rather than a task: it must keep ticking even when every
/// tokio worker is busy running guest code.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    clock: Arc<Clock>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: wasmtime::Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clock = Arc::new(Clock::new());
        let (flag, shared) = (stop.clone(), clock.clone());
        let thread = std::thread::Builder::new()
            .name("tidegate-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    let tick = if shared.running.load(Ordering::Relaxed) > 0 {
                        EPOCH_TICK
                    } else {
                        IDLE_TICK
                    };
                    std::thread::sleep(tick);
                    shared.tick();
                    engine.increment_epoch();
                }
            })
            .ok();
        if thread.is_none() {
            tracing::error!("could not start the epoch thread: function time limits will not fire");
        }
        Self {
            stop,
            clock,
            thread,
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Barrier, mpsc};

    use super::*;

    /// The calling thread's nice value.
    fn nice() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("a name")
            .1
            .split_whitespace()
            .collect();
        fields[16].parse().expect("a number")
    }

    /// Reports the nice value of the thread that drops it, then waits at
    /// its gate (if any) so that it stays pending.
    struct Probe {
        seen: mpsc::Sender<i32>,
        gate: Option<Arc<Barrier>>,
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            let _ = self.seen.send(nice());
            if let Some(gate) = &self.gate {
                gate.wait();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn failed_instances_are_freed_at_low_priority_up_to_a_bound() {
        let normal = nice();
        let engine = Engine::new(&RuntimeConfig::default()).expect("engine");
        let gate = Arc::new(Barrier::new(LOW_PRIORITY_DROPS + 1));
        let (seen, nices) = mpsc::channel();
        for _ in 0..LOW_PRIORITY_DROPS {
            engine.drop_later(Probe {
                seen: seen.clone(),
                gate: Some(gate.clone()),
            });
        }
        let low: Vec<i32> = (0..LOW_PRIORITY_DROPS)
            .map(|_| nices.recv().expect("a drop"))
            .collect();
        assert!(low.iter().all(|&n| n == 19), "{low:?}");
        // With that many still waiting, the next one is freed at normal
        // priority.
        engine.drop_later(Probe { seen, gate: None });
        assert_eq!(nices.recv().expect("a drop"), normal);
        gate.wait();
    }
}
