//! The EZ Focus pipeline on Google Cloud, from `examples/ezfocus_gcp.toml`, against real local
//! emulators: fake-gcs-server for the backup and staging, bqemulator for the BigQuery load job.

mod common;

use std::time::Duration;

use common::emulators::{BqEmulator, FakeGcs};
use common::ezfocus::{BUCKET, PROJECT};
use common::{RunningWorker, TestDb, wait_for_run};
use crm_sync::config::Config;
use crm_sync::fixtures::ezfocus::{self, AccountsQuery, EzFocusConfig, EzFocusFixture};
use crm_sync::gcp::GcpAuth;
use crm_sync::gcp::bigquery::BigQueryLoader;
use crm_sync::gcp::gcs::{GcsStore, parse_gs_uri};
use crm_sync::queue::{self, Trigger};
use futures::StreamExt;
use serde_json::json;
use uuid::Uuid;

struct Setup {
    db: TestDb,
    fixture: EzFocusFixture,
    gcs: FakeGcs,
    bq: BqEmulator,
    config: Config,
    _secrets: tempfile::TempDir,
}

async fn setup() -> Setup {
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
    let config = db.config(&text).await;
    Setup {
        db,
        fixture,
        gcs,
        bq,
        config,
        _secrets: secrets,
    }
}

async fn count_rows(s: &Setup) -> Vec<serde_json::Value> {
    let loader = BigQueryLoader::new(Some(s.bq.base_url()), GcpAuth::Anonymous)
        .await
        .unwrap();
    loader
        .query_rows(
            PROJECT,
            "SELECT batch_id, count(*) AS n, count(DISTINCT store_id) AS ids, countif(latitude IS NOT NULL) AS lat
               FROM `test.crm.Accounts_List` GROUP BY batch_id",
        )
        .await
        .unwrap()
}

async fn output(db: &TestDb, run: Uuid, step: &str) -> serde_json::Value {
    sqlx::query_scalar("SELECT output FROM crm_sync.steps WHERE run_id = $1 AND name = $2")
        .bind(run)
        .bind(step)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn accounts_land_in_bigquery_with_the_raw_answer_backed_up_in_gcs() {
    let s = setup().await;
    let worker = RunningWorker::start(&s.db, &s.config).await;
    let run = queue::enqueue(
        &s.db.pool,
        "ezfocus_accounts",
        &json!({}),
        None,
        Trigger::Cli,
    )
    .await
    .unwrap();
    let status = wait_for_run(&s.db.pool, run, Duration::from_secs(90)).await;
    worker.stop().await;
    let error: Option<String> = sqlx::query_scalar("SELECT error FROM crm_sync.runs WHERE id = $1")
        .bind(run)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "succeeded", "{error:?}");

    // The dataset was created where the example's `location` says (its seed lives in Montreal).
    let dataset: serde_json::Value = reqwest::get(format!(
        "{}/bigquery/v2/projects/{PROJECT}/datasets/crm",
        s.bq.base_url()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(dataset["location"], "northamerica-northeast1", "{dataset}");

    // The raw backup object in the bucket is the fixture's answer, byte for byte.
    let extract = output(&s.db, run, "extract").await;
    let uri = extract["object"].as_str().unwrap();
    assert!(
        uri.starts_with(&format!("gs://{BUCKET}/accounts/raw/accounts_")),
        "{uri}"
    );
    let (bucket, object) = parse_gs_uri(uri).unwrap();
    let store = GcsStore::new(
        Some(s.gcs.endpoint()),
        Some(PROJECT.into()),
        GcpAuth::Anonymous,
    )
    .await
    .unwrap();
    let mut body = store.get_stream(bucket, object).await.unwrap();
    let mut stored = Vec::new();
    while let Some(chunk) = body.next().await {
        stored.extend_from_slice(&chunk.unwrap());
    }
    assert!(
        stored == ezfocus::render_accounts_body(s.fixture.config(), &AccountsQuery::standard())
    );

    let batch: String = sqlx::query_scalar("SELECT batch_id FROM crm_sync.runs WHERE id = $1")
        .bind(run)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    let rows = count_rows(&s).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["batch_id"], json!(batch));
    assert_eq!(
        rows[0]["n"].to_string().trim_matches('"'),
        "2700",
        "{rows:?}"
    );
    let load = output(&s.db, run, "load").await;
    assert_eq!(load["rows"], 2700);
    assert_eq!(load["table"], "test.crm.Accounts_List");
    assert!(
        load["source"]
            .as_str()
            .unwrap()
            .starts_with(&format!("gs://{BUCKET}/ezfocus_accounts/staging/"))
    );
}

/// Stops BigQuery, starts a worker and a run, and waits until the load has failed `attempts` times.
async fn run_into_a_stopped_bigquery(s: &mut Setup, attempts: u32) -> (RunningWorker, Uuid) {
    s.bq.stop();
    let worker = RunningWorker::start(&s.db, &s.config).await;
    let run = queue::enqueue(
        &s.db.pool,
        "ezfocus_accounts",
        &json!({}),
        None,
        Trigger::Cli,
    )
    .await
    .unwrap();
    common::wait_until(
        &s.db.pool,
        &format!(
            "SELECT count(*) >= {attempts} FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
              WHERE s.name = 'load' AND a.outcome = 'retry'"
        ),
        Duration::from_secs(60),
    )
    .await;
    (worker, run)
}

#[tokio::test]
async fn bigquery_down_during_the_load_is_retried_without_a_second_extract() {
    let mut s = setup().await;
    let (worker, run) = run_into_a_stopped_bigquery(&mut s, 2).await;
    s.bq.restart().await;
    let status = wait_for_run(&s.db.pool, run, Duration::from_secs(90)).await;
    worker.stop().await;
    assert_eq!(status, "succeeded");
    assert_eq!(s.fixture.request_count(), 1, "the source was called again");
    let extract_attempts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
          WHERE a.run_id = $1 AND s.name = 'extract'",
    )
    .bind(run)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(extract_attempts, 1);
    let rows = count_rows(&s).await;
    assert_eq!(
        rows[0]["n"].to_string().trim_matches('"'),
        "2700",
        "{rows:?}"
    );
}

#[test]
fn the_gcp_example_keeps_the_same_transform_and_validation_as_the_postgres_one() {
    let section = |text: &str| {
        let start = text.find("[pipelines.transform]").unwrap();
        let end = text.find("[pipelines.destination]").unwrap();
        text[start..end].to_string()
    };
    let pg = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/ezfocus.toml"
    ))
    .unwrap();
    let gcp = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/ezfocus_gcp.toml"
    ))
    .unwrap();
    assert_eq!(section(&pg), section(&gcp));
}

/// A load job that an earlier attempt started (its worker died before recording it) is found by the
/// next attempt from its job id (batch, step, fencing token) and used, instead of a second load.
#[tokio::test]
async fn a_load_job_an_earlier_attempt_started_is_used_not_run_again() {
    let mut s = setup().await;
    let (worker, run) = run_into_a_stopped_bigquery(&mut s, 1).await;
    worker.stop().await;
    let (step_id, fence): (i64, i64) = sqlx::query_as(
        "SELECT a.step_id, a.fence FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
          WHERE a.run_id = $1 AND s.name = 'load' ORDER BY a.fence LIMIT 1",
    )
    .bind(run)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    let batch = common::batch_of(&s.db.pool, run).await;
    let earlier =
        crm_sync::destinations::bigquery::load_job_id(&batch, queue::Lease { step_id, fence });

    // The earlier attempt's job, as its worker would have started it before dying.
    s.bq.restart().await;
    let loader = BigQueryLoader::new(Some(s.bq.base_url()), GcpAuth::Anonymous)
        .await
        .unwrap();
    loader.ensure_dataset(PROJECT, "crm").await.unwrap();
    let transform = s.config.pipelines[0].transform.as_ref().unwrap();
    let data: Vec<_> = transform
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.column_type))
        .collect();
    let schema = crm_sync::destinations::bigquery::schema(
        &data,
        &transform.batch_column,
        &transform.timestamp_column,
    );
    let staging = output(&s.db, run, "transform").await["object"]
        .as_str()
        .unwrap()
        .to_string();
    loader
        .load_truncate_with_job_id(PROJECT, "crm", "Accounts_List", &staging, &schema, &earlier)
        .await
        .unwrap();

    let worker = RunningWorker::start(&s.db, &s.config).await;
    let status = wait_for_run(&s.db.pool, run, Duration::from_secs(90)).await;
    worker.stop().await;
    assert_eq!(status, "succeeded");
    let load = output(&s.db, run, "load").await;
    assert_eq!(load["job_id"], json!(earlier), "{load}");
    assert_eq!(load["rows"], 2700);
    // The succeeding attempt started no job of its own.
    let (last_step, last_fence): (i64, i64) = sqlx::query_as(
        "SELECT a.step_id, a.fence FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
          WHERE a.run_id = $1 AND s.name = 'load' AND a.outcome = 'succeeded'",
    )
    .bind(run)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    let own = crm_sync::destinations::bigquery::load_job_id(
        &batch,
        queue::Lease {
            step_id: last_step,
            fence: last_fence,
        },
    );
    assert!(
        loader.earlier_load(PROJECT, &own).await.unwrap().is_none(),
        "the succeeding attempt started its own load job {own}"
    );
    let rows = count_rows(&s).await;
    assert_eq!(rows[0]["n"].to_string().trim_matches('"'), "2700");
}
