//! The queue's SQL functions given bad arguments (unknown pipelines, NULLs, wrong JSON, wrong types,
//! huge values and arrays), as psql, pg_cron or a broken worker could pass them: each call must fail
//! with its SQLSTATE and a message naming the problem, and leave every `crm_sync` table as it was.

mod common;

use std::time::{Duration, Instant};

use common::{TestDb, wait_for_run};
use uuid::Uuid;

const PIPELINES: &str = r#"
[[pipelines]]
name = "noop"
source = { kind = "noop" }

[[pipelines]]
name = "two"
max_concurrent_runs = 0
source = { kind = "noop", steps = 2 }
"#;

/// Every row of every `crm_sync` table as text, sorted: equal before and after a refused call.
async fn snapshot(db: &TestDb) -> String {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
          WHERE table_schema = 'crm_sync' AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut out = String::new();
    for table in tables {
        let rows: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '') FROM crm_sync.{table} t"
        )))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        out.push_str(&format!("== {table}\n{rows}\n"));
    }
    out
}

/// One bad call: the SQL, the SQLSTATE it must raise, and words its message must contain.
struct Case {
    sql: String,
    state: &'static str,
    message: &'static str,
}

fn case(sql: impl Into<String>, state: &'static str, message: &'static str) -> Case {
    Case {
        sql: sql.into(),
        state,
        message,
    }
}

#[tokio::test]
async fn bad_arguments_get_a_clear_error_and_change_nothing() {
    let db = TestDb::new().await;
    db.config(PIPELINES).await;

    // Some state for the functions to get wrong: a succeeded run, a failed run, a run whose first step
    // is claimed by worker w1 (id and fence known), a queued run.
    let enqueue = |p: &str| format!("SELECT crm_sync.enqueue_run('{p}')");
    let one = |sql: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Uuid>(sqlx::AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let succeeded = one(enqueue("noop")).await;
    let (id, fence): (i64, i64) =
        sqlx::query_as("SELECT step_id, fence FROM crm_sync.claim_steps('w0', 10, 60000)")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    sqlx::query("SELECT crm_sync.complete_steps('w0', ARRAY[$1::bigint], ARRAY[$2::bigint], ARRAY['{}'::jsonb])")
        .bind(id)
        .bind(fence)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        wait_for_run(&db.pool, succeeded, Duration::from_secs(5)).await,
        "succeeded"
    );
    let failed = one(enqueue("two")).await;
    let (fid, ffence): (i64, i64) =
        sqlx::query_as("SELECT step_id, fence FROM crm_sync.claim_steps('w0', 10, 60000)")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    sqlx::query("SELECT crm_sync.fail_step('w0', $1, $2, 'boom', false, NULL)")
        .bind(fid)
        .bind(ffence)
        .execute(&db.pool)
        .await
        .unwrap();
    let running = one(enqueue("two")).await;
    let (id, fence): (i64, i64) =
        sqlx::query_as("SELECT step_id, fence FROM crm_sync.claim_steps('w1', 10, 60000)")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let queued = one(enqueue("two")).await;

    let nil = Uuid::nil();
    let big_array = "(SELECT array_agg(g::bigint) FROM generate_series(1, 1000000) g)";
    let ids = format!("ARRAY[{id}]::bigint[]");
    let fences = format!("ARRAY[{fence}]::bigint[]");
    let cases = vec![
        // enqueue_run: the SQL entry point.
        case(enqueue("nope"), "P0002", "unknown pipeline \"nope\""),
        case(
            "SELECT crm_sync.enqueue_run(NULL)",
            "22004",
            "crm_sync.enqueue_run: pipeline name must not be null",
        ),
        case(
            "SELECT crm_sync.enqueue_run('')",
            "22004",
            "pipeline name must not be null or empty",
        ),
        case(
            "SELECT crm_sync.enqueue_run(repeat('p', 1000000))",
            "P0002",
            "unknown pipeline \"pppp",
        ),
        case(
            "SELECT crm_sync.enqueue_run('noop; DROP TABLE crm_sync.runs; --')",
            "P0002",
            "unknown pipeline \"noop; DROP",
        ),
        case(
            "SELECT crm_sync.enqueue_run('../../etc/passwd')",
            "P0002",
            "unknown pipeline \"../../etc/passwd\"",
        ),
        case(
            "SELECT crm_sync.enqueue_run('noop', '[1, 2]')",
            "22023",
            "params must be a JSON object, got array",
        ),
        case(
            "SELECT crm_sync.enqueue_run('noop', '\"text\"')",
            "22023",
            "params must be a JSON object, got string",
        ),
        case(
            "SELECT crm_sync.enqueue_run('noop', 'null')",
            "22023",
            "params must be a JSON object, got null",
        ),
        case(
            "SELECT crm_sync.enqueue_run('noop', '{bad')",
            "22P02",
            "invalid input syntax for type json",
        ),
        case(
            r#"SELECT crm_sync.enqueue_run('noop', '{"a": "\u0000"}')"#,
            "22P05",
            "unsupported Unicode escape sequence",
        ),
        case(
            r#"SELECT crm_sync.enqueue_run('noop', '{"a": 1e400}')"#,
            "22023",
            "params.a is a number too large",
        ),
        case(
            r#"SELECT crm_sync.enqueue_run('noop', '{"a": [0, -1.7976931348623157e308]}')"#,
            "22023",
            "params.a[1] is a number too large",
        ),
        case(
            "SELECT crm_sync.enqueue_run('noop', ('{\"a\": ' || repeat('[', 200) || repeat(']', 200) || '}')::jsonb)",
            "22023",
            "params nest deeper than 64 levels",
        ),
        case(
            "SELECT crm_sync.enqueue_run('noop', jsonb_build_object('big', repeat('x', 10000000)))",
            "22023",
            "more than the 65536 allowed",
        ),
        case(
            "SELECT crm_sync.enqueue_run('noop', '{}', repeat('k', 201))",
            "22023",
            "idempotency key must be 1-200 characters, got 201",
        ),
        case(
            "SELECT crm_sync.enqueue_run('noop', '{}', '')",
            "22023",
            "idempotency key must be 1-200 characters, got 0",
        ),
        case(
            "SELECT crm_sync.enqueue_run(42)",
            "42883",
            "function crm_sync.enqueue_run(integer) does not exist",
        ),
        case(
            "SELECT crm_sync.enqueue_run('noop', 42)",
            "42883",
            "does not exist",
        ),
        // enqueue_runs: bulk.
        case(
            "SELECT crm_sync.enqueue_runs('nope', 1, 'sql')",
            "P0002",
            "unknown pipeline \"nope\"",
        ),
        case(
            "SELECT crm_sync.enqueue_runs(NULL, 1, 'sql')",
            "22004",
            "crm_sync.enqueue_runs: pipeline name must not be null",
        ),
        case(
            "SELECT crm_sync.enqueue_runs('noop', NULL, 'sql')",
            "22004",
            "count must not be null",
        ),
        case(
            "SELECT crm_sync.enqueue_runs('noop', 0, 'sql')",
            "22023",
            "count must be between 1 and 10000, got 0",
        ),
        case(
            "SELECT crm_sync.enqueue_runs('noop', -5, 'sql')",
            "22023",
            "got -5",
        ),
        case(
            "SELECT crm_sync.enqueue_runs('noop', 10001, 'sql')",
            "22023",
            "got 10001 (call it again for more)",
        ),
        case(
            "SELECT crm_sync.enqueue_runs('noop', 1, 'bogus')",
            "22023",
            "trigger 'bogus' is not one of",
        ),
        case(
            "SELECT crm_sync.enqueue_runs('noop', 1, NULL)",
            "22004",
            "trigger must not be null",
        ),
        case(
            "SELECT crm_sync.enqueue_runs('noop', 'many', 'sql')",
            "22P02",
            "invalid input syntax for type integer",
        ),
        // cancel_run, retry_run, rerun_run: operator actions.
        case(
            "SELECT crm_sync.cancel_run(NULL)",
            "22004",
            "crm_sync.cancel_run: run id must not be null",
        ),
        case(
            "SELECT crm_sync.cancel_run('not-a-uuid')",
            "22P02",
            "invalid input syntax for type uuid",
        ),
        case(
            format!("SELECT crm_sync.cancel_run('{nil}')"),
            "P0002",
            "not found",
        ),
        case(
            format!("SELECT crm_sync.cancel_run('{succeeded}')"),
            "55000",
            "is already succeeded and cannot be cancelled",
        ),
        case(
            "SELECT crm_sync.retry_run(NULL)",
            "22004",
            "crm_sync.retry_run: run id must not be null",
        ),
        case(
            format!("SELECT crm_sync.retry_run('{nil}')"),
            "P0002",
            "not found",
        ),
        case(
            format!("SELECT crm_sync.retry_run('{succeeded}')"),
            "55000",
            "only failed or cancelled runs can be retried",
        ),
        case(
            format!("SELECT crm_sync.retry_run('{running}')"),
            "55000",
            "only failed or cancelled runs can be retried",
        ),
        case(
            "SELECT crm_sync.rerun_run(NULL, 'sql')",
            "22004",
            "crm_sync.rerun_run: run id must not be null",
        ),
        case(
            format!("SELECT crm_sync.rerun_run('{nil}', 'sql')"),
            "P0002",
            "not found",
        ),
        case(
            format!("SELECT crm_sync.rerun_run('{succeeded}', 'bogus')"),
            "22023",
            "trigger 'bogus' is not one of",
        ),
        case(
            format!("SELECT crm_sync.rerun_run('{succeeded}', NULL)"),
            "22004",
            "trigger must not be null",
        ),
        // claim_steps: a worker's claim.
        case(
            "SELECT * FROM crm_sync.claim_steps(NULL, 10, 1000)",
            "22004",
            "crm_sync.claim_steps: worker id must not be null",
        ),
        case(
            "SELECT * FROM crm_sync.claim_steps('', 10, 1000)",
            "22023",
            "worker id must be 1-200 characters, got 0",
        ),
        case(
            "SELECT * FROM crm_sync.claim_steps(repeat('w', 100000), 10, 1000)",
            "22023",
            "worker id must be 1-200 characters, got 100000",
        ),
        case(
            "SELECT * FROM crm_sync.claim_steps('w2', NULL, 1000)",
            "22004",
            "limit must not be null",
        ),
        case(
            "SELECT * FROM crm_sync.claim_steps('w2', 0, 1000)",
            "22023",
            "limit must be between 1 and 10000, got 0",
        ),
        case(
            "SELECT * FROM crm_sync.claim_steps('w2', -1, 1000)",
            "22023",
            "got -1",
        ),
        case(
            "SELECT * FROM crm_sync.claim_steps('w2', 2147483647, 1000)",
            "22023",
            "got 2147483647",
        ),
        case(
            "SELECT * FROM crm_sync.claim_steps('w2', 10, NULL)",
            "22004",
            "lease_ms must not be null",
        ),
        case(
            "SELECT * FROM crm_sync.claim_steps('w2', 10, -1000)",
            "22023",
            "lease_ms must be between 1 and 86400000",
        ),
        case(
            "SELECT * FROM crm_sync.claim_steps('w2', 10, 9223372036854775807)",
            "22023",
            "lease_ms must be between",
        ),
        case(
            "SELECT * FROM crm_sync.claim_steps('w2', 10.5, 1000)",
            "42883",
            "does not exist",
        ),
        // complete_steps: fenced completion.
        case(
            format!("SELECT crm_sync.complete_steps(NULL, {ids}, {fences}, ARRAY['{{}}'::jsonb])"),
            "22004",
            "crm_sync.complete_steps: worker id must not be null",
        ),
        case(
            "SELECT crm_sync.complete_steps('w1', NULL, NULL, NULL)",
            "22004",
            "outputs must not be null",
        ),
        case(
            format!("SELECT crm_sync.complete_steps('w1', NULL, {fences}, ARRAY['{{}}'::jsonb])"),
            "22004",
            "step ids and fences must not be null",
        ),
        case(
            format!("SELECT crm_sync.complete_steps('w1', {ids}, '{{}}', ARRAY['{{}}'::jsonb])"),
            "22023",
            "must have the same length, got 1 ids and 0 fences",
        ),
        case(
            format!(
                "SELECT crm_sync.complete_steps('w1', {ids}, {fences}, ARRAY['{{}}'::jsonb, '{{}}'::jsonb])"
            ),
            "22023",
            "one element per step id, got 1 ids and 2 outputs",
        ),
        case(
            format!(
                "SELECT crm_sync.complete_steps('w1', ARRAY[NULL::bigint], {fences}, ARRAY['{{}}'::jsonb])"
            ),
            "22004",
            "must not contain nulls",
        ),
        case(
            format!(
                "SELECT crm_sync.complete_steps('w1', {big_array}, {big_array}, (SELECT array_agg('{{}}'::jsonb) FROM generate_series(1, 1000000)))"
            ),
            "22023",
            "at most 10000 steps per call, got 1000000",
        ),
        case(
            format!(
                "SELECT crm_sync.complete_steps('w1', {ids}, {fences}, ARRAY['not json']::jsonb[])"
            ),
            "22P02",
            "invalid input syntax for type json",
        ),
        // fail_step.
        case(
            format!("SELECT crm_sync.fail_step(NULL, {id}, {fence}, 'e', true, NULL)"),
            "22004",
            "crm_sync.fail_step: worker id must not be null",
        ),
        case(
            format!("SELECT crm_sync.fail_step('w1', NULL, {fence}, 'e', true, NULL)"),
            "22004",
            "step id and fence must not be null",
        ),
        case(
            format!("SELECT crm_sync.fail_step('w1', {id}, {fence}, 'e', NULL, NULL)"),
            "22004",
            "retryable must be true or false",
        ),
        case(
            format!("SELECT crm_sync.fail_step('w1', {id}, {fence}, 'e', 'maybe', NULL)"),
            "22P02",
            "invalid input syntax for type boolean",
        ),
        // heartbeat and release_steps.
        case(
            format!("SELECT crm_sync.heartbeat(NULL, {ids}, {fences}, 1000)"),
            "22004",
            "crm_sync.heartbeat: worker id must not be null",
        ),
        case(
            format!("SELECT crm_sync.heartbeat('w1', {ids}, '{{}}', 1000)"),
            "22023",
            "must have the same length",
        ),
        case(
            format!("SELECT crm_sync.heartbeat('w1', {ids}, {fences}, -5)"),
            "22023",
            "lease_ms must be between 1 and 86400000 (24 h), got -5",
        ),
        case(
            format!("SELECT crm_sync.heartbeat('w1', {ids}, {fences}, NULL)"),
            "22004",
            "lease_ms must not be null",
        ),
        case(
            format!("SELECT crm_sync.heartbeat('w1', {big_array}, {big_array}, 1000)"),
            "22023",
            "at most 10000 steps per call",
        ),
        case(
            format!("SELECT crm_sync.release_steps(NULL, {ids}, {fences})"),
            "22004",
            "crm_sync.release_steps: worker id must not be null",
        ),
        case(
            "SELECT crm_sync.release_steps('w1', NULL, NULL)",
            "22004",
            "must not be null (pass empty arrays for none)",
        ),
        case(
            format!("SELECT crm_sync.release_steps('w1', {ids}, ARRAY[1, 2]::bigint[])"),
            "22023",
            "got 1 ids and 2 fences",
        ),
        case(
            format!("SELECT crm_sync.release_steps('w1', {big_array}, {big_array})"),
            "22023",
            "at most 10000 steps per call",
        ),
    ];

    let mut before = snapshot(&db).await;
    let started = Instant::now();
    let mut by_state = std::collections::BTreeMap::<&str, usize>::new();
    let mut slowest = (Duration::ZERO, String::new());
    // Every case runs; the mismatches are reported together.
    let mut problems = Vec::new();
    for c in &cases {
        let shown: String = c.sql.chars().take(200).collect();
        let t = Instant::now();
        let result = sqlx::query(sqlx::AssertSqlSafe(c.sql.clone()))
            .execute(&db.pool)
            .await;
        let elapsed = t.elapsed();
        if elapsed > slowest.0 {
            slowest = (elapsed, c.sql.chars().take(80).collect());
        }
        match result {
            Ok(done) => problems.push(format!(
                "{shown}\n  accepted ({} rows affected)",
                done.rows_affected()
            )),
            Err(err) => {
                let Some(db_err) = err.as_database_error() else {
                    problems.push(format!("{shown}\n  not a database error: {err}"));
                    continue;
                };
                let (state, message) = (db_err.code().unwrap_or_default(), db_err.message());
                if state != c.state || !message.contains(c.message) || message.len() > 400 {
                    problems.push(format!(
                        "{shown}\n  want {} {:?}\n  got  {state} {:?}",
                        c.state,
                        c.message,
                        message.chars().take(300).collect::<String>()
                    ));
                }
                *by_state.entry(c.state).or_default() += 1;
            }
        }
        let after = snapshot(&db).await;
        if after != before {
            problems.push(format!("{shown}\n  changed the crm_sync tables"));
            before = after;
        }
    }
    eprintln!(
        "{} bad calls in {:.2?}, {} problems; by SQLSTATE: {by_state:?}; slowest {:.0?} ({})",
        cases.len(),
        started.elapsed(),
        problems.len(),
        slowest.0,
        slowest.1
    );
    assert!(
        problems.is_empty(),
        "{} of {} bad calls were not refused cleanly:\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n")
    );

    // The checks refuse bad calls only: the same functions with good arguments still do their work.
    let done: Vec<i64> = sqlx::query_scalar(
        "SELECT crm_sync.complete_steps('w1', ARRAY[$1::bigint], ARRAY[$2::bigint], ARRAY['{}'::jsonb])",
    )
    .bind(id)
    .bind(fence)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(done, vec![id]);
    let held: Vec<i64> = sqlx::query_scalar("SELECT crm_sync.heartbeat('w1', '{}', '{}', 1000)")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(held.is_empty());
    let retried = one(format!("SELECT crm_sync.retry_run('{failed}')")).await;
    let rerun = one(format!("SELECT crm_sync.rerun_run('{succeeded}', 'sql')")).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT crm_sync.cancel_run('{queued}')"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let bulk: Vec<Uuid> = sqlx::query_scalar("SELECT crm_sync.enqueue_runs('noop', 3, 'sql')")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(bulk.len(), 3);
    let with_params = one(
        r#"SELECT crm_sync.enqueue_run('noop', '{"sleep_ms": 1, "nested": {"a": [1, 2.5e300, "x"]}}', 'key-1')"#
            .into(),
    )
    .await;
    let claimed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM crm_sync.claim_steps('w2', 100, 1000)")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(claimed >= 3, "claimed {claimed}");
    for run in [retried, rerun, with_params, running] {
        let status: String = sqlx::query_scalar("SELECT status FROM crm_sync.runs WHERE id = $1")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(
            ["queued", "running"].contains(&status.as_str()),
            "{run}: {status}"
        );
    }
}

/// Params that passed the checks are read back by the worker's claim (serde_json): the limits are
/// exactly what keeps a run from breaking every claim.
#[tokio::test]
async fn params_at_the_limits_are_read_back_by_a_worker() {
    let db = TestDb::new().await;
    let config = db.config(PIPELINES).await;
    let deep = format!("{}1{}", "[".repeat(62), "]".repeat(62));
    let edge = format!(
        r#"{{"big": 9.99e307, "small": -1e-400, "deep": {deep}, "text": "{}"}}"#,
        "x".repeat(60_000)
    );
    let run: Uuid = sqlx::query_scalar("SELECT crm_sync.enqueue_run('noop', $1::jsonb)")
        .bind(&edge)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let worker = common::RunningWorker::start(&db, &config).await;
    assert_eq!(
        wait_for_run(&db.pool, run, Duration::from_secs(20)).await,
        "succeeded"
    );
    worker.stop().await;
    let detail = crm_sync::history::run_detail(&db.pool, run)
        .await
        .unwrap()
        .unwrap();
    let shown = serde_json::to_value(&detail).unwrap();
    assert_eq!(
        shown["params"]["big"].as_f64(),
        Some(9.99e307),
        "{}",
        shown["params"]["big"]
    );
}
