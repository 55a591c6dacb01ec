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
    /// The directory of precompiled artifacts cannot be created, or is not
    /// safe to load native code from (another user owns it or may write to
    /// it, or it is a symbolic link).
    #[error("runtime.artifact_dir {path}: {reason}")]
    ArtifactDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
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
    /// The runtime is shutting down: the call was not run (or was cut
    /// short when its thread pool stopped). Not a fault of the function.
    #[error("function {function:?} was not run: the runtime is shutting down")]
    ShuttingDown {
        /// The function's name.
        function: String,
    },
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
    /// A short message for the client whose message or connection the
    /// error is about: what happened, in words that hold no detail of the
    /// gateway (no wasmtime message, no file path, no limit's value).
    /// `Display` keeps the detail, for the log.
    pub fn client_message(&self) -> &'static str {
        match self {
            InvokeError::Trap { .. } => "the function failed",
            InvokeError::StackOverflow { .. } => "the function overflowed its call stack",
            InvokeError::Panic { .. } => "the function aborted",
            InvokeError::Overloaded { .. } => "the function is overloaded; try again later",
            InvokeError::Timeout { .. } => "the function ran past its time limit",
            InvokeError::MemoryLimit { .. } => "the function exceeded its memory limit",
            InvokeError::Load(_) => "the function could not be loaded",
            InvokeError::Instantiate { .. } => "the function could not be started",
            InvokeError::ShuttingDown { .. } => "the gateway is shutting down",
        }
    }

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
            InvokeError::ShuttingDown { .. } => "shutdown",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{InvokeError, LoadError};

    #[test]
    fn client_messages_hold_no_internal_detail() {
        let errors = [
            InvokeError::Trap {
                function: "f".into(),
                reason: "wasm trap: out of bounds memory access\n0: 0x1234 - <unknown>!f".into(),
            },
            InvokeError::Load(LoadError::Artifact {
                name: "f".into(),
                path: PathBuf::from("/var/lib/tidegate/artifacts/f-0123.cwasm"),
                source: std::io::Error::other("permission denied"),
            }),
            InvokeError::Instantiate {
                function: "f".into(),
                reason: "maximum concurrent instance limit of 1000 reached".into(),
            },
            InvokeError::Timeout {
                function: "f".into(),
                limit_ms: 5000,
            },
        ];
        for error in errors {
            let detailed = error.to_string();
            let short = error.client_message();
            for secret in ["wasm", "0x1234", "/var/lib", "permission", "1000", "5000"] {
                assert!(!short.contains(secret), "{short:?} holds {secret:?}");
            }
            // The log keeps what the client is not told.
            assert_ne!(short, detailed);
        }
    }
}
