//! The durable step queue against real PostgreSQL: claims, fencing, retries, concurrency limits,
//! cancellation and the SQL interface. Each test has its own database.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{RunningWorker, TestDb, wait_for_run};
use crm_sync::queue::{self, FailOutcome, QueueError, Trigger};
use serde_json::json;
use uuid::Uuid;

const FAST_WORKER: &str = "[worker]\nconcurrency = 8\nlease = \"2s\"\npoll_interval = \"100ms\"\n";

fn pipeline(name: &str, extra: &str, source: &str) -> String {
    format!(
        "[[pipelines]]\nname = \"{name}\"\nretry_backoff = \"10ms\"\n{extra}\nsource = {{ kind = \"noop\", {source} }}\n"
    )
}

#[derive(Debug, sqlx::FromRow)]
struct Attempt {
    attempt: i32,
    worker_id: String,
    outcome: String,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    error: Option<String>,
}

/// A worker that serves the `noop` pipeline.
fn noop_served() -> queue::Served {
    queue::Served {
        pipelines: vec!["noop".into()],
        fingerprints: vec!["test".into()],
    }
}

async fn attempts_of(db: &TestDb, run: Uuid, step: &str) -> Vec<Attempt> {
    sqlx::query_as(
        "SELECT a.attempt, a.worker_id, a.outcome, a.started_at, a.finished_at, a.error
           FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
          WHERE s.run_id = $1 AND s.name = $2 ORDER BY a.fence",
    )
    .bind(run)
    .bind(step)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_worker_whose_lease_was_taken_over_cannot_complete_the_step() {
    let db = TestDb::new().await;
    db.config(&pipeline("noop", "", "sleep_ms = 0")).await;
    let run = queue::enqueue(&db.pool, "noop", &json!({}), None, Trigger::Api)
        .await
        .unwrap();

    let first = queue::claim(
        &db.pool,
        "worker-a",
        10,
        Duration::from_millis(100),
        &noop_served(),
    )
    .await
    .unwrap();
    assert_eq!(first.len(), 1);
    let stale = first[0].lease();
    // worker-a stalls past its lease; the reaper re-queues the step and worker-b claims it.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(queue::reap_expired(&db.pool).await.unwrap(), 1);
    let second = queue::claim(
        &db.pool,
        "worker-b",
        10,
        Duration::from_secs(30),
        &noop_served(),
    )
    .await
    .unwrap();
    assert_eq!(second.len(), 1);
    assert!(
        second[0].fence > stale.fence,
        "a new claim must carry a new fencing token"
    );
    assert_eq!(second[0].attempt, 2);

    // The stale worker can neither complete, fail nor renew.
    let accepted = queue::complete(&db.pool, "worker-a", &[(stale, json!({"from": "a"}))])
        .await
        .unwrap();
    assert!(accepted.is_empty(), "stale completion was accepted");
    let outcome = queue::fail(&db.pool, "worker-a", stale, "late", true, Utc::now())
        .await
        .unwrap();
    assert_eq!(outcome, FailOutcome::Discarded);
    assert!(
        queue::heartbeat(&db.pool, "worker-a", &[stale], Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );

    let accepted = queue::complete(
        &db.pool,
        "worker-b",
        &[(second[0].lease(), json!({"from": "b"}))],
    )
    .await
    .unwrap();
    assert!(accepted.contains(&second[0].step_id));
    assert_eq!(
        wait_for_run(&db.pool, run, Duration::from_secs(5)).await,
        "succeeded"
    );
    let output: serde_json::Value =
        sqlx::query_scalar("SELECT output FROM crm_sync.steps WHERE run_id = $1")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(output, json!({"from": "b"}));
    let log = attempts_of(&db, run, "noop").await;
    let outcomes: Vec<(&str, &str)> = log
        .iter()
        .map(|a| (a.worker_id.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        vec![("worker-a", "lost"), ("worker-b", "succeeded")]
    );
}

#[tokio::test]
async fn retryable_failures_back_off_and_then_succeed() {
    let db = TestDb::new().await;
    let config = db
        .config(&format!(
            "{FAST_WORKER}{}",
            "[[pipelines]]\nname = \"flaky\"\nmax_attempts = 5\nretry_backoff = \"200ms\"\nsource = { kind = \"noop\", fail_times = 2 }\n"
        ))
        .await;
    let (run, status) = common::run_pipeline(&db, &config, "flaky", Duration::from_secs(20)).await;
    assert_eq!(status, "succeeded");

    let log = attempts_of(&db, run, "noop").await;
    let outcomes: Vec<&str> = log.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, vec!["retry", "retry", "succeeded"]);
    assert_eq!(
        log.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // Exponential backoff with equal jitter: at least half of 200 ms, then half of 400 ms.
    let gap = |i: usize| (log[i + 1].started_at - log[i].finished_at.unwrap()).num_milliseconds();
    assert!(gap(0) >= 100, "first backoff only {} ms", gap(0));
    assert!(gap(1) >= 200, "second backoff only {} ms", gap(1));
    assert!(
        log[0]
            .error
            .as_deref()
            .unwrap()
            .contains("planned failure 1 of 2")
    );
}

#[tokio::test]
async fn a_step_that_keeps_failing_fails_the_run_after_max_attempts() {
    let db = TestDb::new().await;
    let config = db
        .config(&format!(
            "{FAST_WORKER}{}",
            pipeline("doomed", "max_attempts = 5", "fail_times = 9")
        ))
        .await;
    let (run, status) = common::run_pipeline(&db, &config, "doomed", Duration::from_secs(20)).await;
    assert_eq!(status, "failed");

    let log = attempts_of(&db, run, "noop").await;
    assert_eq!(log.len(), 5);
    assert_eq!(log.last().unwrap().outcome, "failed");
    let error = common::run_error(&db.pool, run).await;
    assert!(
        error.contains("attempt 5 of 5") && error.contains("planned failure 5 of 9"),
        "{error}"
    );
}

#[tokio::test]
async fn a_terminal_error_fails_the_run_at_once() {
    let db = TestDb::new().await;
    let config = db
        .config(&format!(
            "{FAST_WORKER}{}",
            pipeline(
                "strict",
                "max_attempts = 5",
                "fail_times = 1, fail_kind = \"terminal\", steps = 2"
            )
        ))
        .await;
    let (run, status) = common::run_pipeline(&db, &config, "strict", Duration::from_secs(10)).await;
    assert_eq!(status, "failed");

    assert_eq!(attempts_of(&db, run, "noop_1").await.len(), 1);
    assert!(
        attempts_of(&db, run, "noop_2").await.is_empty(),
        "a later step ran after a terminal failure"
    );
    let error = common::run_error(&db.pool, run).await;
    assert!(
        error.contains("not retryable") && error.contains("noop_1"),
        "{error}"
    );
}

#[tokio::test]
async fn retry_run_resumes_from_the_failed_step_in_the_same_batch() {
    let db = TestDb::new().await;
    let config = db
        .config(&format!(
            "{FAST_WORKER}{}",
            pipeline(
                "etl",
                "",
                "steps = 3, fail_step = \"noop_2\", fail_times = 1, fail_kind = \"terminal\""
            )
        ))
        .await;
    let worker = RunningWorker::start(&db, &config).await;
    let failed = queue::enqueue(&db.pool, "etl", &json!({"k": 1}), None, Trigger::Cli)
        .await
        .unwrap();
    assert_eq!(
        wait_for_run(&db.pool, failed, Duration::from_secs(10)).await,
        "failed"
    );

    // From SQL, as pg_cron or an operator in psql would.
    let retried: Uuid = sqlx::query_scalar("SELECT crm_sync.retry_run($1)")
        .bind(failed)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        wait_for_run(&db.pool, retried, Duration::from_secs(10)).await,
        "succeeded"
    );
    worker.stop().await;

    let (old_batch, new_batch, trigger, retry_of, params): (
        String,
        String,
        String,
        Option<Uuid>,
        serde_json::Value,
    ) = sqlx::query_as(
        "SELECT o.batch_id, n.batch_id, n.trigger, n.retry_of, n.params
               FROM crm_sync.runs o, crm_sync.runs n WHERE o.id = $1 AND n.id = $2",
    )
    .bind(failed)
    .bind(retried)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(old_batch, new_batch);
    assert_eq!(trigger, "retry");
    assert_eq!(retry_of, Some(failed));
    assert_eq!(params, json!({"k": 1}));

    // noop_1 succeeded in the failed run: its checkpoint is reused, it does not run again.
    assert!(
        attempts_of(&db, retried, "noop_1").await.is_empty(),
        "succeeded step ran again"
    );
    let reused: Option<Uuid> = sqlx::query_scalar(
        "SELECT reused_from_run FROM crm_sync.steps WHERE run_id = $1 AND name = 'noop_1'",
    )
    .bind(retried)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(reused, Some(failed));
    assert_eq!(attempts_of(&db, retried, "noop_2").await.len(), 1);
    assert_eq!(attempts_of(&db, retried, "noop_3").await.len(), 1);

    // A run is retried once; retrying it again names the retry.
    match queue::retry(&db.pool, failed).await {
        Err(QueueError::Conflict(m)) => assert!(m.contains(&retried.to_string()), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    match queue::retry(&db.pool, retried).await {
        Err(QueueError::Conflict(m)) => assert!(m.contains("succeeded"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    match queue::retry(&db.pool, Uuid::nil()).await {
        Err(QueueError::NotFound(m)) => assert!(m.contains("not found"), "{m}"),
        other => panic!("expected not found, got {other:?}"),
    }
}

#[tokio::test]
async fn a_thousand_runs_drained_by_four_workers_complete_each_step_once() {
    let db = TestDb::new().await;
    let config = db
        .config(&format!(
            "[worker]\nconcurrency = 16\nclaim_batch = 8\nlease = \"10s\"\npoll_interval = \"100ms\"\n{}",
            pipeline("bulk", "max_concurrent_runs = 0", "steps = 2")
        ))
        .await;
    queue::enqueue_many(&db.pool, "bulk", 1000, Trigger::Api)
        .await
        .unwrap();
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(RunningWorker::start(&db, &config).await);
    }
    common::wait_until(
        &db.pool,
        "SELECT count(*) = 0 FROM crm_sync.runs WHERE status IN ('queued', 'running')",
        Duration::from_secs(120),
    )
    .await;
    let mut succeeded_by_workers = 0;
    for w in workers {
        succeeded_by_workers += w.stop().await.succeeded;
    }
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM crm_sync.runs GROUP BY status")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(statuses, vec![("succeeded".to_string(), 1000)]);
    let (steps, attempts, succeeded, twice, workers_used): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM crm_sync.steps WHERE status = 'succeeded' AND attempts = 1),
                (SELECT count(*) FROM crm_sync.attempts),
                (SELECT count(*) FROM crm_sync.attempts WHERE outcome = 'succeeded'),
                (SELECT count(*) FROM (SELECT step_id FROM crm_sync.attempts WHERE outcome = 'succeeded'
                                        GROUP BY step_id HAVING count(*) > 1) d),
                (SELECT count(DISTINCT worker_id) FROM crm_sync.attempts)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(steps, 2000);
    assert_eq!(attempts, 2000, "every step ran exactly once");
    assert_eq!(succeeded, 2000);
    assert_eq!(twice, 0, "a step completed twice");
    assert_eq!(succeeded_by_workers, 2000);
    assert!(
        workers_used >= 2,
        "only {workers_used} worker did all the work"
    );
}

#[tokio::test]
async fn concurrent_enqueues_of_one_pipeline_never_run_two_at_once() {
    let db = TestDb::new().await;
    let config = db
        .config(&format!(
            "{FAST_WORKER}{}",
            pipeline(
                "refresh",
                "max_concurrent_runs = 1",
                "sleep_ms = 30, steps = 2"
            )
        ))
        .await;
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(RunningWorker::start(&db, &config).await);
    }
    let mut enqueues = Vec::new();
    for _ in 0..20 {
        let pool = db.pool.clone();
        enqueues.push(tokio::spawn(async move {
            queue::enqueue(&pool, "refresh", &json!({}), None, Trigger::Api)
                .await
                .unwrap()
        }));
    }
    let mut ids = HashSet::new();
    for e in enqueues {
        ids.insert(e.await.unwrap());
    }
    assert_eq!(ids.len(), 20);
    // Sample while they run: never more than one admitted or running run.
    let mut max_active = 0i64;
    loop {
        let (active, open): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'running' OR (status = 'queued' AND admitted_at IS NOT NULL)),
                    count(*) FILTER (WHERE status IN ('queued', 'running'))
               FROM crm_sync.runs",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        max_active = max_active.max(active);
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for w in workers {
        w.stop().await;
    }
    assert!(max_active <= 1, "{max_active} runs were active at once");
    let spans: Vec<(DateTime<Utc>, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT started_at, finished_at, status FROM crm_sync.runs ORDER BY started_at",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(spans.len(), 20);
    assert!(spans.iter().all(|s| s.2 == "succeeded"));
    for pair in spans.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "runs overlapped: {:?} started before {:?} finished",
            pair[1].0,
            pair[0].1
        );
    }
}

#[tokio::test]
async fn unknown_pipelines_and_bad_arguments_are_clear_errors_that_write_nothing() {
    let db = TestDb::new().await;
    db.config(&pipeline("noop", "", "sleep_ms = 0")).await;

    match queue::enqueue(&db.pool, "nope", &json!({}), None, Trigger::Cli).await {
        Err(QueueError::NotFound(m)) => {
            assert!(m.contains("unknown pipeline \"nope\""), "{m}");
            assert!(m.contains("known pipelines: noop"), "{m}");
        }
        other => panic!("expected not found, got {other:?}"),
    }
    let sql_error = sqlx::query("SELECT crm_sync.enqueue_run('nope')")
        .execute(&db.pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        sql_error.contains("unknown pipeline \"nope\""),
        "{sql_error}"
    );
    let null_error = sqlx::query("SELECT crm_sync.enqueue_run(NULL)")
        .execute(&db.pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(null_error.contains("must not be null"), "{null_error}");
    let json_error = sqlx::query("SELECT crm_sync.enqueue_run('noop', '[1, 2]')")
        .execute(&db.pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        json_error.contains("params must be a JSON object"),
        "{json_error}"
    );
    let bad_json = sqlx::query("SELECT crm_sync.enqueue_run('noop', '{oops')")
        .execute(&db.pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        bad_json.contains("invalid input syntax for type json"),
        "{bad_json}"
    );
    let null_retry = sqlx::query("SELECT crm_sync.retry_run(NULL)")
        .execute(&db.pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(null_retry.contains("must not be null"), "{null_retry}");

    let (runs, steps): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM crm_sync.runs), (SELECT count(*) FROM crm_sync.steps)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((runs, steps), (0, 0), "a rejected enqueue wrote something");
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_run_and_rejects_reuse_with_other_params() {
    let db = TestDb::new().await;
    db.config(&format!(
        "{}{}",
        pipeline("a", "", "sleep_ms = 0"),
        pipeline("b", "", "sleep_ms = 0")
    ))
    .await;
    let first = queue::enqueue(
        &db.pool,
        "a",
        &json!({"x": 1}),
        Some("daily-2026-11-24"),
        Trigger::Api,
    )
    .await
    .unwrap();
    let again = queue::enqueue(
        &db.pool,
        "a",
        &json!({"x": 1}),
        Some("daily-2026-11-24"),
        Trigger::Api,
    )
    .await
    .unwrap();
    assert_eq!(first, again);
    let from_sql: Uuid =
        sqlx::query_scalar("SELECT crm_sync.enqueue_run('a', '{\"x\": 1}', 'daily-2026-11-24')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(first, from_sql);
    for (pipeline, params) in [("a", json!({"x": 2})), ("b", json!({"x": 1}))] {
        match queue::enqueue(
            &db.pool,
            pipeline,
            &params,
            Some("daily-2026-11-24"),
            Trigger::Api,
        )
        .await
        {
            Err(QueueError::Conflict(m)) => {
                assert!(
                    m.contains("idempotency key \"daily-2026-11-24\"")
                        && m.contains(&first.to_string()),
                    "{m}"
                )
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_sync.runs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 1);
}

#[tokio::test]
async fn cancelling_a_running_run_stops_its_step() {
    let db = TestDb::new().await;
    let config = db
        .config(&format!(
            "{FAST_WORKER}{}",
            pipeline("slow", "", "sleep_ms = 60000, steps = 2")
        ))
        .await;
    let worker = RunningWorker::start(&db, &config).await;
    let run = queue::enqueue(&db.pool, "slow", &json!({}), None, Trigger::Cli)
        .await
        .unwrap();
    common::wait_until(
        &db.pool,
        "SELECT EXISTS (SELECT 1 FROM crm_sync.steps WHERE status = 'running')",
        Duration::from_secs(10),
    )
    .await;
    queue::cancel(&db.pool, run).await.unwrap();
    assert_eq!(
        wait_for_run(&db.pool, run, Duration::from_secs(1)).await,
        "cancelled"
    );
    let stats = tokio::time::timeout(Duration::from_secs(5), worker.stop())
        .await
        .expect("worker stopped promptly");
    assert_eq!(stats.succeeded, 0);
    let statuses: Vec<String> =
        sqlx::query_scalar("SELECT status FROM crm_sync.steps WHERE run_id = $1 ORDER BY position")
            .bind(run)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(statuses, vec!["cancelled", "cancelled"]);
    assert_eq!(
        attempts_of(&db, run, "noop_1").await[0].outcome,
        "cancelled"
    );
    match queue::cancel(&db.pool, run).await {
        Err(QueueError::Conflict(m)) => assert!(m.contains("already cancelled"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[tokio::test]
async fn a_step_over_its_timeout_fails_as_retryable_and_is_retried() {
    let db = TestDb::new().await;
    let config = db
        .config(&format!(
            "{FAST_WORKER}{}",
            pipeline(
                "stuck",
                "max_attempts = 2\nstep_timeout = \"200ms\"",
                "sleep_ms = 5000"
            )
        ))
        .await;
    let (run, status) = common::run_pipeline(&db, &config, "stuck", Duration::from_secs(10)).await;
    assert_eq!(status, "failed");
    let log = attempts_of(&db, run, "noop").await;
    assert_eq!(
        log.iter().map(|a| a.outcome.as_str()).collect::<Vec<_>>(),
        vec!["retry", "failed"]
    );
    assert!(
        log[0]
            .error
            .as_deref()
            .unwrap()
            .contains("timed out after 200ms"),
        "{:?}",
        log[0].error
    );
}

#[tokio::test]
async fn the_health_view_reports_last_success_and_staleness() {
    let db = TestDb::new().await;
    let config = db
        .config(&format!(
            "{FAST_WORKER}{}{}",
            pipeline("fresh", "freshness_sla = \"1h\"", "sleep_ms = 0"),
            pipeline("never", "freshness_sla = \"1h\"", "sleep_ms = 0")
        ))
        .await;
    let (run, status) = common::run_pipeline(&db, &config, "fresh", Duration::from_secs(10)).await;
    assert_eq!(status, "succeeded");
    let rows: Vec<(String, bool, Option<String>, Option<Uuid>)> = sqlx::query_as(
        "SELECT pipeline, stale, last_status, last_run_id FROM crm_sync.pipeline_health ORDER BY pipeline",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                "fresh".to_string(),
                false,
                Some("succeeded".to_string()),
                Some(run)
            ),
            ("never".to_string(), true, None, None),
        ]
    );
}
