//! Load: 10,000 no-op runs (two steps each) drained by 4 `crm-sync worker` processes while 2
//! `crm-sync scheduler` replicas tick a schedule every 2 seconds. Every run succeeds, no step is
//! completed twice, every tick becomes exactly one run, the connections stay within each process's
//! pool, and the history passes the consistency query. Prints the figures quoted in RELIABILITY.md.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{TestDb, spawn_binary, terminate};

const RUNS: i64 = 10_000;
const CHUNK: i64 = 500;
const WORKERS: usize = 4;
const SCHEDULERS: usize = 2;
const MAX_CONNECTIONS: i64 = 4;

fn config(db: &TestDb, process: &str) -> String {
    format!(
        r#"database_url = "{url}?application_name=crm-sync-{process}"

[worker]
concurrency = 50
claim_batch = 50
max_connections = {MAX_CONNECTIONS}
lease = "10s"
poll_interval = "200ms"
shutdown_grace = "10s"

[[pipelines]]
name = "bulk"
max_concurrent_runs = 0
source = {{ kind = "noop", steps = 2 }}

[[pipelines]]
name = "ticking"
schedule = "*/2 * * * * *"
catch_up = "all"
max_concurrent_runs = 0
source = {{ kind = "noop" }}
"#,
        url = db.url
    )
}

/// Connections of the crm-sync processes to the test database, by application name, sampled every
/// 50 ms; keeps the peak of the total and of each process.
async fn sample_connections(
    pool: sqlx::PgPool,
    database: String,
    stop: Arc<AtomicBool>,
) -> (i64, BTreeMap<String, i64>) {
    let mut peak_total = 0;
    let mut peak: BTreeMap<String, i64> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let now: Vec<(String, i64)> = sqlx::query_as(
            "SELECT application_name, count(*) FROM pg_stat_activity
              WHERE datname = $1 AND application_name LIKE 'crm-sync-%' GROUP BY 1",
        )
        .bind(&database)
        .fetch_all(&pool)
        .await
        .unwrap();
        peak_total = peak_total.max(now.iter().map(|c| c.1).sum());
        for (app, n) in now {
            let p = peak.entry(app).or_default();
            *p = (*p).max(n);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (peak_total, peak)
}

#[tokio::test]
async fn ten_thousand_runs_over_four_workers_and_two_schedulers_complete_once_each() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut roles: Vec<String> = (1..=WORKERS).map(|i| format!("worker-{i}")).collect();
    roles.extend((1..=SCHEDULERS).map(|i| format!("scheduler-{i}")));
    let mut processes: Vec<_> = roles
        .iter()
        .map(|name| {
            let path = dir.path().join(format!("{name}.toml"));
            std::fs::write(&path, config(&db, name)).unwrap();
            let command = name.split('-').next().unwrap();
            spawn_binary(&path, &[command], &dir.path().join(format!("{name}.log")))
        })
        .collect();
    common::wait_until(
        &db.pool,
        &format!(
            "SELECT (SELECT count(*) FROM crm_sync.workers WHERE stopped_at IS NULL AND 'worker' = ANY (roles)) = {WORKERS}
                AND EXISTS (SELECT 1 FROM crm_sync.runs WHERE trigger = 'schedule')"
        ),
        Duration::from_secs(30),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample_connections(
        db.pool.pool().clone(),
        db.name.clone(),
        stop.clone(),
    ));
    let started = Instant::now();
    for _ in 0..RUNS / CHUNK {
        sqlx::query("SELECT crm_sync.enqueue_runs('bulk', $1, 'api')")
            .bind(CHUNK as i32)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let enqueued = started.elapsed();
    common::wait_until(
        &db.pool,
        &format!(
            "SELECT count(*) = {RUNS} FROM crm_sync.runs
              WHERE pipeline = 'bulk' AND status IN ('succeeded', 'failed', 'cancelled')"
        ),
        Duration::from_secs(240),
    )
    .await;
    let drained = started.elapsed();
    // The replicas race for at least five ticks (a fast drain can finish within four).
    common::wait_until(
        &db.pool,
        "SELECT count(*) >= 5 FROM crm_sync.runs WHERE trigger = 'schedule'",
        Duration::from_secs(30),
    )
    .await;

    // Stop scheduling, let the workers finish the last ticks, then stop them.
    for (p, name) in processes.iter_mut().zip(&roles).skip(WORKERS) {
        let status = terminate(p, Duration::from_secs(30));
        assert!(status.success(), "{name} exited with {status}");
    }
    common::wait_until(
        &db.pool,
        "SELECT count(*) = 0 FROM crm_sync.runs WHERE status IN ('queued', 'running')",
        Duration::from_secs(60),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (peak_total, peak) = sampler.await.unwrap();
    for (p, name) in processes.iter_mut().zip(&roles).take(WORKERS) {
        let status = terminate(p, Duration::from_secs(30));
        assert!(status.success(), "{name} exited with {status}");
    }

    let statuses: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT pipeline, status, count(*) FROM crm_sync.runs GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let ticks: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT scheduled_for FROM crm_sync.runs WHERE trigger = 'schedule' ORDER BY scheduled_for",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        statuses,
        vec![
            ("bulk".into(), "succeeded".into(), RUNS),
            ("ticking".into(), "succeeded".into(), ticks.len() as i64),
        ]
    );
    // Each two-second tick, once: no gap, no double (the replicas raced for every one).
    for pair in ticks.windows(2) {
        assert_eq!(
            (pair[1] - pair[0]).num_seconds(),
            2,
            "ticks {} and {} are not consecutive",
            pair[0],
            pair[1]
        );
    }
    assert!(
        ticks.len() >= 5,
        "only {} ticks during the load",
        ticks.len()
    );

    // Every step ran once: one attempt each, and it succeeded. No retries, no lost leases.
    let (steps, attempts, succeeded, workers_used): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM crm_sync.steps),
                (SELECT count(*) FROM crm_sync.attempts),
                (SELECT count(*) FROM crm_sync.attempts WHERE outcome = 'succeeded'),
                (SELECT count(DISTINCT worker_id) FROM crm_sync.attempts)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(steps, 2 * RUNS + ticks.len() as i64);
    assert_eq!((attempts, succeeded), (steps, steps));
    assert_eq!(workers_used, WORKERS as i64, "not every worker took part");
    common::consistency::assert_history_consistent(&db.pool).await;

    // Connections: each process within its pool (max_connections), so the total within their sum.
    let processes_seen = peak.len();
    let max_per_process = peak.values().copied().max().unwrap_or(0);
    assert_eq!(processes_seen, WORKERS + SCHEDULERS, "{peak:?}");
    assert!(max_per_process <= MAX_CONNECTIONS, "{peak:?}");
    assert!(peak_total <= MAX_CONNECTIONS * (WORKERS + SCHEDULERS) as i64);

    let secs = drained.as_secs_f64();
    println!(
        "load: {RUNS} runs x 2 steps enqueued in {:.1} s and drained in {secs:.1} s ({:.0} runs/s, {:.0} steps/s) \
         by {WORKERS} worker processes; {} ticks every 2 s by {SCHEDULERS} scheduler replicas, each once; \
         peak connections {peak_total} (limit {}), max per process {max_per_process} (max_connections = {MAX_CONNECTIONS}): {peak:?}",
        enqueued.as_secs_f64(),
        RUNS as f64 / secs,
        2.0 * RUNS as f64 / secs,
        ticks.len(),
        MAX_CONNECTIONS * (WORKERS + SCHEDULERS) as i64,
    );
}
