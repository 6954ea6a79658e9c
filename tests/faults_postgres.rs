//! PostgreSQL crashes and comes back while `crm-sync worker`, `crm-sync scheduler` and `crm-sync serve`
//! processes are busy: they reconnect on their own, the runs in flight finish, the scheduled ticks
//! that fell due during the outage are enqueued afterwards, and no run is lost or duplicated.
//! Runs on a private PostgreSQL server of its own (the shared one must never be restarted).

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::private_postgres::PrivatePostgres;
use common::{run_binary, spawn_binary, terminate};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// Longer than the pool's acquire timeout (10 s), so that queries fail during the outage instead of
/// only waiting for a connection, and longer than the lease, so that leases expire.
const OUTAGE: Duration = Duration::from_secs(12);
const SLOW_RUNS: i64 = 8;

const CONFIG: &str = r#"
[worker]
concurrency = 4
lease = "2s"
poll_interval = "200ms"
shutdown_grace = "10s"

[[pipelines]]
name = "ticking"
schedule = "*/2 * * * * *"
catch_up = "all"
max_concurrent_runs = 0
source = { kind = "noop" }

[[pipelines]]
name = "slow"
max_concurrent_runs = 0
max_attempts = 5
retry_backoff = "100ms"
source = { kind = "noop", sleep_ms = 3000, steps = 3 }
"#;

async fn poll_until(pool: &PgPool, query: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let done: Result<bool, _> = sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_string()))
            .fetch_one(pool)
            .await;
        if matches!(done, Ok(true)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {query} (last answer: {done:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn workers_and_schedulers_ride_out_a_postgres_crash_and_lose_nothing() {
    let mut pg = PrivatePostgres::start();
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&pg.url("postgres"))
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE crm_sync")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let url = pg.url("crm_sync");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("crm-sync.toml");
    std::fs::write(
        &config,
        format!("database_url = \"{url}\"\n{CONFIG}\n[server]\nlisten = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let (code, _, err) = run_binary(&config, &["migrate"]);
    assert_eq!(code, 0, "{err}");

    // A lone worker, a lone scheduler, and `serve` (API, worker and scheduler in one process).
    let names = ["worker", "scheduler", "serve"];
    let mut processes: Vec<_> = names
        .iter()
        .map(|role| spawn_binary(&config, &[role], &dir.path().join(format!("{role}.log"))))
        .collect();
    // The test's own pool: a few connections, each tested before use (they die with the server).
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    poll_until(
        &pool,
        "SELECT count(*) = 2 FROM crm_sync.workers WHERE stopped_at IS NULL AND 'worker' = ANY (roles)",
        Duration::from_secs(30),
    )
    .await;
    poll_until(
        &pool,
        "SELECT count(*) >= 2 FROM crm_sync.runs WHERE trigger = 'schedule'",
        Duration::from_secs(30),
    )
    .await;
    let slow: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT crm_sync.enqueue_runs('slow', $1, 'sql')")
            .bind(SLOW_RUNS as i32)
            .fetch_all(&pool)
            .await
            .unwrap();
    // Crash while steps are running and after the schedule has ticked a few times.
    poll_until(
        &pool,
        "SELECT count(*) >= 2 FROM crm_sync.steps WHERE pipeline = 'slow' AND status = 'running'",
        Duration::from_secs(30),
    )
    .await;
    let down_at = Utc::now();
    pg.crash();
    tokio::time::sleep(OUTAGE).await;
    for (p, role) in processes.iter_mut().zip(names) {
        assert!(
            p.try_wait().unwrap().is_none(),
            "{role} exited during the outage"
        );
    }
    pg.resume();
    let up_at = Utc::now();
    println!(
        "PostgreSQL down {:.1} s (immediate shutdown, crash recovery on start)",
        (up_at - down_at).as_seconds_f64()
    );

    // No operator action: the slow runs finish and the schedule catches up, then keeps ticking.
    let recovered = Instant::now();
    poll_until(
        &pool,
        &format!(
            "SELECT (SELECT count(*) FROM crm_sync.runs WHERE pipeline = 'slow' AND status = 'succeeded') = {SLOW_RUNS}
                AND (SELECT max(scheduled_for) FROM crm_sync.runs WHERE trigger = 'schedule')
                    >= '{}'::timestamptz + interval '4 seconds'",
            up_at.to_rfc3339()
        ),
        Duration::from_secs(90),
    )
    .await;
    println!(
        "all {SLOW_RUNS} slow runs succeeded and the schedule caught up {:.1} s after the restart",
        recovered.elapsed().as_secs_f64()
    );
    for (p, role) in processes.iter_mut().zip(names) {
        assert!(
            p.try_wait().unwrap().is_none(),
            "{role} exited after the outage"
        );
    }

    // Stop scheduling, let the lone worker finish what was enqueued, then stop it.
    for i in [1, 2] {
        let status = terminate(&mut processes[i], Duration::from_secs(30));
        assert!(status.success(), "{} exited with {status}", names[i]);
    }
    poll_until(
        &pool,
        "SELECT count(*) = 0 FROM crm_sync.runs WHERE status IN ('queued', 'running')",
        Duration::from_secs(60),
    )
    .await;
    let status = terminate(&mut processes[0], Duration::from_secs(30));
    assert!(status.success(), "worker exited with {status}");

    let statuses: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT pipeline, status, count(*) FROM crm_sync.runs GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        statuses.iter().all(|(_, status, _)| status == "succeeded"),
        "{statuses:?}"
    );
    let slow_done: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM crm_sync.runs WHERE id = ANY($1) AND status = 'succeeded'",
    )
    .bind(&slow)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(slow_done, SLOW_RUNS);

    // Every two-second tick from the first to the last has exactly one run: none lost in the outage,
    // none doubled by the catch-up or by the two scheduling processes.
    let ticks: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT scheduled_for FROM crm_sync.runs WHERE trigger = 'schedule' ORDER BY scheduled_for",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for pair in ticks.windows(2) {
        assert_eq!(
            (pair[1] - pair[0]).num_seconds(),
            2,
            "ticks {} and {} are not consecutive",
            pair[0],
            pair[1]
        );
    }
    let during = ticks
        .iter()
        .filter(|t| **t > down_at && **t < up_at)
        .count();
    assert!(
        during >= 2,
        "only {during} ticks fell due during the outage: {ticks:?}"
    );

    let (lost, retried): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE outcome = 'lost'), count(*) FILTER (WHERE outcome = 'retry')
           FROM crm_sync.attempts",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    println!(
        "{} scheduled ticks ({during} due during the outage) and {SLOW_RUNS} slow runs, all succeeded once; \
         {lost} attempts lost to expired leases, {retried} retried",
        ticks.len()
    );
    common::consistency::assert_history_consistent(&pool.clone().into()).await;
    for role in names {
        let log = std::fs::read_to_string(dir.path().join(format!("{role}.log"))).unwrap();
        assert!(!log.contains("panicked"), "{role} panicked:\n{log}");
    }
}
