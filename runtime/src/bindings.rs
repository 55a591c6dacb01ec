//! The one place the `tidegate:gateway` world is turned into Rust.

use crate::guest_log::Level;
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
        use tidegate::gateway::logging::Level as Guest;
        let level = match level {
            Guest::Debug => Level::Debug,
            Guest::Info => Level::Info,
            Guest::Warn => Level::Warn,
            Guest::Error => Level::Error,
        };
        self.log_line(level, &message);
    }
}
