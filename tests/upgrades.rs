//! Upgrades: a database of the previous release (migrations 20261124000001..03 only, applied by sqlx's
//! own migrator from those files), filled through that release's SQL functions, is migrated by the
//! current `crm-sync migrate` (the real binary). Every row must still be there as it was, and the new
//! functions must work on the old rows. Migrating twice changes nothing; two `migrate` processes at
//! once both succeed.
//!
//! And from a database the previous release's real binary left (tests/fixtures/upgrade: a `pg_dump`
//! holding a failed EZ Focus run with its checkpoints' files), the new binary migrates it and `retry`
//! resumes that run at its failed load without extracting again.

mod common;

use crm_sync::db::Db;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{TestDb, run_binary, write_config};
use serde_json::{Value, json};
use sqlx::migrate::Migrator;
use uuid::Uuid;

/// The migrations of the previous release.
const PREVIOUS_RELEASE: [&str; 3] = [
    "20261124000001_queue_and_history.sql",
    "20261124000002_scheduler.sql",
    "20261124000003_completion_clock.sql",
];

/// The tables of the previous release (their rows must survive the upgrade).
const OLD_TABLES: [&str; 6] = [
    "pipelines",
    "runs",
    "steps",
    "attempts",
    "workers",
    "schedule_state",
];

/// Applies the previous release's migrations with sqlx's migrator, as that release's binary did.
async fn migrate_to_previous_release(pool: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for file in PREVIOUS_RELEASE {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    let old = Migrator::new(dir.path()).await.unwrap();
    assert_eq!(old.iter().count(), 3);
    old.run(pool.pool())
        .await
        .expect("the previous release's migrations apply");
}

async fn step_of(pool: &Db, worker: &str) -> (i64, i64, Uuid) {
    sqlx::query_as("SELECT step_id, fence, run_id FROM crm_sync.claim_steps($1, 1, 600000)")
        .bind(worker)
        .fetch_one(pool)
        .await
        .expect("a step to claim")
}

async fn complete(pool: &Db, worker: &str, step: i64, fence: i64, output: Value) {
    let accepted: Vec<i64> =
        sqlx::query_scalar("SELECT crm_sync.complete_steps($1, ARRAY[$2], ARRAY[$3], ARRAY[$4])")
            .bind(worker)
            .bind(step)
            .bind(fence)
            .bind(output)
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(accepted, vec![step]);
}

async fn enqueue(pool: &Db, pipeline: &str, params: Value, key: Option<&str>) -> Uuid {
    sqlx::query_scalar("SELECT crm_sync.enqueue_run($1, $2, $3)")
        .bind(pipeline)
        .bind(params)
        .bind(key)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn status(pool: &Db, run: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM crm_sync.runs WHERE id = $1")
        .bind(run)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The runs an operator of the previous release would have: every status, steps with outputs,
/// attempts of every kind, a retry, a scheduled run, schedule state and a worker.
struct OldRuns {
    succeeded: Uuid,
    failed_retried: Uuid,
    failed: Uuid,
    cancelled: Uuid,
    running: Uuid,
    running_step: (i64, i64),
    waiting: Uuid,
    scheduled: Uuid,
    retry: Uuid,
    with_key: Uuid,
}

async fn fill_previous_release(pool: &Db) -> OldRuns {
    sqlx::raw_sql(
        "INSERT INTO crm_sync.pipelines (name, steps, max_attempts, step_timeout_ms, max_concurrent_runs, freshness_sla_s)
         VALUES ('accounts', ARRAY['extract', 'transform', 'load'], 3, 540000, 1, 86400),
                ('orders', ARRAY['extract', 'load'], 3, 540000, NULL, NULL),
                ('slow', ARRAY['extract'], 3, 540000, 1, NULL);
         INSERT INTO crm_sync.schedule_state (pipeline, schedule, last_tick)
         VALUES ('accounts', '0 2 * * * Europe/Paris', now() - interval '1 day');
         INSERT INTO crm_sync.workers (id, hostname, pid, concurrency) VALUES ('old-worker', 'host-1', 4242, 8);",
    )
    .execute(pool)
    .await
    .unwrap();
    let w = "old-worker";

    // accounts: a run that succeeded through all three steps.
    let succeeded = enqueue(pool, "accounts", json!({}), None).await;
    for (name, output) in [
        (
            "extract",
            json!({"uri": "file:///backups/raw/accounts.json", "bytes": 812345, "sha256": "ab12"}),
        ),
        (
            "transform",
            json!({"uri": "file:///backups/staging/accounts.ndjson", "rows": 2700, "warnings": 1}),
        ),
        ("load", json!({"rows": 2700})),
    ] {
        let (step, fence, run) = step_of(pool, w).await;
        assert_eq!(run, succeeded, "{name}");
        complete(pool, w, step, fence, output).await;
    }
    assert_eq!(status(pool, succeeded).await, "succeeded");

    // orders: two runs that failed at load after a retryable attempt; the first is retried.
    let mut failed_runs = Vec::new();
    for _ in 0..2 {
        let run = enqueue(pool, "orders", json!({"since": "2026-11-01"}), None).await;
        let (step, fence, _) = step_of(pool, w).await;
        complete(
            pool,
            w,
            step,
            fence,
            json!({"uri": "file:///backups/raw/orders.json", "bytes": 1024}),
        )
        .await;
        let (step, fence, _) = step_of(pool, w).await;
        let outcome: String =
            sqlx::query_scalar("SELECT crm_sync.fail_step($1, $2, $3, 'HTTP 503', true, now())")
                .bind(w)
                .bind(step)
                .bind(fence)
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(outcome, "retry");
        let (step, fence, _) = step_of(pool, w).await;
        let outcome: String = sqlx::query_scalar(
            "SELECT crm_sync.fail_step($1, $2, $3, 'duplicate key in batch', false, NULL)",
        )
        .bind(w)
        .bind(step)
        .bind(fence)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(outcome, "failed");
        assert_eq!(status(pool, run).await, "failed");
        failed_runs.push(run);
    }
    let retry: Uuid = sqlx::query_scalar("SELECT crm_sync.retry_run($1)")
        .bind(failed_runs[0])
        .fetch_one(pool)
        .await
        .unwrap();

    // orders: a cancelled run, and a queued one enqueued with an idempotency key and parameters.
    let cancelled = enqueue(pool, "orders", json!({}), None).await;
    sqlx::query("SELECT crm_sync.cancel_run($1)")
        .bind(cancelled)
        .execute(pool)
        .await
        .unwrap();

    // slow (one at a time): one running (its worker holds the lease), one waiting for the slot.
    let running = enqueue(pool, "slow", json!({}), None).await;
    let (step, fence, run) = loop {
        let claimed = step_of(pool, w).await;
        if claimed.2 == running {
            break claimed;
        }
        // The retry's load step came first: give it back without spending its attempt.
        sqlx::query("SELECT crm_sync.release_steps($1, ARRAY[$2], ARRAY[$3])")
            .bind(w)
            .bind(claimed.0)
            .bind(claimed.1)
            .execute(pool)
            .await
            .unwrap();
    };
    assert_eq!(run, running);
    let waiting = enqueue(pool, "slow", json!({}), None).await;
    let with_key = enqueue(
        pool,
        "orders",
        json!({"full": true}),
        Some("orders-2026-11-24"),
    )
    .await;

    // accounts: the scheduler's run of today's tick.
    let scheduled: Uuid = sqlx::query_scalar(
        "SELECT crm_sync.enqueue_scheduled('accounts', date_trunc('day', now()) + interval '2 hours')",
    )
    .fetch_one(pool)
    .await
    .unwrap();

    OldRuns {
        succeeded,
        failed_retried: failed_runs[0],
        failed: failed_runs[1],
        cancelled,
        running,
        running_step: (step, fence),
        waiting,
        scheduled,
        retry,
        with_key,
    }
}

/// Every row of a table as JSON, keyed by its primary key (or its first column).
async fn rows(pool: &Db, table: &str) -> BTreeMap<String, Value> {
    let key = match table {
        "pipelines" => "name",
        "schedule_state" => "pipeline",
        _ => "id",
    };
    sqlx::query_as::<_, (String, Value)>(sqlx::AssertSqlSafe(format!(
        "SELECT t.{key}::text, to_jsonb(t) FROM crm_sync.{table} t"
    )))
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// What `migrate` must leave alone: the migrations table and the definitions of every function,
/// view, index and table column of the schema.
async fn schema_fingerprint(pool: &Db) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT format('migration %s %s %s %s', version, description, installed_on, encode(checksum, 'hex'))
           FROM _sqlx_migrations
         UNION ALL
         SELECT 'function ' || pg_get_functiondef(p.oid) FROM pg_proc p
          WHERE p.pronamespace = 'crm_sync'::regnamespace
         UNION ALL
         SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'crm_sync'
         UNION ALL
         SELECT 'view ' || viewname || ' ' || definition FROM pg_views WHERE schemaname = 'crm_sync'
         UNION ALL
         SELECT format('column %s.%s %s %s', table_name, column_name, data_type, column_default)
           FROM information_schema.columns WHERE table_schema = 'crm_sync'
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// pipeline, last_success_at, last_run_id, queued_runs, running_runs of `pipeline_health`.
type Health = (
    String,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<Uuid>,
    i64,
    i64,
);

fn migrate(config: &Path) -> String {
    let (code, out, err) = run_binary(config, &["migrate"]);
    assert_eq!(code, 0, "crm-sync migrate failed:\n{out}\n{err}");
    assert!(out.contains("schema crm_sync is current"), "{out}");
    out
}

#[tokio::test]
async fn the_previous_releases_data_survives_the_upgrade_and_works_with_the_new_functions() {
    let db = TestDb::empty().await;
    migrate_to_previous_release(&db.pool).await;
    let old = fill_previous_release(&db.pool).await;
    let mut before = BTreeMap::new();
    for table in OLD_TABLES {
        before.insert(table, rows(&db.pool, table).await);
    }
    let counts: Vec<String> = OLD_TABLES
        .iter()
        .map(|t| format!("{t} {}", before[t].len()))
        .collect();
    println!("previous release's data: {}", counts.join(", "));
    assert!(!crm_sync::db::migrations_current(&db.pool).await.unwrap());

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, "");
    let started = std::time::Instant::now();
    migrate(&config);
    println!(
        "crm-sync migrate (3 migrations) took {:.2}s",
        started.elapsed().as_secs_f64()
    );
    assert!(crm_sync::db::migrations_current(&db.pool).await.unwrap());

    // Every old row is still there with every old column as it was (new columns may be added).
    for table in OLD_TABLES {
        let after = rows(&db.pool, table).await;
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before[table].keys().collect::<Vec<_>>(),
            "rows of {table}"
        );
        for (key, old_row) in &before[table] {
            let new_row = &after[key];
            for (column, value) in old_row.as_object().unwrap() {
                assert_eq!(&new_row[column], value, "{table} {key} column {column}");
            }
        }
    }
    let lease_ms: i64 =
        sqlx::query_scalar("SELECT lease_ms FROM crm_sync.workers WHERE id = 'old-worker'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(lease_ms, 30_000, "the new column got its default");

    // The queue's gauges and the pipelines' health over the old rows.
    let (waiting, queued, running): (i64, i64, i64) =
        sqlx::query_as("SELECT waiting, queued, running FROM crm_sync.queue_metrics()")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((waiting, queued, running), (1, 3, 1));
    let health: Vec<Health> = sqlx::query_as(
        "SELECT pipeline, last_success_at, last_run_id, queued_runs, running_runs
               FROM crm_sync.pipeline_health ORDER BY pipeline",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let succeeded_at = before["runs"][&old.succeeded.to_string()]["finished_at"]
        .as_str()
        .map(|t| chrono::DateTime::parse_from_rfc3339(t).unwrap().to_utc());
    assert_eq!(
        health[0].1, succeeded_at,
        "accounts' last success is the old run's"
    );
    assert_eq!(health[0].2, Some(old.scheduled), "accounts' newest run");
    assert_eq!((health[0].3, health[0].4), (1, 0));
    assert_eq!(
        (health[2].3, health[2].4),
        (1, 1),
        "slow: one waiting, one running"
    );

    // The old worker's step, claimed before the upgrade, completes with its fence after it.
    let (step, fence) = old.running_step;
    complete(&db.pool, "old-worker", step, fence, json!({"rows": 1})).await;
    assert_eq!(status(&db.pool, old.running).await, "succeeded");

    // The new claim (it returns the trigger now) hands out the old queued steps with their triggers and
    // the checkpoints of their runs' earlier steps.
    let claimed: Vec<(i64, i64, Uuid, String, String, Value)> = sqlx::query_as(
        "SELECT step_id, fence, run_id, step_name, trigger, inputs FROM crm_sync.claim_steps('new-worker', 10, 30000)",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let by_run: BTreeMap<Uuid, (String, String, Value)> = claimed
        .iter()
        .map(|(_, _, run, name, trigger, inputs)| {
            (*run, (name.clone(), trigger.clone(), inputs.clone()))
        })
        .collect();
    assert_eq!(by_run[&old.scheduled].1, "schedule");
    assert_eq!(by_run[&old.with_key].1, "sql");
    assert_eq!(by_run[&old.retry].0, "load");
    assert_eq!(by_run[&old.retry].1, "retry");
    assert_eq!(
        by_run[&old.retry].2["extract"]["uri"], "file:///backups/raw/orders.json",
        "the retry reads the checkpoint its old run left"
    );
    assert_eq!(
        by_run[&old.waiting].1, "sql",
        "the waiting run got the slot"
    );
    assert_eq!(claimed.len(), 4, "{claimed:?}");

    // The retry succeeds: the new recovery trigger compares it with the old failed run.
    let (retry_step, retry_fence, ..) = claimed.iter().find(|c| c.2 == old.retry).unwrap();
    complete(
        &db.pool,
        "new-worker",
        *retry_step,
        *retry_fence,
        json!({"rows": 10}),
    )
    .await;
    assert_eq!(status(&db.pool, old.retry).await, "succeeded");
    let recovered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM crm_sync.notification_events WHERE run_id = $1 AND kind = 'run_recovered'",
    )
    .bind(old.retry)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(recovered, 1);

    // The other old failed run can be retried; the old retried one cannot be retried twice.
    let again: Uuid = sqlx::query_scalar("SELECT crm_sync.retry_run($1)")
        .bind(old.failed)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(status(&db.pool, again).await, "queued");
    let twice = sqlx::query("SELECT crm_sync.retry_run($1)")
        .bind(old.failed_retried)
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(twice.to_string().contains("already retried"), "{twice}");

    // Pruning works on the old rows (a year from now, keep_last 0; rolled back).
    let mut tx = db.pool.begin().await.unwrap();
    let pruned: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT pipeline, status, runs FROM crm_sync.prune_history(keep_last => 0, as_of => now() + interval '1 year')",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    println!("prune a year later would delete: {pruned:?}");
    assert!(
        pruned
            .iter()
            .any(|(p, s, _)| p == "orders" && s == "cancelled"),
        "{pruned:?}"
    );
    assert!(
        !pruned.iter().any(|(p, _, _)| p == "accounts"),
        "accounts' only finished run is its last success: {pruned:?}"
    );
    assert_eq!(status(&db.pool, old.cancelled).await, "cancelled");

    // Migrating again changes nothing: not the schema, not the data.
    let schema = schema_fingerprint(&db.pool).await;
    let mut data = Vec::new();
    for table in OLD_TABLES {
        data.push(rows(&db.pool, table).await);
    }
    migrate(&config);
    assert_eq!(schema_fingerprint(&db.pool).await, schema);
    for (i, table) in OLD_TABLES.iter().enumerate() {
        assert_eq!(rows(&db.pool, table).await, data[i], "{table}");
    }
}

fn spawn_migrate(config: &Path) -> std::process::Child {
    Command::new(common::binary())
        .arg("--config")
        .arg(config)
        .arg("migrate")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn crm-sync migrate")
}

#[tokio::test]
async fn two_migrate_processes_at_once_both_succeed() {
    for previous_release in [false, true] {
        for round in 0..3 {
            let db = TestDb::empty().await;
            if previous_release {
                migrate_to_previous_release(&db.pool).await;
            }
            let dir = tempfile::tempdir().unwrap();
            let config: PathBuf = write_config(dir.path(), &db, "");
            let children = [spawn_migrate(&config), spawn_migrate(&config)];
            for child in children {
                let out = child.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "round {round} (previous release: {previous_release}): {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let applied: Vec<(i64, bool)> =
                sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
                    .fetch_all(&db.pool)
                    .await
                    .unwrap();
            let expected: Vec<(i64, bool)> = crm_sync::db::MIGRATOR
                .iter()
                .map(|m| (m.version, true))
                .collect();
            assert_eq!(applied, expected);
        }
    }
}

/// Where `tests/fixtures/upgrade/produce.sh` kept the previous release's backups: the dump's
/// checkpoints name these absolute `file://` paths, so the test puts the files back exactly there.
const FIXTURE_BACKUPS: &str = "/tmp/crm-sync-upgrade-fixture/backups";

fn upgrade_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade")
}

/// Copies every file under `from` to the same place under `to`, each through a temporary file and a
/// rename (another test process may be putting the same bytes there at the same time).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            let tmp = to.join(format!(".upgrade-copy-{}", Uuid::new_v4().simple()));
            std::fs::copy(entry.path(), &tmp).unwrap();
            std::fs::rename(&tmp, &target).unwrap();
        }
    }
}

/// A TCP port that counts the connections made to it and closes each at once: a source there fails
/// every extract, and the count says whether anything tried. Served by a thread of its own (the test
/// blocks its runtime while it waits for `crm-sync retry`).
fn counting_closed_port() -> (String, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (url, hits)
}

/// Every file under `dir` (none when it does not exist).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// name, status, reused_from_run, output and the number of attempts of a step.
type RetriedStep = (String, String, Option<Uuid>, Option<Value>, i64);

#[tokio::test]
async fn a_failed_ezfocus_run_of_the_previous_release_resumes_at_its_load_after_the_upgrade() {
    let fixture = upgrade_fixture();
    let db = TestDb::empty().await;

    // The database the previous release's binary left (tests/fixtures/upgrade/NOTE.md), restored as is.
    let restore = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &db.url, "-f"])
        .arg(fixture.join("previous-release.sql"))
        .output()
        .expect("run psql");
    assert!(
        restore.status.success(),
        "restoring the previous release's dump failed:\n{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    let old_versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        old_versions.len(),
        7,
        "the previous release applied 7 migrations"
    );
    let (old_run, old_batch): (Uuid, String) = sqlx::query_as(
        "SELECT id, batch_id FROM crm_sync.runs WHERE pipeline = 'ezfocus_accounts' AND status = 'failed'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("the dump holds one failed EZ Focus run");
    let old_steps: Vec<(String, String, Option<Value>)> = sqlx::query_as(
        "SELECT name, status, output FROM crm_sync.steps WHERE run_id = $1 ORDER BY position",
    )
    .bind(old_run)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let statuses: Vec<(&str, &str)> = old_steps
        .iter()
        .map(|(n, s, _)| (n.as_str(), s.as_str()))
        .collect();
    assert_eq!(
        statuses,
        [
            ("extract", "succeeded"),
            ("transform", "succeeded"),
            ("validate", "succeeded"),
            ("load", "failed")
        ]
    );
    assert_eq!(old_steps[1].2.as_ref().unwrap()["rows"], 300);

    // The checkpoints' files, back where the previous release wrote them, byte for byte.
    copy_tree(&fixture.join("backups"), Path::new(FIXTURE_BACKUPS));
    for (name, _, output) in &old_steps[..2] {
        let output = output.as_ref().unwrap();
        let uri = output["object"].as_str().unwrap();
        let path = uri.strip_prefix("file://").unwrap();
        assert!(path.starts_with(FIXTURE_BACKUPS), "{name}: {uri}");
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{name}: {path}: {e}"));
        assert_eq!(
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
            output["sha256"].as_str().unwrap(),
            "{name}: {path} is the file its checkpoint names"
        );
    }

    // The new binary migrates it (however many migrations it has past the previous release's 7).
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let (source_url, source_hits) = counting_closed_port();
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ezfocus.toml"),
    )
    .unwrap();
    // The example as the dump's run had it (300 rows, one attempt), except: the source is a port that
    // fails every request (a second extract would fail the retry) and the destination is crm-sync's
    // own database, which is up.
    let pipeline = crm_sync::fixtures::with_secret_files(
        &example,
        &secrets,
        &crm_sync::fixtures::ezfocus::EXAMPLE_SECRETS,
    )
    .unwrap()
    .replace("http://127.0.0.1:8081", &source_url)
    .replace(
        "./crm-sync-backups",
        &dir.path().join("backups").display().to_string(),
    )
    .replace("min_rows = 2600", "min_rows = 250")
    .replace("max_rows = 2700", "max_rows = 350")
    .replace("max_attempts = 5", "max_attempts = 1")
    .replace("[worker]", "[worker]\npoll_interval = \"100ms\"");
    for changed in [
        source_url.as_str(),
        "min_rows = 250",
        "max_rows = 350",
        "max_attempts = 1",
    ] {
        assert!(
            pipeline.contains(changed),
            "{changed} not set in:\n{pipeline}"
        );
    }
    let config = write_config(dir.path(), &db, &pipeline);
    migrate(&config);
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let expected: Vec<i64> = crm_sync::db::MIGRATOR.iter().map(|m| m.version).collect();
    assert_eq!(versions, expected);
    assert_eq!(&versions[..7], &old_versions[..]);

    // `retry` resumes the run at its load, in the same batch, without a second extract.
    let mut worker = common::spawn_binary(&config, &["worker"], &dir.path().join("worker.log"));
    let (code, out, err) = run_binary(
        &config,
        &[
            "retry",
            &old_run.to_string(),
            "--wait",
            "--wait-timeout",
            "2m",
        ],
    );
    let stopped = common::terminate(&mut worker, std::time::Duration::from_secs(30));
    let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    assert_eq!(code, 0, "crm-sync retry:\n{out}\n{err}\nworker log:\n{log}");
    assert!(stopped.success(), "worker: {stopped:?}\n{log}");
    let new_run: Uuid = out.trim().parse().expect("retry prints the new run's id");
    assert_eq!(status(&db.pool, new_run).await, "succeeded");
    let (retry_of, new_batch): (Option<Uuid>, String) =
        sqlx::query_as("SELECT retry_of, batch_id FROM crm_sync.runs WHERE id = $1")
            .bind(new_run)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(retry_of, Some(old_run));
    assert_eq!(new_batch, old_batch, "a retry keeps the batch id");
    assert_eq!(
        source_hits.load(Ordering::SeqCst),
        0,
        "nothing called the source again"
    );

    // Its first three steps are the old run's checkpoints, not run again; only load ran, once.
    let new_steps: Vec<RetriedStep> = sqlx::query_as(
        "SELECT s.name, s.status, s.reused_from_run, s.output,
                (SELECT count(*) FROM crm_sync.attempts a WHERE a.step_id = s.id)
           FROM crm_sync.steps s WHERE s.run_id = $1 ORDER BY s.position",
    )
    .bind(new_run)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(new_steps.len(), 4, "{new_steps:?}");
    for ((name, status, reused, output, attempts), (old_name, _, old_output)) in
        new_steps[..3].iter().zip(&old_steps)
    {
        assert_eq!(name, old_name);
        assert_eq!(status, "succeeded", "{name}");
        assert_eq!(
            *reused,
            Some(old_run),
            "{name} reused the old run's checkpoint"
        );
        assert_eq!(output, old_output, "{name}'s checkpoint is the old one");
        assert_eq!(*attempts, 0, "{name} was not run again");
    }
    let (name, status, reused, output, attempts) = &new_steps[3];
    assert_eq!((name.as_str(), status.as_str()), ("load", "succeeded"));
    assert_eq!(*reused, None);
    assert_eq!(*attempts, 1, "the load ran once");
    assert_eq!(output.as_ref().unwrap()["rows"], 300);
    let reruns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
          WHERE s.name = 'extract'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(reruns, 1, "one extract ever: the previous release's");
    let backed_up: Vec<_> = files_under(&dir.path().join("backups"));
    assert!(backed_up.is_empty(), "backed up again: {backed_up:?}");

    // The warehouse holds the old run's 300 rows, under its batch id.
    assert_eq!(
        common::table_batches(&db.pool, "ezfocus.accounts_list").await,
        vec![(old_batch.clone(), 300)]
    );

    // The old run still reads as it was, through the new binary.
    let (code, out, err) = run_binary(&config, &["show", &old_run.to_string(), "--json"]);
    assert_eq!(code, 0, "crm-sync show:\n{out}\n{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["id"], old_run.to_string());
    assert_eq!(shown["status"], "failed");
    assert_eq!(shown["batch_id"], old_batch);
    let shown_steps = shown["steps"].as_array().unwrap();
    assert_eq!(shown_steps.len(), 4);
    assert_eq!(shown_steps[3]["status"], "failed");
    assert!(
        shown_steps[3]["error"]
            .as_str()
            .unwrap()
            .contains("cannot connect to the destination database"),
        "{}",
        shown_steps[3]
    );
    assert_eq!(shown_steps[0]["attempt_log"].as_array().unwrap().len(), 1);
}
