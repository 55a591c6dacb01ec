//! Tidegate's gateway: the network side.
//!
//! - [`cli`]: `tidegate serve [--config FILE] [--dev]`.
//! - [`config`]: the file plus `TIDEGATE__*` variables, validated once.
//! - [`server`]: wiring, signals, drain.
//! - [`listener`]: accept, admission, TLS and upgrade under timeouts.
//! - [`limits`]: connection limits in total, per address, in handshakes.
//! - [`proxy_protocol`]: the real client address from a load balancer.
//! - [`state_dir`]: the state directory, the gateway user's own.
//! - [`tls`]: rustls (ring) from PEM files; [`dev`]: the `--dev` certificate.
//! - [`handshake`]: the HTTP upgrade, routing, authentication, `on-connect`.
//! - [`auth`]: JWT validation of the token a client connects with.
//! - [`router`]: path to function.
//! - [`connection`]: one WebSocket: in-order messages, pipelined replies.
//! - [`publisher`]: the RabbitMQ copy, publisher confirms, the spool.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/v1/`.
//! - [`metrics`]: the Prometheus metrics.
//! - [`logging`]: log output.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod connection;
pub mod dev;
pub mod handshake;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod proxy_protocol;
pub mod publisher;
pub mod router;
pub mod server;
pub mod state_dir;
pub mod tls;
