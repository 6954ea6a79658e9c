//! Retention against real PostgreSQL: a year of scheduled history written straight into the tables
//! (runs with steps, attempts and notification outbox rows), pruned by `crm_sync.prune_history` in
//! batches; which runs remain is checked run by run against the rules, the protected runs one by one,
//! and the tables' size over a simulated year. The binary's `prune`, `serve` and `check-config`
//! are tested too.

mod common;

use crm_sync::db::Db;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{TestDb, run_binary, spawn_binary, write_config};
use crm_sync::config::RetentionConfig;
use crm_sync::retention::{self, PruneReport};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const DAY: Duration = Duration::from_secs(86_400);
const TABLES: [&str; 5] = [
    "runs",
    "steps",
    "attempts",
    "notification_events",
    "notification_deliveries",
];

const PIPELINES: &str = r#"
[[pipelines]]
name = "hourly"
source = { kind = "noop", steps = 2 }

[[pipelines]]
name = "daily"
source = { kind = "noop", steps = 3 }

[[pipelines]]
name = "broken"
source = { kind = "noop", steps = 3 }

[[pipelines]]
name = "retired"
enabled = false
source = { kind = "noop" }
"#;

fn policy(keep_last: u32, batch_size: u32) -> RetentionConfig {
    RetentionConfig {
        succeeded: Some(DAY * 30),
        failed: Some(DAY * 180),
        cancelled: Some(DAY * 60),
        keep_last,
        batch_size,
        ..RetentionConfig::default()
    }
}

/// The webhook the outbox rows are addressed to.
async fn add_webhook(pool: &Db) {
    sqlx::query(
        "INSERT INTO crm_sync.webhooks (name, format, events, max_attempts, timeout_ms)
         VALUES ('ops', 'json', ARRAY['run_failed', 'run_recovered'], 3, 1000)",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Inserts finished runs of `pipeline`, one every `every` (a PostgreSQL interval) in `[from, to)`, as
/// the queue would have left them: the `fail_every`-th run failed at its last step (three attempts,
/// a delivered failure notification), the `cancel_every`-th cancelled before its last step, the rest
/// succeeded; each run finished two minutes after it was created. Returns the runs inserted.
async fn insert_history(
    pool: &Db,
    pipeline: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    every: &str,
    fail_every: i64,
    cancel_every: i64,
) -> i64 {
    sqlx::query_scalar(
        "WITH new_runs AS (
            INSERT INTO crm_sync.runs (pipeline, batch_id, trigger, status, scheduled_for, admitted_at,
                                       created_at, started_at, finished_at, error)
            SELECT $1, $1 || to_char(g.t, '_YYYYMMDD\"T\"HH24MISS'), 'schedule', g.status, g.t, g.t, g.t,
                   g.t + interval '1 minute', g.t + interval '2 minutes',
                   CASE WHEN g.status = 'failed' THEN 'step failed (attempt 3 of 3): HTTP 503'
                        WHEN g.status = 'cancelled' THEN 'cancelled by an operator' END
              FROM (SELECT t, CASE WHEN n % $5 = $5 - 1 THEN 'failed'
                                   WHEN n % $6 = $6 - 1 THEN 'cancelled' ELSE 'succeeded' END AS status
                      FROM generate_series($2::timestamptz, $3::timestamptz - interval '1 microsecond',
                                           $4::interval) WITH ORDINALITY AS s (t, n)) g
            RETURNING id, pipeline, batch_id, status, started_at, finished_at
         ), step_rows AS (
            SELECT r.id AS run_id, r.pipeline, p.steps[k] AS name, k AS position, r.started_at, r.finished_at,
                   CASE WHEN r.status = 'succeeded' OR k < cardinality(p.steps) THEN 'succeeded'
                        ELSE r.status END AS status
              FROM new_runs r JOIN crm_sync.pipelines p ON p.name = r.pipeline,
                   generate_series(1, cardinality(p.steps)) AS k
         ), new_steps AS (
            INSERT INTO crm_sync.steps (run_id, pipeline, name, position, status, attempts, max_attempts,
                                        timeout_ms, run_at, fence, started_at, finished_at, output, error)
            SELECT s.run_id, s.pipeline, s.name, s.position, s.status,
                   CASE s.status WHEN 'succeeded' THEN 1 WHEN 'failed' THEN 3 ELSE 0 END, 3, 60000,
                   s.started_at, CASE s.status WHEN 'succeeded' THEN 1 WHEN 'failed' THEN 3 ELSE 0 END,
                   s.started_at, s.finished_at,
                   CASE WHEN s.status = 'succeeded'
                        THEN jsonb_build_object('rows', 2700, 'uri', 'file:///backups/' || s.run_id) END,
                   CASE WHEN s.status = 'failed' THEN 'HTTP 503' END
              FROM step_rows s
            RETURNING id, run_id, status, attempts, started_at, finished_at
         ), new_attempts AS (
            INSERT INTO crm_sync.attempts (step_id, run_id, attempt, fence, worker_id, started_at,
                                           finished_at, outcome, error)
            SELECT s.id, s.run_id, a, a, 'worker-1', s.started_at, s.finished_at,
                   CASE WHEN s.status = 'succeeded' THEN 'succeeded' WHEN a < s.attempts THEN 'retry'
                        ELSE 'failed' END,
                   CASE WHEN s.status = 'failed' THEN 'HTTP 503' END
              FROM new_steps s, generate_series(1, s.attempts) AS a
         ), new_events AS (
            INSERT INTO crm_sync.notification_events (kind, run_id, pipeline, batch_id, created_at)
            SELECT 'run_failed', r.id, r.pipeline, r.batch_id, r.finished_at FROM new_runs r
             WHERE r.status = 'failed'
            RETURNING id, created_at
         ), new_deliveries AS (
            INSERT INTO crm_sync.notification_deliveries (event_id, webhook, state, attempts,
                                                          created_at, delivered_at, last_status)
            SELECT e.id, 'ops', 'delivered', 1, e.created_at, e.created_at, 200 FROM new_events e
         )
         SELECT count(*) FROM new_runs",
    )
    .bind(pipeline)
    .bind(from)
    .bind(to)
    .bind(every)
    .bind(fail_every)
    .bind(cancel_every)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// One finished run written by hand (for the special cases), with one step per pipeline step.
async fn insert_run(
    pool: &Db,
    pipeline: &str,
    status: &str,
    created_at: DateTime<Utc>,
    retry_of: Option<Uuid>,
) -> Uuid {
    let finished = matches!(status, "succeeded" | "failed" | "cancelled");
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO crm_sync.runs (pipeline, batch_id, trigger, status, retry_of, admitted_at, created_at,
                                    started_at, finished_at)
         VALUES ($1, 'b_' || md5(random()::text), CASE WHEN $4::uuid IS NULL THEN 'api' ELSE 'retry' END,
                 $2, $4, $3, $3, CASE WHEN $2 <> 'queued' THEN $3 END,
                 CASE WHEN $5 THEN $3 + interval '2 minutes' END)
         RETURNING id",
    )
    .bind(pipeline)
    .bind(status)
    .bind(created_at)
    .bind(retry_of)
    .bind(finished)
    .fetch_one(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO crm_sync.steps (run_id, pipeline, name, position, status, max_attempts, timeout_ms, run_at)
         SELECT $1, p.name, p.steps[k], k,
                CASE WHEN k > 1 AND $2 IN ('queued', 'running') THEN 'pending' ELSE $2 END, 3, 60000, $3
           FROM crm_sync.pipelines p, generate_series(1, cardinality(p.steps)) k WHERE p.name = $4",
    )
    .bind(id)
    .bind(status)
    .bind(created_at)
    .bind(pipeline)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// Adds a failure notification for `run` whose delivery is in `state`.
async fn add_notification(pool: &Db, run: Uuid, state: &str) {
    sqlx::query(
        "WITH e AS (INSERT INTO crm_sync.notification_events (kind, run_id, pipeline, batch_id)
                    SELECT 'run_failed', id, pipeline, batch_id FROM crm_sync.runs WHERE id = $1
                    RETURNING id)
         INSERT INTO crm_sync.notification_deliveries (event_id, webhook, state) SELECT e.id, 'ops', $2 FROM e",
    )
    .bind(run)
    .bind(state)
    .execute(pool)
    .await
    .unwrap();
}

async fn db_now(pool: &Db) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn table_rows(pool: &Db) -> Vec<i64> {
    let mut rows = Vec::new();
    for t in TABLES {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM crm_sync.{t}"
        )))
        .fetch_one(pool)
        .await
        .unwrap();
        rows.push(n);
    }
    rows
}

/// Bytes of the history tables (with TOAST) and of their indexes.
async fn history_bytes(pool: &Db) -> (i64, i64) {
    sqlx::query_as(
        "SELECT sum(pg_table_size(('crm_sync.' || t)::regclass))::bigint,
                sum(pg_indexes_size(('crm_sync.' || t)::regclass))::bigint
           FROM unnest(ARRAY['runs', 'steps', 'attempts', 'notification_events',
                             'notification_deliveries']) t",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn exists(pool: &Db, run: Uuid) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM crm_sync.runs WHERE id = $1)")
        .bind(run)
        .fetch_one(pool)
        .await
        .unwrap()
}

// ----------------------------------------------------------------------------------------------------
// The rules, written a second time in Rust: which runs must remain after pruning until nothing is due.

#[derive(Debug, Clone, sqlx::FromRow)]
struct Run {
    id: Uuid,
    pipeline: String,
    status: String,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    retry_of: Option<Uuid>,
    pending_delivery: bool,
}

async fn all_runs(pool: &Db) -> Vec<Run> {
    sqlx::query_as(
        "SELECT r.id, r.pipeline, r.status, r.created_at, r.finished_at, r.retry_of,
                EXISTS (SELECT 1 FROM crm_sync.notification_events e
                          JOIN crm_sync.notification_deliveries d ON d.event_id = e.id
                         WHERE e.run_id = r.id AND d.state = 'pending') AS pending_delivery
           FROM crm_sync.runs r",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The runs the policy keeps at `as_of`: delete every due run, again, until none is due (a retry
/// becomes due once the run it retried is gone).
fn expected_survivors(runs: &[Run], p: &RetentionConfig, as_of: DateTime<Utc>) -> HashSet<Uuid> {
    let mut alive: HashMap<Uuid, &Run> = runs.iter().map(|r| (r.id, r)).collect();
    loop {
        let facts = Facts::of(&alive);
        let doomed: Vec<Uuid> = alive
            .values()
            .filter(|r| is_due(r, &alive, &facts, p, as_of))
            .map(|r| r.id)
            .collect();
        if doomed.is_empty() {
            return alive.into_keys().collect();
        }
        for id in doomed {
            alive.remove(&id);
        }
    }
}

/// What the rules look at besides the run itself, computed over the runs still there.
#[derive(Default)]
struct Facts {
    /// Per run: how many newer runs (created_at, id) its pipeline has in the same status.
    newer_same_status: HashMap<Uuid, usize>,
    newest_created: HashMap<String, DateTime<Utc>>,
    /// The pipeline's last failed or succeeded run by (finished_at, id).
    last_finished: HashMap<String, Uuid>,
    /// The finish time of the pipeline's last success.
    last_success: HashMap<String, Option<DateTime<Utc>>>,
    /// Runs with a queued or running retry.
    retried_now: HashSet<Uuid>,
}

impl Facts {
    fn of(alive: &HashMap<Uuid, &Run>) -> Facts {
        let mut f = Facts::default();
        let mut groups: HashMap<(&str, &str), Vec<&Run>> = HashMap::new();
        for r in alive.values() {
            groups.entry((&r.pipeline, &r.status)).or_default().push(r);
            let newest = f
                .newest_created
                .entry(r.pipeline.clone())
                .or_insert(r.created_at);
            *newest = (*newest).max(r.created_at);
            if r.status == "succeeded" {
                let last = f
                    .last_success
                    .entry(r.pipeline.clone())
                    .or_insert(r.finished_at);
                *last = (*last).max(r.finished_at);
            }
            if matches!(r.status.as_str(), "queued" | "running")
                && let Some(parent) = r.retry_of
            {
                f.retried_now.insert(parent);
            }
        }
        let mut finished: HashMap<&str, (DateTime<Utc>, Uuid)> = HashMap::new();
        for r in alive.values() {
            if let (Some(t), "failed" | "succeeded") = (r.finished_at, r.status.as_str()) {
                let best = finished.entry(&r.pipeline).or_insert((t, r.id));
                *best = (*best).max((t, r.id));
            }
        }
        f.last_finished = finished
            .into_iter()
            .map(|(p, (_, id))| (p.to_string(), id))
            .collect();
        for (_, mut runs) in groups {
            runs.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.id)));
            for (newer, r) in runs.iter().enumerate() {
                f.newer_same_status.insert(r.id, newer);
            }
        }
        f
    }
}

fn is_due(
    r: &Run,
    alive: &HashMap<Uuid, &Run>,
    f: &Facts,
    p: &RetentionConfig,
    as_of: DateTime<Utc>,
) -> bool {
    let age = match r.status.as_str() {
        "succeeded" => p.succeeded,
        "failed" => p.failed,
        "cancelled" => p.cancelled,
        _ => return false,
    };
    let Some(age) = age else { return false };
    let cutoff = as_of - chrono::Duration::from_std(age).unwrap();
    let old = r.created_at < cutoff && r.finished_at.unwrap_or(r.created_at) < cutoff;
    old && f.newer_same_status[&r.id] >= p.keep_last as usize
        && r.created_at < f.newest_created[&r.pipeline]
        && f.last_finished.get(&r.pipeline) != Some(&r.id)
        && !(r.status == "succeeded" && f.last_success[&r.pipeline] == r.finished_at)
        && !r.retry_of.is_some_and(|parent| alive.contains_key(&parent))
        && !f.retried_now.contains(&r.id)
        && !r.pending_delivery
}

fn print_report(label: &str, before: &[i64], after: &[i64], report: &PruneReport) {
    println!("{label}");
    println!("  {:<24} {:>9} {:>9}", "table", "before", "after");
    for (i, t) in TABLES.iter().enumerate() {
        println!("  {:<24} {:>9} {:>9}", t, before[i], after[i]);
    }
    println!(
        "  {} batches (runs per batch: {:?}) in {:.2}s",
        report.batches,
        report.batch_runs,
        report.elapsed.as_secs_f64()
    );
}

// ----------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_year_of_runs_is_pruned_in_batches_to_exactly_what_the_policy_keeps() {
    let db = TestDb::new().await;
    db.config(PIPELINES).await;
    add_webhook(&db.pool).await;
    let now = db_now(&db.pool).await;
    // Runs sit 15 minutes off the hour and finish 2 minutes later, so no finish time is within
    // 13 minutes of a cutoff (now - 30/60/180 days) however long the test takes to get to pruning.
    let day = chrono::Duration::days(1);
    let at = |days_ago: i32| now - day * days_ago - chrono::Duration::minutes(15);
    let start = at(365);
    let mut inserted = 0;
    // hourly: a year, every 50th run failed, every 97th cancelled.
    inserted += insert_history(&db.pool, "hourly", start, now, "1 hour", 50, 97).await;
    // daily: a year, one failure a week, one cancel every 30 days.
    inserted += insert_history(&db.pool, "daily", start, now, "1 day", 7, 30).await;
    // broken: succeeded until 200 days ago, failed every day since.
    inserted += insert_history(&db.pool, "broken", start, at(200), "1 day", 1000, 1000).await;
    inserted += insert_history(&db.pool, "broken", at(200), now, "1 day", 1, 1000).await;
    // retired: ran for 115 days until 250 days ago (every 10th failed, every 7th cancelled).
    inserted += insert_history(&db.pool, "retired", start, at(250), "1 day", 10, 7).await;

    // Runs no age may delete, and a chain of retries.
    let stuck_queued = insert_run(&db.pool, "daily", "queued", now - day * 300, None).await;
    let running = insert_run(&db.pool, "hourly", "running", now - day * 2, None).await;
    let retried_failure = insert_run(&db.pool, "daily", "failed", now - day * 250, None).await;
    let active_retry = insert_run(
        &db.pool,
        "daily",
        "queued",
        now - day * 2,
        Some(retried_failure),
    )
    .await;
    let unsent = insert_run(&db.pool, "hourly", "failed", now - day * 250, None).await;
    add_notification(&db.pool, unsent, "pending").await;
    let chain_start = insert_run(&db.pool, "daily", "failed", now - day * 240, None).await;
    let chain_middle = insert_run(
        &db.pool,
        "daily",
        "failed",
        now - day * 239,
        Some(chain_start),
    )
    .await;
    let chain_end = insert_run(
        &db.pool,
        "daily",
        "succeeded",
        now - day * 238,
        Some(chain_middle),
    )
    .await;
    let kept_failure = insert_run(&db.pool, "daily", "failed", now - day * 100, None).await;
    let retry_of_kept = insert_run(
        &db.pool,
        "daily",
        "succeeded",
        now - day * 99,
        Some(kept_failure),
    )
    .await;
    // Reruns of old cancelled hourly runs: rerun_of goes NULL when the run they re-ran is deleted.
    sqlx::query(
        "UPDATE crm_sync.runs r SET rerun_of = c.id
           FROM crm_sync.runs c
          WHERE c.pipeline = 'hourly' AND c.status = 'cancelled' AND r.pipeline = 'hourly'
            AND r.created_at = c.created_at + interval '1 hour'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let reruns_before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM crm_sync.runs WHERE rerun_of IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(reruns_before > 80, "{reruns_before}");

    let policy = policy(5, 500);
    let runs = all_runs(&db.pool).await;
    assert_eq!(runs.len() as i64, inserted + 10);
    let expected = expected_survivors(&runs, &policy, now);
    let steps_before: HashMap<Uuid, i64> = step_counts(&db.pool).await;
    let before = table_rows(&db.pool).await;

    let report = retention::prune(&db.pool, &policy, Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap();
    let after = table_rows(&db.pool).await;
    print_report(
        &format!(
            "a year of history of 4 pipelines ({inserted} runs), keep_last 5, batches of 500:"
        ),
        &before,
        &after,
        &report,
    );
    for d in &report.deleted {
        println!(
            "  deleted {:<8} {:<9} {:>5} runs {:>6} steps {:>6} attempts {:>4} events",
            d.pipeline, d.status, d.runs, d.steps, d.attempts, d.notification_events
        );
    }

    // Exactly the runs the rules keep, each with all of its steps.
    let remaining: HashSet<Uuid> = all_runs(&db.pool).await.iter().map(|r| r.id).collect();
    let wrongly_deleted: Vec<_> = expected.difference(&remaining).collect();
    let wrongly_kept: Vec<_> = remaining.difference(&expected).collect();
    assert!(
        wrongly_deleted.is_empty() && wrongly_kept.is_empty(),
        "deleted but should be kept: {wrongly_deleted:?}\nkept but due: {wrongly_kept:?}"
    );
    let steps_after = step_counts(&db.pool).await;
    for id in &remaining {
        assert_eq!(
            steps_after.get(id),
            steps_before.get(id),
            "steps of run {id}"
        );
    }

    // The report adds up to what left the tables, batch by batch within batch_size.
    let totals = report.totals();
    let reported = [
        totals.runs,
        totals.steps,
        totals.attempts,
        totals.notification_events,
        totals.notification_deliveries,
    ];
    for (i, t) in TABLES.iter().enumerate() {
        assert_eq!(before[i] - after[i], reported[i], "rows deleted from {t}");
    }
    assert!(report.batch_runs.iter().all(|&n| n <= 500), "{report:?}");
    assert_eq!(report.batch_runs.last(), Some(&0));
    let deleted = before[0] - after[0];
    assert!(
        report.batch_runs.iter().filter(|&&n| n > 0).count() as i64 >= (deleted + 499) / 500,
        "{} batches for {deleted} runs",
        report.batches
    );
    assert!(deleted > 7000, "{deleted}");
    let orphans: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM crm_sync.attempts a
                  WHERE NOT EXISTS (SELECT 1 FROM crm_sync.runs r WHERE r.id = a.run_id))
              + (SELECT count(*) FROM crm_sync.notification_deliveries d
                  WHERE NOT EXISTS (SELECT 1 FROM crm_sync.notification_events e WHERE e.id = d.event_id))",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0);

    // What each pipeline keeps, by hand: 30 days of hourly successes (60 of cancels, 180 of failures).
    let kept = kept_by_status(&db.pool).await;
    println!("  kept: {kept:?}");
    let hourly_ok = kept[&("hourly".to_string(), "succeeded".to_string())];
    assert!((30 * 24 - 30..=30 * 24).contains(&hourly_ok), "{hourly_ok}");
    let oldest_ok: DateTime<Utc> = sqlx::query_scalar(
        "SELECT min(finished_at) FROM crm_sync.runs WHERE pipeline = 'hourly' AND status = 'succeeded'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        oldest_ok > now - day * 30 && oldest_ok < now - day * 29,
        "{oldest_ok}"
    );
    let oldest_failure: DateTime<Utc> = sqlx::query_scalar(
        "SELECT min(finished_at) FROM crm_sync.runs
          WHERE pipeline = 'hourly' AND status = 'failed' AND id <> $1",
    )
    .bind(unsent)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(oldest_failure > now - day * 180 && oldest_failure < now - day * 177);
    // retired stopped 250 days ago: only keep_last of each status is left.
    for status in ["succeeded", "failed", "cancelled"] {
        assert_eq!(
            kept[&("retired".to_string(), status.to_string())],
            5,
            "{status}"
        );
    }
    // broken: its last success (201 days ago) is what health reports.
    let broken_last_success: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT last_success_at FROM crm_sync.pipeline_health WHERE pipeline = 'broken'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let broken_last_success = broken_last_success.expect("broken keeps its last success");
    assert!(broken_last_success < now - day * 201 && broken_last_success > now - day * 202);

    for (name, run, kept) in [
        ("a queued run 300 days old", stuck_queued, true),
        ("a running run", running, true),
        ("a failed run whose retry is queued", retried_failure, true),
        ("the queued retry", active_retry, true),
        (
            "a failed run with a notification not yet sent",
            unsent,
            true,
        ),
        ("a failed run of 240 days ago", chain_start, false),
        ("its failed retry", chain_middle, false),
        (
            "the retry of that retry, succeeded 238 days ago",
            chain_end,
            false,
        ),
        ("a failed run of 100 days ago", kept_failure, true),
        ("its retry, succeeded 99 days ago", retry_of_kept, true),
    ] {
        assert_eq!(exists(&db.pool, run).await, kept, "{name}");
    }
    let dangling: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM crm_sync.runs r
          WHERE (r.rerun_of IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm_sync.runs o WHERE o.id = r.rerun_of))
             OR (r.retry_of IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm_sync.runs o WHERE o.id = r.retry_of))",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(dangling, 0);

    // Nothing more is due: another pass deletes nothing.
    let again = retention::prune(&db.pool, &policy, Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((again.runs(), again.batches), (0, 1));
}

async fn step_counts(pool: &Db) -> HashMap<Uuid, i64> {
    sqlx::query_as::<_, (Uuid, i64)>("SELECT run_id, count(*) FROM crm_sync.steps GROUP BY run_id")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

async fn kept_by_status(pool: &Db) -> HashMap<(String, String), i64> {
    sqlx::query_as::<_, (String, String, i64)>(
        "SELECT pipeline, status, count(*) FROM crm_sync.runs GROUP BY pipeline, status",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(p, s, n)| ((p, s), n))
    .collect()
}

/// keep_last = 0 leaves only the protections: each one is checked on its own run.
#[tokio::test]
async fn protected_runs_survive_any_age_and_the_rest_goes_with_its_outbox() {
    let db = TestDb::new().await;
    db.config(PIPELINES).await;
    add_webhook(&db.pool).await;
    let now = db_now(&db.pool).await;
    let ago = |days: i64| now - chrono::Duration::days(days);

    // "broken": one success 400 days ago, then only failures, the newest 200 days ago.
    let last_success = insert_run(&db.pool, "broken", "succeeded", ago(400), None).await;
    let old_failure = insert_run(&db.pool, "broken", "failed", ago(300), None).await;
    let newest_failure = insert_run(&db.pool, "broken", "failed", ago(200), None).await;
    // "daily": its newest run is a cancelled one, 90 days old.
    let daily_older = insert_run(&db.pool, "daily", "succeeded", ago(110), None).await;
    let daily_success = insert_run(&db.pool, "daily", "succeeded", ago(100), None).await;
    let daily_cancelled_old = insert_run(&db.pool, "daily", "cancelled", ago(95), None).await;
    let daily_newest = insert_run(&db.pool, "daily", "cancelled", ago(90), None).await;
    // "retired": its newest run is cancelled, its last finished one failed, both old.
    let retired_older = insert_run(&db.pool, "retired", "failed", ago(260), None).await;
    let retired_finished = insert_run(&db.pool, "retired", "failed", ago(250), None).await;
    let retired_newest = insert_run(&db.pool, "retired", "cancelled", ago(240), None).await;
    // "hourly": queued and running runs from long ago, a failure whose retry is running, a failure
    // whose notification is still pending and ones whose notification was delivered or given up.
    let queued = insert_run(&db.pool, "hourly", "queued", ago(300), None).await;
    let running = insert_run(&db.pool, "hourly", "running", ago(299), None).await;
    let retried = insert_run(&db.pool, "hourly", "failed", ago(298), None).await;
    let retry = insert_run(&db.pool, "hourly", "running", ago(1), Some(retried)).await;
    let pending = insert_run(&db.pool, "hourly", "failed", ago(297), None).await;
    add_notification(&db.pool, pending, "pending").await;
    let delivered = insert_run(&db.pool, "hourly", "failed", ago(296), None).await;
    add_notification(&db.pool, delivered, "delivered").await;
    let failed_after_retry = insert_run(&db.pool, "hourly", "failed", ago(295), None).await;
    add_notification(&db.pool, failed_after_retry, "failed").await;
    let rerun = insert_run(&db.pool, "hourly", "succeeded", ago(0), None).await;
    sqlx::query("UPDATE crm_sync.runs SET rerun_of = $1 WHERE id = $2")
        .bind(delivered)
        .bind(rerun)
        .execute(&db.pool)
        .await
        .unwrap();

    let policy = policy(0, 2);
    let runs = all_runs(&db.pool).await;
    let expected = expected_survivors(&runs, &policy, now);
    let report = retention::prune(&db.pool, &policy, Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap();
    println!("keep_last 0, batches of 2: {:?}", report.batch_runs);

    for (name, run, kept) in [
        ("broken's last success, 400 days old", last_success, true),
        ("broken's failure of 300 days ago", old_failure, false),
        (
            "broken's newest run (its last finished, failed)",
            newest_failure,
            true,
        ),
        ("daily's last success, 100 days old", daily_success, true),
        ("daily's older success", daily_older, false),
        (
            "daily's cancelled run of 95 days ago",
            daily_cancelled_old,
            false,
        ),
        (
            "daily's newest run (cancelled, 90 days old)",
            daily_newest,
            true,
        ),
        ("retired's failure of 260 days ago", retired_older, false),
        (
            "retired's last finished run (failed, 250 days ago)",
            retired_finished,
            true,
        ),
        (
            "retired's newest run (cancelled, 240 days ago)",
            retired_newest,
            true,
        ),
        ("a queued run", queued, true),
        ("a running run", running, true),
        ("a failed run whose retry is running", retried, true),
        ("the running retry", retry, true),
        ("a failure with its notification pending", pending, true),
        (
            "a failure with its notification delivered",
            delivered,
            false,
        ),
        (
            "a failure with its notification given up",
            failed_after_retry,
            false,
        ),
        ("a rerun", rerun, true),
    ] {
        assert_eq!(exists(&db.pool, run).await, kept, "{name}");
        assert_eq!(
            expected.contains(&run),
            kept,
            "the model disagrees on: {name}"
        );
    }
    assert_eq!(report.runs(), 6);
    assert!(
        report.batch_runs.iter().all(|&n| n <= 2),
        "{:?}",
        report.batch_runs
    );
    assert!(report.batches >= 4, "{:?}", report.batch_runs);
    let totals = report.totals();
    assert_eq!(
        (totals.notification_events, totals.notification_deliveries),
        (2, 2)
    );
    let rerun_of: Option<Uuid> =
        sqlx::query_scalar("SELECT rerun_of FROM crm_sync.runs WHERE id = $1")
            .bind(rerun)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(rerun_of, None, "rerun_of of a deleted run is cleared");
    let outbox: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM crm_sync.notification_events WHERE run_id = ANY ($1)",
    )
    .bind(vec![delivered, failed_after_retry])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(outbox, 0);

    // Health reads the same as before pruning.
    let health: Vec<(String, Option<DateTime<Utc>>, Option<String>)> = sqlx::query_as(
        "SELECT pipeline, last_success_at, last_status FROM crm_sync.pipeline_health
          WHERE pipeline IN ('broken', 'daily') ORDER BY pipeline",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(health[0].1.map(|t| t < ago(399)), Some(true));
    assert_eq!(health[0].2.as_deref(), Some("failed"));
    assert!(health[1].1.is_some_and(|t| t < ago(99) && t > ago(101)));
    assert_eq!(health[1].2.as_deref(), Some("cancelled"));

    // The SQL entry point refuses nonsense.
    for bad in [
        "SELECT * FROM crm_sync.prune_history(batch_size => 0)",
        "SELECT * FROM crm_sync.prune_history(keep_last => -1)",
        "SELECT * FROM crm_sync.prune_history(failed => interval '-1 day')",
    ] {
        let err = sqlx::query(bad).execute(&db.pool).await.unwrap_err();
        assert!(err.to_string().contains("prune_history"), "{bad}: {err}");
    }
    // NULL ages keep a status forever.
    let none: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM crm_sync.prune_history(succeeded => NULL, failed => NULL,
                                                       cancelled => NULL, keep_last => 0)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(none, 0);
}

/// Twelve months of a busy deployment, pruned at the end of each month (as_of moves with it) and
/// vacuumed as autovacuum would: the rows kept and the bytes on disk stop growing once the oldest
/// kept status (failures, 180 days) is reached.
#[tokio::test]
async fn history_tables_stay_bounded_over_a_simulated_year() {
    let db = TestDb::new().await;
    db.config(PIPELINES).await;
    add_webhook(&db.pool).await;
    let base = db_now(&db.pool).await - chrono::Duration::days(400);
    let month = chrono::Duration::days(30);
    let started = Instant::now();
    let mut inserted = 0;
    let mut rows_by_month = Vec::new();
    let mut bytes_by_month = Vec::new();
    println!(
        "{:>5} {:>9} {:>8} {:>8} {:>9} {:>7} {:>8} {:>10} {:>10}",
        "month", "inserted", "runs", "steps", "attempts", "events", "batches", "table B", "index B"
    );
    for m in 0..12 {
        let (from, to) = (base + month * m, base + month * (m + 1));
        inserted += insert_history(&db.pool, "hourly", from, to, "15 minutes", 40, 97).await;
        inserted += insert_history(&db.pool, "daily", from, to, "1 hour", 20, 50).await;
        inserted += insert_history(&db.pool, "broken", from, to, "1 day", 3, 1000).await;
        let mut batches = 0;
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(runs), 0)::bigint FROM crm_sync.prune_history(
                     succeeded => interval '30 days', failed => interval '180 days',
                     cancelled => interval '30 days', keep_last => 100, batch_size => 1000, as_of => $1)",
            )
            .bind(to)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            assert!(n <= 1000);
            batches += 1;
            if n == 0 {
                break;
            }
        }
        sqlx::query("VACUUM (ANALYZE) crm_sync.runs, crm_sync.steps, crm_sync.attempts, crm_sync.notification_events, crm_sync.notification_deliveries")
            .execute(&db.pool)
            .await
            .unwrap();
        let rows = table_rows(&db.pool).await;
        let bytes = history_bytes(&db.pool).await;
        println!(
            "{:>5} {:>9} {:>8} {:>8} {:>9} {:>7} {:>8} {:>10} {:>10}",
            m + 1,
            inserted,
            rows[0],
            rows[1],
            rows[2],
            rows[3],
            batches,
            bytes.0,
            bytes.1
        );
        rows_by_month.push(rows);
        bytes_by_month.push(bytes);
    }
    println!("simulated year in {:.1}s", started.elapsed().as_secs_f64());

    // Steady state from month 7 on (failures are kept 180 days): runs kept vary by a few percent
    // (months have different numbers of 20th/40th runs) and the tables' bytes stop growing: VACUUM
    // frees what pruning deleted and the next month's rows reuse it.
    let steady = &rows_by_month[6..];
    let (lo, hi) = (
        steady.iter().map(|r| r[0]).min().unwrap(),
        steady.iter().map(|r| r[0]).max().unwrap(),
    );
    assert!(hi as f64 <= lo as f64 * 1.05, "runs kept drift: {lo}..{hi}");
    assert!(
        (hi as f64) < inserted as f64 / 4.0,
        "{hi} runs kept of {inserted} inserted"
    );
    let (table_7, index_7) = bytes_by_month[6];
    let (table_12, index_12) = bytes_by_month[11];
    assert!(
        table_12 as f64 <= table_7 as f64 * 1.10,
        "tables grew from {table_7} to {table_12} bytes in steady state"
    );
    // B-tree pages are reused only once empty, and the failures kept 180 days leave a few entries on
    // pages otherwise emptied: indexes settle later (about month 15 in a 20-month run, at 2.2 times
    // the tables) and a PostgreSQL transaction open anywhere on the server delays the reuse.
    assert!(
        index_12 as f64 <= index_7 as f64 * 1.5,
        "indexes grew from {index_7} to {index_12} bytes in steady state"
    );
}

/// Two pruners at once (two `serve` replicas) share the work: every run is deleted once, the result is
/// the same as one pruner's.
#[tokio::test]
async fn two_pruners_at_once_delete_each_run_once() {
    let db = TestDb::new().await;
    db.config(PIPELINES).await;
    add_webhook(&db.pool).await;
    let now = db_now(&db.pool).await;
    let start = now - chrono::Duration::days(365) - chrono::Duration::minutes(15);
    insert_history(&db.pool, "hourly", start, now, "1 hour", 25, 50).await;
    insert_history(&db.pool, "daily", start, now, "1 day", 5, 50).await;
    let policy = policy(10, 200);
    let expected = expected_survivors(&all_runs(&db.pool).await, &policy, now);
    let before = table_rows(&db.pool).await;
    let stop = CancellationToken::new();
    let (a, b) = tokio::join!(
        retention::prune(&db.pool, &policy, Duration::ZERO, &stop),
        retention::prune(&db.pool, &policy, Duration::ZERO, &stop)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let after = table_rows(&db.pool).await;
    println!(
        "two pruners: {} + {} runs in {} + {} batches",
        a.runs(),
        b.runs(),
        a.batches,
        b.batches
    );
    assert!(a.runs() > 0 && b.runs() > 0, "both did part of the work");
    assert_eq!(a.runs() + b.runs(), before[0] - after[0]);
    assert_eq!(a.totals().steps + b.totals().steps, before[1] - after[1]);
    let remaining: HashSet<Uuid> = all_runs(&db.pool).await.iter().map(|r| r.id).collect();
    assert_eq!(remaining, expected);
}

/// The rows of worker processes gone silent for more than a week are forgotten by each pass (a dry
/// run counts them and keeps them); live and recently stopped workers stay.
#[tokio::test]
async fn worker_rows_silent_for_a_week_are_forgotten() {
    let db = TestDb::new().await;
    db.config(PIPELINES).await;
    sqlx::query(
        "INSERT INTO crm_sync.workers (id, hostname, pid, concurrency, started_at, heartbeat_at, stopped_at) VALUES
           ('crashed-long-ago', 'h', 1, 1, now() - interval '30 days', now() - interval '8 days', NULL),
           ('stopped-long-ago', 'h', 2, 1, now() - interval '30 days', now() - interval '9 days', now() - interval '9 days'),
           ('stopped-yesterday', 'h', 3, 1, now() - interval '2 days', now() - interval '1 day', now() - interval '1 day'),
           ('alive', 'h', 4, 1, now() - interval '30 days', now(), NULL)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let ids = || async {
        sqlx::query_scalar::<_, String>("SELECT id FROM crm_sync.workers ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap()
    };
    let policy = policy(10, 200);
    let dry = retention::dry_run(&db.pool, &policy).await.unwrap();
    assert_eq!(dry.workers, 2);
    assert_eq!(ids().await.len(), 4, "a dry run deletes nothing");
    let report = retention::prune(&db.pool, &policy, Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.workers, 2);
    assert_eq!(ids().await, vec!["alive", "stopped-yesterday"]);
}

// ----------------------------------------------------------------------------------------------------
// The binary: `prune --dry-run`, `prune`, `serve` pruning in the background, `serve --no-retention`,
// `check-config`.

const SERVED: &str = r#"
[retention]
keep_last = 3
interval = "1s"
batch_size = 10

[[pipelines]]
name = "noop"
source = { kind = "noop" }
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn count_runs(pool: &Db) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM crm_sync.runs")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_ready(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/readyz")).await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "serve did not get ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `crm-sync serve` child, killed if the test fails before it is stopped.
struct Served(Option<std::process::Child>);

impl Served {
    /// SIGTERM, then a clean exit is expected.
    fn stop(mut self) {
        let mut child = self.0.take().unwrap();
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn prune_dry_run_prune_and_serve_in_the_background() {
    let db = TestDb::new().await;
    db.config(SERVED).await;
    add_webhook(&db.pool).await;
    let dir = tempfile::tempdir().unwrap();
    let now = db_now(&db.pool).await;
    let day = chrono::Duration::days(1);
    // 30 daily successes 70 to 40 days old, one fresh: keep_last 3 keeps the fresh one and 2 old.
    insert_history(
        &db.pool,
        "noop",
        now - day * 70,
        now - day * 40,
        "1 day",
        1000,
        1000,
    )
    .await;
    insert_run(&db.pool, "noop", "succeeded", now, None).await;
    assert_eq!(count_runs(&db.pool).await, 31);

    let port = free_port();
    let config = write_config(
        dir.path(),
        &db,
        &format!("{SERVED}\n[server]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let (code, out, err) = run_binary(&config, &["prune", "--dry-run"]);
    println!("{out}");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("would delete 28 runs, 28 steps, 28 attempts"),
        "{out}"
    );
    assert!(out.contains("in 3 batch(es)"), "{out}");
    assert!(out.contains("dry run: nothing was deleted"), "{out}");
    assert!(
        out.contains("retention: succeeded 30d, failed 180d, cancelled 30d; keep_last 3"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("noop") && l.contains("succeeded") && l.contains(" 28 ")),
        "{out}"
    );
    assert_eq!(count_runs(&db.pool).await, 31);

    // serve --no-retention leaves the history alone.
    let base = format!("http://127.0.0.1:{port}");
    let quiet = Served(Some(spawn_binary(
        &config,
        &["serve", "--no-workers", "--no-scheduler", "--no-retention"],
        &dir.path().join("quiet.log"),
    )));
    wait_ready(&base).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count_runs(&db.pool).await, 31);
    quiet.stop();

    // serve prunes in the background, at start and every interval.
    let log = dir.path().join("serve.log");
    let serve = Served(Some(spawn_binary(
        &config,
        &["serve", "--no-workers", "--no-scheduler"],
        &log,
    )));
    common::wait_until(
        &db.pool,
        "SELECT count(*) = 3 FROM crm_sync.runs",
        Duration::from_secs(20),
    )
    .await;
    // New old history is found at the next interval.
    insert_history(
        &db.pool,
        "noop",
        now - day * 400,
        now - day * 390,
        "1 day",
        1,
        1000,
    )
    .await;
    common::wait_until(
        &db.pool,
        "SELECT count(*) = 6 FROM crm_sync.runs",
        Duration::from_secs(20),
    )
    .await;
    serve.stop();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("retention started"), "{log}");
    assert!(log.contains("old run history pruned"), "{log}");

    // By hand, once more: nothing left, except what `prune` itself now deletes.
    insert_history(
        &db.pool,
        "noop",
        now - day * 100,
        now - day * 95,
        "1 day",
        1000,
        1000,
    )
    .await;
    let (code, out, err) = run_binary(&config, &["prune"]);
    println!("{out}");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted 5 runs"), "{out}");
    assert!(!out.contains("dry run"), "{out}");
    let (code, out, _) = run_binary(&config, &["prune"]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to prune"), "{out}");
}

#[test]
fn check_config_reports_retention_mistakes_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crm-sync.toml");
    std::fs::write(
        &path,
        "[[pipelines]]\nname = \"a\"\nsource = { kind = \"noop\" }\n\n[retention]\nsucceeded = \"10m\"\nfailed = \"never\"\nbatch_size = 0\ninterval = \"0s\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::binary())
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for expected in [
        "crm-sync.toml:5: retention.succeeded: must be at least 1h",
        "crm-sync.toml:5: retention.batch_size: must be between 1 and 100000",
        "crm-sync.toml:5: retention.interval: must be at least 1s",
        "3 problems found",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    std::fs::write(&path, "[retention]\nfailed = \"half a year\"\nkeep = 3\n").unwrap();
    let out = std::process::Command::new(common::binary())
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("crm-sync.toml:1: retention.failed: invalid age"),
        "{err}"
    );
    std::fs::write(
        &path,
        "[retention]\nfailed = \"never\"\nsucceeded = \"14d\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::binary())
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        shown.contains("retention: succeeded 14d, failed never, cancelled 30d; keep_last 100"),
        "{shown}"
    );
}
