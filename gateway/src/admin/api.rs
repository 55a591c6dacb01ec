//! What every management endpoint shares: the bearer token in front of
//! `/v1/` and `/@connections/`, and errors as JSON
//! (`{"error": kind, "message": ...}`) with a status that fits.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use subtle::ConstantTimeEq;

use super::AdminState;

/// A refused management request: its status, a short kind and a message
/// naming the cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A short word for programs (`not-found`, `conflict`, ...).
    pub kind: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    /// An error with this status and kind.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", message)
    }

    /// 404: nothing there.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", message)
    }

    /// 409: the change conflicts with the current state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 410: the connection is unknown or gone (as API Gateway answers).
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GONE, "gone", message)
    }

    /// 413: the body is over a limit.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too-large", message)
    }

    /// 500: the gateway failed; the detail is in its log.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.kind, "message": self.message });
        let mut response = json(self.status, &body);
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A JSON response.
pub fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// Whether `path` is behind the token.
fn guarded(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/") || path.starts_with("/@connections")
}

/// The token in front of the management paths: every request under
/// `/v1/` and `/@connections/` (matched or not) needs
/// `Authorization: Bearer <admin.token>`; without a token configured
/// they are all 404.
pub async fn guard(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if guarded(request.uri().path())
        && let Err(error) = authorize(state.token.as_deref(), request.headers())
    {
        let (parts, body) = request.into_parts();
        drain(&parts.headers, body).await;
        return error.into_response();
    }
    next.run(request).await
}

/// Most of a refused request's body read (and thrown away) before the
/// answer.
pub const DRAIN_LIMIT: usize = 64 << 20;

/// Longest a refused request's body is read before the answer.
pub const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Read what is left of a refused request's body, up to [`DRAIN_LIMIT`]
/// bytes and for [`DRAIN_TIME`], keeping none of it. A client still
/// sending a large body (an upload refused before it was read) then reads
/// the answer, instead of failing with a broken pipe when the connection
/// closes under it. What is beyond the bounds is not read: the connection
/// closes. Nothing is read from a client that waits for `100 Continue`
/// before sending (it reads the refusal instead), nor from one that said
/// its body is larger than the bound (it would be cut off anyway).
pub async fn drain(headers: &HeaderMap, body: Body) {
    let waits_to_send = headers
        .get(header::EXPECT)
        .is_some_and(|expect| expect.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let too_large = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .is_some_and(|length| length > DRAIN_LIMIT as u64);
    if waits_to_send || too_large {
        return;
    }
    let mut stream = body.into_data_stream();
    let mut left = DRAIN_LIMIT;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(chunk)) = stream.next().await {
            left = left.saturating_sub(chunk.len());
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

/// Check `Authorization: Bearer <token>`, in constant time.
fn authorize(token: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = token else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "api-off",
            "the management API is off: set admin.token to turn it on",
        ));
    };
    // The scheme is case-insensitive (RFC 7235).
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    // Digests of equal length, compared in constant time: neither the
    // token's bytes nor its length show in the time taken.
    let digest = |bytes: &[u8]| ring::digest::digest(&ring::digest::SHA256, bytes);
    let (presented, token) = (digest(presented.as_bytes()), digest(token.as_bytes()));
    if bool::from(presented.as_ref().ct_eq(token.as_ref())) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token (Authorization: Bearer <admin.token>)",
        ))
    }
}

/// The answer for a management path nobody serves.
pub async fn no_such_path(request: Request) -> Response {
    ApiError::not_found(format!(
        "no such endpoint: {} {}",
        request.method(),
        request.uri().path()
    ))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_guards_every_management_path_and_nothing_else() {
        for path in ["/v1", "/v1/functions", "/v1/nope", "/@connections/x"] {
            assert!(guarded(path), "{path}");
        }
        for path in ["/metrics", "/healthz", "/readyz", "/v10", "/"] {
            assert!(!guarded(path), "{path}");
        }
    }

    #[test]
    fn a_missing_or_wrong_token_is_refused_and_the_right_one_passes() {
        let mut headers = HeaderMap::new();
        let refused = authorize(Some("secret-token"), &headers).unwrap_err();
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        headers.insert(header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert!(authorize(Some("secret-token"), &headers).is_err());
        headers.insert(
            header::AUTHORIZATION,
            "Bearer secret-token".parse().unwrap(),
        );
        assert!(authorize(Some("secret-token"), &headers).is_ok());
        let off = authorize(None, &headers).unwrap_err();
        assert_eq!(off.status, StatusCode::NOT_FOUND);
        assert!(!off.message.contains("secret"), "{}", off.message);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_waiting_for_100_continue_or_too_large_is_not_read() {
        let pending = || {
            Body::from_stream(futures_util::stream::pending::<
                Result<Vec<u8>, std::io::Error>,
            >())
        };
        let mut expect = HeaderMap::new();
        expect.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        let mut large = HeaderMap::new();
        large.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from(DRAIN_LIMIT as u64 + 1),
        );
        for headers in [expect, large] {
            let started = tokio::time::Instant::now();
            drain(&headers, pending()).await;
            assert_eq!(started.elapsed(), std::time::Duration::ZERO, "{headers:?}");
        }
        // Any other body is read for at most DRAIN_TIME.
        let started = tokio::time::Instant::now();
        drain(&HeaderMap::new(), pending()).await;
        assert_eq!(started.elapsed(), DRAIN_TIME);
    }
}
