//! Tidegate's gateway: the network side.
//!
//! Modules, from the top (a module uses only those below it):
//! - [`cli`]: `tidegate serve [--config FILE] [--dev]`; passes the signal.
//! - [`app`]: [`app::App`] builds every part, binds, serves until a
//!   shutdown future completes, then drains.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/v1/`.
//! - [`listener`]: accept, the PROXY header, admission, TLS and the upgrade
//!   under timeouts, then the connection.
//! - [`handshake`]: the HTTP upgrade ([`handshake::Upgrader`]): routing,
//!   authentication, `on-connect`.
//! - [`connection`]: one WebSocket: reading, writing, time limits, the
//!   closing handshake.
//! - [`dispatch`]: one message: copy, call, effects, failure policy.
//! - [`close`]: the close codes the gateway sends, and why.
//! - [`publisher`]: the RabbitMQ copy, publisher confirms, the spool.
//! - [`limits`]: connection limits in total, per address, in handshakes.
//! - [`proxy_protocol`]: the real client address from a load balancer.
//! - [`auth`]: JWT validation of the token a client connects with.
//! - [`router`]: path to function.
//! - [`tls`]: rustls (ring) from PEM files; [`dev`]: the `--dev` certificate.
//! - [`state_dir`]: the state directory and the private directories in it.
//! - [`config`]: the file plus `TIDEGATE__*` variables, validated once.
//! - [`metrics`]: the Prometheus metrics; [`logging`]: log output.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod close;
pub mod config;
pub mod connection;
pub mod dev;
pub mod dispatch;
pub mod handshake;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod proxy_protocol;
pub mod publisher;
pub mod router;
pub mod state_dir;
pub mod tls;
