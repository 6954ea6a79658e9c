//! Prometheus metrics, names prefixed `crm_sync_`.
//!
//! Two kinds, kept in two registries:
//! - process metrics ([`Metrics`]): what this process did (runs it finished, step durations, rows,
//!   retries, busy worker slots, scheduler ticks). Every replica exports its own; Prometheus sums them.
//! - cluster metrics ([`cluster`]): facts about the whole deployment read from PostgreSQL at scrape
//!   time (queue depth and age, last success and staleness per pipeline, workers alive). `serve`
//!   exports them; they are gauges, the same from any replica.
//!
//! Labels are bounded: pipeline and step names from the config, the trigger and status enums. Run
//! ids, batch ids and error text never become labels.

pub mod cluster;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Step durations run from milliseconds (noop) to an hour (a large browser export).
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// The process metrics; cheap to clone handles, shared as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    /// Runs that reached a final status in this process.
    pub runs_total: IntCounterVec,
    /// Every attempt of every step, successful or not.
    pub step_duration_seconds: HistogramVec,
    /// Records the transform step parsed from the extracted raw answer.
    pub rows_extracted_total: IntCounterVec,
    /// Rows the load step wrote to the destination.
    pub rows_loaded_total: IntCounterVec,
    /// What merge loads did to rows, by change: inserted, updated, unchanged, deleted.
    pub merge_rows_total: IntCounterVec,
    /// Failed attempts that were re-queued for another attempt.
    pub step_retries_total: IntCounterVec,
    /// Steps running in this process's workers now.
    pub worker_busy_slots: IntGauge,
    /// Step slots of this process's workers (their concurrency).
    pub worker_slots: IntGauge,
    /// Fire time to enqueue of the last tick this process's scheduler enqueued.
    pub scheduler_lag_seconds: Gauge,
    /// Scheduler ticks by outcome: enqueued, or skipped by a catch-up policy.
    pub scheduler_ticks_total: IntCounterVec,
    /// Notification deliveries by webhook and outcome (delivered, retry, failed).
    pub notifications_total: IntCounterVec,
    /// API requests refused for a wrong token (`wrong_token`) or from a locked-out address
    /// (`locked_out`); requests with no token at all are not counted.
    pub http_auth_failures_total: IntCounterVec,
}

impl Metrics {
    /// A fresh set of process metrics in their own registry.
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new(
                "crm_sync_build_info",
                "The running crm-sync version (always 1).",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        register(&registry, build_info);
        let metrics = Metrics {
            runs_total: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "crm_sync_runs_total",
                        "Runs that reached a final status (succeeded, failed, cancelled) in this process.",
                    ),
                    &["pipeline", "trigger", "status"],
                )
                .expect("valid metric"),
            ),
            step_duration_seconds: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "crm_sync_step_duration_seconds",
                        "Duration of each step attempt, successful or not.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["pipeline", "step"],
                )
                .expect("valid metric"),
            ),
            rows_extracted_total: register(
                &registry,
                counter_vec(
                    "crm_sync_rows_extracted_total",
                    "Records parsed from extracted CRM answers.",
                    &["pipeline"],
                ),
            ),
            rows_loaded_total: register(
                &registry,
                counter_vec(
                    "crm_sync_rows_loaded_total",
                    "Rows written to destinations.",
                    &["pipeline"],
                ),
            ),
            merge_rows_total: register(
                &registry,
                counter_vec(
                    "crm_sync_merge_rows_total",
                    "Rows of merge loads by change: inserted, updated, unchanged, deleted.",
                    &["pipeline", "change"],
                ),
            ),
            step_retries_total: register(
                &registry,
                counter_vec(
                    "crm_sync_step_retries_total",
                    "Failed step attempts re-queued for another attempt.",
                    &["pipeline", "step"],
                ),
            ),
            worker_busy_slots: register(
                &registry,
                IntGauge::new(
                    "crm_sync_worker_busy_slots",
                    "Steps running in this process's workers.",
                )
                .expect("valid metric"),
            ),
            worker_slots: register(
                &registry,
                IntGauge::new(
                    "crm_sync_worker_slots",
                    "Step slots of this process's workers (their concurrency).",
                )
                .expect("valid metric"),
            ),
            scheduler_lag_seconds: register(
                &registry,
                Gauge::new(
                    "crm_sync_scheduler_lag_seconds",
                    "Fire time to enqueue of the last tick this process's scheduler enqueued.",
                )
                .expect("valid metric"),
            ),
            scheduler_ticks_total: register(
                &registry,
                counter_vec(
                    "crm_sync_scheduler_ticks_total",
                    "Schedule ticks handled by this process: enqueued, or skipped by a catch-up policy.",
                    &["outcome"],
                ),
            ),
            notifications_total: register(
                &registry,
                counter_vec(
                    "crm_sync_notifications_total",
                    "Webhook deliveries attempted by this process, by outcome.",
                    &["webhook", "outcome"],
                ),
            ),
            http_auth_failures_total: register(
                &registry,
                counter_vec(
                    "crm_sync_http_auth_failures_total",
                    "API requests refused for a wrong bearer token or from an address locked out after too many.",
                    &["reason"],
                ),
            ),
            registry,
        };
        for reason in ["wrong_token", "locked_out"] {
            metrics
                .http_auth_failures_total
                .with_label_values(&[reason]);
        }
        // Zero series exist from the start, so rates and alerts see them before the first tick.
        for outcome in ["enqueued", "skipped"] {
            metrics.scheduler_ticks_total.with_label_values(&[outcome]);
        }
        Arc::new(metrics)
    }

    /// Counts a run that reached `status`.
    pub fn run_finished(&self, pipeline: &str, trigger: &str, status: &str) {
        self.runs_total
            .with_label_values(&[pipeline, trigger, status])
            .inc();
    }

    /// Records one step attempt's duration.
    pub fn step_attempt(&self, pipeline: &str, step: &str, elapsed: Duration) {
        self.step_duration_seconds
            .with_label_values(&[pipeline, step])
            .observe(elapsed.as_secs_f64());
    }

    /// Marks one worker slot busy until the returned guard is dropped (the step ended, was
    /// abandoned or its task was aborted).
    pub fn busy_slot(&self) -> BusySlot {
        self.worker_busy_slots.inc();
        BusySlot(self.worker_busy_slots.clone())
    }

    /// The process metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        encode(&self.registry)
    }
}

/// Held while a step occupies a worker slot.
pub struct BusySlot(IntGauge);

impl Drop for BusySlot {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("text encoding into a Vec cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}
