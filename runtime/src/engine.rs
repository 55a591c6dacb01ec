//! The wasmtime engine every function shares, and the epoch ticker that
//! drives invocation deadlines.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::background::Background;
pub use crate::background::LOW_PRIORITY_DROPS;
use crate::bindings::Handler;
use crate::clock::{Clock, EpochTicker};
pub use crate::clock::{EPOCH_TICK, IDLE_TICK};
use crate::config::RuntimeConfig;
use crate::error::LoadError;
use crate::host::HostState;

/// The engine, the linker with the host's imports, and the epoch ticker.
pub struct Engine {
    /// Compiles and runs every function of this node.
    pub(crate) engine: wasmtime::Engine,
    /// WASI (with nothing granted) and the `tidegate:gateway` imports.
    pub(crate) linker: Linker<HostState>,
    /// Where calls that run past `runtime.long_call_after` finish, and
    /// failed instances are freed. Shut down before the ticker stops
    /// (fields drop in order), so a call still running there sees one more
    /// tick, yields, and is dropped.
    background: Background,
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
            .table_keep_resident(16 << 10)
            // A slot keeps its resident pages (and its affinity) after its
            // instance goes. By default wasmtime takes a never-used slot for
            // a module without slots of its own until 100 such warm slots
            // exist, so every new version of a function left 3-5 MiB
            // resident behind (measured: 20 deploys under load, 37 to 134
            // MiB). Reusing the least recently used warm slot instead bounds
            // resident memory by the most instances alive at once; a module
            // still gets its own slots back first.
            .max_unused_warm_slots(0);

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
        let ticker = EpochTicker::start(engine.clone())
            .map_err(|e| LoadError::Engine(format!("starting the epoch thread: {e}")))?;
        Ok(Arc::new(Self {
            engine,
            linker,
            background,
            ticker,
        }))
    }

    /// Milliseconds since the engine started: a coarse clock (it advances
    /// at every tick) that costs an atomic load instead of a clock read.
    pub fn now_millis(&self) -> u64 {
        self.ticker.clock().now_millis()
    }

    /// The shared clock, for instances' deadlines.
    pub(crate) fn clock(&self) -> &Arc<Clock> {
        self.ticker.clock()
    }

    /// The executor long calls move to.
    pub(crate) fn background(&self) -> &Background {
        &self.background
    }

    /// Drop `value` (a failed instance) off the async workers: see
    /// [`Background::drop_later`].
    pub(crate) fn drop_later<T: Send + 'static>(&self, value: T) {
        self.background.drop_later(value);
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
