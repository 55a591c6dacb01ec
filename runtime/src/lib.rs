//! Tidegate's WebAssembly side.
//!
//! The gateway hands this crate a connection and a message; it runs the
//! function for that route in a sandboxed instance and returns the effects
//! the function asked for. Nothing here knows about sockets or queues.
//!
//! - [`config`]: typed limits and timeouts ([`RuntimeConfig`]).
//! - [`engine`]: the wasmtime engine (pooling allocator, copy-on-write
//!   memory images, epoch interruption).
//! - `clock`: the epoch ticker and the coarse clock deadlines are read on,
//!   shared by the engine, the host state and the long-call threads.
//! - `bindings`: the only `bindgen!` of the `tidegate:gateway` world, and the
//!   host side of its imports.
//! - `host`: per-instance host state: WASI with nothing granted, store
//!   limits, the invocation deadline, guest output into the log.
//! - `guest_log`: a function's log lines, escaped (one guest line, one
//!   record) and limited per second.
//! - `wall_clock`: the wall-clock bound on a call, armed only when the call
//!   has to wait.
//! - `background`: the long-call threads (nice 19) where calls that run long
//!   finish, so they do not hold up socket I/O and short calls, and where
//!   failed instances are freed.
//! - [`function`]: one loaded function version: its component, its
//!   precompiled artifact, its pre-instantiated component and its instance
//!   pool.
//! - `artifact`: precompiled artifacts on disk, written and read so that no
//!   other user can plant or swap the native code the runtime loads.
//! - [`private_dir`]: directories only the gateway's user may change: the
//!   artifact directory, and the gateway's own (certificate, spool).
//! - [`registry`]: the functions this node serves, by name, and the
//!   background task that scales idle functions down to zero.
//! - [`metrics`]: the runtime's Prometheus metrics.
//! - [`error`]: what can go wrong, typed for the gateway to act on.

#![deny(unsafe_code)]

mod artifact;
mod background;
mod bindings;
mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod function;
mod guest_log;
mod host;
pub mod metrics;
pub mod private_dir;
pub mod registry;
mod wall_clock;

pub use bindings::types::{ConnectDecision, Connection, Context, Effect, HandlerError, Payload};
pub use config::RuntimeConfig;
pub use error::{InvokeError, LoadError};
pub use function::{Function, Keep, Priority};
pub use metrics::RuntimeMetrics;
pub use registry::{Ready, Registry};
