//! The runtime's limits and timeouts, already validated by the gateway.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

/// Default of [`RuntimeConfig::max_log_lines_per_second`]: enough for a
/// function that logs a line per message at a modest rate, too few to
/// flood the log.
pub const DEFAULT_MAX_LOG_LINES_PER_SECOND: NonZeroU32 = match NonZeroU32::new(100) {
    Some(n) => n,
    None => panic!("100 is not zero"),
};

/// Limits and timeouts of the function runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where precompiled artifacts are kept, so an unloaded function can be
    /// reloaded without compiling it again. Created 0700 (with its missing
    /// parents) if missing; it must be a directory of the user Tidegate runs
    /// as that no one else may write to (one its group may write to is made
    /// private again), since what is in it is loaded as native code. Its
    /// parents are the operator's (a volume's root may be shared); see
    /// [`crate::private_dir`].
    pub artifact_dir: PathBuf,
    /// Most instances one function may have at once; further messages wait
    /// for an instance to come free.
    pub max_instances: NonZeroU32,
    /// Most calls of one function waiting for an instance while all
    /// `max_instances` are busy; further calls are refused at once with
    /// [`crate::InvokeError::Overloaded`].
    pub max_queued: usize,
    /// Most instances of all functions together: the size of the pooling
    /// allocator's slabs, reserved (as virtual memory) at start-up.
    pub max_total_instances: NonZeroU32,
    /// Most linear memory one instance may grow to, in bytes.
    pub memory_limit: usize,
    /// Most WebAssembly call stack one invocation may use, in bytes; deeper
    /// recursion traps (a stack overflow).
    pub max_stack: usize,
    /// Longest one invocation (one event of one connection) may run.
    pub timeout: Duration,
    /// A call still running after this long finishes on the long-call
    /// threads, so it cannot delay socket I/O and short calls.
    pub long_call_after: Duration,
    /// Whether the long-call threads run at the lowest CPU priority (nice
    /// 19: they get the CPU everything else leaves over) or at the same
    /// priority as the rest (the kernel shares the CPU evenly).
    pub long_call_lowest_priority: bool,
    /// An idle instance is released after this long without work; a function
    /// with no traffic for this long holds no instances.
    pub idle_timeout: Duration,
    /// A function with no instances for this long has its compiled code
    /// dropped from memory; it is reloaded from its artifact when needed.
    pub unload_after: Duration,
    /// Largest log line a function may write; longer lines are cut.
    pub max_log_line: usize,
    /// Most log lines (stdout, stderr and the logging import together) one
    /// function may write per second, all its instances together; further
    /// lines are dropped and counted.
    pub max_log_lines_per_second: NonZeroU32,
    /// Bytes at the start of an instance's memory kept mapped (and reset
    /// by memset) when the instance is released, so the next instance in
    /// that slot starts without page faults. Returned to the system when
    /// the function's code is unloaded.
    pub keep_resident: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            artifact_dir: PathBuf::from("/var/lib/tidegate/artifacts"),
            max_instances: NonZeroU32::new(64).expect("64 is not zero"),
            max_queued: 1024,
            max_total_instances: NonZeroU32::new(1000).expect("1000 is not zero"),
            memory_limit: 64 << 20,
            max_stack: 512 << 10,
            timeout: Duration::from_secs(5),
            long_call_after: Duration::from_millis(1),
            long_call_lowest_priority: true,
            idle_timeout: Duration::from_secs(60),
            unload_after: Duration::from_secs(600),
            max_log_line: 4096,
            max_log_lines_per_second: DEFAULT_MAX_LOG_LINES_PER_SECOND,
            keep_resident: 1280 << 10,
        }
    }
}
