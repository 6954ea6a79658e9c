//! `/api/pipelines/{name}/runs` and `/api/runs`: trigger, list, read, retry, rerun, cancel.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::Caller;
use super::body::RunParams;
use super::openapi::ErrorBody;
use super::{ApiError, AppState};
use crate::history::{self, RunDetail, RunFilter, RunSummary};
use crate::queue::{self, Trigger};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(trigger))
        .routes(routes!(list_runs))
        .routes(routes!(show_run))
        .routes(routes!(retry))
        .routes(routes!(rerun))
        .routes(routes!(cancel))
}

/// The run a request created (or, with a repeated `Idempotency-Key`, found).
#[derive(Serialize, ToSchema)]
pub(super) struct RunCreated {
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

/// Starts a run. The optional body is the run's parameters (a JSON object); repeating a request with
/// the same `Idempotency-Key` returns the same run.
#[utoipa::path(post, path = "/pipelines/{name}/runs", tag = "runs", security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "The pipeline's name"),
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 200,
         pattern = "^[!-~]([ -~]*[!-~])?$",
         description = "1-200 visible ASCII characters; a repeat returns the same run"),
        ("X-Crm-Sync-Client" = Option<String>, Header, description = "`console` records the run's trigger as console"),
    ),
    request_body(content = Option<RunParams>, description = "Run parameters (at most 64 KiB)", content_type = "application/json"),
    responses(
        (status = 202, description = "Queued", body = RunCreated),
        (status = 400, description = "Body not valid JSON or not an object, NUL characters, bad key", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A read-only token", body = ErrorBody),
        (status = 404, description = "Unknown pipeline (the known ones are named)", body = ErrorBody),
        (status = 409, description = "Idempotency key reused for another pipeline or disabled pipeline", body = ErrorBody),
        (status = 413, description = "Body larger than 64 KiB", body = ErrorBody),
        (status = 415, description = "A body that is not application/json", body = ErrorBody),
    ))]
async fn trigger(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    RunParams(params): RunParams,
) -> Result<(StatusCode, Json<RunCreated>), ApiError> {
    caller.require_admin("starting a run")?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                // Printable ASCII only: HTTP allows tabs and obs-text in header values, keys
                // that show and compare the same everywhere do not.
                .filter(|k| {
                    (1..=200).contains(&k.len()) && k.bytes().all(|b| (b' '..=b'~').contains(&b))
                })
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Idempotency-Key must be 1-200 visible ASCII characters".into(),
                    )
                })?,
        ),
    };
    let id = queue::enqueue(&state.pool, &name, &params, key, trigger_of(&headers)).await?;
    Ok((StatusCode::ACCEPTED, Json(RunCreated { id })))
}

/// The run statuses a list can be filtered by.
const STATUSES: [&str; 5] = ["queued", "running", "succeeded", "failed", "cancelled"];

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct RunsQuery {
    /// Only this pipeline's runs.
    pipeline: Option<String>,
    /// queued, running, succeeded, failed or cancelled.
    #[param(schema_with = status_schema)]
    status: Option<String>,
    /// 1-1000, default 50.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Only runs created before this instant (RFC 3339, years 1-9999): the next page.
    before: Option<DateTime<Utc>>,
}

/// The `status` filter in the OpenAPI document: one of [`STATUSES`].
fn status_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(STATUSES))
        .build()
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
        && !STATUSES.contains(&s.as_str())
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
    if q.pipeline.as_deref().is_some_and(|p| p.contains('\0')) {
        return Err(ApiError::BadRequest(
            "pipeline must not contain NUL characters".into(),
        ));
    }
    // PostgreSQL's timestamps end in 294276 AD and chrono's go further: keep to calendar years.
    if q.before.is_some_and(|b| !(1..=9999).contains(&b.year())) {
        return Err(ApiError::BadRequest(
            "before must be an RFC 3339 instant between the years 1 and 9999".into(),
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

/// Runs started from the console say so (`X-Crm-Sync-Client: console`); all others are `api`.
fn trigger_of(headers: &HeaderMap) -> Trigger {
    match headers.get("x-crm-sync-client") {
        Some(v) if v == "console" => Trigger::Console,
        _ => Trigger::Api,
    }
}

pub(super) fn run_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse()
        .map_err(|_| ApiError::BadRequest(format!("\"{id}\" is not a run id (a UUID)")))
}

/// One run: its steps with outputs (row counts, backup object URIs), every attempt, errors.
#[utoipa::path(get, path = "/runs/{id}", tag = "runs", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The run id")),
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
    params(("id" = Uuid, Path, description = "The failed or cancelled run")),
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
    params(
        ("id" = Uuid, Path, description = "Any finished run"),
        ("X-Crm-Sync-Client" = Option<String>, Header, description = "`console` records the run's trigger as console"),
    ),
    responses(
        (status = 202, description = "The new run", body = RunCreated),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
    ))]
async fn rerun(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<RunCreated>), ApiError> {
    caller.require_admin("rerunning a run")?;
    let new = queue::rerun(&state.pool, run_id(&id)?, trigger_of(&headers)).await?;
    Ok((StatusCode::ACCEPTED, Json(RunCreated { id: new })))
}

/// Cancels a queued or running run; its running step is stopped at once.
#[utoipa::path(post, path = "/runs/{id}/cancel", tag = "runs", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "A queued or running run")),
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
