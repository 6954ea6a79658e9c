//! The EZ Focus accounts pipeline end to end, from `examples/ezfocus.toml`: the fixture API over real
//! HTTP, a local backup, transform, validation, and an atomic replace in PostgreSQL.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{RunningWorker, TestDb, wait_for_run};
use crm_sync::config::Config;
use crm_sync::fixtures::ezfocus::{EzFocusConfig, EzFocusFixture, Fault};
use crm_sync::queue;
use serde_json::json;
use uuid::Uuid;

struct Setup {
    db: TestDb,
    fixture: EzFocusFixture,
    config: Config,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// The example config, pointed at the fixture, a temporary backup directory and secret files.
async fn setup(edit: impl Fn(String) -> String) -> Setup {
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let text = common::ezfocus::example_config(&fixture, secrets.path(), backups.path());
    let config = db.config(&edit(text)).await;
    Setup {
        db,
        fixture,
        config,
        _dirs: (secrets, backups),
    }
}

async fn run(s: &Setup) -> (Uuid, String) {
    common::run_pipeline(
        &s.db,
        &s.config,
        "ezfocus_accounts",
        Duration::from_secs(120),
    )
    .await
}

async fn table_batches(db: &TestDb) -> Vec<(String, i64)> {
    common::table_batches(&db.pool, "ezfocus.accounts_list").await
}

#[tokio::test]
async fn accounts_land_in_postgres_renamed_typed_and_stamped() {
    let s = setup(|t| t).await;
    let (run, status) = run(&s).await;
    assert_eq!(
        status,
        "succeeded",
        "{}",
        common::run_error(&s.db.pool, run).await
    );
    let batch = common::batch_of(&s.db.pool, run).await;
    assert_eq!(table_batches(&s.db).await, vec![(batch.clone(), 2700)]);

    let types: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
          WHERE table_schema = 'ezfocus' AND table_name = 'accounts_list' ORDER BY ordinal_position",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    let type_of = |c: &str| {
        types
            .iter()
            .find(|t| t.0 == c)
            .map(|t| t.1.as_str())
            .unwrap_or("missing")
    };
    assert_eq!(type_of("store_id"), "text");
    assert_eq!(type_of("latitude"), "double precision");
    assert_eq!(type_of("client_since"), "date");
    assert_eq!(type_of("load_timestamp"), "timestamp with time zone");
    assert_eq!(
        type_of("accnt_no"),
        "missing",
        "renamed columns keep only their new name"
    );

    // Coordinates that arrived as strings are floats now; accnt_no numbers are text store ids.
    let (numeric_ids, coords, stamped): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE store_id ~ '^[0-9]+$'),
                count(latitude),
                count(*) FILTER (WHERE load_timestamp > now() - interval '5 minutes')
           FROM ezfocus.accounts_list",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert!(numeric_ids > 2600, "{numeric_ids}");
    assert!(coords > 2600, "{coords}");
    assert_eq!(stamped, 2700);

    // The checkpoints tell the story: rows per step, warnings counted, not fatal.
    let outputs: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT name, output FROM crm_sync.steps WHERE run_id = $1 ORDER BY position",
    )
    .bind(run)
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        outputs.iter().map(|o| o.0.as_str()).collect::<Vec<_>>(),
        ["extract", "transform", "validate", "load"]
    );
    assert_eq!(outputs[1].1["rows"], 2700);
    assert_eq!(
        outputs[1].1["warnings"]["client_since: unparseable date"],
        18
    );
    let warnings = outputs[2].1["warnings"].as_object().unwrap();
    let duplicates = warnings
        .iter()
        .find(|(k, _)| k.starts_with("duplicate store_id (e.g. "));
    assert_eq!(
        duplicates.map(|d| d.1.clone()),
        Some(json!(3)),
        "{warnings:?}"
    );
    assert_eq!(
        warnings.get("province not in [\"ON\"]"),
        Some(&json!(3)),
        "{warnings:?}"
    );
    assert_eq!(outputs[3].1["rows"], 2700);
    assert_eq!(outputs[3].1["table"], "ezfocus.accounts_list");
}

#[tokio::test]
async fn a_second_run_replaces_the_first_atomically() {
    let s = setup(|t| t).await;
    let (first, status) = run(&s).await;
    assert_eq!(status, "succeeded");
    let first_batch = common::batch_of(&s.db.pool, first).await;

    // A reader watches the table throughout the second run: always one whole batch, never empty.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pool, stop) = (s.db.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let view: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT batch_id, count(*) FROM ezfocus.accounts_list GROUP BY batch_id",
                )
                .fetch_all(&pool)
                .await
                .unwrap();
                seen.push(view);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seen
        })
    };
    let (second, status) = run(&s).await;
    assert_eq!(status, "succeeded");
    stop.store(true, Ordering::Relaxed);
    let seen = reader.await.unwrap();
    let second_batch = common::batch_of(&s.db.pool, second).await;
    assert!(
        seen.len() > 10,
        "the reader looked only {} times",
        seen.len()
    );
    for view in &seen {
        assert_eq!(
            view.len(),
            1,
            "a reader saw a mix or an empty table: {view:?}"
        );
        assert_eq!(view[0].1, 2700);
        assert!(view[0].0 == first_batch || view[0].0 == second_batch);
    }
    assert_eq!(table_batches(&s.db).await, vec![(second_batch, 2700)]);
}

#[tokio::test]
async fn bad_answers_fail_the_run_and_leave_the_previous_batch_in_place() {
    let s = setup(|t| t).await;
    let (good, status) = run(&s).await;
    assert_eq!(status, "succeeded");
    let good_batch = common::batch_of(&s.db.pool, good).await;

    for (fault, reason) in [
        (Fault::EmptyArray, "0 rows, fewer than min_rows = 2600"),
        (
            Fault::RowLimit(1080),
            "row count dropped 60 % against the last successful batch (1080 rows, was 2700)",
        ),
        (
            Fault::MalformedJson,
            "the extract is not a JSON array of records",
        ),
    ] {
        s.fixture.faults().clear();
        s.fixture.faults().set(fault.clone());
        let (bad, status) = run(&s).await;
        assert_eq!(status, "failed", "{fault:?}");
        let error = common::run_error(&s.db.pool, bad).await;
        assert!(error.contains(reason), "{fault:?}: {error}");
        let attempts: i64 =
            sqlx::query_scalar("SELECT count(*) FROM crm_sync.attempts WHERE run_id = $1")
                .bind(bad)
                .fetch_one(&s.db.pool)
                .await
                .unwrap();
        assert!(
            attempts <= 3,
            "a terminal failure was retried ({attempts} attempts)"
        );
        assert_eq!(
            table_batches(&s.db).await,
            vec![(good_batch.clone(), 2700)],
            "{fault:?}"
        );
    }
}

#[tokio::test]
async fn a_missing_required_column_fails_validation_and_loads_nothing() {
    // The API renamed accnt_name: the pipeline's source field is gone from every record.
    let s = setup(|t| t.replace("from = \"accnt_name\"", "from = \"account_name\"")).await;
    let (run, status) = run(&s).await;
    assert_eq!(status, "failed");
    let error = common::run_error(&s.db.pool, run).await;
    assert!(
        error.contains("required column store_name is missing"),
        "{error}"
    );
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('ezfocus.accounts_list') IS NOT NULL")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert!(!exists, "a failed gate must not touch the destination");
}

#[tokio::test]
async fn a_failed_load_is_retried_from_the_load_without_a_second_extract() {
    let s = setup(|t| t).await;
    // A table in the way with an incompatible column: the load fails, the earlier steps succeeded.
    sqlx::query("CREATE SCHEMA ezfocus")
        .execute(&s.db.pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE ezfocus.accounts_list (store_id integer)")
        .execute(&s.db.pool)
        .await
        .unwrap();
    let (failed, status) = run(&s).await;
    assert_eq!(status, "failed");
    assert!(
        common::run_error(&s.db.pool, failed)
            .await
            .contains("step load failed"),
        "{}",
        common::run_error(&s.db.pool, failed).await
    );
    assert_eq!(s.fixture.request_count(), 1);

    sqlx::query("DROP TABLE ezfocus.accounts_list")
        .execute(&s.db.pool)
        .await
        .unwrap();
    let worker = RunningWorker::start(&s.db, &s.config).await;
    let retried = queue::retry(&s.db.pool, failed).await.unwrap();
    assert_eq!(
        wait_for_run(&s.db.pool, retried, Duration::from_secs(60)).await,
        "succeeded"
    );
    worker.stop().await;
    assert_eq!(
        s.fixture.request_count(),
        1,
        "the retry called the source again"
    );
    let ran: Vec<String> = sqlx::query_scalar(
        "SELECT s.name FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id WHERE a.run_id = $1",
    )
    .bind(retried)
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(ran, vec!["load"]);
    assert_eq!(
        table_batches(&s.db).await,
        vec![(common::batch_of(&s.db.pool, failed).await, 2700)],
        "same batch_id"
    );
}
