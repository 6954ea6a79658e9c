//! Read-side queries over the run log: runs, their steps and every attempt.

use crate::db::Db;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

mod retry;
pub use retry::{ErrorClass, RunFailure};

/// One run as listed by `crm-sync runs` and `GET /api/runs`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RunSummary {
    pub id: Uuid,
    pub pipeline: String,
    pub batch_id: String,
    pub trigger: String,
    pub status: String,
    pub params: Value,
    pub retry_of: Option<Uuid>,
    pub rerun_of: Option<Uuid>,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// Rows the load step wrote (absent until it succeeded).
    pub rows_loaded: Option<i64>,
}

impl RunSummary {
    /// Seconds from start to finish (or until now while running).
    pub fn duration_secs(&self) -> Option<f64> {
        let start = self.started_at?;
        let end = self.finished_at.unwrap_or_else(Utc::now);
        Some((end - start).num_milliseconds() as f64 / 1000.0)
    }
}

/// One step of a run, with its attempts.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StepRecord {
    pub id: i64,
    pub name: String,
    pub position: i32,
    pub status: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub reused_from_run: Option<Uuid>,
    /// Fingerprint of the pipeline definition its last attempt ran under (see `crm-sync pipelines`).
    pub fingerprint: Option<String>,
    /// The worker holding the step while it runs.
    pub lease_owner: Option<String>,
    #[serde(skip)]
    pub attempt_started_at: Option<DateTime<Utc>>,
    /// Every attempt, the one in progress last (outcome `running`).
    #[sqlx(skip)]
    pub attempt_log: Vec<AttemptRecord>,
}

/// One attempt at a step: who ran it, when, and how it ended.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AttemptRecord {
    #[serde(skip)]
    pub step_id: i64,
    pub attempt: i32,
    pub worker_id: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: String,
    pub error: Option<String>,
    /// Fingerprint of the pipeline definition the attempt ran under.
    pub fingerprint: Option<String>,
}

/// A run with everything known about it (`crm-sync show`, `GET /api/runs/{id}`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunDetail {
    #[serde(flatten)]
    pub run: RunSummary,
    pub steps: Vec<StepRecord>,
    /// The pipeline definitions (fingerprints) the run's steps ran under, in step order; more than
    /// one means its config changed while it ran (a rolling upgrade, a config edited between a
    /// failure and its retry).
    pub definitions: Vec<String>,
    /// The run that retried this one (a failed or cancelled run is retried at most once).
    pub retried_by: Option<Uuid>,
    /// The step that failed the run and how (null unless it failed in a step).
    pub failure: Option<RunFailure>,
}

/// Filters for [`list_runs`].
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub pipeline: Option<String>,
    pub status: Option<String>,
    /// Only runs created before this instant (paging, newest first).
    pub before: Option<DateTime<Utc>>,
    pub limit: i64,
}

/// The columns of [`RunSummary`], over `crm_sync.runs r`.
pub(crate) const RUN_COLUMNS: &str = "r.id, r.pipeline, r.batch_id, r.trigger, r.status, r.params, r.retry_of, \
     r.rerun_of, r.scheduled_for, r.created_at, r.started_at, r.finished_at, r.error, \
     (SELECT (l.output->>'rows')::bigint FROM crm_sync.steps l \
       WHERE l.run_id = r.id AND l.name = 'load' AND l.status = 'succeeded') AS rows_loaded";

/// The statement of [`list_runs`]: $1 pipeline, $2 status, $3 before (each NULL for any), $4 limit.
/// Public so that the index test EXPLAINs exactly what the runs list runs.
pub fn list_runs_sql() -> String {
    format!(
        "SELECT {RUN_COLUMNS} FROM crm_sync.runs r
          WHERE ($1::text IS NULL OR r.pipeline = $1)
            AND ($2::text IS NULL OR r.status = $2)
            AND ($3::timestamptz IS NULL OR r.created_at < $3)
          ORDER BY r.created_at DESC, r.id DESC
          LIMIT $4"
    )
}

/// Runs, newest first.
pub async fn list_runs(pool: &Db, filter: &RunFilter) -> Result<Vec<RunSummary>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(list_runs_sql()))
        .bind(&filter.pipeline)
        .bind(&filter.status)
        .bind(filter.before)
        .bind(filter.limit.clamp(1, 1000))
        .fetch_all(pool)
        .await
}

/// The statement of [`changed_since`]: $1 the time of the feed's last look (less a margin). Public so
/// that the index test EXPLAINs exactly what the event streams' feed runs four times a second.
/// Each run that changed itself or in one of its steps, with its latest change.
pub const CHANGED_SINCE_SQL: &str = "SELECT c.run_id, max(c.changed_at) AS changed_at
       FROM (SELECT r.id AS run_id, r.updated_at AS changed_at FROM crm_sync.runs r
              WHERE r.updated_at > $1
             UNION ALL
             SELECT s.run_id, s.updated_at FROM crm_sync.steps s WHERE s.updated_at > $1) c
      GROUP BY c.run_id";

/// The runs that changed (themselves or a step) after `since`, each with the time of its latest
/// change, and the database time just before the look.
pub async fn changed_since(
    pool: &Db,
    since: DateTime<Utc>,
) -> Result<(DateTime<Utc>, Vec<(Uuid, DateTime<Utc>)>), sqlx::Error> {
    let at: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await?;
    let changed = sqlx::query_as(CHANGED_SINCE_SQL)
        .bind(since)
        .fetch_all(pool)
        .await?;
    Ok((at, changed))
}

/// The summaries of these runs (those that still exist), oldest first.
pub async fn runs_by_id(pool: &Db, ids: &[Uuid]) -> Result<Vec<RunSummary>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM crm_sync.runs r WHERE r.id = ANY($1) ORDER BY r.created_at, r.id"
    )))
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// One run with its steps and attempts; `None` if there is no such run.
pub async fn run_detail(pool: &Db, id: Uuid) -> Result<Option<RunDetail>, sqlx::Error> {
    let Some(run) = sqlx::query_as::<_, RunSummary>(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM crm_sync.runs r WHERE r.id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let mut steps: Vec<StepRecord> = sqlx::query_as(
        "SELECT id, name, position, status, attempts, max_attempts, started_at, finished_at, output, error,
                reused_from_run, fingerprint, lease_owner, attempt_started_at
           FROM crm_sync.steps WHERE run_id = $1 ORDER BY position",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    let attempts: Vec<AttemptRecord> = sqlx::query_as(
        "SELECT step_id, attempt, worker_id, started_at, finished_at, outcome, error, fingerprint
           FROM crm_sync.attempts WHERE run_id = $1 ORDER BY step_id, fence",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    for attempt in attempts {
        if let Some(step) = steps.iter_mut().find(|s| s.id == attempt.step_id) {
            step.attempt_log.push(attempt);
        }
    }
    for step in steps.iter_mut().filter(|s| s.status == "running") {
        if let (Some(worker_id), Some(started_at)) =
            (step.lease_owner.clone(), step.attempt_started_at)
        {
            step.attempt_log.push(AttemptRecord {
                step_id: step.id,
                attempt: step.attempts,
                worker_id,
                started_at,
                finished_at: None,
                outcome: "running".into(),
                error: None,
                fingerprint: step.fingerprint.clone(),
            });
        }
    }
    let mut definitions: Vec<String> = Vec::new();
    for f in steps.iter().filter_map(|s| s.fingerprint.as_ref()) {
        if !definitions.contains(f) {
            definitions.push(f.clone());
        }
    }
    Ok(Some(RunDetail {
        retried_by: retry::retried_by(pool, &run).await?,
        failure: retry::failure(&run, &steps),
        run,
        steps,
        definitions,
    }))
}

/// Just the status of a run (for `run --wait`).
pub async fn run_status(
    pool: &Db,
    id: Uuid,
) -> Result<Option<(String, Option<String>)>, sqlx::Error> {
    sqlx::query_as("SELECT status, error FROM crm_sync.runs WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}
