//! The functions of `functions/`, built for `wasm32-wasip2` by this crate's
//! build script: the gateway bundles [`ECHO`] for `tidegate serve --dev`,
//! and tests load the components from their paths.

/// Directory holding the built components (`<name>.wasm`).
pub const DIR: &str = env!("TIDEGATE_FUNCTIONS_DIR");

/// The echo function: replies with every message, keeping its type.
pub const ECHO: &[u8] = include_bytes!(concat!(env!("TIDEGATE_FUNCTIONS_DIR"), "/echo.wasm"));

/// Path of the echo component.
pub const ECHO_PATH: &str = concat!(env!("TIDEGATE_FUNCTIONS_DIR"), "/echo.wasm");

/// Path of the `faulty` test function, which traps, loops or exhausts its
/// memory on request (see `functions/faulty`).
pub const FAULTY_PATH: &str = concat!(env!("TIDEGATE_FUNCTIONS_DIR"), "/faulty.wasm");

/// Path of the example `$connect` authorizer (see `functions/authorizer`).
pub const AUTHORIZER_PATH: &str = concat!(env!("TIDEGATE_FUNCTIONS_DIR"), "/authorizer.wasm");

/// Path of the example chat rooms function (see `functions/chat`).
pub const CHAT_PATH: &str = concat!(env!("TIDEGATE_FUNCTIONS_DIR"), "/chat.wasm");

/// Path of the example for custom routes, which says which action it was
/// sent (see `functions/router`).
pub const ROUTER_PATH: &str = concat!(env!("TIDEGATE_FUNCTIONS_DIR"), "/router.wasm");
