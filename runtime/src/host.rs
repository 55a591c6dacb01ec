//! Host state of one instance: WASI with nothing granted, resource limits,
//! the current invocation's deadline, and guest output routed into the log.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, UpdateDeadline};

use crate::clock::{Clock, micros};
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

/// The `T` of every instance's `Store<T>`.
pub(crate) struct HostState {
    /// WASI context: no preopened directories, no sockets, no environment;
    /// stdout and stderr go to the log.
    wasi: WasiCtx,
    /// WASI resources (streams) the guest holds.
    table: ResourceTable,
    /// The function's name, for log lines.
    function: Arc<str>,
    /// When the current invocation must have finished, in microseconds on
    /// `clock`.
    pub deadline: u64,
    /// The engine's coarse clock.
    clock: Arc<Clock>,
    /// Most bytes of linear memory the instance may have.
    memory_limit: usize,
    /// Longest log line kept.
    max_log_line: usize,
}

impl HostState {
    pub fn new(
        function: Arc<str>,
        clock: Arc<Clock>,
        memory_limit: usize,
        max_log_line: usize,
    ) -> Self {
        let wasi = WasiCtx::builder()
            .stdout(GuestOutput::new(function.clone(), "stdout", max_log_line))
            .stderr(GuestOutput::new(function.clone(), "stderr", max_log_line))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            function,
            deadline: 0,
            clock,
            memory_limit,
            max_log_line,
        }
    }

    pub fn function_name(&self) -> &str {
        &self.function
    }

    /// Cut a guest log line to the configured maximum, on a char boundary.
    pub fn clip_log_line<'a>(&self, line: &'a str) -> &'a str {
        clip(line, self.max_log_line)
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

fn clip(line: &str, max: usize) -> &str {
    if line.len() <= max {
        return line;
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
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

/// A guest's stdout or stderr: each line becomes a log event tagged with
/// the function's name.
#[derive(Clone)]
struct GuestOutput {
    function: Arc<str>,
    stream: &'static str,
    max_line: usize,
}

impl GuestOutput {
    fn new(function: Arc<str>, stream: &'static str, max_line: usize) -> Self {
        Self {
            function,
            stream,
            max_line,
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
        })
    }
}

/// Collects bytes into lines (at most `max_line` bytes each) and logs them.
struct LineLogger {
    output: GuestOutput,
    line: Vec<u8>,
}

impl LineLogger {
    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches(['\r', '\n']);
        tracing::info!(
            target: "tidegate::function",
            function = &*self.output.function,
            stream = self.output.stream,
            "{text}"
        );
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
            } else if self.line.len() < self.output.max_line {
                self.line.push(byte);
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

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn clip_keeps_short_lines_and_cuts_on_char_boundaries() {
        assert_eq!(clip("hello", 10), "hello");
        assert_eq!(clip("hello", 3), "hel");
        assert_eq!(clip("héllo", 2), "h");
    }
}
