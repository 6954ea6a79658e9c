//! Health endpoints: the process (`/healthz`), its dependencies (`/readyz`), and each pipeline's
//! freshness computed from the run history and whether a live worker serves it (`/health/pipelines`,
//! 503 when any is stale or has steps no live worker serves).

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

/// The database is reachable and its schema is current; `reason` says which is not.
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
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "readiness check: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "not ready", "reason": "database unreachable" })),
            )
        }
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
    /// Some live worker claims this pipeline's steps.
    served: bool,
    /// Steps waiting while no live worker serves the pipeline.
    unserved_steps: i64,
    /// Distinct definitions live processes registered (more than 1: their configs differ).
    definitions: i64,
}

/// Each enabled pipeline's last success, age and last status against its freshness SLA, and who
/// serves it.
#[derive(Serialize, ToSchema)]
struct PipelinesHealth {
    /// `ok`; `stale` when any enabled pipeline is past its freshness SLA; `unserved` when steps wait
    /// for a pipeline no live worker serves (and none is stale).
    status: String,
    /// The stale pipelines' names.
    stale: Vec<String>,
    /// Pipelines with steps waiting that no live worker serves.
    unserved: Vec<String>,
    /// Pipelines live processes define differently (their configs differ); reported, not a 503.
    conflicts: Vec<String>,
    pipelines: Vec<PipelineHealth>,
}

/// Freshness of every enabled pipeline, from the run history, and whether its steps have a worker.
#[utoipa::path(get, path = "/health/pipelines", tag = "health",
    responses(
        (status = 200, description = "Every enabled pipeline is fresh and served", body = PipelinesHealth),
        (status = 503, description = "Some enabled pipeline is stale (named in `stale`) or has steps no live worker serves (named in `unserved`)", body = PipelinesHealth),
    ))]
async fn pipelines(
    State(state): State<AppState>,
) -> Result<(StatusCode, Json<PipelinesHealth>), ApiError> {
    let rows: Vec<PipelineHealth> = sqlx::query_as(
        "SELECT pipeline, enabled, last_success_at, last_success_batch_id, seconds_since_success, last_run_id,
                last_status, last_finished_at, freshness_sla_s, stale, served, unserved_steps, definitions
           FROM crm_sync.pipeline_health WHERE enabled AND left(pipeline, 2) <> '__' ORDER BY pipeline",
    )
    .fetch_all(&state.pool)
    .await?;
    let names = |keep: fn(&PipelineHealth) -> bool| -> Vec<String> {
        rows.iter()
            .filter(|r| keep(r))
            .map(|r| r.pipeline.clone())
            .collect()
    };
    let stale = names(|r| r.stale == Some(true));
    let unserved = names(|r| r.unserved_steps > 0);
    let conflicts = names(|r| r.definitions > 1);
    let (status, word) = match (stale.is_empty(), unserved.is_empty()) {
        (true, true) => (StatusCode::OK, "ok"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "stale"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "unserved"),
    };
    let body = PipelinesHealth {
        status: word.into(),
        stale,
        unserved,
        conflicts,
        pipelines: rows,
    };
    Ok((status, Json(body)))
}
