//! Where long calls finish: a small executor whose threads run at the
//! lowest CPU priority (nice 19), so a function that runs long,
//! loops until its deadline or keeps failing only gets the CPU time that
//! socket I/O and short calls leave over.
//!
//! A call starts on the gateway's own workers (no thread hop on the fast
//! path). If it is still running after `runtime.long_call_after` (it yields
//! to the executor at every epoch tick, so it is seen), the rest of it is
//! moved here: wasmtime's call future is `Send`, and its fiber resumes on
//! whichever thread polls it next.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

use crate::clock::Clock;

/// Most failed instances waiting to be freed at low priority; more are freed
/// at normal priority.
pub const LOW_PRIORITY_DROPS: usize = 8;

/// The background executor. Dropping it stops its threads without waiting
/// for their calls (each one is dropped, and its instance with it).
pub(crate) struct Background {
    runtime: Option<Runtime>,
    /// Where failed instances are freed once [`LOW_PRIORITY_DROPS`] are
    /// already waiting on the long-call threads: the runtime the executor
    /// was started from (normal priority).
    reaper: Option<Handle>,
    /// Instances waiting to be freed on the long-call threads.
    pending_drops: Arc<AtomicUsize>,
}

impl Background {
    /// Start `threads` worker threads, at the lowest priority if `lowest`.
    pub(crate) fn start(threads: usize, lowest: bool) -> std::io::Result<Self> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder
            .worker_threads(threads.max(1))
            .thread_name("tidegate-long-calls")
            .enable_all();
        if lowest {
            builder.on_thread_start(lowest_priority);
        }
        let runtime = builder.build()?;
        Ok(Self {
            runtime: Some(runtime),
            reaper: Handle::try_current().ok(),
            pending_drops: Arc::default(),
        })
    }

    pub(crate) fn handle(&self) -> &Handle {
        self.runtime
            .as_ref()
            .expect("the runtime lives until the executor is dropped")
            .handle()
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
            _ => self.handle(),
        };
        threads.spawn_blocking(move || {
            drop(value);
            drop(pending);
        });
    }
}

/// One instance waiting to be freed, until dropped (also when its task is
/// dropped unrun at shutdown).
struct PendingDrop(Arc<AtomicUsize>);

impl Drop for PendingDrop {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // The engine may be dropped inside another runtime, where a
            // blocking shutdown is not allowed.
            runtime.shutdown_background();
        }
    }
}

/// Lower the calling thread to the lowest normal priority (nice 19): it
/// still gets a small share of a busy CPU, so a long call that is
/// legitimate finishes, just after everything else. (`SCHED_IDLE` would
/// starve it outright while any other thread on the machine is busy.) An
/// unprivileged thread may always lower its own priority; if the system
/// still refuses, the thread runs at normal priority and says so.
fn lowest_priority() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    if let Err(e) = set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other),
    ) {
        tracing::warn!(
            "could not lower the priority of a long-call thread ({e:?}): long calls will compete with socket I/O"
        );
    }
}

/// A call that runs inline until it has run for too long, then moves to
/// the background executor. Its output is the call's, or the background
/// task's failure.
pub(crate) struct Placed<'a, F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    state: State<'a, F>,
    moved: bool,
}

enum State<'a, F: Future> {
    Inline {
        call: Pin<Box<F>>,
        /// Where the call moves to, and where it is freed if cancelled.
        background: &'a Background,
        /// The engine's clock, which `due` is on.
        clock: &'a Clock,
        /// When (in microseconds on the engine's clock) a call still
        /// pending moves.
        due: u64,
    },
    Background(AbortOnDrop<F::Output>),
    Done,
}

impl<'a, F> Placed<'a, F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// Run `call` inline; once it is pending at or after `due` (in
    /// microseconds on `clock`), move it to the long-call threads.
    pub(crate) fn inline(call: F, background: &'a Background, clock: &'a Clock, due: u64) -> Self {
        Self {
            state: State::Inline {
                call: Box::pin(call),
                background,
                clock,
                due,
            },
            moved: false,
        }
    }

    /// Run `call` on the long-call threads from the start.
    pub(crate) fn background(call: F, background: &Background) -> Self {
        Self {
            state: State::Background(AbortOnDrop(background.handle().spawn(call))),
            moved: true,
        }
    }

    /// Whether the call has moved to the background executor.
    pub(crate) fn moved(&self) -> bool {
        self.moved
    }
}

impl<F> Future for Placed<'_, F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = Result<F::Output, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is `Unpin` (the call is boxed).
        let this = &mut *self;
        if let State::Inline {
            call,
            background,
            clock,
            due,
        } = &mut this.state
        {
            match call.as_mut().poll(cx) {
                Poll::Ready(output) => {
                    this.state = State::Done;
                    return Poll::Ready(Ok(output));
                }
                Poll::Pending if clock.now_micros() < *due => return Poll::Pending,
                Poll::Pending => {
                    let background = background.handle().clone();
                    let State::Inline { call, .. } =
                        std::mem::replace(&mut this.state, State::Done)
                    else {
                        unreachable!("matched above");
                    };
                    this.state = State::Background(AbortOnDrop(background.spawn(call)));
                    this.moved = true;
                }
            }
        }
        match &mut this.state {
            State::Background(task) => {
                let output = std::task::ready!(Pin::new(&mut task.0).poll(cx));
                this.state = State::Done;
                Poll::Ready(output)
            }
            State::Inline { .. } | State::Done => panic!("a placed call polled after it ended"),
        }
    }
}

impl<F> Drop for Placed<'_, F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        // A call cancelled while inline holds its instance: free it off
        // the async worker, like any failed instance.
        if let State::Inline { .. } = self.state
            && let State::Inline {
                call, background, ..
            } = std::mem::replace(&mut self.state, State::Done)
        {
            background.drop_later(call);
        }
    }
}

/// A background task that is cancelled when its caller goes away (the
/// connection closed mid-call): the call is dropped at its next yield.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
