//! Tidegate's gateway: the network side.
//!
//! Modules, from the top (a module uses only those below it):
//! - [`cli`]: `tidegate serve [--config FILE] [--dev]`; passes the signal.
//! - [`client`]: `tidegate fn|route|conn|group`, the admin API's client.
//! - [`app`]: [`app::App`] builds every part, binds, serves until a
//!   shutdown future completes, then drains.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/v1/`.
//! - [`listener`]: accept, the PROXY header, admission, TLS and the upgrade
//!   under timeouts, then the connection.
//! - [`handshake`]: the HTTP upgrade ([`handshake::Upgrader`]): routing,
//!   authentication, `on-connect`.
//! - [`connection`]: one WebSocket: reading, writing, time limits, the
//!   closing handshake.
//! - [`dispatch`]: one message: the function for it (the live version),
//!   copy, call, effects, failure policy.
//! - [`cluster`]: several nodes as one platform through the broker:
//!   membership, connections and groups of other nodes.
//! - [`hub`]: this node's connections and groups: `send`, `broadcast`,
//!   the connections API, the push queue.
//! - [`close`]: the close codes the gateway sends, and why.
//! - [`publisher`]: the RabbitMQ copy, publisher confirms, the spool.
//! - [`push`]: the push queue: messages for connections and groups.
//! - [`limits`]: connection limits in total, per address, in handshakes.
//! - [`proxy_protocol`]: the real client address from a load balancer.
//! - [`auth`]: JWT validation of the token a client connects with.
//! - [`router`]: routes: path to route, message to function.
//! - [`tls`]: rustls (ring) from PEM files; [`dev`]: the `--dev` certificate.
//! - [`state_dir`]: the state directory and the private directories in it.
//! - [`store`]: the functions, versions and routes the management API
//!   changes, kept under the state directory.
//! - [`config`]: the file plus `TIDEGATE__*` variables, validated once.
//! - [`metrics`]: the Prometheus metrics; [`logging`]: log output.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod client;
pub mod close;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod dev;
pub mod dispatch;
pub mod handshake;
pub mod hub;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod proxy_protocol;
pub mod publisher;
pub mod push;
pub mod router;
pub mod state_dir;
pub mod store;
pub mod tls;
