//! The scheduler: turns each pipeline's cron ticks into runs.
//!
//! Exactly one run per occurrence, however many replicas run: every replica may try to enqueue a tick,
//! and the unique index on `(pipeline, scheduled_for)` lets one win (`crm_sync.enqueue_scheduled`).
//! The database clock is the time source, so replicas on skewed hosts agree. `crm_sync.schedule_state`
//! remembers how far each schedule was handled; ticks missed while no scheduler ran follow the
//! pipeline's catch-up policy. Time zone and DST rules live in [`cron`].

pub mod cron;

use std::sync::Arc;
use std::time::Duration;

use crate::db::Db;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::{Config, PipelineConfig};
use crate::metrics::Metrics;
use cron::{CatchUp, Schedule};

/// Longest sleep between passes, so config-independent drift or a missed wake-up costs little.
const MAX_SLEEP: Duration = Duration::from_secs(5);

/// One scheduled pipeline, parsed.
#[derive(Debug, Clone)]
pub struct ScheduledPipeline {
    pub name: String,
    pub schedule: Schedule,
    pub catch_up: CatchUp,
}

impl ScheduledPipeline {
    /// The identity of the schedule stored with its state: a changed expression or zone starts afresh.
    fn key(&self) -> String {
        format!(
            "{} @ {}",
            self.schedule.expression(),
            self.schedule.timezone()
        )
    }
}

/// The enabled, scheduled pipelines of a config; an invalid schedule is an error naming the pipeline
/// (check-config reports the same problems with their lines).
pub fn scheduled_pipelines(config: &Config) -> anyhow::Result<Vec<ScheduledPipeline>> {
    let mut out = Vec::new();
    for p in config.pipelines.iter().filter(|p| p.enabled) {
        if let Some(s) =
            parse_schedule(p).map_err(|e| anyhow::anyhow!("pipeline \"{}\": {e}", p.name))?
        {
            out.push(s);
        }
    }
    Ok(out)
}

/// Parses a pipeline's schedule; `Ok(None)` for a manual-only pipeline.
pub fn parse_schedule(
    p: &PipelineConfig,
) -> Result<Option<ScheduledPipeline>, cron::ScheduleError> {
    let Some(expr) = &p.schedule else {
        return Ok(None);
    };
    let schedule = Schedule::parse(expr, &p.timezone)?;
    let catch_up = p.catch_up;
    Ok(Some(ScheduledPipeline {
        name: p.name.clone(),
        schedule,
        catch_up,
    }))
}

/// What one pass did.
#[derive(Debug, Default, Clone)]
pub struct TickReport {
    /// (pipeline, occurrence, run) for each run this pass enqueued.
    pub enqueued: Vec<(String, DateTime<Utc>, Uuid)>,
    /// (pipeline, occurrence) for ticks another replica had already enqueued.
    pub duplicates: Vec<(String, DateTime<Utc>)>,
    /// (pipeline, occurrence) for missed ticks the catch-up policy left out.
    pub skipped: Vec<(String, DateTime<Utc>)>,
}

/// A scheduler over one database; several may run at once.
pub struct Scheduler {
    pool: Db,
    pipelines: Vec<ScheduledPipeline>,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    pub fn new(pool: Db, config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            pool,
            pipelines: scheduled_pipelines(config)?,
            metrics: Metrics::new(),
        })
    }

    /// Records into `metrics` (the process's, served on `/metrics`) instead of a private set.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// One pass at instant `now` (the database clock in production, any instant in tests): enqueues
    /// the due ticks of every scheduled pipeline and records how far each schedule was handled.
    pub async fn tick(&self, now: DateTime<Utc>) -> anyhow::Result<TickReport> {
        let mut report = TickReport::default();
        for p in &self.pipelines {
            self.tick_pipeline(p, now, &mut report).await?;
        }
        Ok(report)
    }

    async fn tick_pipeline(
        &self,
        p: &ScheduledPipeline,
        now: DateTime<Utc>,
        report: &mut TickReport,
    ) -> anyhow::Result<()> {
        let key = p.key();
        // A pipeline seen for the first time (or whose schedule changed) starts at `now`: no catch-up
        // of ticks from before it was scheduled.
        let last_tick: DateTime<Utc> = sqlx::query_scalar(
            "WITH upsert AS (
                 INSERT INTO crm_sync.schedule_state (pipeline, schedule, last_tick) VALUES ($1, $2, $3)
                 ON CONFLICT (pipeline) DO UPDATE
                    SET schedule = EXCLUDED.schedule, last_tick = EXCLUDED.last_tick, updated_at = now()
                  WHERE crm_sync.schedule_state.schedule <> EXCLUDED.schedule
                 RETURNING last_tick)
             SELECT last_tick FROM upsert
             UNION ALL
             SELECT last_tick FROM crm_sync.schedule_state
              WHERE pipeline = $1 AND NOT EXISTS (SELECT 1 FROM upsert)",
        )
        .bind(&p.name)
        .bind(&key)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        if last_tick >= now {
            return Ok(());
        }

        let due = cron::due_ticks(&p.schedule, last_tick, now, &p.catch_up);
        let missed = p.schedule.occurrences_between(last_tick, now, 10_000);
        for tick in missed.iter().filter(|t| !due.contains(t)) {
            report.skipped.push((p.name.clone(), *tick));
            self.metrics
                .scheduler_ticks_total
                .with_label_values(&["skipped"])
                .inc();
            info!(pipeline = %p.name, tick = %tick, "missed tick skipped by the catch-up policy");
        }
        for tick in due {
            let run: Option<Uuid> = sqlx::query_scalar("SELECT crm_sync.enqueue_scheduled($1, $2)")
                .bind(&p.name)
                .bind(tick)
                .fetch_one(&self.pool)
                .await?;
            match run {
                Some(run) => {
                    let lag = (now - tick).to_std().unwrap_or_default();
                    self.metrics
                        .scheduler_ticks_total
                        .with_label_values(&["enqueued"])
                        .inc();
                    self.metrics.scheduler_lag_seconds.set(lag.as_secs_f64());
                    info!(pipeline = %p.name, tick = %tick, run_id = %run, lag_ms = lag.as_millis() as u64, "scheduled run enqueued");
                    report.enqueued.push((p.name.clone(), tick, run));
                }
                None => report.duplicates.push((p.name.clone(), tick)),
            }
        }
        sqlx::query(
            "UPDATE crm_sync.schedule_state SET last_tick = greatest(last_tick, $2), updated_at = now()
              WHERE pipeline = $1 AND schedule = $3",
        )
        .bind(&p.name)
        .bind(now)
        .bind(&key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The next instant any pipeline fires after `now`.
    pub fn next_fire(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.pipelines
            .iter()
            .filter_map(|p| p.schedule.next_after(now))
            .min()
    }

    /// Runs passes on the database clock until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        info!(pipelines = self.pipelines.len(), "scheduler started");
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let pause = match self.pass().await {
                Ok(pause) => {
                    failures = 0;
                    pause
                }
                Err(e) => {
                    failures += 1;
                    let pause = Duration::from_millis(200 * 2u64.pow(failures.min(5)));
                    warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "scheduler pass failed");
                    pause
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        info!("scheduler stopped");
        Ok(())
    }

    /// One pass on the database clock; returns how long to sleep before the next.
    async fn pass(&self) -> anyhow::Result<Duration> {
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&self.pool)
            .await?;
        self.tick(now).await?;
        let until_next = self
            .next_fire(now)
            .and_then(|next| (next - now).to_std().ok())
            .unwrap_or(MAX_SLEEP);
        // Wake just after the tick, so that it is due when we look.
        Ok((until_next + Duration::from_millis(2)).min(MAX_SLEEP))
    }
}
