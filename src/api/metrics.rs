//! `GET /metrics`: the Prometheus text format. No token: it carries counts and pipeline names only,
//! and scrapers rarely hold credentials (restrict it at the network edge if needed).

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// Process metrics, then (on `serve`) the queue and freshness gauges read from PostgreSQL.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses(
        (status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String),
        (status = 500, description = "The database could not be read", body = super::openapi::ErrorBody),
    )
)]
async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let mut body = state.metrics.render();
    if let Some(cluster) = &state.cluster {
        body.push_str(&cluster.render(&state.pool).await?);
    }
    Ok((
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    ))
}
