//! Errors of the runtime, typed so the gateway can pick a close code and a
//! metric label without parsing messages.

use std::path::PathBuf;

/// Loading a function failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a valid component, or it does not fit the
    /// `tidegate:gateway` handler world.
    #[error("function {name:?} is not a valid Tidegate component: {reason}")]
    Invalid {
        /// The function's name.
        name: String,
        /// What wasmtime reported.
        reason: String,
    },
    /// The precompiled artifact could not be written or read.
    #[error("function {name:?}: artifact {path}: {source}")]
    Artifact {
        /// The function's name.
        name: String,
        /// The artifact's path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The engine could not be set up.
    #[error("wasmtime engine: {0}")]
    Engine(String),
}

/// Running one event of a function failed. Every variant affects only the
/// message (or connection event) that triggered it.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The function trapped (panic, unreachable, out-of-bounds access,
    /// stack overflow, ...); the instance was discarded.
    #[error("function {function:?} trapped: {reason}")]
    Trap {
        /// The function's name.
        function: String,
        /// What trapped.
        reason: String,
    },
    /// The function overflowed its call stack (for example unbounded
    /// recursion); the instance was discarded.
    #[error("function {function:?} overflowed its call stack")]
    StackOverflow {
        /// The function's name.
        function: String,
    },
    /// The function aborted (a Rust `panic!` compiles to an abort, an
    /// `unreachable` instruction); the instance was discarded.
    #[error("function {function:?} aborted (a panic or an unreachable instruction)")]
    Panic {
        /// The function's name.
        function: String,
    },
    /// Every instance of the function was busy and `runtime.max_queued`
    /// calls were already waiting: the call was refused at once.
    #[error("function {function:?} is overloaded: all instances busy and {queued} calls waiting")]
    Overloaded {
        /// The function's name.
        function: String,
        /// Calls waiting when this one was refused.
        queued: usize,
    },
    /// The function ran past `runtime.timeout`; the instance was discarded.
    #[error("function {function:?} ran longer than its time limit of {limit_ms} ms")]
    Timeout {
        /// The function's name.
        function: String,
        /// The limit, in milliseconds.
        limit_ms: u128,
    },
    /// The function tried to grow its memory past `runtime.memory_limit`.
    #[error("function {function:?} exceeded its memory limit of {limit_bytes} bytes")]
    MemoryLimit {
        /// The function's name.
        function: String,
        /// The limit, in bytes.
        limit_bytes: usize,
    },
    /// The function's code could not be loaded or instantiated.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The function could not be instantiated (for example the instance
    /// pool of the whole node is exhausted).
    #[error("function {function:?} could not be instantiated: {reason}")]
    Instantiate {
        /// The function's name.
        function: String,
        /// What wasmtime reported.
        reason: String,
    },
}

impl InvokeError {
    /// A short, fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            InvokeError::Trap { .. } => "trap",
            InvokeError::StackOverflow { .. } => "stack_overflow",
            InvokeError::Panic { .. } => "panic",
            InvokeError::Overloaded { .. } => "overloaded",
            InvokeError::Timeout { .. } => "timeout",
            InvokeError::MemoryLimit { .. } => "memory_limit",
            InvokeError::Load(_) => "load_error",
            InvokeError::Instantiate { .. } => "instantiate_error",
        }
    }
}
