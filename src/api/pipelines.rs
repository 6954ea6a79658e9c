//! `/api/pipelines`: every registered pipeline (whichever process's config registered it) with its
//! schedule's next fire time, its health from the run history, who serves it and whether live
//! processes define it differently: what the console's pipelines page shows. An admin can disable
//! and enable a pipeline here (`crm-sync pipelines disable|enable`).

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, FixedOffset, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::openapi::ErrorBody;
use super::{ApiError, AppState};
use crate::registry::{self, PipelineStatus};
use crate::scheduler::cron::Schedule;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_pipelines))
        .routes(routes!(disable))
        .routes(routes!(enable))
}

/// A registered pipeline, its schedule and its health.
#[derive(Serialize, ToSchema)]
struct PipelineInfo {
    #[serde(flatten)]
    status: PipelineStatus,
    /// Live processes define the pipeline in more than one way (`processes` says how).
    conflict: bool,
    /// The next scheduled run in the pipeline's time zone (RFC 3339 with its offset); absent when
    /// manual-only or disabled.
    next_fire_local: Option<DateTime<FixedOffset>>,
    /// The same instant in UTC.
    next_fire_utc: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
struct PipelineList {
    pipelines: Vec<PipelineInfo>,
}

/// The registered pipelines with next fire times, health, and who serves them.
#[utoipa::path(get, path = "/pipelines", tag = "pipelines", security(("bearer" = [])),
    responses(
        (status = 200, body = PipelineList),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
    ))]
async fn list_pipelines(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<PipelineList>, ApiError> {
    let now = Utc::now();
    let pipelines = registry::list(&state.pool)
        .await?
        .into_iter()
        .map(|status| {
            let next = status
                .schedule
                .as_deref()
                .filter(|_| status.enabled)
                .and_then(|expr| Schedule::parse(expr, status.timezone.as_deref()?).ok())
                .and_then(|s| {
                    let next = s.next_after(now)?;
                    Some((next.with_timezone(&s.timezone()).fixed_offset(), next))
                });
            PipelineInfo {
                conflict: status.conflict(),
                next_fire_local: next.map(|n| n.0),
                next_fire_utc: next.map(|n| n.1),
                status,
            }
        })
        .collect();
    Ok(Json(PipelineList { pipelines }))
}

/// What a disable or enable left.
#[derive(Serialize, ToSchema)]
struct PipelineSwitched {
    name: String,
    enabled: bool,
}

/// Disables a pipeline for every process: no scheduled ticks, no new runs (runs already queued or
/// running go on). Kept until enabled again, whatever configs register it.
#[utoipa::path(post, path = "/pipelines/{name}/disable", tag = "pipelines", security(("bearer" = [])),
    params(("name" = String, Path, description = "The pipeline's name")),
    responses(
        (status = 200, body = PipelineSwitched),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A read-only token", body = ErrorBody),
        (status = 404, description = "Unknown pipeline", body = ErrorBody),
    ))]
async fn disable(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<PipelineSwitched>, ApiError> {
    caller.require_admin("disabling a pipeline")?;
    switch(&state, &name, false).await
}

/// Clears an operator's disable. A pipeline whose registered config says `enabled = false` stays
/// disabled (409, naming why).
#[utoipa::path(post, path = "/pipelines/{name}/enable", tag = "pipelines", security(("bearer" = [])),
    params(("name" = String, Path, description = "The pipeline's name")),
    responses(
        (status = 200, body = PipelineSwitched),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A read-only token", body = ErrorBody),
        (status = 404, description = "Unknown pipeline", body = ErrorBody),
        (status = 409, description = "Disabled by its config", body = ErrorBody),
    ))]
async fn enable(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<PipelineSwitched>, ApiError> {
    caller.require_admin("enabling a pipeline")?;
    switch(&state, &name, true).await
}

async fn switch(
    state: &AppState,
    name: &str,
    enabled: bool,
) -> Result<Json<PipelineSwitched>, ApiError> {
    if name.contains('\0') {
        return Err(ApiError::BadRequest(
            "the pipeline name contains a NUL character".into(),
        ));
    }
    registry::set_enabled(&state.pool, name, enabled, "the API").await?;
    Ok(Json(PipelineSwitched {
        name: name.to_string(),
        enabled,
    }))
}
