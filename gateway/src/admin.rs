//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and the
//! management API under `/v1/` behind a bearer token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use runtime::Registry;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::publisher::Publisher;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// Rendered by `/metrics`.
    pub metrics: Metrics,
    /// Its readiness feeds `/readyz`; `None` when copies are off.
    pub publisher: Option<Publisher>,
    /// Listed by `/v1/functions`.
    pub registry: Arc<Registry>,
    /// True once the WebSocket listener accepts, false again on shutdown.
    pub accepting: Arc<AtomicBool>,
    /// Bearer token of `/v1/`; `None` turns the management API off.
    pub token: Option<Arc<str>>,
}

/// Serve the admin endpoints on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/functions", get(functions))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!("admin listener failed: {e}");
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if !state.accepting.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not accepting connections\n",
        )
            .into_response();
    }
    let copies = match &state.publisher {
        None => "message copies off",
        Some(publisher) if !publisher.is_ready() => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "message copies cannot be stored: the broker is unreachable and the spool is full\n",
            )
                .into_response();
        }
        Some(publisher) if publisher.is_connected() => "broker connected",
        Some(_) => "broker unreachable, spooling",
    };
    (StatusCode::OK, format!("ready ({copies})\n")).into_response()
}

async fn functions(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(response) = authorize(&state, &headers) {
        return response;
    }
    let mut list: Vec<serde_json::Value> = state
        .registry
        .all()
        .iter()
        .map(|function| {
            serde_json::json!({
                "name": function.name(),
                "version": function.version(),
                "instances": function.live_instances(),
                "loaded": function.is_loaded(),
            })
        })
        .collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "functions": list }).to_string(),
    )
        .into_response()
}

/// Check `Authorization: Bearer <admin.token>`, in constant time.
#[allow(clippy::result_large_err)]
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = &state.token else {
        return Err((
            StatusCode::NOT_FOUND,
            "the management API is off: set admin.token to turn it on\n",
        )
            .into_response());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong bearer token\n",
        )
            .into_response())
    }
}
