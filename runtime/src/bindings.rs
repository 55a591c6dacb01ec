//! The one place the `tidegate:gateway` world is turned into Rust.

use crate::host::HostState;

wasmtime::component::bindgen!({
    path: "../functions/wit",
    world: "handler",
    exports: { default: async },
});

pub use tidegate::gateway::types;

impl tidegate::gateway::types::Host for HostState {}

impl tidegate::gateway::logging::Host for HostState {
    fn log(&mut self, level: tidegate::gateway::logging::Level, message: String) {
        use tidegate::gateway::logging::Level;
        let function = self.function_name();
        let message = self.clip_log_line(&message);
        match level {
            Level::Debug => tracing::debug!(target: "tidegate::function", function, "{message}"),
            Level::Info => tracing::info!(target: "tidegate::function", function, "{message}"),
            Level::Warn => tracing::warn!(target: "tidegate::function", function, "{message}"),
            Level::Error => tracing::error!(target: "tidegate::function", function, "{message}"),
        }
    }
}
