//! The routes API: `PUT /v1/routes` (a route in the short or the long
//! form), `GET /v1/routes` (every route, the config file's too, with its
//! origin), `DELETE /v1/routes?path=/chat`. The changes are the catalog's
//! ([`crate::store::Catalog`]).

use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use serde::Serialize;

use super::AdminState;
use super::api::{ApiError, json};
use super::functions::{not_allowed, read_json};
use crate::router::{Origin, RouteSpec};

/// The route endpoints.
pub fn router() -> Router<AdminState> {
    Router::new().route(
        "/v1/routes",
        put(set).get(list).delete(remove).fallback(not_allowed),
    )
}

/// A route as listed: its spec and where it was defined.
#[derive(Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    spec: &'a RouteSpec,
    origin: Origin,
}

async fn set(State(state): State<AdminState>, headers: HeaderMap, body: Body) -> Response {
    let outcome = async {
        let spec: RouteSpec = read_json(&headers, body, state.body_timeout).await?;
        let created = state.catalog.put_route(spec.clone()).await?;
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok::<_, ApiError>(json(
            status,
            &Listed {
                spec: &spec,
                origin: Origin::Api,
            },
        ))
    };
    outcome.await.unwrap_or_else(IntoResponse::into_response)
}

async fn list(State(state): State<AdminState>) -> Response {
    let router = state.routes.snapshot();
    let mut routes: Vec<Listed<'_>> = router
        .entries()
        .iter()
        .map(|entry| Listed {
            spec: entry.route.spec(),
            origin: entry.origin,
        })
        .collect();
    routes.sort_by(|a, b| a.spec.path.cmp(&b.spec.path));
    json(StatusCode::OK, &serde_json::json!({ "routes": routes }))
}

/// The `path` of `?path=/chat`.
fn path_of(query: Option<&str>) -> Result<String, ApiError> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(key, _)| key == "path")
        .map(|(_, path)| path.into_owned())
        .ok_or_else(|| ApiError::bad_request("say which route: DELETE /v1/routes?path=/chat"))
}

async fn remove(State(state): State<AdminState>, RawQuery(query): RawQuery) -> Response {
    let outcome = async {
        let path = path_of(query.as_deref())?;
        state.catalog.remove_route(&path).await?;
        Ok::<_, ApiError>(StatusCode::NO_CONTENT.into_response())
    };
    outcome.await.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_to_delete_is_read_from_the_query_decoded() {
        assert_eq!(path_of(Some("path=%2Fchat")).unwrap(), "/chat");
        assert_eq!(path_of(Some("x=1&path=/a/b")).unwrap(), "/a/b");
        assert_eq!(path_of(None).unwrap_err().status, StatusCode::BAD_REQUEST);
    }
}
