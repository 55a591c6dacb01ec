//! The connections API: send to, describe and close one connection
//! (`/v1/connections/{id}`, and the same under API Gateway's
//! `/@connections/{id}` so code written for it ports by changing the
//! host), list connections, and broadcast to a group.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_tungstenite::tungstenite::Message;

use super::AdminState;
use super::api::{ApiError, json};
use super::functions::read_body;
use crate::close::Close;
use crate::cluster::{Answer, ClusterError, Request};
use crate::hub::{Delivery, check_group};

/// Connections listed when the request gives no `limit`.
const DEFAULT_LIMIT: usize = 100;

/// Most connections listed at once.
const MAX_LIMIT: usize = 1000;

/// The connection and group endpoints. Bodies are bounded by
/// `websocket.max_message_size` (a client could not be sent more).
pub fn router() -> Router<AdminState> {
    let one = get(info).post(send).delete(close);
    Router::new()
        .route("/v1/connections", get(list))
        .route("/v1/connections/{id}", one.clone())
        .route("/@connections/{id}", one)
        .route("/v1/groups/{group}", get(group))
        .route("/v1/nodes", get(nodes))
        .route(
            "/v1/groups/{group}/messages",
            axum::routing::post(broadcast),
        )
}

/// The body as the WebSocket message it is sent as: text when the content
/// type is `text/*` or JSON, binary otherwise; at most
/// `websocket.max_message_size` bytes (413 beyond, read no further).
async fn message(state: &AdminState, headers: &HeaderMap, body: Body) -> Result<Message, ApiError> {
    let body = read_body(
        headers,
        body,
        state.max_message_size,
        "the message (websocket.max_message_size)",
        state.body_timeout,
    )
    .await?;
    message_of(headers, body)
}

fn message_of(headers: &HeaderMap, body: Bytes) -> Result<Message, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let text =
        essence.starts_with("text/") || essence == "application/json" || essence.ends_with("+json");
    if !text {
        return Ok(Message::Binary(body));
    }
    match String::from_utf8(body.to_vec()) {
        Ok(text) => Ok(Message::Text(text.into())),
        Err(_) => Err(ApiError::bad_request(format!(
            "the body is sent as text ({essence}) but is not valid UTF-8; send it as \
             application/octet-stream for a binary message"
        ))),
    }
}

fn gone(id: &str) -> ApiError {
    ApiError::gone(format!(
        "no connection {id:?} (closed, never was, or its node is gone)"
    ))
}

fn full(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "send-queue-full",
        format!(
            "the send queue of connection {id:?} is full (websocket.send_queue_bytes): \
             its client is not reading; try again later"
        ),
    )
}

/// Ask the node holding connection `id` (another one) and answer as it
/// does; `None` when `id` is this node's.
async fn ask_remote(
    state: &AdminState,
    id: &str,
    request: Request,
) -> Option<Result<Answer, ApiError>> {
    let node = state.hub.remote_node(id)?;
    let cluster = state.cluster.as_ref()?;
    Some(cluster.ask(node, request).await.map_err(|e| match e {
        ClusterError::Unavailable => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster-unavailable",
            e.to_string(),
        ),
        ClusterError::Timeout { .. } => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "node-timeout", e.to_string())
        }
    }))
}

/// An answer of another node as the API gives it.
fn answered(id: &str, answer: Result<Answer, ApiError>, done: StatusCode) -> Response {
    match answer {
        Ok(Answer::Done) => done.into_response(),
        Ok(Answer::Full) => full(id).into_response(),
        Ok(Answer::Gone) => gone(id).into_response(),
        Ok(Answer::Info(info)) => json(StatusCode::OK, &info),
        Err(error) => error.into_response(),
    }
}

async fn send(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let message = match message(&state, &headers, body).await {
        Ok(message) => message,
        Err(error) => return error.into_response(),
    };
    let request = Request::Send {
        id: id.clone(),
        message,
    };
    if let Some(answer) = ask_remote(&state, &id, request.clone()).await {
        return answered(&id, answer, StatusCode::OK);
    }
    let Request::Send { message, .. } = request else {
        unreachable!("built just above");
    };
    match state.hub.deliver(&id, message) {
        Delivery::Delivered => StatusCode::OK.into_response(),
        Delivery::Full => full(&id).into_response(),
        _ => gone(&id).into_response(),
    }
}

async fn info(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    if let Some(answer) = ask_remote(&state, &id, Request::Info { id: id.clone() }).await {
        return answered(&id, answer, StatusCode::OK);
    }
    match state.hub.info(&id) {
        Some(info) => json(StatusCode::OK, &info),
        None => gone(&id).into_response(),
    }
}

/// `?code=&reason=`: the close to send, 1000 with no reason by default.
fn close_of(query: Option<&str>) -> Result<Close, ApiError> {
    let (mut code, mut reason) = (crate::close::code::NORMAL, String::new());
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "code" => {
                code = value.parse().map_err(|_| {
                    ApiError::bad_request(format!("code {value:?} is not a close code"))
                })?;
            }
            "reason" => reason = value.into_owned(),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {other:?}: use code and reason"
                )));
            }
        }
    }
    if reason.len() > 123 {
        return Err(ApiError::bad_request(
            "a close reason is at most 123 bytes (RFC 6455)",
        ));
    }
    Close::by_function(code, reason).map_err(|_| {
        ApiError::bad_request(format!(
            "close code {code} cannot be sent: use 1000 or 3000-4999"
        ))
    })
}

async fn close(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let close = match close_of(query.as_deref()) {
        Ok(close) => close,
        Err(error) => return error.into_response(),
    };
    let request = Request::Close {
        id: id.clone(),
        close: close.clone(),
    };
    if let Some(answer) = ask_remote(&state, &id, request).await {
        return answered(&id, answer, StatusCode::NO_CONTENT);
    }
    if state.hub.close_here(&id, close) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        gone(&id).into_response()
    }
}

async fn list(State(state): State<AdminState>, RawQuery(query): RawQuery) -> Response {
    let (mut route, mut group, mut limit) = (None, None, DEFAULT_LIMIT);
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match &*key {
            "route" => route = Some(value.into_owned()),
            "group" => group = Some(value.into_owned()),
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => limit = n,
                _ => {
                    return ApiError::bad_request(format!(
                        "limit {value:?}: a number from 1 to {MAX_LIMIT}"
                    ))
                    .into_response();
                }
            },
            other => {
                return ApiError::bad_request(format!(
                    "unknown parameter {other:?}: use route, group and limit"
                ))
                .into_response();
            }
        }
    }
    let connections = state.hub.list(route.as_deref(), group.as_deref(), limit);
    json(
        StatusCode::OK,
        &serde_json::json!({ "connections": connections }),
    )
}

async fn group(State(state): State<AdminState>, Path(group): Path<String>) -> Response {
    if let Err(error) = check_group(&group) {
        return ApiError::bad_request(error.to_string()).into_response();
    }
    json(
        StatusCode::OK,
        &serde_json::json!({ "group": group, "members": state.hub.group_size(&group) }),
    )
}

async fn broadcast(
    State(state): State<AdminState>,
    Path(group): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(error) = check_group(&group) {
        return ApiError::bad_request(error.to_string()).into_response();
    }
    let message = match message(&state, &headers, body).await {
        Ok(message) => message,
        Err(error) => return error.into_response(),
    };
    let (delivered, full) = state.hub.broadcast(&group, &message);
    json(
        StatusCode::OK,
        &serde_json::json!({ "group": group, "delivered": delivered, "full": full }),
    )
}

/// `GET /v1/nodes`: the nodes of the cluster as this node sees them (this
/// one alone without a cluster).
async fn nodes(State(state): State<AdminState>) -> Response {
    let nodes = match &state.cluster {
        Some(cluster) => serde_json::to_value(cluster.members()).unwrap_or_default(),
        None => serde_json::json!([{
            "node": state.hub.node_id(),
            "connections": state.hub.connections(),
            "self": true,
        }]),
    };
    json(StatusCode::OK, &serde_json::json!({ "nodes": nodes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_takes_a_function_code_and_a_short_reason() {
        assert_eq!(close_of(None).unwrap().code(), 1000);
        let close = close_of(Some("code=4001&reason=bye%20now")).unwrap();
        assert_eq!((close.code(), close.reason()), (4001, "bye now".to_owned()));
        for bad in ["code=1001", "code=x", "code=2000", "other=1"] {
            let error = close_of(Some(bad)).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        let long = format!("reason={}", "r".repeat(124));
        assert!(close_of(Some(&long)).is_err());
    }
}
