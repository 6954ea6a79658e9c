//! The API's one error type: each variant is a status code; the JSON body says what was wrong. And the
//! layer that gives the errors axum answers by itself (malformed paths and queries, unknown routes,
//! wrong methods) the same JSON body.

use axum::Json;
use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::queue::QueueError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or malformed bearer token")]
    Unauthorized,
    /// Too many wrong tokens from the caller's address: retry after this many seconds.
    #[error("too many failed authentications from this address; retry in {0} s")]
    TooManyAuthFailures(u64),
    #[error("this token may only read; {0} needs an admin token")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A request body over the API's limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A body that is not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A limit on concurrent use (event streams) is reached.
    #[error("{0}")]
    TooManyRequests(String),
    /// Logged with its detail; the client sees only that something failed on our side.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::TooManyAuthFailures(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "API request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let ApiError::TooManyAuthFailures(secs) = self {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::NotFound(m) => ApiError::NotFound(m),
            QueueError::Conflict(m) => ApiError::Conflict(m),
            QueueError::Invalid(m) => ApiError::BadRequest(m),
            QueueError::Database(e) => ApiError::Internal(e.into()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

/// Longest error text of axum's own that is passed on (its rejections are one line).
const MAX_PLAIN_ERROR: usize = 16 * 1024;

/// Gives every error response a JSON `{"error": ..}` body. axum answers some requests before any
/// handler runs: a path or query it cannot decode (plain text), an unknown route (404) or method (405,
/// empty). Clients, the console and the OpenAPI document all expect one error shape, so those are
/// rewritten here; the status and other headers (`Allow`, `WWW-Authenticate`) stay.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_PLAIN_ERROR)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(CONTENT_LENGTH);
    let body = serde_json::to_vec(&json!({ "error": message })).unwrap_or_default();
    Response::from_parts(parts, Body::from(body))
}
