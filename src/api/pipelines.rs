//! `GET /api/pipelines`: each configured pipeline with its schedule's next fire time (local and UTC)
//! and its health from the run history: what the console's pipelines page shows.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, FixedOffset, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::Caller;
use super::openapi::ErrorBody;
use super::{ApiError, AppState};
use crate::scheduler;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_pipelines))
}

/// A configured pipeline, its schedule and its health.
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
    /// The next scheduled run in the pipeline's time zone (RFC 3339 with its offset); absent when
    /// manual-only or disabled.
    next_fire_local: Option<DateTime<FixedOffset>>,
    /// The same instant in UTC.
    next_fire_utc: Option<DateTime<Utc>>,
    max_attempts: u32,
    max_concurrent_runs: u32,
    /// Longest allowed time since the last success, in seconds.
    freshness_sla_s: Option<i64>,
    last_success_at: Option<DateTime<Utc>>,
    seconds_since_success: Option<i64>,
    last_run_id: Option<Uuid>,
    /// Status of the newest run.
    last_status: Option<String>,
    /// True when enabled, with an SLA, and the last success is older than it (or missing).
    stale: bool,
    queued_runs: i64,
    running_runs: i64,
}

#[derive(Serialize, ToSchema)]
struct PipelineList {
    pipelines: Vec<PipelineInfo>,
}

#[derive(sqlx::FromRow)]
struct Health {
    pipeline: String,
    last_success_at: Option<DateTime<Utc>>,
    seconds_since_success: Option<i64>,
    last_run_id: Option<Uuid>,
    last_status: Option<String>,
    stale: Option<bool>,
    queued_runs: i64,
    running_runs: i64,
}

/// The configured pipelines with next fire times and health.
#[utoipa::path(get, path = "/pipelines", tag = "runs", security(("bearer" = [])),
    responses(
        (status = 200, body = PipelineList),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
    ))]
async fn list_pipelines(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<PipelineList>, ApiError> {
    let health: Vec<Health> = sqlx::query_as(
        "SELECT pipeline, last_success_at, seconds_since_success, last_run_id, last_status, stale,
                queued_runs, running_runs
           FROM crm_sync.pipeline_health",
    )
    .fetch_all(&state.pool)
    .await?;
    let now = Utc::now();
    let pipelines = state
        .config
        .pipelines
        .iter()
        .map(|p| {
            let h = health.iter().find(|h| h.pipeline == p.name);
            let next = scheduler::parse_schedule(p)
                .ok()
                .flatten()
                .filter(|_| p.enabled)
                .and_then(|s| {
                    let next = s.schedule.next_after(now)?;
                    Some((
                        next.with_timezone(&s.schedule.timezone()).fixed_offset(),
                        next,
                    ))
                });
            PipelineInfo {
                name: p.name.clone(),
                enabled: p.enabled,
                steps: p.step_names(),
                schedule: p.schedule.clone(),
                timezone: p.timezone.clone(),
                next_fire_local: next.map(|n| n.0),
                next_fire_utc: next.map(|n| n.1),
                max_attempts: p.max_attempts,
                max_concurrent_runs: p.max_concurrent_runs,
                freshness_sla_s: p.freshness_sla.map(|d| d.as_secs() as i64),
                last_success_at: h.and_then(|h| h.last_success_at),
                seconds_since_success: h.and_then(|h| h.seconds_since_success),
                last_run_id: h.and_then(|h| h.last_run_id),
                last_status: h.and_then(|h| h.last_status.clone()),
                stale: h.and_then(|h| h.stale).unwrap_or(false),
                queued_runs: h.map_or(0, |h| h.queued_runs),
                running_runs: h.map_or(0, |h| h.running_runs),
            }
        })
        .collect();
    Ok(Json(PipelineList { pipelines }))
}
