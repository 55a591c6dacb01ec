//! Host state of one instance: WASI with nothing granted, resource limits,
//! the current invocation's deadline, and guest output routed into the log.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, UpdateDeadline};

use crate::clock::{Clock, micros};
use crate::guest_log::{GuestLog, Level};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Most table elements an instance may grow its tables to.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Raised (as a trap) when an invocation runs past its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the function ran past its time limit")]
pub(crate) struct DeadlineExceeded;

/// Raised (as a trap) when a function grows its memory past the limit.
#[derive(Debug, thiserror::Error)]
#[error("the function tried to grow its memory to {desired} bytes, over the limit of {limit}")]
pub(crate) struct MemoryLimitExceeded {
    pub desired: usize,
    pub limit: usize,
}

/// Whom the current call of an instance is about, for its log lines: set
/// when a call starts, cleared when it ends. Shared with the instance's
/// stdout and stderr, which do not see the store.
#[derive(Clone, Default)]
pub(crate) struct Caller(Arc<Mutex<Option<CallerId>>>);

/// The connection a call is about.
pub(crate) enum CallerId {
    /// `on-message`, `on-disconnect`.
    Context(Arc<crate::bindings::types::Context>),
    /// `on-connect`.
    Connection(Arc<crate::bindings::types::Connection>),
}

impl Caller {
    /// The call now is about `id` (`None`: no call).
    pub(crate) fn set(&self, id: Option<CallerId>) {
        *self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = id;
    }

    /// Log `line` with the current call's connection id and route.
    fn line(&self, log: &GuestLog, level: Level, stream: &'static str, line: &str) {
        self.with_connection(|connection, route| log.line(level, stream, connection, route, line));
    }

    /// The current call's connection id and route (empty between calls).
    fn connection(&self) -> (String, String) {
        self.with_connection(|connection, route| (connection.to_owned(), route.to_owned()))
    }

    fn with_connection<R>(&self, f: impl FnOnce(&str, &str) -> R) -> R {
        let caller = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &*caller {
            Some(CallerId::Context(ctx)) => f(&ctx.id, &ctx.route),
            Some(CallerId::Connection(conn)) => f(&conn.id, &conn.route),
            None => f("", ""),
        }
    }
}

/// The `T` of every instance's `Store<T>`.
pub(crate) struct HostState {
    /// WASI context: no preopened directories, no sockets, no environment;
    /// stdout and stderr go to the log.
    wasi: WasiCtx,
    /// WASI resources (streams) the guest holds.
    table: ResourceTable,
    /// The function's log: stdout, stderr and the `logging` import.
    log: Arc<GuestLog>,
    /// The connection of the current call, for the log.
    caller: Caller,
    /// When the current invocation must have finished, in microseconds on
    /// `clock`.
    pub deadline: u64,
    /// The engine's coarse clock.
    clock: Arc<Clock>,
    /// Most bytes of linear memory the instance may have.
    memory_limit: usize,
}

impl HostState {
    pub fn new(log: Arc<GuestLog>, clock: Arc<Clock>, memory_limit: usize) -> Self {
        let caller = Caller::default();
        let wasi = WasiCtx::builder()
            .stdout(GuestOutput::new(log.clone(), caller.clone(), "stdout"))
            .stderr(GuestOutput::new(log.clone(), caller.clone(), "stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            log,
            caller,
            deadline: 0,
            clock,
            memory_limit,
        }
    }

    /// Log a line of the `logging` import.
    pub fn log_line(&self, level: Level, line: &str) {
        self.caller.line(&self.log, level, "log", line);
    }

    /// Whom the current call is about.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Give the current invocation `limit` from `now` (a precise reading
    /// of the clock, in microseconds).
    pub fn set_deadline(&mut self, now: u64, limit: Duration) {
        self.deadline = now.saturating_add(micros(limit));
    }

    /// The epoch callback: yield to the executor at every tick, and trap
    /// once the invocation's deadline has passed.
    ///
    /// The yield is tokio's own: it lets the worker poll for I/O and timers
    /// before the long call resumes. (A plain wake-and-return-pending
    /// yield does not: with every worker running a long call, sockets would
    /// only be polled every few dozen ticks, and every other connection
    /// would wait that long.)
    pub fn on_epoch(&mut self) -> wasmtime::Result<UpdateDeadline> {
        if self.clock.now_micros() >= self.deadline {
            return Err(wasmtime::Error::new(DeadlineExceeded));
        }
        Ok(UpdateDeadline::YieldCustom(
            1,
            Box::pin(tokio::task::yield_now()),
        ))
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            return Err(wasmtime::Error::new(MemoryLimitExceeded {
                desired,
                limit: self.memory_limit,
            }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A guest's stdout or stderr: each line goes to the function's log.
#[derive(Clone)]
struct GuestOutput {
    log: Arc<GuestLog>,
    caller: Caller,
    stream: &'static str,
}

impl GuestOutput {
    fn new(log: Arc<GuestLog>, caller: Caller, stream: &'static str) -> Self {
        Self {
            log,
            caller,
            stream,
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineLogger {
            output: self.clone(),
            line: Vec::new(),
            connection: None,
        })
    }
}

/// Collects bytes into lines (at most `runtime.max_log_line` bytes each)
/// and logs them.
struct LineLogger {
    output: GuestOutput,
    line: Vec<u8>,
    /// The connection (and route) of the call that wrote the line's first
    /// byte: a line a call leaves unfinished is logged under that call's
    /// connection, not the one of the call that ends it.
    connection: Option<(String, String)>,
}

impl LineLogger {
    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        // A CRLF line ending is an ending; other carriage returns are
        // escaped as part of the line.
        let text = text.strip_suffix('\r').unwrap_or(&text);
        match self.connection.take() {
            Some((connection, route)) => {
                self.output
                    .log
                    .line(Level::Info, self.output.stream, &connection, &route, text)
            }
            None => {
                self.output
                    .caller
                    .line(&self.output.log, Level::Info, self.output.stream, text)
            }
        }
        self.line.clear();
    }
}

impl AsyncWrite for LineLogger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        for &byte in buf {
            if byte == b'\n' {
                self.emit();
            } else {
                if self.connection.is_none() {
                    self.connection = Some(self.output.caller.connection());
                }
                if self.line.len() < self.output.log.max_line() {
                    self.line.push(byte);
                }
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}
