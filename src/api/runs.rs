//! `/api/pipelines` and `/api/runs`: trigger, list, read, retry, rerun, cancel.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::auth::Caller;
use super::{ApiError, AppState};
use crate::history::{self, RunFilter};
use crate::queue::{self, Trigger};

pub fn router(_state: AppState) -> Router<AppState> {
    Router::new()
        .route("/pipelines", get(list_pipelines))
        .route("/pipelines/{name}/runs", post(trigger))
        .route("/runs", get(list_runs))
        .route("/runs/{id}", get(show_run))
        .route("/runs/{id}/retry", post(retry))
        .route("/runs/{id}/rerun", post(rerun))
        .route("/runs/{id}/cancel", post(cancel))
}

async fn list_pipelines(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let pipelines: Vec<Value> = state
        .config
        .pipelines
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "enabled": p.enabled,
                "steps": p.step_names(),
                "schedule": p.schedule,
                "timezone": p.timezone,
                "max_attempts": p.max_attempts,
                "max_concurrent_runs": p.max_concurrent_runs,
            })
        })
        .collect();
    Ok(Json(json!({ "pipelines": pipelines })))
}

/// `POST /api/pipelines/{name}/runs` with optional JSON params; `Idempotency-Key` returns the same run.
async fn trigger(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require_admin("starting a run")?;
    let params = match body {
        None => json!({}),
        Some(Json(v)) if v.is_object() => v,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "the body must be a JSON object of run parameters".into(),
            ));
        }
    };
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 200)
                .ok_or_else(|| {
                    ApiError::BadRequest("Idempotency-Key must be 1-200 visible characters".into())
                })?,
        ),
    };
    let id = queue::enqueue(&state.pool, &name, &params, key, Trigger::Api).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id }))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    pipeline: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
    before: Option<DateTime<Utc>>,
}

async fn list_runs(
    State(state): State<AppState>,
    _caller: Caller,
    query: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if let Some(s) = &q.status
        && !["queued", "running", "succeeded", "failed", "cancelled"].contains(&s.as_str())
    {
        return Err(ApiError::BadRequest(format!(
            "status \"{s}\" is not one of queued, running, succeeded, failed, cancelled"
        )));
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 1000".into(),
        ));
    }
    let runs = history::list_runs(
        &state.pool,
        &RunFilter {
            pipeline: q.pipeline,
            status: q.status,
            before: q.before,
            limit,
        },
    )
    .await?;
    Ok(Json(json!({ "runs": runs })))
}

fn run_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse()
        .map_err(|_| ApiError::BadRequest(format!("\"{id}\" is not a run id (a UUID)")))
}

async fn show_run(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = run_id(&id)?;
    let detail = history::run_detail(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {id} not found")))?;
    Ok(Json(
        serde_json::to_value(detail).map_err(|e| ApiError::Internal(e.into()))?,
    ))
}

async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require_admin("retrying a run")?;
    let new = queue::retry(&state.pool, run_id(&id)?).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": new }))))
}

async fn rerun(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require_admin("rerunning a run")?;
    let new = queue::rerun(&state.pool, run_id(&id)?, Trigger::Api).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": new }))))
}

async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin("cancelling a run")?;
    let id = run_id(&id)?;
    queue::cancel(&state.pool, id).await?;
    Ok(Json(json!({ "id": id, "status": "cancelled" })))
}
