//! A change to the catalog as one value, so that a cluster can put it in
//! a log every node applies in the same order (see
//! [`crate::cluster::registry`]).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use runtime::Function;
use serde::{Deserialize, Serialize};

use super::{CatalogError, Uploaded};
use crate::router::RouteSpec;

/// One change the management API makes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum Change {
    /// A component as a version of function `name`, live at once if
    /// `live`.
    Upload {
        /// The function.
        name: String,
        /// Whether it goes live.
        live: bool,
        /// The component (carried beside the change, not in its JSON).
        #[serde(skip)]
        wasm: Bytes,
    },
    /// Make a version live.
    SetLive {
        /// The function.
        name: String,
        /// The version.
        version: String,
    },
    /// Delete a version that is not live.
    RemoveVersion {
        /// The function.
        name: String,
        /// The version.
        version: String,
    },
    /// Delete a function no route names.
    RemoveFunction {
        /// The function.
        name: String,
    },
    /// Add or replace a route.
    PutRoute {
        /// The route.
        spec: RouteSpec,
    },
    /// Delete a route.
    RemoveRoute {
        /// Its path.
        path: String,
    },
}

impl Change {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Upload { .. } => "upload",
            Change::SetLive { .. } => "set-live",
            Change::RemoveVersion { .. } => "remove-version",
            Change::RemoveFunction { .. } => "remove-function",
            Change::PutRoute { .. } => "put-route",
            Change::RemoveRoute { .. } => "remove-route",
        }
    }
}

/// What a change did.
pub enum Applied {
    /// [`Change::Upload`].
    Uploaded(Uploaded),
    /// [`Change::SetLive`].
    Live(Arc<Function>),
    /// [`Change::PutRoute`]: whether the route is new.
    Route(bool),
    /// The removals.
    Done,
}

/// Where changes go when a cluster shares them: every node applies them in
/// the log's order, and [`ChangeLog::submit`] answers once this node has.
pub trait ChangeLog: Send + Sync {
    /// Put `change` in the log and wait until this node applied it; what
    /// applying it did here.
    fn submit(&self, change: Change) -> BoxFuture<'_, Result<Applied, CatalogError>>;
}
