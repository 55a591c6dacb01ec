//! The functions API: upload a version (`PUT /v1/functions/{name}`), list
//! functions and their versions, make a version live, delete a version or
//! a whole function. The changes themselves are the catalog's
//! ([`crate::store::Catalog`]); this file speaks HTTP.

use std::time::SystemTime;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, put};
use futures_util::StreamExt;
use runtime::Function;
use runtime::registry::VersionError;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::AdminState;
use super::api::{ApiError, drain, json};
use crate::router::TableError;
use crate::store::CatalogError;

/// Largest JSON body of the other endpoints (`{"version": ...}`, a route).
pub(super) const MAX_JSON_BODY: usize = 64 << 10;

/// The function endpoints.
pub fn router() -> Router<AdminState> {
    Router::new()
        .route("/v1/functions", get(list).fallback(not_allowed))
        .route(
            "/v1/functions/{name}",
            get(show).put(upload).delete(remove).fallback(not_allowed),
        )
        .route(
            "/v1/functions/{name}/live",
            put(set_live).fallback(not_allowed),
        )
        .route(
            "/v1/functions/{name}/versions/{version}",
            delete(remove_version).fallback(not_allowed),
        )
}

/// A method the path does not take.
pub(super) async fn not_allowed(request: axum::extract::Request) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!(
            "{} is not an operation of {}",
            request.method(),
            request.uri().path()
        ),
    )
    .into_response()
}

/// A catalog error as the API answers it.
impl From<CatalogError> for ApiError {
    fn from(error: CatalogError) -> Self {
        let message = error.to_string();
        match error {
            CatalogError::BadName(_) | CatalogError::BadRoute(_) => ApiError::bad_request(message),
            CatalogError::Invalid(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid-component", message)
            }
            CatalogError::Version(
                VersionError::UnknownFunction(_) | VersionError::UnknownVersion { .. },
            )
            | CatalogError::Route(TableError::NotFound(_)) => ApiError::not_found(message),
            CatalogError::ConfigFunction(_)
            | CatalogError::Version(VersionError::Live { .. })
            | CatalogError::InUse { .. }
            | CatalogError::MissingFunction { .. }
            | CatalogError::VersionClash { .. }
            | CatalogError::Route(TableError::FromConfig(_)) => ApiError::conflict(message),
            CatalogError::TooLarge { .. } => ApiError::too_large(message),
            CatalogError::Busy => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message),
            CatalogError::Unshared(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster-unavailable",
                message,
            ),
            CatalogError::Unloadable { .. } => {
                tracing::error!("management API: {message}");
                ApiError::internal(message)
            }
            CatalogError::Disk(_) | CatalogError::Load(_) => {
                tracing::error!("management API: {message}");
                ApiError::internal(format!(
                    "the change could not be kept, nothing was changed: {message}"
                ))
            }
        }
    }
}

/// Read a body of at most `limit` bytes; 413 beyond. A body that stops
/// arriving for `idle` (`admin.header_timeout`) is refused with 408, so a
/// stalled client holds nothing (an upload's compile slot) for long.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    what: &str,
    idle: std::time::Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::too_large(format!("{what} is larger than {limit} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        drain(headers, body).await;
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(declared.map_or(0, |length| length as usize));
    let mut stream = body.into_data_stream();
    loop {
        let chunk = match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!(
                        "{what} stopped arriving for {} (admin.header_timeout)",
                        humantime::format_duration(idle)
                    ),
                ));
            }
        };
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            drop(bytes);
            drain(headers, Body::from_stream(stream)).await;
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes.into())
}

/// A JSON body as `T`; 400 naming what is wrong.
pub(super) async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    idle: std::time::Duration,
) -> Result<T, ApiError> {
    let bytes = read_body(headers, body, MAX_JSON_BODY, "the JSON body", idle).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not the JSON expected: {e}")))
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn origin(state: &AdminState, name: &str) -> &'static str {
    if state.catalog.is_config_function(name) {
        "config"
    } else {
        "api"
    }
}

/// One function in `GET /v1/functions`.
#[derive(Serialize)]
struct FunctionSummary {
    name: String,
    /// `config` (the config file's) or `api` (uploaded).
    origin: &'static str,
    /// The live version, if any.
    live: Option<String>,
    /// How many versions it has.
    versions: usize,
    /// Instances alive now, every version together.
    instances: u32,
    /// Whether the live version's compiled code is in memory.
    loaded: bool,
}

async fn list(State(state): State<AdminState>) -> Response {
    let functions: Vec<FunctionSummary> = state
        .registry
        .list()
        .into_iter()
        .map(|summary| {
            let instances = state
                .registry
                .versions(&summary.name)
                .unwrap_or_default()
                .iter()
                .map(|v| v.function.live_instances())
                .sum();
            FunctionSummary {
                origin: origin(&state, &summary.name),
                live: summary.live.as_ref().map(|f| f.version().to_owned()),
                loaded: summary.live.as_ref().is_some_and(|f| f.is_loaded()),
                versions: summary.versions,
                instances,
                name: summary.name,
            }
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({ "functions": functions }),
    )
}

/// One version in `GET /v1/functions/{name}`, and the answer to an upload.
#[derive(Serialize)]
struct VersionInfo {
    version: String,
    digest: String,
    size: usize,
    created: String,
    live: bool,
    instances: u32,
    invocations: u64,
    loaded: bool,
}

impl VersionInfo {
    fn of(function: &Function, created: SystemTime, live: bool) -> Self {
        Self {
            version: function.version().to_owned(),
            digest: function.digest(),
            size: function.size(),
            created: rfc3339(created),
            live,
            instances: function.live_instances(),
            invocations: function.invocations(),
            loaded: function.is_loaded(),
        }
    }
}

async fn show(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    let Some(versions) = state.registry.versions(&name) else {
        return ApiError::not_found(format!("no function {name:?}")).into_response();
    };
    let live = versions
        .iter()
        .find(|v| v.live)
        .map(|v| v.function.version().to_owned());
    let versions: Vec<VersionInfo> = versions
        .iter()
        .map(|v| VersionInfo::of(&v.function, v.created, v.live))
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "name": name,
            "origin": origin(&state, &name),
            "live": live,
            "versions": versions,
        }),
    )
}

/// `?live=false` (the default is true).
fn live_of(query: Option<&str>) -> Result<bool, ApiError> {
    let mut live = true;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match (&*key, &*value) {
            ("live", "true") => live = true,
            ("live", "false") => live = false,
            (key, _) => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {key}={value}: the only one is live=true|false"
                )));
            }
        }
    }
    Ok(live)
}

async fn upload(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match try_upload(&state, &name, query.as_deref(), &headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn try_upload(
    state: &AdminState,
    name: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let catalog = &state.catalog;
    let limit = catalog.max_upload_size();
    let too_large = || ApiError::from(CatalogError::TooLarge { limit });
    let admitted = async {
        let live = live_of(query)?;
        catalog.check_upload(name)?;
        if headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok())
            .is_some_and(|length| length > limit as u64)
        {
            return Err(too_large());
        }
        // The body is read only once this upload may compile: waiting
        // uploads hold a connection, not their component.
        let slot = catalog.upload_slot().await?;
        Ok::<_, ApiError>((live, slot))
    };
    let (live, _slot) = match admitted.await {
        Ok(admitted) => admitted,
        Err(error) => {
            drain(headers, body).await;
            return Err(error);
        }
    };
    let wasm = read_body(headers, body, limit, "the component", state.body_timeout)
        .await
        .map_err(|e| {
            if e.status == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                e
            }
        })?;
    let uploaded = catalog.upload(name, wasm, live).await?;
    let function = &uploaded.function;
    let is_live = state
        .registry
        .get(name)
        .is_some_and(|f| f.version() == function.version());
    let status = if uploaded.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(
        status,
        &serde_json::json!({
            "name": name,
            "version": function.version(),
            "digest": function.digest(),
            "size": function.size(),
            "created": rfc3339(uploaded.created_at),
            "live": is_live,
            "pruned": uploaded.pruned,
        }),
    ))
}

/// `PUT /v1/functions/{name}/live`'s body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LiveVersion {
    version: String,
}

async fn set_live(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let outcome = async {
        let LiveVersion { version } = read_json(&headers, body, state.body_timeout).await?;
        let function = state.catalog.set_live(&name, &version).await?;
        Ok::<_, ApiError>(json(
            StatusCode::OK,
            &serde_json::json!({ "name": name, "live": function.version() }),
        ))
    };
    outcome.await.unwrap_or_else(IntoResponse::into_response)
}

async fn remove_version(
    State(state): State<AdminState>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    match state.catalog.remove_version(&name, &version).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => ApiError::from(error).into_response(),
    }
}

async fn remove(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match state.catalog.remove_function(&name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => ApiError::from(error).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_is_true_unless_said_false_and_nothing_else_is_taken() {
        assert!(live_of(None).unwrap());
        assert!(live_of(Some("live=true")).unwrap());
        assert!(!live_of(Some("live=false")).unwrap());
        assert_eq!(
            live_of(Some("live=no")).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            live_of(Some("version=1")).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_is_refused_with_408() {
        let chunks =
            futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"12"))])
                .chain(futures_util::stream::pending());
        let error = read_body(
            &HeaderMap::new(),
            Body::from_stream(chunks),
            1 << 20,
            "the component",
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert_eq!(error.status, StatusCode::REQUEST_TIMEOUT);
        assert!(
            error.message.contains("admin.header_timeout"),
            "{}",
            error.message
        );
    }

    #[tokio::test]
    async fn a_body_over_its_limit_is_413_whether_declared_or_streamed() {
        let mut headers = HeaderMap::new();
        let read = |headers: HeaderMap, body: &'static [u8]| async move {
            read_body(
                &headers,
                Body::from(body),
                4,
                "the body",
                std::time::Duration::from_secs(5),
            )
            .await
        };
        assert_eq!(&read(headers.clone(), b"1234").await.unwrap()[..], b"1234");
        assert_eq!(
            read(headers.clone(), b"12345").await.unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        headers.insert(header::CONTENT_LENGTH, "99".parse().unwrap());
        assert_eq!(
            read(headers, b"1").await.unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
