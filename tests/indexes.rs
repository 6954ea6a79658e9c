//! The hot queries against a history of a million runs: each is EXPLAINed (ANALYZE, JSON) and its plan
//! walked, so that a Seq Scan of runs, steps or attempts, or an index walked through rows of other
//! pipelines, fails the test; each is timed and the figures printed. Statements inside PL/pgSQL
//! (the recovery trigger, pruning) are timed with generic plans forced, which is what PostgreSQL may
//! pick by itself after a session's fifth call.

mod common;

use std::time::Instant;

use common::TestDb;
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, Postgres};
use uuid::Uuid;

const RUNS: i64 = 1_000_000;
const PIPELINES: i64 = 20;
/// More rows than this removed by filters on runs, steps or attempts in one plan means an index was
/// walked through rows it did not need (e.g. every pipeline's newest runs to find a rare one's).
const MAX_FILTERED: i64 = 10_000;

type Conn = PoolConnection<Postgres>;

async fn exec(conn: &mut Conn, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut **conn)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"));
}

/// The definitions of runs', steps' and attempts' indexes and constraints (and of the foreign keys
/// pointing at them), to drop them around the bulk load and to check they come back the same.
async fn schema_objects(
    conn: &mut Conn,
) -> (Vec<(String, String)>, Vec<(String, String, String, String)>) {
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
           FROM pg_index i
          WHERE i.indrelid IN ('crm_sync.runs'::regclass, 'crm_sync.steps'::regclass, 'crm_sync.attempts'::regclass)
            AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
          ORDER BY 1",
    )
    .fetch_all(&mut **conn)
    .await
    .unwrap();
    let constraints: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT conrelid::regclass::text, conname::text, contype::text, pg_get_constraintdef(oid)
           FROM pg_constraint
          WHERE (conrelid IN ('crm_sync.runs'::regclass, 'crm_sync.steps'::regclass, 'crm_sync.attempts'::regclass)
                 AND contype IN ('p', 'u', 'f'))
             OR (confrelid IN ('crm_sync.runs'::regclass, 'crm_sync.steps'::regclass) AND contype = 'f')
          ORDER BY 1, 2",
    )
    .fetch_all(&mut **conn)
    .await
    .unwrap();
    (indexes, constraints)
}

/// A year of history: a million runs of 20 pipelines (every 50th failed, every 97th cancelled), two
/// steps each with one attempt per step that ran; a pipeline run by hand 50 times 330 days ago; a
/// retired one; and the queue's live work. Indexes and constraints are dropped during the load and
/// built again from their own definitions (several times faster than maintaining them row by row).
async fn load(conn: &mut Conn) {
    let started = Instant::now();
    exec(
        conn,
        "SET maintenance_work_mem = '128MB'; SET synchronous_commit = off;
         INSERT INTO crm_sync.pipelines (name, steps, max_attempts, step_timeout_ms, max_concurrent_runs, freshness_sla_s, enabled)
         SELECT 'pipeline_' || lpad(i::text, 2, '0'), ARRAY['extract', 'load'], 3, 60000, NULL::integer, 86400::bigint, true
           FROM generate_series(1, 20) i
         UNION ALL SELECT 'manual', ARRAY['extract'], 3, 60000, NULL, NULL, true
         UNION ALL SELECT 'retired', ARRAY['extract'], 3, 60000, NULL, NULL, false;",
    )
    .await;
    let (indexes, constraints) = schema_objects(conn).await;
    for (table, name, _, _) in constraints.iter().filter(|c| c.2 == "f") {
        exec(conn, &format!("ALTER TABLE {table} DROP CONSTRAINT {name}")).await;
    }
    for (table, name, _, _) in constraints.iter().filter(|c| c.2 != "f") {
        exec(conn, &format!("ALTER TABLE {table} DROP CONSTRAINT {name}")).await;
    }
    for (name, _) in &indexes {
        exec(conn, &format!("DROP INDEX {name}")).await;
    }
    let mut figures = Vec::new();
    let mut timed = async |label: &str, conn: &mut Conn, sql: &str| {
        let t = Instant::now();
        exec(conn, sql).await;
        figures.push(format!("{label} {:.1}s", t.elapsed().as_secs_f64()));
    };
    timed(
        "runs",
        conn,
        &format!(
            "INSERT INTO crm_sync.runs (pipeline, batch_id, trigger, status, admitted_at, created_at, started_at,
                                        finished_at, error)
             SELECT 'pipeline_' || lpad((1 + n % {PIPELINES})::text, 2, '0'), 'b' || n, 'schedule',
                    CASE WHEN n % 50 = 7 THEN 'failed' WHEN n % 97 = 3 THEN 'cancelled' ELSE 'succeeded' END,
                    t, t, t, t + interval '2 minutes',
                    CASE WHEN n % 50 = 7 THEN 'step load failed: HTTP 503' END
               FROM (SELECT n, now() - interval '365 days' + n * (interval '365 days' / {RUNS}) AS t
                       FROM generate_series(1, {RUNS}) n) g
             UNION ALL
             SELECT 'manual', 'm' || n, 'cli', 'succeeded', t, t, t, t + interval '1 minute', NULL
               FROM (SELECT n, now() - interval '330 days' + n * interval '1 hour' AS t
                       FROM generate_series(1, 50) n) g
             UNION ALL
             SELECT 'retired', 'r' || n, 'schedule', CASE WHEN n % 10 = 0 THEN 'failed' ELSE 'succeeded' END,
                    t, t, t, t + interval '1 minute', NULL
               FROM (SELECT n, now() - interval '310 days' + n * interval '30 minutes' AS t
                       FROM generate_series(1, 480) n) g"
        ),
    )
    .await;
    timed(
        "steps",
        conn,
        "INSERT INTO crm_sync.steps (run_id, pipeline, name, position, status, attempts, max_attempts, timeout_ms,
                                     run_at, fence, started_at, finished_at, output, error)
         SELECT r.id, r.pipeline, p.steps[k], k,
                CASE WHEN r.status = 'succeeded' OR k < cardinality(p.steps) THEN 'succeeded' ELSE r.status END,
                CASE WHEN r.status = 'cancelled' AND k = cardinality(p.steps) THEN 0 ELSE 1 END, 3, 60000,
                r.created_at, 1, r.started_at, r.finished_at,
                jsonb_build_object('rows', 2700, 'uri', 'gs://backups/' || r.batch_id || '/' || k),
                CASE WHEN r.status = 'failed' AND k = cardinality(p.steps) THEN 'HTTP 503' END
           FROM crm_sync.runs r JOIN crm_sync.pipelines p ON p.name = r.pipeline,
                generate_series(1, cardinality(p.steps)) k",
    )
    .await;
    timed(
        "attempts",
        conn,
        "INSERT INTO crm_sync.attempts (step_id, run_id, attempt, fence, worker_id, started_at, finished_at,
                                        outcome, error)
         SELECT s.id, s.run_id, 1, 1, 'worker-1', s.started_at, s.finished_at, s.status, s.error
           FROM crm_sync.steps s WHERE s.status IN ('succeeded', 'failed')",
    )
    .await;
    let t = Instant::now();
    for (table, name, _, def) in constraints.iter().filter(|c| c.2 != "f") {
        exec(
            conn,
            &format!("ALTER TABLE {table} ADD CONSTRAINT {name} {def}"),
        )
        .await;
    }
    for (table, name, _, def) in constraints.iter().filter(|c| c.2 == "f") {
        exec(
            conn,
            &format!("ALTER TABLE {table} ADD CONSTRAINT {name} {def}"),
        )
        .await;
    }
    for (_, def) in &indexes {
        exec(conn, def).await;
    }
    figures.push(format!("indexes {:.1}s", t.elapsed().as_secs_f64()));
    assert_eq!(
        schema_objects(conn).await,
        (indexes, constraints),
        "the indexes and constraints came back as they were"
    );

    // The queue's live work: runs waiting for a slot, queued steps due now and in backoff, running ones.
    exec(
        conn,
        "WITH r AS (
            INSERT INTO crm_sync.runs (pipeline, batch_id, trigger, status, admitted_at, created_at, started_at)
            SELECT 'pipeline_' || lpad((1 + n % 20)::text, 2, '0'), 'live' || n, 'api',
                   CASE WHEN n <= 20 THEN 'running' ELSE 'queued' END,
                   CASE WHEN n <= 60 THEN now() END, now() - n * interval '1 second',
                   CASE WHEN n <= 20 THEN now() END
              FROM generate_series(1, 300) n
            RETURNING id, pipeline, status, admitted_at)
         INSERT INTO crm_sync.steps (run_id, pipeline, name, position, status, max_attempts, timeout_ms, run_at,
                                     lease_owner, lease_expires_at)
         SELECT r.id, r.pipeline, 'extract', 1,
                CASE WHEN r.status = 'running' THEN 'running' WHEN r.admitted_at IS NOT NULL THEN 'queued'
                     ELSE 'pending' END, 3, 60000,
                now() + CASE WHEN random() < 0.3 THEN interval '1 minute' ELSE interval '0' END,
                CASE WHEN r.status = 'running' THEN 'worker-1' END,
                CASE WHEN r.status = 'running' THEN now() + interval '30 seconds' END
           FROM r;
         ANALYZE crm_sync.runs, crm_sync.steps, crm_sync.attempts;",
    )
    .await;
    println!(
        "loaded {} runs in {:.1}s ({})",
        RUNS + 830,
        started.elapsed().as_secs_f64(),
        figures.join(", ")
    );
}

/// One node of a plan that reads runs, steps or attempts.
#[derive(Debug)]
struct Scan {
    node: String,
    relation: String,
    index: Option<String>,
    removed: i64,
}

fn scans(plan: &Value, out: &mut Vec<Scan>) {
    let relation = plan["Relation Name"].as_str().unwrap_or_default();
    if plan["Node Type"] == "Bitmap Index Scan" {
        // Which index a bitmap read (it names no relation; its Bitmap Heap Scan parent does).
        out.push(Scan {
            node: "Bitmap Index Scan".into(),
            relation: String::new(),
            index: plan["Index Name"].as_str().map(str::to_string),
            removed: 0,
        });
    } else if ["runs", "steps", "attempts"].contains(&relation) {
        let loops = plan["Actual Loops"].as_i64().unwrap_or(1);
        let removed = plan["Rows Removed by Filter"].as_i64().unwrap_or(0)
            + plan["Rows Removed by Index Recheck"].as_i64().unwrap_or(0);
        out.push(Scan {
            node: plan["Node Type"].as_str().unwrap_or_default().to_string(),
            relation: relation.to_string(),
            index: plan["Index Name"].as_str().map(str::to_string),
            removed: removed * loops,
        });
    }
    for child in plan["Plans"].as_array().into_iter().flatten() {
        scans(child, out);
    }
}

/// The plan as an indented outline: node, relation or index, rows, rows filtered out.
fn outline(plan: &Value, depth: usize, out: &mut String) {
    let target = plan["Index Name"]
        .as_str()
        .or(plan["Relation Name"].as_str())
        .unwrap_or_default();
    out.push_str(&format!(
        "{:indent$}{} {target} rows={} loops={} filtered={}\n",
        "",
        plan["Node Type"].as_str().unwrap_or_default(),
        plan["Actual Rows"],
        plan["Actual Loops"],
        plan["Rows Removed by Filter"].as_i64().unwrap_or(0),
        indent = depth * 2
    ));
    for child in plan["Plans"].as_array().into_iter().flatten() {
        outline(child, depth + 1, out);
    }
}

/// Checks one EXPLAIN (ANALYZE, FORMAT JSON) result and prints its figures; a problem is added to
/// `problems` (all are reported at the end).
fn check(name: &str, explained: &Value, problems: &mut Vec<String>) {
    let root = &explained[0];
    let mut found = Vec::new();
    scans(&root["Plan"], &mut found);
    let ms = root["Execution Time"].as_f64().unwrap_or(f64::NAN);
    let used: Vec<String> = found
        .iter()
        .map(|s| match &s.index {
            Some(i) => format!("{} {i}", s.node),
            None => format!("{} {}", s.node, s.relation),
        })
        .collect();
    let removed: i64 = found.iter().map(|s| s.removed).sum();
    println!(
        "  {name:<46} {ms:>9.3} ms  filtered {removed:>6}  {}",
        used.join(", ")
    );
    let mut plan = String::new();
    outline(&root["Plan"], 2, &mut plan);
    if found.iter().any(|s| s.node == "Seq Scan") {
        problems.push(format!(
            "{name}: sequential scan of a history table\n{plan}"
        ));
    }
    if removed > MAX_FILTERED {
        problems.push(format!(
            "{name}: {removed} rows read and thrown away\n{plan}"
        ));
    }
}

async fn explain(conn: &mut Conn, sql: &str) -> Value {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"
    )))
    .fetch_one(&mut **conn)
    .await
    .unwrap_or_else(|e| panic!("{e}\n{sql}"))
}

async fn explain_list_runs(
    conn: &mut Conn,
    pipeline: Option<&str>,
    status: Option<&str>,
    before: Option<chrono::DateTime<chrono::Utc>>,
) -> Value {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}",
        crm_sync::history::list_runs_sql()
    )))
    .bind(pipeline)
    .bind(status)
    .bind(before)
    .bind(50_i64)
    .fetch_one(&mut **conn)
    .await
    .unwrap()
}

/// A function's SQL body with its parameters written in (claim_steps_unchecked, the body behind
/// claim_steps' argument checks, and queue_metrics are LANGUAGE sql).
async fn function_body(conn: &mut Conn, signature: &str, args: &[(&str, &str)]) -> String {
    let mut body: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT prosrc FROM pg_proc WHERE oid = '{signature}'::regprocedure"
    )))
    .fetch_one(&mut **conn)
    .await
    .unwrap();
    for (name, value) in args {
        body = body.replace(name, value);
    }
    body.trim().trim_end_matches(';').to_string()
}

async fn timed<F: std::future::Future>(f: F) -> (F::Output, f64) {
    let t = Instant::now();
    let out = f.await;
    (out, t.elapsed().as_secs_f64() * 1000.0)
}

#[tokio::test]
async fn hot_queries_use_indexes_at_a_million_runs() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    load(&mut conn).await;
    println!("plans and execution times at {RUNS} runs (custom plans unless said generic):");

    // The worker's claim, the whole statement (it locks and updates: rolled back).
    let claim = function_body(
        &mut conn,
        "crm_sync.claim_steps_unchecked(text,integer,bigint,text[],text[])",
        &[
            ("p_worker", "'index-test'"),
            ("p_limit", "100"),
            ("p_lease_ms", "30000"),
            // A worker that serves every pipeline, as the claim filters them.
            ("p_pipelines", "ARRAY(SELECT name FROM crm_sync.pipelines)"),
            ("p_fingerprints", "(NULL::text[])"),
        ],
    )
    .await;
    exec(&mut conn, "BEGIN").await;
    let claimed = explain(&mut conn, &claim).await;
    exec(&mut conn, "ROLLBACK").await;
    let mut problems = Vec::new();
    check("claim_steps (100 due steps)", &claimed, &mut problems);

    let metrics = function_body(&mut conn, "crm_sync.queue_metrics()", &[]).await;
    check(
        "queue_metrics()",
        &explain(&mut conn, &metrics).await,
        &mut problems,
    );

    // /health/pipelines, /metrics and /api/pipelines read the pipeline_health view.
    for (name, sql) in [
        (
            "/health/pipelines",
            "SELECT pipeline, enabled, last_success_at, last_success_batch_id, seconds_since_success, last_run_id,
                    last_status, last_finished_at, freshness_sla_s, stale, served, unserved_steps, definitions
               FROM crm_sync.pipeline_health WHERE enabled AND left(pipeline, 2) <> '__' ORDER BY pipeline",
        ),
        (
            "/metrics freshness (every pipeline)",
            "SELECT pipeline, enabled, extract(epoch FROM last_success_at)::double precision AS last_success,
                    freshness_sla_s, stale, definitions, unserved_steps
               FROM crm_sync.pipeline_health WHERE pipeline NOT LIKE '\\_\\_%'",
        ),
        (
            "/api/pipelines and crm-sync pipelines",
            "SELECT h.pipeline AS name, h.enabled, h.disabled_by, h.fingerprint, p.schedule, p.timezone, p.steps,
                    p.max_attempts, p.max_concurrent_runs, p.freshness_sla_s, h.registered_by, h.definitions,
                    h.served, h.unserved_steps, h.queued_runs, h.running_runs, h.last_run_id, h.last_status,
                    h.last_success_at, h.seconds_since_success, coalesce(h.stale, false) AS stale
               FROM crm_sync.pipeline_health h JOIN crm_sync.pipelines p ON p.name = h.pipeline
              WHERE left(h.pipeline, 2) <> '__' ORDER BY h.pipeline",
        ),
    ] {
        check(name, &explain(&mut conn, sql).await, &mut problems);
    }

    // The runs list (crm-sync runs, GET /api/runs, the console), filtered every way it can be.
    let page: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT now() - interval '100 days'")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let lists: [(&str, Option<&str>, Option<&str>, Option<_>); 8] = [
        ("runs: newest", None, None, None),
        ("runs: a page 100 days back", None, None, Some(page)),
        ("runs: pipeline_07", Some("pipeline_07"), None, None),
        (
            "runs: manual (rare, 330 days old)",
            Some("manual"),
            None,
            None,
        ),
        ("runs: failed", None, Some("failed"), None),
        ("runs: cancelled", None, Some("cancelled"), None),
        ("runs: queued", None, Some("queued"), None),
        (
            "runs: pipeline_07 succeeded",
            Some("pipeline_07"),
            Some("succeeded"),
            None,
        ),
    ];
    for (name, pipeline, status, before) in lists {
        let explained = explain_list_runs(&mut conn, pipeline, status, before).await;
        check(name, &explained, &mut problems);
    }

    // The event streams' change feed, every 250 ms per process.
    let events = crm_sync::history::CHANGED_SINCE_SQL.replace("$1", "now() - interval '3 seconds'");
    check(
        "event streams' change feed (changed runs)",
        &explain(&mut conn, &events).await,
        &mut problems,
    );

    // GET /api/runs/{id}: its steps and attempts.
    let run: Uuid = sqlx::query_scalar("SELECT id FROM crm_sync.runs WHERE batch_id = 'b500000'")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    for (name, sql) in [
        (
            "run detail: steps",
            format!("SELECT * FROM crm_sync.steps WHERE run_id = '{run}' ORDER BY position"),
        ),
        (
            "run detail: attempts",
            format!(
                "SELECT * FROM crm_sync.attempts WHERE run_id = '{run}' ORDER BY step_id, fence"
            ),
        ),
    ] {
        check(name, &explain(&mut conn, &sql).await, &mut problems);
    }

    // Inside PL/pgSQL, with generic plans: a run finishing (the recovery trigger reads the
    // pipeline's previous finished run), and pruning. Rolled back.
    exec(&mut conn, "SET plan_cache_mode = force_generic_plan").await;
    let mut tx = conn.begin().await.unwrap();
    let mut finish_ms = Vec::new();
    for pipeline in [
        "pipeline_01",
        "pipeline_02",
        "manual",
        "pipeline_03",
        "manual",
    ] {
        let run: Uuid = sqlx::query_scalar("SELECT crm_sync.enqueue_run($1)")
            .bind(pipeline)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        loop {
            let claimed: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT step_id, fence FROM crm_sync.claim_steps('index-test', 1, 30000)",
            )
            .fetch_all(&mut *tx)
            .await
            .unwrap();
            let Some(&(step, fence)) = claimed.first() else {
                panic!("run {run} has no step to claim")
            };
            let (_, ms) = timed(
                sqlx::query(
                    "SELECT crm_sync.complete_steps('index-test', $1, $2, ARRAY['{}'::jsonb])",
                )
                .bind(vec![step])
                .bind(vec![fence])
                .execute(&mut *tx),
            )
            .await;
            let status: String =
                sqlx::query_scalar("SELECT status FROM crm_sync.runs WHERE id = $1")
                    .bind(run)
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
            if status == "succeeded" {
                finish_ms.push((pipeline, ms));
                break;
            }
        }
    }
    tx.rollback().await.unwrap();
    for (pipeline, ms) in &finish_ms {
        println!(
            "  {:<46} {ms:>9.3} ms  (generic plans)",
            format!("last complete_steps of a {pipeline} run")
        );
    }
    for (pipeline, ms) in &finish_ms {
        if *ms > 250.0 {
            problems.push(format!("finishing a {pipeline} run took {ms:.0} ms"));
        }
    }

    let mut tx = conn.begin().await.unwrap();
    let mut prune_ms = Vec::new();
    for (label, sql) in [
        (
            "prune_history: nothing due",
            "SELECT count(*) FROM crm_sync.prune_history(succeeded => interval '400 days', failed => NULL, cancelled => interval '400 days')",
        ),
        (
            "prune_history: nothing due",
            "SELECT count(*) FROM crm_sync.prune_history(succeeded => interval '400 days', failed => NULL, cancelled => interval '400 days')",
        ),
        (
            "prune_history: one batch of 1000",
            "SELECT count(*) FROM crm_sync.prune_history()",
        ),
        (
            "prune_history: one batch of 1000",
            "SELECT count(*) FROM crm_sync.prune_history()",
        ),
        (
            "prune_history: one batch of 1000",
            "SELECT count(*) FROM crm_sync.prune_history()",
        ),
    ] {
        let (_, ms) = timed(sqlx::query(sql).execute(&mut *tx)).await;
        println!("  {label:<46} {ms:>9.3} ms  (generic plans)");
        prune_ms.push((label, ms));
    }
    tx.rollback().await.unwrap();
    for (label, ms) in prune_ms {
        if ms > 1200.0 {
            problems.push(format!("{label} took {ms:.0} ms"));
        }
    }
    exec(&mut conn, "RESET plan_cache_mode").await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
