//! Misbehaving sources against the full reference pipelines into PostgreSQL: 500s, 429 with
//! Retry-After, timeouts (a silent server, a stalled body, a step over its `step_timeout`), cut
//! answers, and Qashier download errors. Retryable faults are retried with backoff up to
//! `max_attempts`; when the attempts run out the run fails, and the previous batch stays in the
//! table, whole. (Malformed and empty answers, a cut Qashier download and a changed CSV header are
//! in `ezfocus_pipeline.rs` and `qashier_pipeline.rs`; 429 timing and 401s in `extract.rs`.)

mod common;

use std::time::Duration;

use common::{RunningWorker, TestDb, table_batches, wait_for_run};
use crm_sync::config::Config;
use crm_sync::fixtures::ezfocus::{EzFocusConfig, EzFocusFixture, Fault};
use crm_sync::fixtures::qashier;
use crm_sync::queue::{self, Trigger};
use serde_json::json;
use uuid::Uuid;

const ACCOUNTS: &str = "ezfocus.accounts_list";

struct EzFocus {
    db: TestDb,
    fixture: EzFocusFixture,
    config: Config,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// `examples/ezfocus.toml` on the fixture (5 attempts, 50 ms first backoff) with a 1 s read
/// timeout, edited further by `edit`, and one good batch already loaded. Returns the batch.
async fn ezfocus(edit: impl Fn(String) -> String) -> (EzFocus, String) {
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let text = common::ezfocus::example_config(&fixture, secrets.path(), backups.path())
        .replace("read_timeout = \"60s\"", "read_timeout = \"1s\"");
    let config = db.config(&edit(text)).await;
    let s = EzFocus {
        db,
        fixture,
        config,
        _dirs: (secrets, backups),
    };
    let (good, status) = run(&s.db, &s.config, "ezfocus_accounts").await;
    assert_eq!(
        status,
        "succeeded",
        "{}",
        common::run_error(&s.db.pool, good).await
    );
    let batch = common::batch_of(&s.db.pool, good).await;
    (s, batch)
}

async fn run(db: &TestDb, config: &Config, pipeline: &str) -> (Uuid, String) {
    common::run_pipeline(db, config, pipeline, Duration::from_secs(120)).await
}

/// (outcome, error) of every attempt of `step` in `run`, in order.
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

fn outcomes(log: &[(String, String)]) -> Vec<&str> {
    log.iter().map(|a| a.0.as_str()).collect()
}

/// Asserts the run failed in its extract after `n` attempts whose errors all contain `error`, and the
/// table still holds exactly `batch`.
async fn failed_keeping(
    s: &EzFocus,
    run: Uuid,
    status: &str,
    n: usize,
    error: &str,
    batch: &str,
    rows: i64,
) {
    let run_error = common::run_error(&s.db.pool, run).await;
    assert_eq!(status, "failed", "{run_error}");
    let log = attempts(&s.db, run, "extract").await;
    let mut expected = vec!["retry"; n - 1];
    expected.push("failed");
    assert_eq!(outcomes(&log), expected, "{log:?}");
    assert!(log.iter().all(|a| a.1.contains(error)), "{log:?}");
    assert!(
        run_error.contains(&format!(
            "step extract failed (attempt {n} of {n}, no attempts left)"
        )),
        "{run_error}"
    );
    assert_eq!(
        table_batches(&s.db.pool, ACCOUNTS).await,
        vec![(batch.to_string(), rows)]
    );
}

/// Starts a worker, enqueues one run, waits until `query` holds, calls `then`, and waits for the run.
async fn run_through(s: &EzFocus, query: &str, then: impl FnOnce()) -> (Uuid, String) {
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
    common::wait_until(&s.db.pool, query, Duration::from_secs(60)).await;
    then();
    let status = wait_for_run(&s.db.pool, run, Duration::from_secs(60)).await;
    worker.stop().await;
    (run, status)
}

#[tokio::test]
async fn ezfocus_500s_and_429s_are_retried_then_fail_keeping_the_previous_batch() {
    let (s, good) = ezfocus(|t| t).await;

    // The gateway answers 500 to all five attempts: the run fails, the table keeps its batch.
    s.fixture.faults().fail_first_n_with_500(5);
    let (bad, status) = run(&s.db, &s.config, "ezfocus_accounts").await;
    failed_keeping(&s, bad, &status, 5, "answered HTTP 500", &good, 2700).await;
    assert_eq!(s.fixture.status_count(500), 5);

    // A 429 with Retry-After: 1, then a 500, then the answer: one run, a new batch.
    s.fixture.faults().set(Fault::RateLimitNext {
        requests: 1,
        retry_after_secs: 1,
    });
    s.fixture.faults().fail_first_n_with_500(1);
    let (ok, status) = run(&s.db, &s.config, "ezfocus_accounts").await;
    assert_eq!(
        status,
        "succeeded",
        "{}",
        common::run_error(&s.db.pool, ok).await
    );
    let log = attempts(&s.db, ok, "extract").await;
    assert_eq!(outcomes(&log), ["retry", "retry", "succeeded"], "{log:?}");
    assert!(
        log[0].1.contains("rate limited") && log[1].1.contains("HTTP 500"),
        "{log:?}"
    );
    let waited: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM (b.started_at - a.finished_at))::float8
           FROM crm_sync.attempts a JOIN crm_sync.attempts b ON b.step_id = a.step_id AND b.fence = a.fence + 1
          WHERE a.run_id = $1 AND a.error LIKE 'rate limited%'",
    )
    .bind(ok)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert!(
        waited >= 1.0,
        "retried {waited:.3} s after a 429 with Retry-After: 1"
    );
    let batch = common::batch_of(&s.db.pool, ok).await;
    assert_eq!(
        table_batches(&s.db.pool, ACCOUNTS).await,
        vec![(batch, 2700)]
    );
    common::consistency::assert_history_consistent(&s.db.pool).await;
}

#[tokio::test]
async fn ezfocus_timeouts_and_cut_answers_are_retried_then_fail_keeping_the_previous_batch() {
    let (s, good) = ezfocus(|t| t).await;

    // A server that sends no headers within the 1 s read timeout, every time.
    s.fixture
        .faults()
        .set(Fault::DelayHeaders(Duration::from_secs(3)));
    let (bad, status) = run(&s.db, &s.config, "ezfocus_accounts").await;
    failed_keeping(&s, bad, &status, 5, "timed out", &good, 2700).await;
    s.fixture.faults().clear();

    // A connection cut after 50 kB, every time: no partial object, the table keeps its batch.
    s.fixture.faults().set(Fault::CutBodyAfter(50_000));
    let (bad, status) = run(&s.db, &s.config, "ezfocus_accounts").await;
    failed_keeping(&s, bad, &status, 5, "was cut after", &good, 2700).await;
    s.fixture.faults().clear();

    // A body that stalls past the read timeout between chunks, until the server recovers.
    s.fixture
        .faults()
        .set(Fault::SlowBody(Duration::from_millis(1500)));
    let faults = s.fixture.faults().clone();
    let (ok, status) = run_through(
        &s,
        "SELECT count(*) >= 2 FROM crm_sync.attempts a JOIN crm_sync.runs r ON r.id = a.run_id
          WHERE r.status = 'running' AND a.outcome = 'retry'",
        move || faults.clear(),
    )
    .await;
    assert_eq!(
        status,
        "succeeded",
        "{}",
        common::run_error(&s.db.pool, ok).await
    );
    let log = attempts(&s.db, ok, "extract").await;
    assert!(
        log.len() >= 3 && log.last().unwrap().0 == "succeeded",
        "{log:?}"
    );
    assert!(
        log[..log.len() - 1]
            .iter()
            .all(|a| a.0 == "retry" && a.1.ends_with("nothing arrived for 1s (read_timeout)")),
        "{log:?}"
    );
    let batch = common::batch_of(&s.db.pool, ok).await;
    assert_eq!(
        table_batches(&s.db.pool, ACCOUNTS).await,
        vec![(batch, 2700)]
    );

    // Only whole objects are visible in the backup store: the raw answers of the two good runs.
    let root = s._dirs.1.path().display().to_string();
    let visible: Vec<String> = files_under(s._dirs.1.path())
        .into_iter()
        .map(|f| f[root.len()..].to_string())
        .filter(|f| f.contains("/raw/") && !f.contains("/."))
        .collect();
    assert_eq!(visible.len(), 2, "{visible:?}");
    common::consistency::assert_history_consistent(&s.db.pool).await;
}

#[tokio::test]
async fn a_step_over_its_timeout_is_recorded_retried_and_the_run_ends_as_configured() {
    // 2,700 accounts in 11 chunks 600 ms apart: the extract needs over 6 s, never silent for the 1 s
    // read timeout. The other steps take well under 4 s, even in a debug build.
    let (s, good) = ezfocus(|t| {
        t.replace("step_timeout = \"9m\"", "step_timeout = \"4s\"")
            .replace("max_attempts = 5", "max_attempts = 2")
    })
    .await;
    s.fixture
        .faults()
        .set(Fault::SlowBody(Duration::from_millis(600)));

    // Slow every time: both attempts time out and the run fails after the configured 2.
    let (bad, status) = run(&s.db, &s.config, "ezfocus_accounts").await;
    failed_keeping(&s, bad, &status, 2, "step timed out after 4s", &good, 2700).await;

    // Slow once: the timed-out attempt is retried and the run succeeds.
    let faults = s.fixture.faults().clone();
    let (ok, status) = run_through(
        &s,
        "SELECT EXISTS (SELECT 1 FROM crm_sync.attempts a JOIN crm_sync.runs r ON r.id = a.run_id
                         WHERE r.status = 'running' AND a.error LIKE 'step timed out%')",
        move || faults.clear(),
    )
    .await;
    assert_eq!(
        status,
        "succeeded",
        "{}",
        common::run_error(&s.db.pool, ok).await
    );
    let log = attempts(&s.db, ok, "extract").await;
    assert_eq!(outcomes(&log), ["retry", "succeeded"], "{log:?}");
    assert_eq!(log[0].1, "step timed out after 4s");
    let batch = common::batch_of(&s.db.pool, ok).await;
    assert_eq!(
        table_batches(&s.db.pool, ACCOUNTS).await,
        vec![(batch, 2700)]
    );
    common::consistency::assert_history_consistent(&s.db.pool).await;
}

#[tokio::test]
async fn qashier_download_errors_are_retried_then_fail_keeping_the_previous_batch() {
    let db = TestDb::new().await;
    let fixture = common::qashier::quick_fixture().await;
    let secrets = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let config = db
        .config(&common::qashier::example_config(
            &fixture,
            qashier::DEFAULT_PASSWORD,
            secrets.path(),
            backups.path(),
        ))
        .await;
    let rows = qashier::DEFAULT_ROWS as i64;
    let table = "backoffice.customers";
    let (good, status) = run(&db, &config, "qashier_customers").await;
    assert_eq!(
        status,
        "succeeded",
        "{}",
        common::run_error(&db.pool, good).await
    );
    let good_batch = common::batch_of(&db.pool, good).await;

    // The download answers 500 once: the second attempt (a fresh browser) gets the file.
    fixture.faults().set(qashier::Fault::FailDownloadsNext(1));
    let (ok, status) = run(&db, &config, "qashier_customers").await;
    assert_eq!(
        status,
        "succeeded",
        "{}",
        common::run_error(&db.pool, ok).await
    );
    assert_eq!(
        outcomes(&attempts(&db, ok, "extract").await),
        ["retry", "succeeded"]
    );
    let ok_batch = common::batch_of(&db.pool, ok).await;
    assert_eq!(
        table_batches(&db.pool, table).await,
        vec![(ok_batch.clone(), rows)]
    );

    // 500 on both attempts the config allows: the run fails and the table keeps the last batch.
    fixture.faults().set(qashier::Fault::FailDownloadsNext(2));
    let (bad, status) = run(&db, &config, "qashier_customers").await;
    assert_eq!(status, "failed");
    let log = attempts(&db, bad, "extract").await;
    assert_eq!(outcomes(&log), ["retry", "failed"], "{log:?}");
    assert_eq!(table_batches(&db.pool, table).await, vec![(ok_batch, rows)]);
    assert_ne!(good_batch, common::batch_of(&db.pool, bad).await);
    assert_eq!(fixture.counts().downloads_refused, 3);
    common::consistency::assert_history_consistent(&db.pool).await;
}

fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}
