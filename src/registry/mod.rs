//! What the database knows of the config files of the processes that use it.
//!
//! Several processes share one database, each with its own config file: `serve` on one host, extra
//! workers elsewhere, an operator's CLI, old and new versions during a rolling upgrade. Each registers
//! the pipelines and webhooks of its own config, with a fingerprint of each pipeline's definition, and
//! changes nothing its config does not mention: leaving a pipeline out disables nothing; retiring one
//! is explicit (`enabled = false`, or `crm-sync pipelines disable`). When live processes define one
//! pipeline differently, the registered definition stays the one a live process holds and the
//! conflict is reported (`crm-sync pipelines`, the console, `crm_sync_pipeline_definitions`); see
//! `migrations/20261207000008_deployments.sql` for the rules, which live in SQL so that every process
//! and psql agree. [`processes`] keeps the rows of the live processes themselves.

pub mod processes;

pub use processes::{Heard, Presence, ProcessInfo, Role};

use std::time::Duration;

use crate::db::Db;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use tracing::{info, warn};

use crate::config::{Config, NotificationsConfig, PipelineConfig};
use crate::queue::QueueError;

/// Pipelines whose name starts with this are internal (benchmarks): never listed or alerted on.
pub const INTERNAL_PREFIX: &str = "__";

/// What the database keeps of a pipeline's definition: its fingerprint, steps and limits.
#[derive(Debug, Clone)]
pub struct Registration {
    pub name: String,
    pub fingerprint: String,
    pub schedule: Option<String>,
    pub timezone: String,
    pub steps: Vec<String>,
    pub max_attempts: u32,
    pub step_timeout: Duration,
    /// 0 = no limit.
    pub max_concurrent_runs: u32,
    pub freshness_sla: Option<Duration>,
    pub enabled: bool,
}

impl From<&PipelineConfig> for Registration {
    fn from(p: &PipelineConfig) -> Self {
        Self {
            name: p.name.clone(),
            fingerprint: p.fingerprint.clone(),
            schedule: p.schedule.clone(),
            timezone: p.timezone.clone(),
            steps: p.step_names(),
            max_attempts: p.max_attempts,
            step_timeout: p.step_timeout,
            max_concurrent_runs: p.max_concurrent_runs,
            freshness_sla: p.freshness_sla,
            enabled: p.enabled,
        }
    }
}

/// What became of one pipeline's registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// This definition is now the registered one.
    Registered,
    /// It already was.
    Unchanged,
    /// Another live process holds a different definition, which stays registered (a conflict).
    Kept,
}

/// Registers the pipelines and webhooks of `config` as process `by` (`live` when `by` has a row in
/// `crm_sync.workers` that it keeps alive), in one transaction, and logs every conflict.
pub async fn register_config(
    pool: &Db,
    config: &Config,
    by: &str,
    live: bool,
) -> Result<Vec<(String, Outcome)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let outcomes = register_in(&mut tx, config, by, live).await?;
    tx.commit().await?;
    log_outcomes(pool, config, &outcomes).await?;
    Ok(outcomes)
}

/// [`register_config`] inside the caller's transaction (a process registers its row and its
/// pipelines at once); log the outcomes with [`log_outcomes`] after the commit.
pub async fn register_in(
    tx: &mut PgConnection,
    config: &Config,
    by: &str,
    live: bool,
) -> Result<Vec<(String, Outcome)>, sqlx::Error> {
    let mut outcomes = Vec::with_capacity(config.pipelines.len());
    for p in &config.pipelines {
        let outcome = register(tx, by, live, &Registration::from(p)).await?;
        outcomes.push((p.name.clone(), outcome));
    }
    register_webhooks(tx, &config.notifications).await?;
    Ok(outcomes)
}

/// Logs new registrations, and every conflict with the definition that stays registered.
pub async fn log_outcomes(
    pool: &Db,
    config: &Config,
    outcomes: &[(String, Outcome)],
) -> Result<(), sqlx::Error> {
    for (name, outcome) in outcomes {
        let Some(p) = config.pipeline(name) else {
            continue;
        };
        match outcome {
            Outcome::Registered => {
                info!(pipeline = %name, fingerprint = %p.fingerprint, "pipeline registered")
            }
            Outcome::Unchanged => {}
            Outcome::Kept => {
                let (registered, holder): (Option<String>, Option<String>) = sqlx::query_as(
                    "SELECT fingerprint, registered_by FROM crm_sync.pipelines WHERE name = $1",
                )
                .bind(name)
                .fetch_one(pool)
                .await?;
                warn!(
                    pipeline = %name,
                    this_definition = %p.fingerprint,
                    registered_definition = registered.as_deref().unwrap_or("-"),
                    registered_by = holder.as_deref().unwrap_or("-"),
                    "this config defines the pipeline differently from a live process; the registered \
                     definition stays until that process stops (see `crm-sync pipelines`)"
                );
            }
        }
    }
    Ok(())
}

/// Registers one pipeline definition (see [`Outcome`]).
pub async fn register(
    conn: &mut PgConnection,
    by: &str,
    live: bool,
    r: &Registration,
) -> Result<Outcome, sqlx::Error> {
    let outcome: String = sqlx::query_scalar(
        "SELECT crm_sync.register_pipeline($1, $2, $3, $4, $5, $6, $7, $8, $9, NULLIF($10, 0), $11, $12)",
    ).persistent(false)
    .bind(by)
    .bind(live)
    .bind(&r.name)
    .bind(&r.fingerprint)
    .bind(&r.schedule)
    .bind(&r.timezone)
    .bind(&r.steps)
    .bind(r.max_attempts as i32)
    .bind(i64::try_from(r.step_timeout.as_millis()).unwrap_or(i64::MAX))
    .bind(r.max_concurrent_runs as i32)
    .bind(r.freshness_sla.map(|d| d.as_secs().max(1) as i64))
    .bind(r.enabled)
    .fetch_one(conn)
    .await?;
    Ok(match outcome.as_str() {
        "registered" => Outcome::Registered,
        "kept" => Outcome::Kept,
        _ => Outcome::Unchanged,
    })
}

/// Upserts the configured webhooks (never their URLs), so that the run trigger creates deliveries for
/// them; webhooks of other configs are left as they are.
async fn register_webhooks(
    conn: &mut PgConnection,
    config: &NotificationsConfig,
) -> Result<(), sqlx::Error> {
    for w in &config.webhooks {
        let events: Vec<&str> = w.events.iter().map(|e| e.kind()).collect();
        sqlx::query(
            "INSERT INTO crm_sync.webhooks AS w (name, format, events, pipelines, max_attempts, timeout_ms, config_enabled)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (name) DO UPDATE
                SET format = EXCLUDED.format, events = EXCLUDED.events, pipelines = EXCLUDED.pipelines,
                    max_attempts = EXCLUDED.max_attempts, timeout_ms = EXCLUDED.timeout_ms,
                    config_enabled = EXCLUDED.config_enabled, updated_at = now()
              WHERE (w.format, w.events, w.pipelines, w.max_attempts, w.timeout_ms, w.config_enabled)
                    IS DISTINCT FROM
                    (EXCLUDED.format, EXCLUDED.events, EXCLUDED.pipelines, EXCLUDED.max_attempts,
                     EXCLUDED.timeout_ms, EXCLUDED.config_enabled)",
        ).persistent(false)
        .bind(&w.name)
        .bind(w.format.as_str())
        .bind(&events)
        .bind(&w.pipelines)
        .bind(w.max_attempts as i32)
        .bind(i64::try_from(w.timeout.as_millis()).unwrap_or(i64::MAX))
        .bind(w.enabled)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// A registered pipeline as the database sees it: `crm-sync pipelines`, `GET /api/pipelines`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct PipelineStatus {
    pub name: String,
    pub enabled: bool,
    /// `config` (its registered config says `enabled = false`) or `operator`
    /// (`crm-sync pipelines disable`); absent when enabled.
    pub disabled_by: Option<String>,
    /// Fingerprint of the registered definition.
    pub fingerprint: Option<String>,
    /// The registered definition's cron expression (absent: manual only) and time zone.
    pub schedule: Option<String>,
    pub timezone: Option<String>,
    /// Step names in order.
    pub steps: Vec<String>,
    pub max_attempts: i32,
    /// Absent: no limit.
    pub max_concurrent_runs: Option<i32>,
    /// Longest allowed time since the last success, in seconds.
    pub freshness_sla_s: Option<i64>,
    /// The process that registered it.
    pub registered_by: Option<String>,
    /// Distinct definitions the live processes hold; more than 1 is a conflict.
    pub definitions: i64,
    /// Some live worker claims this pipeline's steps.
    pub served: bool,
    /// Steps waiting while no live worker serves the pipeline.
    pub unserved_steps: i64,
    pub queued_runs: i64,
    pub running_runs: i64,
    pub last_run_id: Option<uuid::Uuid>,
    /// Status of the newest run.
    pub last_status: Option<String>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub seconds_since_success: Option<i64>,
    /// Enabled, with an SLA, and the last success older than it (or missing).
    pub stale: bool,
    /// Each live process's definition of the pipeline.
    #[sqlx(skip)]
    pub processes: Vec<ProcessDefinition>,
}

/// One live process's definition of a pipeline.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ProcessDefinition {
    #[serde(skip)]
    pub pipeline: String,
    pub process_id: String,
    pub fingerprint: String,
    pub roles: Vec<String>,
    pub version: Option<String>,
    pub registered_at: DateTime<Utc>,
}

impl PipelineStatus {
    /// Live processes define the pipeline in more than one way.
    pub fn conflict(&self) -> bool {
        self.definitions > 1
    }
}

/// Every registered pipeline (internal ones left out), by name, with the live processes' definitions.
pub async fn list(pool: &Db) -> Result<Vec<PipelineStatus>, sqlx::Error> {
    let mut pipelines: Vec<PipelineStatus> = sqlx::query_as(
        "SELECT h.pipeline AS name, h.enabled, h.disabled_by, h.fingerprint, p.schedule, p.timezone, p.steps,
                p.max_attempts, p.max_concurrent_runs, p.freshness_sla_s, h.registered_by, h.definitions,
                h.served, h.unserved_steps, h.queued_runs, h.running_runs, h.last_run_id, h.last_status,
                h.last_success_at, h.seconds_since_success, coalesce(h.stale, false) AS stale
           FROM crm_sync.pipeline_health h JOIN crm_sync.pipelines p ON p.name = h.pipeline
          WHERE left(h.pipeline, 2) <> $1 ORDER BY h.pipeline",
    ).persistent(false)
    .bind(INTERNAL_PREFIX)
    .fetch_all(pool)
    .await?;
    let definitions: Vec<ProcessDefinition> = sqlx::query_as(
        "SELECT g.pipeline, g.process_id, g.fingerprint, w.roles, w.version, g.registered_at
           FROM crm_sync.pipeline_registrations g JOIN crm_sync.live_processes w ON w.id = g.process_id
          ORDER BY g.pipeline, g.registered_at, g.process_id",
    ).persistent(false)
    .fetch_all(pool)
    .await?;
    for d in definitions {
        if let Some(p) = pipelines.iter_mut().find(|p| p.name == d.pipeline) {
            p.processes.push(d);
        }
    }
    Ok(pipelines)
}

/// An operator's `crm-sync pipelines disable|enable NAME`: a disabled pipeline is not scheduled and
/// accepts no new runs; enabling clears only the operator's flag (a config's `enabled = false` stays).
pub async fn set_enabled(pool: &Db, name: &str, enabled: bool, by: &str) -> Result<(), QueueError> {
    sqlx::query("SELECT 1 FROM crm_sync.set_pipeline_enabled($1, $2, $3)")
        .persistent(false)
        .bind(name)
        .bind(enabled)
        .bind(by)
        .execute(pool)
        .await?;
    Ok(())
}
