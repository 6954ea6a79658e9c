//! Health endpoints: the process (`/healthz`), its dependencies (`/readyz`), and each pipeline's
//! freshness computed from the run history (`/health/pipelines`, 503 when any is stale).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/health/pipelines", get(pipelines))
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

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
#[derive(Debug, Serialize, sqlx::FromRow)]
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

async fn pipelines(State(state): State<AppState>) -> Result<(StatusCode, Json<Value>), ApiError> {
    let rows: Vec<PipelineHealth> = sqlx::query_as(
        "SELECT pipeline, enabled, last_success_at, last_success_batch_id, seconds_since_success, last_run_id,
                last_status, last_finished_at, freshness_sla_s, stale
           FROM crm_sync.pipeline_health WHERE enabled ORDER BY pipeline",
    )
    .fetch_all(&state.pool)
    .await?;
    let stale: Vec<&str> = rows
        .iter()
        .filter(|r| r.stale == Some(true))
        .map(|r| r.pipeline.as_str())
        .collect();
    let status = if stale.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({ "status": if stale.is_empty() { "ok" } else { "stale" }, "stale": stale, "pipelines": rows });
    Ok((status, Json(body)))
}
