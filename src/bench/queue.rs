//! `crm-sync bench queue`: how fast the queue drains no-op runs, and how soon an idle worker starts a
//! freshly enqueued run. Runs the real worker code against the configured database, in a pipeline of
//! its own (`__bench_noop`) whose runs it deletes afterwards. Safe against a shared database by
//! construction: its workers claim only that pipeline's steps (and no other worker serves it), and it
//! writes no other rows and runs no maintenance on crm-sync's tables.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::db::Db;
use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, PipelineConfig, SourceConfig, WorkerConfig};
use crate::pipeline::Executor;
use crate::queue::{self, Trigger};
use crate::registry::{self, Registration};
use crate::sources::noop::{FailKind, NoopConfig};
use crate::worker::{Worker, WorkerOptions};

/// The pipeline the benchmark enqueues; internal, never disabled by config syncs.
pub const BENCH_PIPELINE: &str = "__bench_noop";

#[derive(clap::Args, Debug, Clone)]
pub struct QueueBenchArgs {
    /// No-op runs to enqueue and drain.
    #[arg(long, default_value_t = 10_000)]
    pub jobs: u32,
    /// Steps each worker runs at once.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// Worker instances (each with its own connection pool, as separate processes would have).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Most steps claimed or completed per round trip (default: [worker] claim_batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Measure enqueue-to-start latency instead: one run at a time, idle worker.
    #[arg(long)]
    pub latency: bool,
    /// Runs measured in latency mode.
    #[arg(long, default_value_t = 200)]
    pub samples: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct ThroughputReport {
    mode: &'static str,
    jobs: u32,
    workers: usize,
    concurrency: usize,
    claim_batch: usize,
    enqueue_seconds: f64,
    enqueue_per_second: f64,
    drain_seconds: f64,
    completed_per_second: f64,
    all_succeeded: bool,
    peak_rss_mib: Option<f64>,
}

#[derive(Debug, Serialize)]
struct LatencyReport {
    mode: &'static str,
    samples: u32,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    peak_rss_mib: Option<f64>,
}

/// Runs the benchmark and prints its figures.
pub async fn run(config: &Config, pool: Db, args: &QueueBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.jobs > 0, "--jobs must be at least 1");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
    let bench_config = Arc::new(bench_config(config));
    let mut conn = pool.acquire().await?;
    registry::register(
        &mut conn,
        "bench",
        false,
        &Registration::from(&bench_config.pipelines[0]),
    )
    .await?;
    drop(conn);
    delete_bench_runs(&pool).await?;

    let mut worker_config = config.worker.clone();
    worker_config.concurrency = args.concurrency;
    worker_config.claim_batch = args.batch.unwrap_or(worker_config.claim_batch).max(1);
    worker_config.max_connections = worker_config.max_connections.max(4);

    let result = if args.latency {
        latency(config, &pool, bench_config, &worker_config, args).await
    } else {
        throughput(config, &pool, bench_config, &worker_config, args).await
    };
    delete_bench_runs(&pool).await?;
    result
}

fn bench_config(config: &Config) -> Config {
    let pipeline = PipelineConfig {
        name: BENCH_PIPELINE.into(),
        schedule: None,
        timezone: "UTC".into(),
        enabled: true,
        fingerprint: "bench".into(),
        max_attempts: 3,
        step_timeout: Duration::from_secs(60),
        retry_backoff: Duration::from_millis(100),
        retry_backoff_max: Duration::from_secs(1),
        max_concurrent_runs: 0,
        catch_up: crate::scheduler::cron::CatchUp::Latest,
        freshness_sla: None,
        show_key_values: false,
        source: SourceConfig::Noop(NoopConfig {
            sleep_ms: 0,
            fail_times: 0,
            fail_kind: FailKind::Retryable,
            fail_step: None,
            steps: 1,
        }),
        backup: Default::default(),
        transform: None,
        validate: None,
        destination: None,
    };
    Config {
        path: Some(PathBuf::from("(bench)")),
        database_url: config.database_url.clone(),
        listen_url: config.listen_url.clone(),
        pooler: config.pooler,
        server: config.server.clone(),
        worker: config.worker.clone(),
        pipelines: vec![pipeline],
        notifications: Default::default(),
        retention: config.retention.clone(),
    }
}

async fn delete_bench_runs(pool: &Db) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM crm_sync.runs WHERE pipeline = $1")
        .bind(BENCH_PIPELINE)
        .execute(pool)
        .await
        .context("deleting benchmark runs")?;
    Ok(())
}

/// Starts `n` workers, each on its own pool; returns their shutdown token and join handles.
async fn start_workers(
    config: &Config,
    bench_config: Arc<Config>,
    worker_config: &WorkerConfig,
    n: usize,
) -> anyhow::Result<(
    CancellationToken,
    Vec<tokio::task::JoinHandle<anyhow::Result<crate::worker::WorkerStats>>>,
)> {
    let shutdown = CancellationToken::new();
    let mut handles = Vec::new();
    for _ in 0..n {
        let pool = crate::db::connect(
            config.require_database_url()?,
            worker_config.max_connections,
            config.pooler,
        )
        .await?;
        let mut options = bench_config.as_ref().clone();
        options.worker = worker_config.clone();
        let worker = Worker::new(
            pool,
            Executor::new(bench_config.clone()),
            WorkerOptions::from_config(&options),
        );
        handles.push(tokio::spawn(worker.run(shutdown.clone())));
    }
    Ok((shutdown, handles))
}

async fn throughput(
    config: &Config,
    pool: &Db,
    bench_config: Arc<Config>,
    worker_config: &WorkerConfig,
    args: &QueueBenchArgs,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut left = args.jobs;
    while left > 0 {
        let chunk = left.min(10_000);
        queue::enqueue_many(pool, BENCH_PIPELINE, chunk, Trigger::Cli).await?;
        left -= chunk;
    }
    let enqueue_seconds = started.elapsed().as_secs_f64();

    let t0: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await?;
    let (shutdown, handles) =
        start_workers(config, bench_config, worker_config, args.workers).await?;
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM crm_sync.runs WHERE pipeline = $1 AND status IN ('queued', 'running')",
        )
        .bind(BENCH_PIPELINE)
        .fetch_one(pool)
        .await?;
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (t1, succeeded): (Option<DateTime<Utc>>, i64) = sqlx::query_as(
        "SELECT max(finished_at), count(*) FILTER (WHERE status = 'succeeded') FROM crm_sync.runs WHERE pipeline = $1",
    )
    .bind(BENCH_PIPELINE)
    .fetch_one(pool)
    .await?;
    shutdown.cancel();
    for h in handles {
        h.await??;
    }
    let drain_seconds = t1
        .map(|t1| (t1 - t0).num_microseconds().unwrap_or(0) as f64 / 1e6)
        .unwrap_or(0.0);
    let report = ThroughputReport {
        mode: "throughput",
        jobs: args.jobs,
        workers: args.workers,
        concurrency: args.concurrency,
        claim_batch: worker_config.claim_batch,
        enqueue_seconds,
        enqueue_per_second: f64::from(args.jobs) / enqueue_seconds.max(1e-9),
        drain_seconds,
        completed_per_second: succeeded as f64 / drain_seconds.max(1e-9),
        all_succeeded: succeeded == i64::from(args.jobs),
        peak_rss_mib: peak_rss_mib(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "bench queue: {} no-op runs, {} worker(s) x concurrency {}, claim batch {}",
            report.jobs, report.workers, report.concurrency, report.claim_batch
        );
        println!(
            "  enqueue : {:>8.3} s  {:>10.0} runs/s",
            report.enqueue_seconds, report.enqueue_per_second
        );
        println!(
            "  drain   : {:>8.3} s  {:>10.0} runs/s completed (all succeeded: {})",
            report.drain_seconds, report.completed_per_second, report.all_succeeded
        );
        print_rss(report.peak_rss_mib);
    }
    anyhow::ensure!(
        report.all_succeeded,
        "only {succeeded} of {} runs succeeded",
        args.jobs
    );
    Ok(())
}

async fn latency(
    config: &Config,
    pool: &Db,
    bench_config: Arc<Config>,
    worker_config: &WorkerConfig,
    args: &QueueBenchArgs,
) -> anyhow::Result<()> {
    let (shutdown, handles) =
        start_workers(config, bench_config, worker_config, args.workers).await?;
    // Let the workers connect and LISTEN before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..args.samples {
        let id = queue::enqueue(pool, BENCH_PIPELINE, &json!({}), None, Trigger::Cli).await?;
        loop {
            let status: String =
                sqlx::query_scalar("SELECT status FROM crm_sync.runs WHERE id = $1")
                    .bind(id)
                    .fetch_one(pool)
                    .await?;
            if status == "succeeded" {
                break;
            }
            anyhow::ensure!(
                status != "failed" && status != "cancelled",
                "benchmark run {id} {status}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Idle gap: the next enqueue finds the worker waiting on LISTEN, as in production.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    for h in handles {
        h.await??;
    }
    // Enqueue-to-start on the database clock: the enqueue transaction's start to the claim's.
    let mut latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM (s.started_at - r.created_at))::float8 * 1000
           FROM crm_sync.runs r JOIN crm_sync.steps s ON s.run_id = r.id
          WHERE r.pipeline = $1 AND s.position = 1",
    )
    .bind(BENCH_PIPELINE)
    .fetch_all(pool)
    .await?;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let report = LatencyReport {
        mode: "latency",
        samples: args.samples,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        peak_rss_mib: peak_rss_mib(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "bench queue --latency: {} runs, one at a time, idle worker (enqueue to step start, database clock)",
            report.samples
        );
        println!(
            "  p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
            report.p50_ms, report.p90_ms, report.p99_ms, report.max_ms
        );
        print_rss(report.peak_rss_mib);
    }
    Ok(())
}

fn print_rss(mib: Option<f64>) {
    match mib {
        Some(m) => println!("  peak RSS: {m:.1} MiB"),
        None => println!("  peak RSS: unknown (no /proc/self/status)"),
    }
}

/// Peak resident set size of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
