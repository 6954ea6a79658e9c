//! The two reference pipelines in `write = "merge"` mode, switched on by their examples' own commented
//! lines, against the fixtures' editions (each edition updates, closes and opens a known set of
//! records): exact counts and exact final tables in PostgreSQL and BigQuery, re-runs that change
//! nothing, a truncated extract that changes nothing, and switching between replace and merge.

mod common;

use std::time::Duration;

use common::{TestDb, merge_counts, merge_mode, step_output};
use crm_sync::fixtures::ezfocus::{EzFocusConfig, EzFocusFixture, Fault};
use crm_sync::gcp::GcpAuth;
use crm_sync::gcp::bigquery::BigQueryLoader;
use serde_json::{Value, json};
use uuid::Uuid;

/// Runs `pipeline` once; returns the run, its status and the load step's output (or the error).
async fn run(
    db: &TestDb,
    config: &crm_sync::config::Config,
    pipeline: &str,
) -> (Uuid, String, Value) {
    let (run, status) = common::run_pipeline(db, config, pipeline, Duration::from_secs(180)).await;
    let load = step_output(&db.pool, run, "load").await;
    let load = if load.is_null() {
        json!({ "error": common::run_error(&db.pool, run).await })
    } else {
        load
    };
    (run, status, load)
}

/// Live rows of a merged PostgreSQL table per batch_id, and soft-deleted rows per deleted_in_batch.
async fn pg_table(db: &TestDb, table: &str) -> (Vec<(String, i64)>, Vec<(String, i64)>) {
    let live = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT batch_id::text, count(*) FROM {table} WHERE deleted_at IS NULL GROUP BY 1 ORDER BY 1"
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let deleted = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT deleted_in_batch, count(*) FROM {table} WHERE deleted_at IS NOT NULL GROUP BY 1 ORDER BY 1"
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    (live, deleted)
}

fn sorted(mut v: Vec<(String, i64)>) -> Vec<(String, i64)> {
    v.sort();
    v
}

#[tokio::test]
async fn ezfocus_accounts_merge_by_store_id_across_editions_and_switch_modes() {
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let (secrets, backups) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let replace_text = common::ezfocus::example_config(&fixture, secrets.path(), backups.path());
    let merge = db.config(&merge_mode(&replace_text)).await;
    let table = "ezfocus.accounts_list";

    // Edition 0: 2,700 accounts, of which 3 repeat an earlier store_id and 3 have none: those six
    // are left out (skip_dirty_keys = 10) and named; the other 2,694 are inserted.
    let metrics = crm_sync::metrics::Metrics::new();
    let (run1, status) = common::run_pipeline_with_metrics(
        &db,
        &merge,
        "ezfocus_accounts",
        Duration::from_secs(180),
        metrics.clone(),
    )
    .await;
    let load = step_output(&db.pool, run1, "load").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(merge_counts(&load), [2694, 0, 0, 0], "{load}");
    let text = metrics.render();
    for (change, n) in [("inserted", 2694), ("skipped", 6)] {
        let line = format!(
            "crm_sync_merge_rows_total{{change=\"{change}\",pipeline=\"ezfocus_accounts\"}} {n}"
        );
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = common::write_config(dir.path(), &db, &merge_mode(&replace_text));
    let (code, stdout, stderr) = common::run_binary(&file, &["show", &run1.to_string()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("merge  2694 inserted, 0 updated, 0 unchanged, 0 deleted")
            && stdout.contains("left out  duplicate store_id: 3, empty store_id: 3 (e.g. "),
        "{stdout}"
    );
    let transform = step_output(&db.pool, run1, "transform").await;
    assert_eq!(
        transform["skipped"],
        json!({ "duplicate store_id": 3, "empty store_id": 3 }),
        "{transform}"
    );
    // Each named by row, a repeated key by its hash: never by its value.
    let named = transform["skipped_keys"].as_array().unwrap();
    assert_eq!(named.len(), 6, "{transform}");
    assert!(
        named
            .iter()
            .filter_map(Value::as_str)
            .all(|k| k.starts_with("key#") || k.starts_with("empty key at row ")),
        "{transform}"
    );
    let validate = step_output(&db.pool, run1, "validate").await;
    assert_eq!(validate["warnings"]["left out: duplicate store_id"], 3);
    assert_eq!(validate["rows"], 2694);
    let b1 = common::batch_of(&db.pool, run1).await;

    // Edition 1: 27 accounts change their phone, 27 close, 10 open.
    fixture.set_edition(1);
    let (run2, status, load) = run(&db, &merge, "ezfocus_accounts").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(merge_counts(&load), [10, 27, 2640, 27], "{load}");
    let b2 = common::batch_of(&db.pool, run2).await;

    // Edition 2: the next 27 / 27 / 10.
    fixture.set_edition(2);
    let (run3, status, load) = run(&db, &merge, "ezfocus_accounts").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(merge_counts(&load), [10, 27, 2623, 27], "{load}");
    let b3 = common::batch_of(&db.pool, run3).await;

    // The same edition again changes nothing.
    let (_, status, load) = run(&db, &merge, "ezfocus_accounts").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(merge_counts(&load), [0, 0, 2660, 0], "{load}");

    // The exact final table: every live row carries the batch that last changed it, closed
    // accounts are kept with the batch that closed them.
    let expected_live = sorted(vec![(b1.clone(), 2586), (b2.clone(), 37), (b3.clone(), 37)]);
    let expected_deleted = sorted(vec![(b2.clone(), 27), (b3.clone(), 27)]);
    assert_eq!(
        pg_table(&db, table).await,
        (expected_live.clone(), expected_deleted.clone())
    );
    let (changed_phones, first_seen_later, hashed): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE phone LIKE '%555-02%'),
                count(*) FILTER (WHERE first_seen_batch <> $1),
                count(*) FILTER (WHERE row_hash IS NOT NULL)
           FROM ezfocus.accounts_list WHERE deleted_at IS NULL",
    )
    .bind(&b1)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((changed_phones, first_seen_later, hashed), (54, 20, 2660));

    // A truncated extract (half the accounts) changes nothing: the gate's max_drop stops it, and
    // without the row-count checks the merge's own deletion guard (max_delete_share = 0.2) does.
    fixture.faults().set(Fault::RowLimit(1_300));
    let (_, status, load) = run(&db, &merge, "ezfocus_accounts").await;
    assert_eq!(status, "failed", "{load}");
    assert!(
        load["error"].as_str().unwrap().contains("dropped"),
        "{load}"
    );
    assert_eq!(
        pg_table(&db, table).await,
        (expected_live.clone(), expected_deleted.clone())
    );
    let unguarded = merge_mode(&replace_text)
        .replace("min_rows = 2600\n", "min_rows = 1\n")
        .replace("max_drop = 0.2\n", "");
    let unguarded = db.config(&unguarded).await;
    let (_, status, load) = run(&db, &unguarded, "ezfocus_accounts").await;
    assert_eq!(status, "failed", "{load}");
    let error = load["error"].as_str().unwrap();
    assert!(
        error.contains("of 2660 live rows") && error.contains("more than max_delete_share (20 %)"),
        "{error}"
    );
    assert_eq!(
        pg_table(&db, table).await,
        (expected_live, expected_deleted)
    );
    fixture.faults().clear();

    // Back to replace (the example as shipped): the table is exactly edition 2 again, repeats and
    // all, and the merge's key index is gone.
    let replace = db.config(&replace_text).await;
    let (run5, status, load) = run(&db, &replace, "ezfocus_accounts").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(load["write"], "replace");
    let b5 = common::batch_of(&db.pool, run5).await;
    assert_eq!(
        common::table_batches(&db.pool, table).await,
        vec![(b5.clone(), 2666)]
    );

    // And merge again: the rows a unique key cannot hold (3 empty keys, both copies of 3 repeated
    // ones) are removed first; the rest, written by a replace, get their hashes (updated).
    let (run6, status, load) = run(&db, &merge, "ezfocus_accounts").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(load["unkeyable_removed"], 9, "{load}");
    assert_eq!(merge_counts(&load), [3, 2657, 0, 0], "{load}");
    let b6 = common::batch_of(&db.pool, run6).await;
    assert_eq!(pg_table(&db, table).await, (vec![(b6, 2660)], vec![]));
}

#[tokio::test]
async fn ezfocus_accounts_merge_into_bigquery_through_a_staging_table() {
    use common::ezfocus::{BUCKET, PROJECT};
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let (gcs, bq) = common::emulators::gcp_with_bucket(PROJECT, BUCKET).await;
    let secrets = tempfile::tempdir().unwrap();
    let text = common::ezfocus::gcp_example_config(
        &fixture,
        secrets.path(),
        &gcs.endpoint(),
        &bq.base_url(),
    );
    let config = db.config(&merge_mode(&text)).await;
    let loader = BigQueryLoader::new(Some(bq.base_url()), GcpAuth::Anonymous)
        .await
        .unwrap();
    let table_state = || async {
        loader
            .query_rows(
                PROJECT,
                "SELECT countif(deleted_at IS NULL) AS live, countif(deleted_at IS NOT NULL) AS deleted,
                        countif(deleted_at IS NULL AND phone LIKE '%555-02%') AS changed,
                        count(DISTINCT store_id) AS ids
                   FROM `test.crm.Accounts_List`",
            )
            .await
            .unwrap()
    };
    let number = |rows: &[Value], name: &str| -> i64 {
        let v = &rows[0][name];
        v.as_str()
            .and_then(|s| s.parse().ok())
            .or(v.as_i64())
            .unwrap()
    };

    let (_, status, load) = run(&db, &config, "ezfocus_accounts").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(merge_counts(&load), [2694, 0, 0, 0], "{load}");

    fixture.set_edition(1);
    let (run2, status, load) = run(&db, &config, "ezfocus_accounts").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(merge_counts(&load), [10, 27, 2640, 27], "{load}");
    let rows = table_state().await;
    assert_eq!(
        ["live", "deleted", "changed", "ids"].map(|n| number(&rows, n)),
        [2677, 27, 27, 2704],
        "{rows:?}"
    );
    let b2 = common::batch_of(&db.pool, run2).await;
    let per_batch = loader
        .query_rows(
            PROJECT,
            &format!(
                "SELECT countif(batch_id = '{b2}') AS changed_in_2, countif(deleted_in_batch = '{b2}') AS deleted_in_2
                   FROM `test.crm.Accounts_List`"
            ),
        )
        .await
        .unwrap();
    assert_eq!(number(&per_batch, "changed_in_2"), 37, "{per_batch:?}");
    assert_eq!(number(&per_batch, "deleted_in_2"), 27, "{per_batch:?}");

    // Edition 2: the next 27 / 27 / 10.
    fixture.set_edition(2);
    let (_, status, load) = run(&db, &config, "ezfocus_accounts").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(merge_counts(&load), [10, 27, 2623, 27], "{load}");
    let rows = table_state().await;
    assert_eq!(
        ["live", "deleted", "changed", "ids"].map(|n| number(&rows, n)),
        [2660, 54, 54, 2714],
        "{rows:?}"
    );

    // The same edition again: nothing changes, and no staging table is left behind.
    let (_, status, load) = run(&db, &config, "ezfocus_accounts").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(merge_counts(&load), [0, 0, 2660, 0], "{load}");
    let tables = loader
        .query_rows(
            PROJECT,
            "SELECT table_name FROM `test.crm.INFORMATION_SCHEMA.TABLES`",
        )
        .await
        .unwrap();
    assert_eq!(tables, vec![json!({ "table_name": "Accounts_List" })]);

    // Back to replace (one WRITE_TRUNCATE load job of all 2,666 rows, repeats and all), then merge
    // again: the 9 rows no key tells apart (3 empty keys, both copies of 3 repeated ones) are removed
    // first, the others get their hashes (updated once), the repeated keys come back (inserted).
    let replace = db.config(&text).await;
    let (_, status, load) = run(&db, &replace, "ezfocus_accounts").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(
        (load["write"].as_str(), load["rows"].as_u64()),
        (Some("replace"), Some(2666)),
        "{load}"
    );
    let (_, status, load) = run(&db, &config, "ezfocus_accounts").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(load["unkeyable_removed"], 9, "{load}");
    assert_eq!(merge_counts(&load), [3, 2657, 0, 0], "{load}");
    let rows = table_state().await;
    assert_eq!(
        ["live", "deleted", "ids"].map(|n| number(&rows, n)),
        [2660, 0, 2660],
        "{rows:?}"
    );
}

#[tokio::test]
async fn qashier_customers_merge_by_store_name_phone_and_join_date() {
    let db = TestDb::new().await;
    let fixture = common::qashier::quick_fixture().await;
    let (secrets, backups) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let text = common::qashier::example_config(
        &fixture,
        crm_sync::fixtures::qashier::DEFAULT_PASSWORD,
        secrets.path(),
        backups.path(),
    );
    let config = db.config(&merge_mode(&text)).await;
    let table = "backoffice.customers";

    let (run1, status, load) = run(&db, &config, "qashier_customers").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(merge_counts(&load), [987, 0, 0, 0], "{load}");
    let b1 = common::batch_of(&db.pool, run1).await;

    // Edition 1: 10 customers' points change, 10 leave, 10 join.
    fixture.set_edition(1);
    let (run2, status, load) = run(&db, &config, "qashier_customers").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(merge_counts(&load), [10, 10, 967, 10], "{load}");
    let b2 = common::batch_of(&db.pool, run2).await;

    // Edition 2, then the same again.
    fixture.set_edition(2);
    let (run3, status, load) = run(&db, &config, "qashier_customers").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(merge_counts(&load), [10, 10, 967, 10], "{load}");
    let b3 = common::batch_of(&db.pool, run3).await;
    let (_, status, load) = run(&db, &config, "qashier_customers").await;
    assert_eq!(status, "succeeded", "{load}");
    assert_eq!(merge_counts(&load), [0, 0, 987, 0], "{load}");

    assert_eq!(
        pg_table(&db, table).await,
        (
            sorted(vec![(b1, 947), (b2.clone(), 20), (b3.clone(), 20)]),
            sorted(vec![(b2, 10), (b3, 10)])
        )
    );
    // The spec's DDL is kept: identity ids, created_at; the changed points are numbers.
    let (ids, points): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT id), count(*) FILTER (WHERE available_point IN (9001.00, 9002.00))
           FROM backoffice.customers WHERE deleted_at IS NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((ids, points), (987, 20));
}
