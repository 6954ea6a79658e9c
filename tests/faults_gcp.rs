//! The GCS and BigQuery emulators crash and come back in the middle of a run of the EZ Focus pipeline
//! on Google Cloud (`examples/ezfocus_gcp.toml`): fake-gcs-server while the extract streams the raw
//! answer into the bucket, bqemulator while the load job runs. The run retries and completes; the
//! bucket holds only whole objects and the table exactly one whole batch.
//!
//! bqemulator 1.4.0 empties a table when a WRITE_TRUNCATE load job fails (real BigQuery applies a
//! load job atomically or not at all), so this test does not claim the previous batch survives a
//! failed load on the emulator: it checks the table once the retried load has succeeded.

mod common;

use std::time::{Duration, Instant};

use common::emulators::BqEmulator;
use common::ezfocus::{BUCKET, PROJECT};
use common::{RunningWorker, TestDb, wait_for_run};
use crm_sync::fixtures::ezfocus::{self, AccountsQuery, EzFocusConfig, EzFocusFixture, Fault};
use crm_sync::gcp::GcpAuth;
use crm_sync::gcp::bigquery::BigQueryLoader;
use crm_sync::queue::{self, Trigger};
use serde_json::json;
use uuid::Uuid;

/// (batch_id, rows) per batch in the BigQuery table.
async fn bigquery_batches(bq: &BqEmulator) -> Vec<(String, String)> {
    let loader = BigQueryLoader::new(Some(bq.base_url()), GcpAuth::Anonymous)
        .await
        .unwrap();
    let rows = loader
        .query_rows(
            PROJECT,
            "SELECT batch_id, count(*) AS n FROM `test.crm.Accounts_List` GROUP BY batch_id",
        )
        .await
        .unwrap();
    let text = |v: &serde_json::Value| v.to_string().trim_matches('"').to_string();
    rows.iter()
        .map(|r| (text(&r["batch_id"]), text(&r["n"])))
        .collect()
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &std::path::Path, root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path, root));
        } else {
            out.push(path.strip_prefix(root).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

async fn attempts(db: &TestDb, run: Uuid, step: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT a.outcome, coalesce(a.error, '') FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
          WHERE a.run_id = $1 AND s.name = $2 ORDER BY a.fence",
    )
    .bind(run)
    .bind(step)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn gcs_and_bigquery_crashing_mid_run_are_retried_and_the_run_completes_whole() {
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let (mut gcs, mut bq) = common::emulators::gcp_with_bucket(PROJECT, BUCKET).await;
    let secrets = tempfile::tempdir().unwrap();
    let config = db
        .config(&common::ezfocus::gcp_example_config(
            &fixture,
            secrets.path(),
            &gcs.endpoint(),
            &bq.base_url(),
        ))
        .await;
    let worker = RunningWorker::start(&db, &config).await;
    let params = json!({});
    let enqueue = || queue::enqueue(&db.pool, "ezfocus_accounts", &params, None, Trigger::Cli);

    // A first batch, undisturbed.
    let first = enqueue().await.unwrap();
    assert_eq!(
        wait_for_run(&db.pool, first, Duration::from_secs(120)).await,
        "succeeded"
    );
    let first_batch = common::batch_of(&db.pool, first).await;

    // The second run: the extract streams slowly into the bucket, and the bucket goes away.
    fixture
        .faults()
        .set(Fault::SlowBody(Duration::from_millis(300)));
    let run = enqueue().await.unwrap();
    let started = Instant::now();
    common::wait_until(
        &db.pool,
        &format!(
            "SELECT EXISTS (SELECT 1 FROM crm_sync.steps WHERE run_id = '{run}' AND name = 'extract'
                             AND status = 'running' AND attempt_started_at < now() - interval '800 milliseconds')"
        ),
        Duration::from_secs(60),
    )
    .await;
    gcs.stop();
    fixture.faults().clear();
    common::wait_until(
        &db.pool,
        &format!(
            "SELECT count(*) >= 2 FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
              WHERE a.run_id = '{run}' AND s.name = 'extract' AND a.outcome = 'retry'"
        ),
        Duration::from_secs(60),
    )
    .await;
    gcs.restart().await;
    println!(
        "fake-gcs-server down {:.1} s during the extract",
        started.elapsed().as_secs_f64()
    );

    // Then BigQuery crashes while the load job runs.
    common::wait_until(
        &db.pool,
        &format!(
            "SELECT EXISTS (SELECT 1 FROM crm_sync.steps WHERE run_id = '{run}' AND name = 'load' AND status = 'running')"
        ),
        Duration::from_secs(60),
    )
    .await;
    let bq_down = Instant::now();
    bq.stop();
    common::wait_until(
        &db.pool,
        &format!(
            "SELECT count(*) >= 2 FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
              WHERE a.run_id = '{run}' AND s.name = 'load' AND a.outcome = 'retry'"
        ),
        Duration::from_secs(60),
    )
    .await;
    bq.restart().await;
    println!(
        "bqemulator down {:.1} s during the load",
        bq_down.elapsed().as_secs_f64()
    );
    let status = wait_for_run(&db.pool, run, Duration::from_secs(120)).await;
    worker.stop().await;
    assert_eq!(
        status,
        "succeeded",
        "{}",
        common::run_error(&db.pool, run).await
    );
    println!(
        "run succeeded {:.1} s after it was enqueued",
        started.elapsed().as_secs_f64()
    );

    let extract = attempts(&db, run, "extract").await;
    let load = attempts(&db, run, "load").await;
    println!(
        "extract: {} attempts, load: {} attempts; first errors: {} / {}",
        extract.len(),
        load.len(),
        extract[0].1,
        load[0].1
    );
    for (step, log) in [("extract", &extract), ("load", &load)] {
        assert!(log.len() >= 3, "{step}: {log:?}");
        assert!(
            log[..log.len() - 1].iter().all(|a| a.0 == "retry"),
            "{step}: {log:?}"
        );
        assert_eq!(log.last().unwrap().0, "succeeded", "{step}: {log:?}");
    }
    // Transform and validate ran once: the outages did not leak into the steps after them.
    for step in ["transform", "validate"] {
        assert_eq!(attempts(&db, run, step).await.len(), 1, "{step}");
    }

    // The table: exactly the second batch, whole.
    let batch = common::batch_of(&db.pool, run).await;
    assert_eq!(
        bigquery_batches(&bq).await,
        vec![(batch.clone(), "2700".into())],
        "first batch was {first_batch}"
    );
    // The bucket: the raw answer and the staged rows of each batch, whole; nothing half-uploaded.
    let bucket = gcs.root.join(BUCKET);
    let objects = files_under(&bucket, &gcs.root);
    assert_eq!(objects.len(), 4, "{objects:?}");
    assert_eq!(
        objects
            .iter()
            .filter(|o| o.contains("/accounts/raw/"))
            .count(),
        2,
        "{objects:?}"
    );
    for b in [&first_batch, &batch] {
        assert!(
            objects.contains(&format!("{BUCKET}/ezfocus_accounts/staging/{b}.ndjson")),
            "{objects:?}"
        );
    }
    let raw: serde_json::Value = sqlx::query_scalar(
        "SELECT output FROM crm_sync.steps WHERE run_id = $1 AND name = 'extract'",
    )
    .bind(run)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let object = raw["object"]
        .as_str()
        .unwrap()
        .strip_prefix("gs://")
        .unwrap();
    let expected = ezfocus::render_accounts_body(fixture.config(), &AccountsQuery::standard());
    assert!(
        std::fs::read(gcs.root.join(object)).unwrap() == expected,
        "the raw backup is not the answer"
    );
    common::consistency::assert_history_consistent(&db.pool).await;
}
