//! Registers the config's pipelines in `crm_sync.pipelines`, so the database can enforce their limits
//! and SQL callers can enqueue them by name, and its webhooks in `crm_sync.webhooks` (same transaction),
//! so the run trigger knows whom to notify.

use sqlx::PgPool;

use std::time::Duration;

use crate::config::{Config, PipelineConfig};

/// Pipelines whose name starts with this are internal (benchmarks) and are never disabled by a sync.
pub const INTERNAL_PREFIX: &str = "__";

/// Upserts every configured pipeline and webhook and disables registered ones that left the config.
pub async fn sync(pool: &PgPool, config: &Config) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for p in &config.pipelines {
        register(&mut tx, &Registration::from(p)).await?;
    }
    let names: Vec<&str> = config.pipelines.iter().map(|p| p.name.as_str()).collect();
    sqlx::query(
        "UPDATE crm_sync.pipelines SET enabled = false, updated_at = now()
          WHERE enabled AND NOT (name = ANY($1)) AND left(name, 2) <> $2",
    )
    .bind(&names)
    .bind(INTERNAL_PREFIX)
    .execute(&mut *tx)
    .await?;
    crate::notify::store::register(&mut tx, &config.notifications).await?;
    tx.commit().await
}

/// What the database keeps of a pipeline: its steps and limits.
#[derive(Debug, Clone)]
pub struct Registration {
    pub name: String,
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
            steps: p.step_names(),
            max_attempts: p.max_attempts,
            step_timeout: p.step_timeout,
            max_concurrent_runs: p.max_concurrent_runs,
            freshness_sla: p.freshness_sla,
            enabled: p.enabled,
        }
    }
}

/// Upserts one pipeline row.
pub async fn register(conn: &mut sqlx::PgConnection, r: &Registration) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO crm_sync.pipelines
                (name, steps, max_attempts, step_timeout_ms, max_concurrent_runs, freshness_sla_s, enabled)
         VALUES ($1, $2, $3, $4, NULLIF($5, 0), $6, $7)
         ON CONFLICT (name) DO UPDATE
            SET steps = EXCLUDED.steps, max_attempts = EXCLUDED.max_attempts,
                step_timeout_ms = EXCLUDED.step_timeout_ms, max_concurrent_runs = EXCLUDED.max_concurrent_runs,
                freshness_sla_s = EXCLUDED.freshness_sla_s, enabled = EXCLUDED.enabled, updated_at = now()
          WHERE (crm_sync.pipelines.steps, crm_sync.pipelines.max_attempts, crm_sync.pipelines.step_timeout_ms,
                 crm_sync.pipelines.max_concurrent_runs, crm_sync.pipelines.freshness_sla_s,
                 crm_sync.pipelines.enabled)
                IS DISTINCT FROM
                (EXCLUDED.steps, EXCLUDED.max_attempts, EXCLUDED.step_timeout_ms, EXCLUDED.max_concurrent_runs,
                 EXCLUDED.freshness_sla_s, EXCLUDED.enabled)",
    )
    .bind(&r.name)
    .bind(&r.steps)
    .bind(r.max_attempts as i32)
    .bind(i64::try_from(r.step_timeout.as_millis()).unwrap_or(i64::MAX))
    .bind(r.max_concurrent_runs as i32)
    .bind(r.freshness_sla.map(|d| d.as_secs().max(1) as i64))
    .bind(r.enabled)
    .execute(conn)
    .await?;
    Ok(())
}
