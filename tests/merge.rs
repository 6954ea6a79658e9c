//! `write = "merge"` into PostgreSQL: successive batches with known inserts, updates and deletions
//! give exact counts and the exact final table; the same batch again changes nothing; duplicate or
//! missing keys fail validation naming them; a truncated extract trips the deletion guard.

mod common;
#[path = "merge/key_privacy.rs"]
mod key_privacy;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use common::TestDb;
use serde_json::{Value, json};

/// A source whose answer the test sets before each run.
struct Source {
    base: String,
    answer: Arc<Mutex<Value>>,
}

async fn source() -> Source {
    let answer = Arc::new(Mutex::new(json!([])));
    let app = axum::Router::new()
        .route(
            "/accounts",
            get(
                |State(a): State<Arc<Mutex<Value>>>| async move { Json(a.lock().unwrap().clone()) },
            ),
        )
        .with_state(answer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Source { base, answer }
}

fn accounts(ids: std::ops::Range<u32>, edited: &[u32]) -> Value {
    Value::Array(
        ids.map(|i| {
            let city = if edited.contains(&i) {
                "Ottawa"
            } else {
                "Toronto"
            };
            json!({ "id": i, "name": format!("Store {i}"), "city": city })
        })
        .collect(),
    )
}

fn config(base: &str, backups: &std::path::Path, deletes: &str) -> String {
    format!(
        r#"
[worker]
poll_interval = "100ms"

[[pipelines]]
name = "accounts"
retry_backoff = "50ms"

[pipelines.source]
kind = "http_json"
url = "{base}/accounts"

[pipelines.backup]
kind = "local"
dir = "{backups}"
path = "raw/accounts_{{date}}_{{time}}.json"

[pipelines.transform]
kind = "json"
columns = [
  {{ name = "store_id", from = "id", type = "string" }},
  {{ name = "store_name", from = "name", type = "string" }},
  {{ name = "city", type = "string" }},
]

[pipelines.destination]
kind = "postgres"
table = "crm.accounts"
write = "merge"
key = ["store_id"]
deletes = "{deletes}"
max_delete_share = 0.3
"#,
        backups = backups.display()
    )
}

async fn run(db: &TestDb, config: &crm_sync::config::Config) -> (String, Value) {
    let (run, status) = common::run_pipeline(db, config, "accounts", Duration::from_secs(60)).await;
    // The load's output, or the run's error.
    let output: Value = sqlx::query_scalar(
        "SELECT coalesce(
                    (SELECT output FROM crm_sync.steps WHERE run_id = r.id AND name = 'load'),
                    jsonb_build_object('error', r.error))
           FROM crm_sync.runs r WHERE r.id = $1",
    )
    .bind(run)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    (status, output)
}

#[tokio::test]
async fn successive_batches_insert_update_leave_alone_and_soft_delete_by_key() {
    let db = TestDb::new().await;
    let src = source().await;
    let backups = tempfile::tempdir().unwrap();
    let config_text = config(&src.base, backups.path(), "soft");
    let config = db.config(&config_text).await;

    // Batch 1: 100 new rows.
    *src.answer.lock().unwrap() = accounts(0..100, &[]);
    let (status, out) = run(&db, &config).await;
    assert_eq!(status, "succeeded", "{out}");
    assert_eq!(common::merge_counts(&out), [100, 0, 0, 0], "{out}");
    let batch1: String = sqlx::query_scalar("SELECT batch_id FROM crm.accounts LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();

    // Batch 2: 3 rows changed, 10 gone (0..10), 5 new (100..105).
    *src.answer.lock().unwrap() = accounts(10..105, &[20, 30, 40]);
    let (status, out) = run(&db, &config).await;
    assert_eq!(status, "succeeded", "{out}");
    assert_eq!(common::merge_counts(&out), [5, 3, 87, 10], "{out}");
    let batch2 = out["batch_id"].as_str().unwrap().to_string();

    // The table: every key once; the changed rows carry batch 2, the others batch 1; the first batch
    // that saw each row; the missing ones soft-deleted in batch 2.
    let rows: Vec<(String, String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT store_id, city, batch_id, first_seen_batch, deleted_in_batch FROM crm.accounts ORDER BY store_id::int",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 105);
    for (id, city, batch, first, deleted) in &rows {
        let i: u32 = id.parse().unwrap();
        let changed = [20, 30, 40].contains(&i);
        assert_eq!(city, if changed { "Ottawa" } else { "Toronto" }, "{id}");
        let expected_batch = if changed || i >= 100 {
            &batch2
        } else {
            &batch1
        };
        assert_eq!(batch, expected_batch, "{id}");
        assert_eq!(first, if i >= 100 { &batch2 } else { &batch1 }, "{id}");
        assert_eq!(deleted.as_ref(), (i < 10).then_some(&batch2), "{id}");
    }

    // The same answer again: nothing changes.
    let (status, out) = run(&db, &config).await;
    assert_eq!(status, "succeeded", "{out}");
    assert_eq!(common::merge_counts(&out), [0, 0, 95, 0], "{out}");

    // A soft-deleted key that comes back is revived (an update); the counts reach the metrics and
    // `crm-sync show`.
    *src.answer.lock().unwrap() = accounts(5..105, &[20, 30, 40]);
    let metrics = crm_sync::metrics::Metrics::new();
    let (id, status) = common::run_pipeline_with_metrics(
        &db,
        &config,
        "accounts",
        Duration::from_secs(60),
        metrics.clone(),
    )
    .await;
    assert_eq!(status, "succeeded");
    let out = common::step_output(&db.pool, id, "load").await;
    assert_eq!(common::merge_counts(&out), [0, 5, 95, 0], "{out}");
    let text = metrics.render();
    for (change, n) in [
        ("inserted", 0),
        ("updated", 5),
        ("unchanged", 95),
        ("deleted", 0),
    ] {
        let line =
            format!("crm_sync_merge_rows_total{{change=\"{change}\",pipeline=\"accounts\"}} {n}");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = common::write_config(dir.path(), &db, &config_text);
    let (code, stdout, stderr) = common::run_binary(&file, &["show", &id.to_string()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("merge  0 inserted, 5 updated, 95 unchanged, 0 deleted"),
        "{stdout}"
    );
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM crm.accounts WHERE deleted_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(live, 100);
}

/// Keys the batch tells apart but the table's column type does not ("0123456789" and "123456789" in
/// a bigint column): the load's own duplicate check refuses them, naming the key by its hash.
#[tokio::test]
async fn keys_equal_only_in_the_tables_type_are_refused_by_hash() {
    let db = TestDb::new().await;
    let src = source().await;
    let backups = tempfile::tempdir().unwrap();
    let config = db.config(&config(&src.base, backups.path(), "soft")).await;
    sqlx::raw_sql(
        "CREATE SCHEMA crm; CREATE TABLE crm.accounts (store_id bigint, store_name text, city text,
                                                     batch_id text, load_timestamp timestamptz)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    *src.answer.lock().unwrap() = json!([
        {"id": "0123456789", "name": "A", "city": "Hull"},
        {"id": "123456789", "name": "B", "city": "Hull"},
    ]);
    let (status, out) = run(&db, &config).await;
    assert_eq!(status, "failed");
    let error = out["error"].as_str().unwrap_or_default().to_string();
    let key = crm_sync::keys::KeyDisplay::new("accounts", false).parts(&[&json!("123456789")]);
    assert!(
        error.contains(&format!(
            "duplicate merge keys in the batch (store_id): {key} (2 rows); nothing was changed"
        )),
        "{error}"
    );
    assert!(!error.contains("123456789"), "{error}");
}

#[tokio::test]
async fn the_deletion_guard_and_key_validation_leave_the_table_unchanged() {
    let db = TestDb::new().await;
    let src = source().await;
    let backups = tempfile::tempdir().unwrap();
    let config = db.config(&config(&src.base, backups.path(), "hard")).await;
    *src.answer.lock().unwrap() = accounts(0..100, &[]);
    assert_eq!(run(&db, &config).await.0, "succeeded");
    let snapshot = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT string_agg(store_id || city || batch_id, ',' ORDER BY store_id) FROM crm.accounts",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let before = snapshot().await;

    // Half the rows missing: more than max_delete_share (30 %).
    *src.answer.lock().unwrap() = accounts(0..50, &[1]);
    let (status, out) = run(&db, &config).await;
    assert_eq!(status, "failed");
    let error = out["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("would delete 50 of 100 live rows"),
        "{error}"
    );
    assert_eq!(snapshot().await, before);

    // Duplicate keys in one batch: a validation error naming them.
    let mut dup = accounts(0..100, &[]);
    dup.as_array_mut()
        .unwrap()
        .push(json!({"id": 7, "name": "Again", "city": "Hull"}));
    *src.answer.lock().unwrap() = dup;
    let (status, out) = run(&db, &config).await;
    assert_eq!(status, "failed");
    let error = out["error"].as_str().unwrap_or_default().to_string();
    // Named by a hash of the key and its rows (the repeat is the 101st row), not by the value.
    let key = crm_sync::keys::KeyDisplay::new("accounts", false).parts(&[&json!("7")]);
    assert!(
        error.contains(&format!(
            "duplicate merge key store_id (e.g. {key} at rows 8, 101)"
        )),
        "{error}"
    );
    assert_eq!(snapshot().await, before);

    // A row without a key: named as such, nothing changes.
    let mut keyless = accounts(0..100, &[]);
    keyless
        .as_array_mut()
        .unwrap()
        .push(json!({"id": null, "name": "Nobody", "city": "Hull"}));
    *src.answer.lock().unwrap() = keyless;
    let (status, out) = run(&db, &config).await;
    assert_eq!(status, "failed");
    let error = out["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("empty merge key store_id (row 101): 1 rows"),
        "{error}"
    );
    assert_eq!(snapshot().await, before);

    // Hard deletes remove the missing rows.
    *src.answer.lock().unwrap() = accounts(0..90, &[]);
    let (status, out) = run(&db, &config).await;
    assert_eq!(status, "succeeded", "{out}");
    assert_eq!(common::merge_counts(&out), [0, 0, 90, 10]);
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM crm.accounts")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(total, 90);
}

#[test]
fn merge_settings_are_checked_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("write = \"merge\"\n", "needs a key"),
        (
            "write = \"merge\"\nkey = [\"nope\"]\n",
            "merge key column \"nope\" is not one of",
        ),
        (
            "key = [\"store_id\"]\n",
            "key only applies to write = \"merge\"",
        ),
        (
            "write = \"merge\"\nkey = [\"store_id\"]\nmax_delete_share = 2.0\n",
            "max_delete_share",
        ),
        ("write = \"upsert\"\n", "unknown variant"),
        (
            "skip_dirty_keys = 5\n",
            "skip_dirty_keys only applies to write = \"merge\"",
        ),
        (
            "write = \"merge\"\nkey = [\"store_id\"]\nskip_dirty_keys = -1\n",
            "destination.skip_dirty_keys: invalid value: integer `-1`, expected u64",
        ),
    ];
    for (extra, expected) in cases {
        let text = config("http://127.0.0.1:1", dir.path(), "soft").replace(
            "write = \"merge\"\nkey = [\"store_id\"]\ndeletes = \"soft\"\nmax_delete_share = 0.3\n",
            extra,
        );
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let (code, out, err) = common::run_binary(&path, &["check-config"]);
        assert_ne!(code, 0, "{extra}");
        assert!(
            format!("{out}{err}").contains(expected),
            "{extra}: {out}{err}"
        );
    }
}

#[tokio::test]
async fn bigquery_merges_through_a_staging_table_with_exact_counts() {
    use crm_sync::gcp::GcpAuth;
    use crm_sync::gcp::bigquery::BigQueryLoader;

    let db = TestDb::new().await;
    let src = source().await;
    let (gcs, bq) = common::emulators::gcp_with_bucket("demo", "merge-backups").await;
    let backups = tempfile::tempdir().unwrap();
    let text = on_gcp(
        &config(&src.base, backups.path(), "soft"),
        backups.path(),
        &gcs,
        &bq,
    );
    let config = db.config(&text).await;

    *src.answer.lock().unwrap() = accounts(0..50, &[]);
    let (status, out) = run(&db, &config).await;
    assert_eq!(status, "succeeded", "{out}");
    assert_eq!(common::merge_counts(&out), [50, 0, 0, 0], "{out}");

    *src.answer.lock().unwrap() = accounts(5..55, &[10, 11]);
    let (status, out) = run(&db, &config).await;
    assert_eq!(status, "succeeded", "{out}");
    assert_eq!(common::merge_counts(&out), [5, 2, 43, 5], "{out}");
    let batch2 = out["batch_id"].as_str().unwrap().to_string();

    let loader = BigQueryLoader::new(Some(bq.base_url()), GcpAuth::Anonymous)
        .await
        .unwrap();
    let rows = loader
        .query_rows(
            "demo",
            "SELECT store_id, city, batch_id, deleted_in_batch FROM `demo.crm.accounts`",
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 55);
    let get = |id: &str| rows.iter().find(|r| r["store_id"] == id).unwrap().clone();
    assert_eq!(get("10")["city"], "Ottawa");
    assert_eq!(get("10")["batch_id"], batch2.as_str());
    assert_eq!(get("2")["deleted_in_batch"], batch2.as_str());
    assert!(get("20")["deleted_in_batch"].is_null());
    // The staging tables are gone.
    let tables = loader
        .query_rows(
            "demo",
            "SELECT table_name FROM `demo.crm.INFORMATION_SCHEMA.TABLES`",
        )
        .await
        .unwrap();
    assert!(
        tables.iter().any(|t| t.to_string().contains("accounts"))
            && tables
                .iter()
                .all(|t| !t.to_string().contains("crm_sync_stage")),
        "{tables:?}"
    );

    // The same batch again changes nothing; the guard fires on a truncated extract.
    let (_, out) = run(&db, &config).await;
    assert_eq!(common::merge_counts(&out), [0, 0, 50, 0], "{out}");
    *src.answer.lock().unwrap() = accounts(5..20, &[]);
    let (status, out) = run(&db, &config).await;
    assert_eq!(status, "failed");
    assert!(
        out["error"]
            .as_str()
            .unwrap_or_default()
            .contains("would delete 35 of 50 live rows"),
        "{out}"
    );
}

/// A test config moved to Google Cloud: backups in the `merge-backups` bucket of fake-gcs-server,
/// the destination the `demo.crm.accounts` table of bqemulator (same write settings).
fn on_gcp(
    text: &str,
    backups: &std::path::Path,
    gcs: &common::emulators::FakeGcs,
    bq: &common::emulators::BqEmulator,
) -> String {
    let text = text
        .replace(
            &format!("kind = \"local\"\ndir = \"{}\"", backups.display()),
            &format!(
                "kind = \"gcs\"\nbucket = \"merge-backups\"\nproject = \"demo\"\ncredentials = \"anonymous\"\nendpoint = \"{}\"",
                gcs.endpoint()
            ),
        )
        .replace(
            "kind = \"postgres\"\ntable = \"crm.accounts\"",
            &format!(
                "kind = \"bigquery\"\nproject = \"demo\"\ndataset = \"crm\"\ntable = \"accounts\"\ncredentials = \"anonymous\"\nendpoint = \"{}\"",
                bq.base_url()
            ),
        );
    assert!(
        text.contains("kind = \"bigquery\"") && text.contains("kind = \"gcs\""),
        "{text}"
    );
    text
}

/// A key part may be null, and null equals null: the same rows merge the same way in PostgreSQL
/// (NULLS NOT DISTINCT index, jsonb key arrays) and BigQuery (IS NOT DISTINCT FROM).
#[tokio::test]
async fn composite_keys_with_null_parts_match_in_postgres_and_bigquery() {
    let db = TestDb::new().await;
    let src = source().await;
    let (gcs, bq) = common::emulators::gcp_with_bucket("demo", "merge-backups").await;
    let backups = tempfile::tempdir().unwrap();
    let pg_text = config(&src.base, backups.path(), "soft")
        .replace("key = [\"store_id\"]", "key = [\"store_id\", \"city\"]")
        .replace("max_delete_share = 0.3", "max_delete_share = 0.5");
    let gcp_text = on_gcp(&pg_text, backups.path(), &gcs, &bq)
        .replace("name = \"accounts\"", "name = \"accounts_gcp\"");
    // One config at a time: registering a config disables the pipelines it does not name.
    let configs = [("accounts", pg_text), ("accounts_gcp", gcp_text)];
    let batches = [
        // (answer, expected [inserted, updated, unchanged, deleted])
        (
            json!([{"id": 1, "name": "A", "city": null}, {"id": 1, "name": "B", "city": "X"},
                   {"id": 2, "name": "C", "city": null}]),
            [3, 0, 0, 0],
        ),
        (
            json!([{"id": 1, "name": "A2", "city": null}, {"id": 1, "name": "B", "city": "X"},
                   {"id": 2, "name": "C", "city": null}]),
            [0, 1, 2, 0],
        ),
        (
            json!([{"id": 1, "name": "A2", "city": null}, {"id": 1, "name": "B", "city": "X"}]),
            [0, 0, 2, 1],
        ),
    ];
    for (pipeline, text) in &configs {
        let config = &db.config(text).await;
        for (answer, expected) in &batches {
            *src.answer.lock().unwrap() = answer.clone();
            let (run, status) =
                common::run_pipeline(&db, config, pipeline, Duration::from_secs(60)).await;
            let out = common::step_output(&db.pool, run, "load").await;
            assert_eq!(
                status,
                "succeeded",
                "{pipeline}: {}",
                common::run_error(&db.pool, run).await
            );
            assert_eq!(common::merge_counts(&out), *expected, "{pipeline}: {out}");
        }
    }
    // Both tables end the same: three keys, one of them (2, null) soft-deleted, (1, null) renamed.
    let pg: Vec<(String, Option<String>, String, bool)> = sqlx::query_as(
        "SELECT store_id, city, store_name, deleted_at IS NULL FROM crm.accounts ORDER BY 1, 2",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        pg,
        vec![
            ("1".into(), Some("X".into()), "B".into(), true),
            ("1".into(), None, "A2".into(), true),
            ("2".into(), None, "C".into(), false),
        ]
    );
    let loader = crm_sync::gcp::bigquery::BigQueryLoader::new(
        Some(bq.base_url()),
        crm_sync::gcp::GcpAuth::Anonymous,
    )
    .await
    .unwrap();
    let rows = loader
        .query_rows(
            "demo",
            "SELECT store_id, city, store_name, deleted_at IS NULL AS live FROM `demo.crm.accounts`
              ORDER BY store_id, city",
        )
        .await
        .unwrap();
    let rows: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        rows[0].contains("\"A2\"") && rows[0].contains("\"city\":null"),
        "{rows:?}"
    );
    assert!(
        rows[1].contains("\"X\"") && rows[1].contains("true"),
        "{rows:?}"
    );
    assert!(
        rows[2].contains("\"C\"") && rows[2].contains("false"),
        "{rows:?}"
    );
}
