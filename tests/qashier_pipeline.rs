//! The Qashier customers pipeline end to end, from `examples/qashier.toml`: real headless Chromium
//! against the Qashier fixture, the CSV backed up as downloaded, transformed, validated, and
//! `backoffice.customers` replaced in one transaction.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{TestDb, browser};
use crm_sync::config::Config;
use crm_sync::fixtures::qashier::{self, Fault, QashierFixture};
use uuid::Uuid;

struct Setup {
    db: TestDb,
    fixture: QashierFixture,
    config: Config,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn setup(password: &str) -> Setup {
    let db = TestDb::new().await;
    let fixture = common::qashier::quick_fixture().await;
    let secrets = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let text = common::qashier::example_config(&fixture, password, secrets.path(), backups.path());
    let config = db.config(&text).await;
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
        "qashier_customers",
        Duration::from_secs(120),
    )
    .await
}

async fn table_batches(db: &TestDb) -> Vec<(String, i64)> {
    common::table_batches(&db.pool, "backoffice.customers").await
}

#[tokio::test]
async fn customers_are_exported_with_chromium_and_replace_the_table() {
    let s = setup(qashier::DEFAULT_PASSWORD).await;
    let (first, status) = run(&s).await;
    assert_eq!(
        status,
        "succeeded",
        "{}",
        common::run_error(&s.db.pool, first).await
    );
    let expected_rows = qashier::DEFAULT_ROWS as i64;
    assert_eq!(
        table_batches(&s.db).await,
        vec![(common::batch_of(&s.db.pool, first).await, expected_rows)]
    );

    // The raw backup is the CSV exactly as downloaded.
    let extract: serde_json::Value = sqlx::query_scalar(
        "SELECT output FROM crm_sync.steps WHERE run_id = $1 AND name = 'extract'",
    )
    .bind(first)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    let path = extract["object"]
        .as_str()
        .unwrap()
        .strip_prefix("file://")
        .unwrap()
        .to_string();
    assert!(
        path.ends_with(".csv") && path.contains("/customers/raw/customers_"),
        "{path}"
    );
    assert!(std::fs::read(&path).unwrap() == qashier::render_csv(s.fixture.config()));

    // Types per the spec: the table's own DDL, phones as text with their leading zero, real dates,
    // booleans, numbers without separators, and a real timestamptz update_time.
    let (zero_phones, prefixed, booleans, dates, decimals, fresh): (i64, i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT count(*) FILTER (WHERE contact_number LIKE '0%'),
                count(*) FILTER (WHERE contact_number ~ '^(66|65|00)'),
                count(*) FILTER (WHERE sms_pdpa IS NOT NULL),
                count(date_joined),
                count(*) FILTER (WHERE available_point > 999),
                count(*) FILTER (WHERE update_time > now() - interval '5 minutes')
           FROM backoffice.customers",
        )
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert!(
        zero_phones > 100 && prefixed > 0,
        "{zero_phones} {prefixed}"
    );
    assert_eq!(booleans, expected_rows);
    assert!(dates > expected_rows / 2);
    assert!(decimals > 0, "thousands separators were not stripped");
    assert_eq!(fresh, expected_rows);
    let identity: String = sqlx::query_scalar(
        "SELECT data_type::text FROM information_schema.columns
          WHERE table_schema = 'backoffice' AND table_name = 'customers' AND column_name = 'customer_name'",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(identity, "character varying");

    let (second, status) = run(&s).await;
    assert_eq!(status, "succeeded");
    assert_eq!(
        table_batches(&s.db).await,
        vec![(common::batch_of(&s.db.pool, second).await, expected_rows)]
    );
}

#[tokio::test]
async fn a_wrong_password_fails_at_once_with_a_screenshot() {
    let s = setup("not-the-password-81c2").await;
    let (run, status) = run(&s).await;
    assert_eq!(status, "failed");
    let error = common::run_error(&s.db.pool, run).await;
    assert!(
        error.contains("login rejected") && error.contains("not retryable"),
        "{error}"
    );
    assert!(!error.contains("not-the-password-81c2"));
    let attempts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM crm_sync.attempts WHERE run_id = $1")
            .bind(run)
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 1);
    let shot = error
        .split("screenshot: file://")
        .nth(1)
        .expect("screenshot URI in the error");
    let shot = shot.trim_end_matches(')');
    let png = std::fs::read(shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG: {shot}");
    // A picture of the back office (customers' names): only the service's user may read it.
    let shot = std::path::Path::new(shot);
    assert_eq!(crm_sync::private_fs::mode(shot).unwrap(), 0o600, "{shot:?}");
    let folder = shot.parent().unwrap();
    assert_eq!(
        crm_sync::private_fs::mode(folder).unwrap(),
        0o700,
        "{folder:?}"
    );
    assert_eq!(s.fixture.counts().downloads, 0);
}

#[tokio::test]
async fn an_export_button_that_never_appears_is_a_bounded_retryable_failure() {
    // The worker gives each export a work directory under the temporary directory
    // (`$TMPDIR/crm-sync-export-*`), and the browser's profile (`--user-data-dir`) lives in it, so
    // every Chromium process of the run names this test's own directory on its command line.
    let tmp = tempfile::tempdir().unwrap();
    // SAFETY: nextest runs each test in its own process, and no other thread reads the environment yet.
    unsafe { std::env::set_var("TMPDIR", tmp.path()) };
    let s = setup(qashier::DEFAULT_PASSWORD).await;
    s.fixture.faults().set(Fault::ExportNeverAppears);

    // Count the browsers naming that directory while the run goes: if none is ever seen, the check
    // for leftovers below could not fail, whatever the code does.
    let most_seen = Arc::new(AtomicUsize::new(0));
    let watcher = tokio::spawn({
        let (dir, most_seen) = (tmp.path().to_path_buf(), most_seen.clone());
        async move {
            loop {
                let now = browser::processes_mentioning(&dir).len();
                most_seen.fetch_max(now, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let (run, status) = run(&s).await;
    watcher.abort();
    assert_eq!(status, "failed");
    let error = common::run_error(&s.db.pool, run).await;
    assert!(
        error.contains("did not appear") && error.contains("attempt 2 of 2"),
        "{error}"
    );
    assert!(
        most_seen.load(Ordering::Relaxed) > 0,
        "no process naming {} was seen during the run: the browsers live elsewhere",
        tmp.path().display()
    );
    // Killed and reaped by the source before each attempt ends; SIGKILL is asynchronous, hence a grace.
    browser::assert_no_process_mentions(tmp.path(), Duration::from_secs(3)).await;
}

#[tokio::test]
async fn a_cut_download_or_a_changed_header_keeps_the_previous_batch() {
    let s = setup(qashier::DEFAULT_PASSWORD).await;
    let (good, status) = run(&s).await;
    assert_eq!(status, "succeeded");
    let good_batch = common::batch_of(&s.db.pool, good).await;

    s.fixture.faults().set(Fault::CutDownloadAfter(20_000));
    let (cut, status) = run(&s).await;
    assert_eq!(status, "failed");
    let error = common::run_error(&s.db.pool, cut).await;
    assert!(error.contains("step extract failed"), "{error}");
    assert_eq!(
        table_batches(&s.db).await,
        vec![(good_batch.clone(), qashier::DEFAULT_ROWS as i64)]
    );

    s.fixture.faults().clear();
    s.fixture.faults().set(Fault::RenameHeader {
        from: "Contact Number".into(),
        to: "Phone".into(),
    });
    let (renamed, status) = run(&s).await;
    assert_eq!(status, "failed");
    let error = common::run_error(&s.db.pool, renamed).await;
    assert!(
        error.contains(
            "the CSV header changed: missing [\"Contact Number\"], unexpected [\"Phone\"]"
        ),
        "{error}"
    );
    assert_eq!(
        table_batches(&s.db).await,
        vec![(good_batch, qashier::DEFAULT_ROWS as i64)]
    );
}
