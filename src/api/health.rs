//! Health endpoints: the process (`/healthz`), its dependencies (`/readyz`), and each pipeline's
//! freshness computed from the run history (`/health/pipelines`, 503 when any is stale).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(pipelines))
}

/// The process is up (no dependency is checked).
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Always {\"status\": \"ok\"}", body = Object)))]
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// The database is reachable and its schema is current.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready", body = Object),
        (status = 503, description = "Database unreachable or not migrated; `reason` says which", body = Object),
    ))]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    match crate::db::migrations_current(&state.pool).await {
        Ok(true) => (StatusCode::OK, Json(json!({ "status": "ready" }))),
        Ok(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({ "status": "not ready", "reason": "database schema is not current: run crm-sync migrate" }),
            ),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "reason": "database unreachable" })),
        ),
    }
}

/// One row of `crm_sync.pipeline_health`.
#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
struct PipelineHealth {
    pipeline: String,
    enabled: bool,
    last_success_at: Option<DateTime<Utc>>,
    last_success_batch_id: Option<String>,
    seconds_since_success: Option<i64>,
    last_run_id: Option<Uuid>,
    last_status: Option<String>,
    last_finished_at: Option<DateTime<Utc>>,
    freshness_sla_s: Option<i64>,
    stale: Option<bool>,
}

/// Each enabled pipeline's last success, age and last status against its freshness SLA.
#[derive(Serialize, ToSchema)]
struct PipelinesHealth {
    /// `ok`, or `stale` when any enabled pipeline is past its freshness SLA.
    status: String,
    /// The stale pipelines' names.
    stale: Vec<String>,
    pipelines: Vec<PipelineHealth>,
}

/// Freshness of every enabled pipeline, from the run history.
#[utoipa::path(get, path = "/health/pipelines", tag = "health",
    responses(
        (status = 200, description = "Every enabled pipeline is fresh", body = PipelinesHealth),
        (status = 503, description = "Some enabled pipeline is stale (named in `stale`)", body = PipelinesHealth),
    ))]
async fn pipelines(
    State(state): State<AppState>,
) -> Result<(StatusCode, Json<PipelinesHealth>), ApiError> {
    let rows: Vec<PipelineHealth> = sqlx::query_as(
        "SELECT pipeline, enabled, last_success_at, last_success_batch_id, seconds_since_success, last_run_id,
                last_status, last_finished_at, freshness_sla_s, stale
           FROM crm_sync.pipeline_health WHERE enabled ORDER BY pipeline",
    )
    .fetch_all(&state.pool)
    .await?;
    let stale: Vec<String> = rows
        .iter()
        .filter(|r| r.stale == Some(true))
        .map(|r| r.pipeline.clone())
        .collect();
    let status = if stale.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = PipelinesHealth {
        status: if stale.is_empty() { "ok" } else { "stale" }.into(),
        stale,
        pipelines: rows,
    };
    Ok((status, Json(body)))
}
