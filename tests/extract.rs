//! The `ezfocus` source's extract step against the EZ Focus fixture over real HTTP: the raw answer is
//! streamed into the local backup store byte for byte, source faults are classified for retries, and
//! no secret reaches the run history.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{RunningWorker, TestDb, wait_for_run};
use crm_sync::fixtures::ezfocus::{self, AccountsQuery, EzFocusConfig, EzFocusFixture, Fault};
use crm_sync::queue::{self, Trigger};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

struct Setup {
    db: TestDb,
    fixture: EzFocusFixture,
    config: crm_sync::config::Config,
    backups: tempfile::TempDir,
    _secrets: tempfile::TempDir,
}

/// A database, the fixture, secret files and a pipeline `accounts` pointing at them.
async fn setup(password: &str) -> Setup {
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let write = |name: &str, value: &str| {
        let path = secrets.path().join(name);
        crm_sync::private_fs::write_new(&path, format!("{value}\n").as_bytes()).unwrap();
        path.display().to_string()
    };
    let key = write("key", ezfocus::DEFAULT_ACCOUNTS_KEY);
    let user = write("user", ezfocus::DEFAULT_USERNAME);
    let pass = write("pass", password);
    let backups = tempfile::tempdir().unwrap();
    let config = db
        .config(&format!(
            r#"
[worker]
poll_interval = "100ms"

[[pipelines]]
name = "accounts"
timezone = "America/Toronto"
max_attempts = 4
retry_backoff = "50ms"

[pipelines.source]
kind = "ezfocus"
base_url = "{}"
key = {{ file = "{key}" }}
username = {{ file = "{user}" }}
password = {{ file = "{pass}" }}
prov = "ON"
tpcl = ["SUCC", "LRS", "MED"]
read_timeout = "2s"

[pipelines.backup]
kind = "local"
dir = "{}"
path = "accounts/raw/accounts_{{date}}_{{time}}.json"
"#,
            fixture.base_url(),
            backups.path().display()
        ))
        .await;
    Setup {
        db,
        fixture,
        config,
        backups,
        _secrets: secrets,
    }
}

async fn run_once(s: &Setup) -> (Uuid, String) {
    common::run_pipeline(&s.db, &s.config, "accounts", Duration::from_secs(30)).await
}

async fn step(db: &TestDb, run: Uuid) -> (Option<Value>, Vec<(String, Option<String>)>) {
    let output: Option<Value> =
        sqlx::query_scalar("SELECT output FROM crm_sync.steps WHERE run_id = $1")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let attempts = sqlx::query_as(
        "SELECT outcome, error FROM crm_sync.attempts WHERE run_id = $1 ORDER BY fence",
    )
    .bind(run)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    (output, attempts)
}

fn files_under(dir: &Path) -> Vec<String> {
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

#[tokio::test]
async fn the_raw_answer_is_backed_up_byte_for_byte_with_its_checksum() {
    let s = setup(ezfocus::DEFAULT_PASSWORD).await;
    let (run, status) = run_once(&s).await;
    assert_eq!(status, "succeeded");
    let (output, _) = step(&s.db, run).await;
    let output = output.unwrap();

    let expected = ezfocus::render_accounts_body(s.fixture.config(), &AccountsQuery::standard());
    let uri = output["object"].as_str().unwrap();
    let path = uri.strip_prefix("file://").unwrap();
    assert!(
        path.starts_with(&s.backups.path().display().to_string())
            && path.contains("/accounts/raw/accounts_"),
        "{path}"
    );
    let stored = std::fs::read(path).unwrap();
    assert!(
        stored == expected,
        "backup differs from the fixture's answer"
    );
    assert_eq!(output["bytes"], json!(expected.len()));
    assert_eq!(
        output["sha256"],
        json!(hex::encode(Sha256::digest(&expected)))
    );
    assert_eq!(output["http_status"], json!(200));
    assert_eq!(s.fixture.request_count(), 1);
    // The pipeline's filters reached the API.
    let query = s.fixture.last_query().unwrap();
    assert!(
        query.contains("prov=ON") && query.contains("tpcl=SUCC%2CLRS%2CMED"),
        "{query}"
    );
}

#[tokio::test]
async fn server_errors_are_retried_until_the_extract_succeeds() {
    let s = setup(ezfocus::DEFAULT_PASSWORD).await;
    s.fixture.faults().fail_first_n_with_500(2);
    let (run, status) = run_once(&s).await;
    assert_eq!(status, "succeeded");
    let (_, attempts) = step(&s.db, run).await;
    let outcomes: Vec<&str> = attempts.iter().map(|a| a.0.as_str()).collect();
    assert_eq!(outcomes, vec!["retry", "retry", "succeeded"]);
    assert!(
        attempts[0]
            .1
            .as_deref()
            .unwrap()
            .contains("answered HTTP 500"),
        "{attempts:?}"
    );
    assert_eq!(s.fixture.request_count(), 3);
}

#[tokio::test]
async fn a_429_is_retried_no_sooner_than_its_retry_after() {
    let s = setup(ezfocus::DEFAULT_PASSWORD).await;
    s.fixture.faults().set(Fault::RateLimitNext {
        requests: 1,
        retry_after_secs: 2,
    });
    let (run, status) = run_once(&s).await;
    assert_eq!(status, "succeeded");
    let gap: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM (s.attempt_started_at - a.finished_at))::float8
           FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
          WHERE a.run_id = $1 AND a.outcome = 'retry'",
    )
    .bind(run)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    // The worker fixes the retry time when the 429 arrives (now + 2 s); the attempt's finished_at is
    // stamped by PostgreSQL when the failure is recorded, a few milliseconds later. So the gap
    // measured from finished_at may fall short of 2 s by that recording time, never by more.
    assert!(gap >= 1.9, "retried after {gap:.3}s despite Retry-After: 2");
    assert_eq!(s.fixture.status_count(429), 1);
}

#[tokio::test]
async fn rejected_credentials_fail_at_once_and_no_secret_reaches_the_history() {
    let s = setup("wrong-password-4f1c9").await;
    let (run, status) = run_once(&s).await;
    assert_eq!(status, "failed");
    let (_, attempts) = step(&s.db, run).await;
    assert_eq!(attempts.len(), 1, "a 401 must not be retried");
    assert_eq!(s.fixture.request_count(), 1);
    let history: String = sqlx::query_scalar(
        "SELECT concat_ws(' ', (SELECT row_to_json(r)::text FROM crm_sync.runs r WHERE id = $1),
                              (SELECT json_agg(s)::text FROM crm_sync.steps s WHERE run_id = $1),
                              (SELECT json_agg(a)::text FROM crm_sync.attempts a WHERE run_id = $1))",
    )
    .bind(run)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert!(history.contains("credentials rejected"), "{history}");
    for secret in ["wrong-password-4f1c9", ezfocus::DEFAULT_ACCOUNTS_KEY] {
        assert!(
            !history.contains(secret),
            "secret {secret} found in the run history"
        );
    }
}

#[tokio::test]
async fn a_cut_answer_is_retried_and_leaves_no_partial_backup() {
    let s = setup(ezfocus::DEFAULT_PASSWORD).await;
    s.fixture.faults().set(Fault::CutBodyAfter(50_000));
    let worker = RunningWorker::start(&s.db, &s.config).await;
    let run = queue::enqueue(&s.db.pool, "accounts", &json!({}), None, Trigger::Cli)
        .await
        .unwrap();
    common::wait_until(
        &s.db.pool,
        "SELECT count(*) >= 2 FROM crm_sync.attempts WHERE outcome = 'retry'",
        Duration::from_secs(30),
    )
    .await;
    s.fixture.faults().clear();
    assert_eq!(
        wait_for_run(&s.db.pool, run, Duration::from_secs(30)).await,
        "succeeded"
    );
    worker.stop().await;
    let (_, attempts) = step(&s.db, run).await;
    assert!(
        attempts[0].1.as_deref().unwrap().contains("was cut after"),
        "{attempts:?}"
    );
    let files = files_under(s.backups.path());
    assert_eq!(files.len(), 1, "partial objects left behind: {files:?}");
}

#[tokio::test]
async fn the_generic_http_json_source_makes_the_same_request() {
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let text = crm_sync::fixtures::with_secret_files(
        &format!(
            r#"
[[pipelines]]
name = "generic"
[pipelines.source]
kind = "http_json"
url = "{}/api"
query = {{ prov = "ON", seg = "", tpcl = "SUCC,LRS,MED" }}
query_secrets = {{ key = {{ env = "EZFOCUS_ACCOUNTS_KEY" }} }}
username = {{ env = "EZFOCUS_USERNAME" }}
password = {{ env = "EZFOCUS_PASSWORD" }}
[pipelines.backup]
kind = "local"
dir = "{}"
"#,
            fixture.base_url(),
            backups.path().display()
        ),
        secrets.path(),
        &ezfocus::EXAMPLE_SECRETS,
    )
    .unwrap();
    let config = db.config(&text).await;
    let worker = RunningWorker::start(&db, &config).await;
    let run = queue::enqueue(&db.pool, "generic", &json!({}), None, Trigger::Cli)
        .await
        .unwrap();
    assert_eq!(
        wait_for_run(&db.pool, run, Duration::from_secs(30)).await,
        "succeeded"
    );
    worker.stop().await;
    let (output, _) = step(&db, run).await;
    let path = output.unwrap()["object"]
        .as_str()
        .unwrap()
        .strip_prefix("file://")
        .unwrap()
        .to_string();
    assert!(path.contains("/generic/raw/generic_"), "{path}");
    let expected = ezfocus::render_accounts_body(fixture.config(), &AccountsQuery::standard());
    assert!(std::fs::read(path).unwrap() == expected);
}
