//! Retention: deleting old run history in small batches, so that the history tables (and every query
//! that reads them) stay small however long crm-sync runs.
//!
//! The rules live in one SQL function, `crm_sync.prune_history()` (`migrations/*_retention.sql`), which
//! deletes at most one batch per call, so that pg_cron or psql users prune exactly as crm-sync does.
//! This module calls it: [`prune`] repeats it until nothing is due (`crm-sync prune`, and each pass of
//! [`Pruner`], which `crm-sync serve` runs every `[retention] interval`).
//!
//! Each pass also forgets the rows of worker processes that stopped, or stopped heartbeating, more
//! than [`FORGET_WORKERS_AFTER`] ago: every process start adds one, and nothing else removes them.

use std::time::{Duration, Instant};

use crate::db::Db;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::RetentionConfig;

/// What one batch deleted of one pipeline's runs of one status (a row of `crm_sync.prune_history`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Deleted {
    pub pipeline: String,
    pub status: String,
    pub runs: i64,
    pub steps: i64,
    pub attempts: i64,
    pub notification_events: i64,
    pub notification_deliveries: i64,
    pub oldest_finished_at: Option<DateTime<Utc>>,
    pub newest_finished_at: Option<DateTime<Utc>>,
}

impl Deleted {
    /// Adds another batch's figures for the same pipeline and status.
    fn absorb(&mut self, other: &Deleted) {
        self.runs += other.runs;
        self.steps += other.steps;
        self.attempts += other.attempts;
        self.notification_events += other.notification_events;
        self.notification_deliveries += other.notification_deliveries;
        self.oldest_finished_at = min_time(self.oldest_finished_at, other.oldest_finished_at);
        self.newest_finished_at = self.newest_finished_at.max(other.newest_finished_at);
    }
}

fn min_time(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The outcome of pruning until nothing was due.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Per pipeline and status, summed over the batches, ordered by pipeline then status.
    pub deleted: Vec<Deleted>,
    /// Calls of `prune_history`, the last one (which found nothing) included.
    pub batches: u32,
    /// Runs deleted by each call, in order (the last is 0).
    pub batch_runs: Vec<i64>,
    /// Rows of `crm_sync.workers` forgotten (see [`FORGET_WORKERS_AFTER`]).
    pub workers: u64,
    #[serde(serialize_with = "as_secs")]
    pub elapsed: Duration,
}

/// How long the row of a worker process is kept after it stopped or last heartbeated: long enough to
/// read an old attempt's worker id back to a host and pid, short enough that restarts do not pile up.
pub const FORGET_WORKERS_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// Deletes the rows of workers silent for more than [`FORGET_WORKERS_AFTER`] (a live worker
/// heartbeats every third of its lease) and returns how many went.
pub async fn forget_workers<'c>(executor: impl PgExecutor<'c>) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM crm_sync.workers
          WHERE greatest(heartbeat_at, coalesce(stopped_at, heartbeat_at)) < now() - make_interval(secs => $1)",
    ).persistent(false)
    .bind(FORGET_WORKERS_AFTER.as_secs_f64())
    .execute(executor)
    .await?;
    Ok(done.rows_affected())
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl PruneReport {
    /// Runs deleted in all.
    pub fn runs(&self) -> i64 {
        self.deleted.iter().map(|d| d.runs).sum()
    }

    /// Everything deleted in all: runs, steps, attempts, notification events and deliveries.
    pub fn totals(&self) -> Deleted {
        let mut total = Deleted {
            pipeline: "total".into(),
            status: String::new(),
            runs: 0,
            steps: 0,
            attempts: 0,
            notification_events: 0,
            notification_deliveries: 0,
            oldest_finished_at: None,
            newest_finished_at: None,
        };
        for d in &self.deleted {
            total.absorb(d);
        }
        total
    }

    fn add_batch(&mut self, batch: &[Deleted]) {
        self.batches += 1;
        self.batch_runs.push(batch.iter().map(|d| d.runs).sum());
        for d in batch {
            match self
                .deleted
                .iter_mut()
                .find(|x| x.pipeline == d.pipeline && x.status == d.status)
            {
                Some(x) => x.absorb(d),
                None => self.deleted.push(d.clone()),
            }
        }
        self.deleted
            .sort_by(|a, b| (&a.pipeline, &a.status).cmp(&(&b.pipeline, &b.status)));
    }
}

/// Deletes one batch as `policy` says (ages measured from `as_of`, the database's `now()` when
/// `None`) and returns what went. Exposed so that callers can own the transaction (a dry run rolls
/// it back).
pub async fn prune_batch<'c>(
    executor: impl PgExecutor<'c>,
    policy: &RetentionConfig,
    as_of: Option<DateTime<Utc>>,
) -> Result<Vec<Deleted>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM crm_sync.prune_history(
             succeeded => $1, failed => $2, cancelled => $3, keep_last => $4, batch_size => $5,
             as_of => coalesce($6, now()))",
    )
    .persistent(false)
    .bind(policy.succeeded)
    .bind(policy.failed)
    .bind(policy.cancelled)
    .bind(i32::try_from(policy.keep_last).unwrap_or(i32::MAX))
    .bind(i32::try_from(policy.batch_size).unwrap_or(i32::MAX))
    .bind(as_of)
    .fetch_all(executor)
    .await
}

/// Prunes batch after batch until one deletes nothing, each batch its own transaction, sleeping
/// `pause` between batches so that the queue's own statements get the database in between. Stops
/// early (with what was done so far) when `stop` is cancelled.
pub async fn prune(
    pool: &Db,
    policy: &RetentionConfig,
    pause: Duration,
    stop: &CancellationToken,
) -> Result<PruneReport, sqlx::Error> {
    let started = Instant::now();
    let mut report = PruneReport::default();
    loop {
        let batch = prune_batch(pool, policy, None).await?;
        report.add_batch(&batch);
        if batch.is_empty() || stop.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => break,
        }
    }
    report.workers = forget_workers(pool).await?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// What [`prune`] would delete now, found by doing it in one transaction that is rolled back: exact
/// (retries whose retried run goes first are counted too), but it holds the locks until it is done,
/// so it is meant for an operator's `crm-sync prune --dry-run`, not for a loop.
pub async fn dry_run(pool: &Db, policy: &RetentionConfig) -> Result<PruneReport, sqlx::Error> {
    let started = Instant::now();
    let mut report = PruneReport::default();
    let mut tx = pool.begin().await?;
    loop {
        let batch = prune_batch(&mut *tx, policy, None).await?;
        report.add_batch(&batch);
        if batch.is_empty() {
            break;
        }
    }
    report.workers = forget_workers(&mut *tx).await?;
    tx.rollback().await?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The retention loop of `crm-sync serve`: a [`prune`] pass at start and then every
/// `[retention] interval`. Any number of processes may run it (runs are claimed with SKIP LOCKED).
pub struct Pruner {
    pool: Db,
    policy: RetentionConfig,
}

/// Between two batches of one pass: enough for the queue's statements to get through.
const PAUSE: Duration = Duration::from_millis(100);

impl Pruner {
    pub fn new(pool: Db, policy: &RetentionConfig) -> Pruner {
        Pruner {
            pool,
            policy: policy.clone(),
        }
    }

    /// Prunes until `shutdown`. A failed pass (database down, a deadlock with an operator's
    /// statement) is logged and tried again at the next interval: nothing is lost by waiting.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        info!(
            interval = %humantime::format_duration(self.policy.interval),
            batch_size = self.policy.batch_size,
            "retention started"
        );
        while !shutdown.is_cancelled() {
            match prune(&self.pool, &self.policy, PAUSE, &shutdown).await {
                Ok(report) if report.runs() > 0 => {
                    let t = report.totals();
                    info!(
                        runs = t.runs,
                        steps = t.steps,
                        attempts = t.attempts,
                        notification_events = t.notification_events,
                        batches = report.batches,
                        elapsed_ms = report.elapsed.as_millis() as u64,
                        "old run history pruned"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "pruning run history failed; trying again next interval")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.policy.interval) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        info!("retention stopped");
        Ok(())
    }
}
