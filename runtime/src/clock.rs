//! The engine's clock: a coarse microsecond clock kept by the epoch ticker
//! thread, which also advances wasmtime's epoch (what interrupts running
//! guests), and the count of calls running (the ticker ticks fast only
//! while some are).
//!
//! Its own module because the engine (which starts the ticker), the host
//! state (deadlines) and the long-call executor (when a call moves) all
//! read it, and none of them should depend on another for that.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// Whole milliseconds in `duration`.
pub(crate) fn millis(duration: Duration) -> u64 {
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
    /// The clock's zero.
    started: Instant,
    /// Microseconds since `started`, as of the last tick.
    micros: AtomicU64,
    /// Calls running now.
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
/// tokio worker is busy running guest code. Stopped when dropped.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    clock: Arc<Clock>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    /// Start ticking `engine`'s epoch.
    ///
    /// # Errors
    /// When the thread cannot be started: without it no time limit fires
    /// and no per-second budget renews, so the runtime must not start.
    pub(crate) fn start(engine: wasmtime::Engine) -> std::io::Result<Self> {
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
            })?;
        Ok(Self {
            stop,
            clock,
            thread: Some(thread),
        })
    }

    /// The clock this ticker keeps.
    pub(crate) fn clock(&self) -> &Arc<Clock> {
        &self.clock
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
