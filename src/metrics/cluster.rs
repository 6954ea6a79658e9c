//! Cluster metrics: the queue and the pipelines' freshness as PostgreSQL sees them, read at scrape
//! time. Gauges only, so every replica that exports them reports the same values.

use crate::db::Db;
use prometheus::{Gauge, GaugeVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::Mutex;

use super::{encode, register};

/// Gauges refreshed from the database on every scrape.
pub struct ClusterMetrics {
    registry: Registry,
    last_success: GaugeVec,
    freshness_sla: GaugeVec,
    stale: IntGaugeVec,
    definitions: IntGaugeVec,
    unserved_steps: IntGaugeVec,
    queue_depth: IntGaugeVec,
    oldest_queued_age: Gauge,
    workers_alive: IntGauge,
    /// One refresh at a time: a refresh resets the per-pipeline series before setting them again.
    refreshing: Mutex<()>,
}

impl Default for ClusterMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let int_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        Self {
            last_success: gauge_vec(
                "crm_sync_last_success_timestamp_seconds",
                "Unix time of each pipeline's last successful run.",
                &["pipeline"],
            ),
            freshness_sla: gauge_vec(
                "crm_sync_pipeline_freshness_sla_seconds",
                "Each pipeline's freshness SLA: the longest allowed time since its last success.",
                &["pipeline"],
            ),
            stale: int_gauge_vec(
                "crm_sync_pipeline_stale",
                "1 when an enabled pipeline's last success is older than its freshness SLA.",
                &["pipeline"],
            ),
            definitions: int_gauge_vec(
                "crm_sync_pipeline_definitions",
                "Distinct definitions (config fingerprints) of each pipeline among the live processes; \
                 more than 1 means their config files define it differently.",
                &["pipeline"],
            ),
            unserved_steps: int_gauge_vec(
                "crm_sync_pipeline_unserved_steps",
                "Steps of each pipeline waiting while no live worker serves it (no live worker's config \
                 has the pipeline).",
                &["pipeline"],
            ),
            queue_depth: int_gauge_vec(
                "crm_sync_queue_depth",
                "Work in the queue: runs waiting for a concurrency slot, steps due (queued), steps \
                 queued for later (delayed, e.g. retry backoff), steps running.",
                &["state"],
            ),
            oldest_queued_age: register(
                &registry,
                Gauge::new(
                    "crm_sync_oldest_queued_step_age_seconds",
                    "How long the oldest due step has waited for a worker (0 when none is due).",
                )
                .expect("valid metric"),
            ),
            workers_alive: register(
                &registry,
                IntGauge::new(
                    "crm_sync_workers_alive",
                    "Workers whose last heartbeat is within their lease.",
                )
                .expect("valid metric"),
            ),
            registry,
            refreshing: Mutex::new(()),
        }
    }

    /// Reads the gauges from the database and returns them in the Prometheus text format.
    pub async fn render(&self, pool: &Db) -> Result<String, sqlx::Error> {
        let _one_at_a_time = self.refreshing.lock().await;
        let queue: QueueRow = sqlx::query_as("SELECT * FROM crm_sync.queue_metrics()")
            .fetch_one(pool)
            .await?;
        let pipelines: Vec<PipelineRow> = sqlx::query_as(
            "SELECT pipeline, enabled, extract(epoch FROM last_success_at)::double precision AS last_success,
                    freshness_sla_s, stale, definitions, unserved_steps
               FROM crm_sync.pipeline_health
              WHERE pipeline NOT LIKE '\\_\\_%'",
        )
        .fetch_all(pool)
        .await?;

        for (state, value) in [
            ("waiting", queue.waiting),
            ("queued", queue.queued),
            ("delayed", queue.delayed),
            ("running", queue.running),
        ] {
            self.queue_depth.with_label_values(&[state]).set(value);
        }
        self.oldest_queued_age.set(queue.oldest_queued_age_s);
        self.workers_alive.set(queue.workers_alive);

        self.last_success.reset();
        self.freshness_sla.reset();
        self.stale.reset();
        self.definitions.reset();
        self.unserved_steps.reset();
        for p in &pipelines {
            let name = [p.pipeline.as_str()];
            if let Some(t) = p.last_success {
                self.last_success.with_label_values(&name).set(t);
            }
            self.definitions.with_label_values(&name).set(p.definitions);
            self.unserved_steps
                .with_label_values(&name)
                .set(p.unserved_steps);
            if !p.enabled {
                continue;
            }
            if let Some(sla) = p.freshness_sla_s {
                self.freshness_sla.with_label_values(&name).set(sla as f64);
                let stale = p.stale.unwrap_or(false);
                self.stale.with_label_values(&name).set(i64::from(stale));
            }
        }
        Ok(encode(&self.registry))
    }
}

#[derive(sqlx::FromRow)]
struct QueueRow {
    waiting: i64,
    queued: i64,
    delayed: i64,
    running: i64,
    oldest_queued_age_s: f64,
    workers_alive: i64,
}

#[derive(sqlx::FromRow)]
struct PipelineRow {
    pipeline: String,
    enabled: bool,
    last_success: Option<f64>,
    freshness_sla_s: Option<i64>,
    stale: Option<bool>,
    definitions: i64,
    unserved_steps: i64,
}
