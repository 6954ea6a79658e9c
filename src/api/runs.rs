//! `/api/pipelines` and `/api/runs`: trigger, list, read, retry, rerun, cancel.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::Caller;
use super::openapi::ErrorBody;
use super::{ApiError, AppState};
use crate::history::{self, RunDetail, RunFilter, RunSummary};
use crate::queue::{self, Trigger};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_pipelines))
        .routes(routes!(trigger))
        .routes(routes!(list_runs))
        .routes(routes!(show_run))
        .routes(routes!(retry))
        .routes(routes!(rerun))
        .routes(routes!(cancel))
}

/// A configured pipeline.
#[derive(Serialize, ToSchema)]
struct PipelineInfo {
    name: String,
    enabled: bool,
    /// Step names in order.
    steps: Vec<String>,
    /// Cron expression, absent for manual-only pipelines.
    schedule: Option<String>,
    /// IANA time zone of the schedule.
    timezone: String,
    max_attempts: u32,
    max_concurrent_runs: u32,
}

#[derive(Serialize, ToSchema)]
struct PipelineList {
    pipelines: Vec<PipelineInfo>,
}

/// The run a request created (or, with a repeated `Idempotency-Key`, found).
#[derive(Serialize, ToSchema)]
struct RunCreated {
    id: Uuid,
}

#[derive(Serialize, ToSchema)]
struct RunList {
    /// Newest first; page with `before` = the last run's `created_at`.
    runs: Vec<RunSummary>,
}

#[derive(Serialize, ToSchema)]
struct RunCancelled {
    id: Uuid,
    /// Always `cancelled`.
    status: String,
}

/// The configured pipelines.
#[utoipa::path(get, path = "/pipelines", tag = "runs", security(("bearer" = [])),
    responses(
        (status = 200, body = PipelineList),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
    ))]
async fn list_pipelines(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<PipelineList>, ApiError> {
    let pipelines = state
        .config
        .pipelines
        .iter()
        .map(|p| PipelineInfo {
            name: p.name.clone(),
            enabled: p.enabled,
            steps: p.step_names(),
            schedule: p.schedule.clone(),
            timezone: p.timezone.clone(),
            max_attempts: p.max_attempts,
            max_concurrent_runs: p.max_concurrent_runs,
        })
        .collect();
    Ok(Json(PipelineList { pipelines }))
}

/// Starts a run. The optional body is the run's parameters (a JSON object); repeating a request with
/// the same `Idempotency-Key` returns the same run.
#[utoipa::path(post, path = "/pipelines/{name}/runs", tag = "runs", security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "The pipeline's name"),
        ("Idempotency-Key" = Option<String>, Header, description = "1-200 characters; a repeat returns the same run"),
    ),
    request_body(content = Option<Object>, description = "Run parameters", content_type = "application/json"),
    responses(
        (status = 202, description = "Queued", body = RunCreated),
        (status = 400, description = "Body not a JSON object, bad key", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A read-only token", body = ErrorBody),
        (status = 404, description = "Unknown pipeline (the known ones are named)", body = ErrorBody),
        (status = 409, description = "Idempotency key reused for another pipeline or disabled pipeline", body = ErrorBody),
    ))]
async fn trigger(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Result<(StatusCode, Json<RunCreated>), ApiError> {
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
    Ok((StatusCode::ACCEPTED, Json(RunCreated { id })))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct RunsQuery {
    /// Only this pipeline's runs.
    pipeline: Option<String>,
    /// queued, running, succeeded, failed or cancelled.
    status: Option<String>,
    /// 1-1000, default 50.
    limit: Option<i64>,
    /// Only runs created before this instant (RFC 3339): the next page.
    before: Option<DateTime<Utc>>,
}

/// Runs, newest first.
#[utoipa::path(get, path = "/runs", tag = "runs", security(("bearer" = [])),
    params(RunsQuery),
    responses(
        (status = 200, body = RunList),
        (status = 400, description = "Unknown status, limit out of range, unknown field", body = ErrorBody),
        (status = 401, body = ErrorBody),
    ))]
async fn list_runs(
    State(state): State<AppState>,
    _caller: Caller,
    query: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RunList>, ApiError> {
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
    Ok(Json(RunList { runs }))
}

pub(super) fn run_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse()
        .map_err(|_| ApiError::BadRequest(format!("\"{id}\" is not a run id (a UUID)")))
}

/// One run: its steps with outputs (row counts, backup object URIs), every attempt, errors.
#[utoipa::path(get, path = "/runs/{id}", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The run id (a UUID)")),
    responses(
        (status = 200, body = RunDetail),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
    ))]
async fn show_run(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RunDetail>, ApiError> {
    let id = run_id(&id)?;
    let detail = history::run_detail(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {id} not found")))?;
    Ok(Json(detail))
}

/// Resumes a failed or cancelled run from the step that failed, in the same batch (a new run with
/// trigger `retry`; succeeded steps' checkpoints are reused).
#[utoipa::path(post, path = "/runs/{id}/retry", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The failed or cancelled run")),
    responses(
        (status = 202, description = "The new run", body = RunCreated),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The run did not fail, or was already retried", body = ErrorBody),
    ))]
async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<RunCreated>), ApiError> {
    caller.require_admin("retrying a run")?;
    let new = queue::retry(&state.pool, run_id(&id)?).await?;
    Ok((StatusCode::ACCEPTED, Json(RunCreated { id: new })))
}

/// Runs the same pipeline with the same parameters again from the first step, in a new batch.
#[utoipa::path(post, path = "/runs/{id}/rerun", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path, description = "Any finished run")),
    responses(
        (status = 202, description = "The new run", body = RunCreated),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
    ))]
async fn rerun(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<RunCreated>), ApiError> {
    caller.require_admin("rerunning a run")?;
    let new = queue::rerun(&state.pool, run_id(&id)?, Trigger::Api).await?;
    Ok((StatusCode::ACCEPTED, Json(RunCreated { id: new })))
}

/// Cancels a queued or running run; its running step is stopped at once.
#[utoipa::path(post, path = "/runs/{id}/cancel", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path, description = "A queued or running run")),
    responses(
        (status = 200, body = RunCancelled),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The run already finished", body = ErrorBody),
    ))]
async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RunCancelled>, ApiError> {
    caller.require_admin("cancelling a run")?;
    let id = run_id(&id)?;
    queue::cancel(&state.pool, id).await?;
    let (pipeline, trigger): (String, String) =
        sqlx::query_as("SELECT pipeline, trigger FROM crm_sync.runs WHERE id = $1")
            .bind(id)
            .fetch_one(&state.pool)
            .await?;
    state.metrics.run_finished(&pipeline, &trigger, "cancelled");
    Ok(Json(RunCancelled {
        id,
        status: "cancelled".into(),
    }))
}
