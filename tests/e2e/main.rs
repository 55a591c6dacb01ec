//! End-to-end tests: the real `tidegate` binary, real TLS WebSockets, the
//! real RabbitMQ on 127.0.0.1:5672. Every test uses its own ports, state
//! directory and queue, and deletes the queue when done.

// Shared with the no_loss test binary; each uses part of them.
#[expect(
    dead_code,
    reason = "shared by the e2e and no_loss binaries; each uses part"
)]
mod harness;
mod proxy;

mod admin;
mod auth;
mod cli;
mod client_address;
mod cluster;
mod cluster_harness;
mod echo;
mod faults;
mod foreign;
mod functions_api;
mod idle;
mod image;
mod lifecycle;
mod limits;
mod platform;
mod queue;
mod tls;
