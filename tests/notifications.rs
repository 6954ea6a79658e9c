//! Failure and recovery webhooks against real PostgreSQL and a local HTTP receiver: what is sent and
//! when, filters, retries and giving up, two notifiers over one database, and the webhook URL (a secret)
//! never showing up in output, tables or errors.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use common::{RunningWorker, TestDb, run_binary, spawn_binary, wait_for_run, wait_until};
use crm_sync::config::Config;
use crm_sync::metrics::Metrics;
use crm_sync::notify::Notifier;
use crm_sync::queue::{self, Trigger};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

// ------------------------------------------------------------------------------------------------
// The receiver: records every POST; answers each path from a script (default 200).

#[derive(Debug, Clone)]
enum Reply {
    Status(u16, &'static str),
    Sleep(Duration),
}

#[derive(Debug, Clone)]
struct Received {
    path: String,
    event_id: String,
    attempt: String,
    body: Value,
    at: Instant,
}

#[derive(Default)]
struct ReceiverState {
    received: Mutex<Vec<Received>>,
    script: Mutex<HashMap<String, VecDeque<Reply>>>,
    /// Answers on these paths, after the script is used up (default 200).
    always: Mutex<HashMap<String, u16>>,
    delay: Mutex<Duration>,
}

struct Receiver {
    base: String,
    state: Arc<ReceiverState>,
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(ReceiverState::default());
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(state.clone());
        let stop = CancellationToken::new();
        let until = stop.clone().cancelled_owned();
        let handle = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(until)
                .await
                .unwrap();
        });
        Receiver {
            base,
            state,
            stop,
            handle,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn script(&self, path: &str, replies: &[Reply]) {
        self.state
            .script
            .lock()
            .unwrap()
            .insert(path.into(), replies.iter().cloned().collect());
    }

    fn always(&self, path: &str, status: u16) {
        self.state
            .always
            .lock()
            .unwrap()
            .insert(path.into(), status);
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    fn on(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Waits until `path` has received `n` requests (and returns them).
    async fn wait_for(&self, path: &str, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.on(path);
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{path}: {} of {n} requests after {timeout:?}: {:#?}",
                got.len(),
                self.received()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.handle.await.unwrap();
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let path = uri.path().to_string();
    state.received.lock().unwrap().push(Received {
        path: path.clone(),
        event_id: header("x-crm-sync-event-id"),
        attempt: header("x-crm-sync-attempt"),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at: Instant::now(),
    });
    let delay = *state.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    let next = state
        .script
        .lock()
        .unwrap()
        .get_mut(&path)
        .and_then(|q| q.pop_front());
    match next {
        Some(Reply::Status(code, text)) => (StatusCode::from_u16(code).unwrap(), text.into()),
        Some(Reply::Sleep(d)) => {
            tokio::time::sleep(d).await;
            (StatusCode::OK, "ok".into())
        }
        None => {
            let code = state.always.lock().unwrap().get(&path).copied();
            (
                StatusCode::from_u16(code.unwrap_or(200)).unwrap(),
                "ok".into(),
            )
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Helpers.

/// An in-process notifier on its own pool (another process, as far as the database can tell).
struct RunningNotifier {
    stop: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
    metrics: Arc<Metrics>,
}

impl RunningNotifier {
    async fn start(db: &TestDb, config: &Config) -> RunningNotifier {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&db.url)
            .await
            .unwrap();
        let metrics = Metrics::new();
        let notifier = Notifier::new(pool.into(), config)
            .unwrap()
            .with_metrics(metrics.clone());
        let stop = CancellationToken::new();
        let handle = tokio::spawn(notifier.run(stop.clone()));
        RunningNotifier {
            stop,
            handle,
            metrics,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// A webhook URL in a secret file (`url = { file = .. }`); returns the TOML reference.
fn url_file(dir: &Path, name: &str, url: &str) -> String {
    let path = dir.join(name);
    crm_sync::private_fs::write_new(&path, format!("{url}\n").as_bytes()).unwrap();
    format!("{{ file = \"{}\" }}", path.display())
}

async fn enqueue(db: &TestDb, pipeline: &str, params: Value) -> Uuid {
    queue::enqueue(&db.pool, pipeline, &params, None, Trigger::Cli)
        .await
        .unwrap()
}

async fn run_to_end(db: &TestDb, pipeline: &str, params: Value, expected: &str) -> Uuid {
    let id = enqueue(db, pipeline, params).await;
    assert_eq!(
        wait_for_run(&db.pool, id, Duration::from_secs(20)).await,
        expected
    );
    id
}

/// (webhook, state, attempts, last_status, last_error) of every delivery, oldest first.
async fn deliveries(db: &TestDb) -> Vec<(String, String, i32, Option<i32>, Option<String>)> {
    sqlx::query_as(
        "SELECT webhook, state, attempts, last_status, last_error
           FROM crm_sync.notification_deliveries ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sigterm_and_wait(child: &mut Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "crm-sync exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "crm-sync did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const FLAKY: &str = r#"
[worker]
poll_interval = "100ms"

# Succeeds unless a run says {"fail_times": 1}; then its only step fails at once.
[[pipelines]]
name = "flaky"
source = { kind = "noop", fail_kind = "terminal" }

[[pipelines]]
name = "quiet"
source = { kind = "noop", fail_kind = "terminal" }
"#;

// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_failure_then_a_recovery_are_announced_once_each_in_slack_and_json() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = db
        .config(&format!(
            r#"
[server]
public_url = "https://crm-sync.example.com/"
{FLAKY}
[[notifications.webhooks]]
name = "ops-slack"
url = {slack}
format = "slack"

[[notifications.webhooks]]
name = "ops-json"
url = {json}
format = "json"
"#,
            slack = url_file(dir.path(), "slack", &receiver.url("/hooks/slack")),
            json = url_file(dir.path(), "json", &receiver.url("/hooks/json")),
        ))
        .await;
    let worker = RunningWorker::start(&db, &config).await;
    let notifier = RunningNotifier::start(&db, &config).await;

    let failed = run_to_end(&db, "flaky", json!({"fail_times": 1}), "failed").await;
    let batch = common::batch_of(&db.pool, failed).await;
    let console = format!("https://crm-sync.example.com/runs/{failed}");
    let json_msg = receiver
        .wait_for("/hooks/json", 1, Duration::from_secs(10))
        .await;
    let b = &json_msg[0].body;
    assert_eq!(b["event"], "run_failed", "{b}");
    assert_eq!(b["pipeline"], "flaky");
    assert_eq!(b["run_id"], failed.to_string());
    assert_eq!(b["batch_id"], batch);
    assert_eq!(b["status"], "failed");
    assert_eq!(b["failed_step"], "noop");
    assert!(
        b["error"].as_str().unwrap().contains(
            "step noop failed (attempt 1 of 5, not retryable): noop: planned failure 1 of 1"
        ),
        "{b}"
    );
    assert_eq!(b["attempts"], 1);
    assert!(b["finished_at"].as_str().unwrap().ends_with('Z'), "{b}");
    assert_eq!(b["console_url"], console);

    let slack_msg = receiver
        .wait_for("/hooks/slack", 1, Duration::from_secs(10))
        .await;
    let s = &slack_msg[0].body;
    let text = s["text"].as_str().unwrap();
    assert!(
        text.starts_with(":red_circle:") && text.contains("*flaky* run failed at step `noop`"),
        "{s}"
    );
    let blocks = s["blocks"].to_string();
    for fact in [
        format!("`{batch}`"),
        "*Failed step*\\n`noop`".to_string(),
        "planned failure 1 of 1".to_string(),
        format!("<{console}|Open run>"),
    ] {
        assert!(blocks.contains(&fact), "{fact} not in {blocks}");
    }

    let recovered = run_to_end(&db, "flaky", json!({}), "succeeded").await;
    let json_msgs = receiver
        .wait_for("/hooks/json", 2, Duration::from_secs(10))
        .await;
    let r = &json_msgs[1].body;
    assert_eq!(r["event"], "run_recovered", "{r}");
    assert_eq!(r["run_id"], recovered.to_string());
    assert_eq!(r["status"], "succeeded");
    assert!(r["failed_step"].is_null() && r["error"].is_null(), "{r}");
    let slack_msgs = receiver
        .wait_for("/hooks/slack", 2, Duration::from_secs(10))
        .await;
    let text = slack_msgs[1].body["text"].as_str().unwrap();
    assert!(
        text.starts_with(":large_green_circle:") && text.contains("*flaky* recovered"),
        "{text}"
    );

    // A success after a success is news to nobody: no event, so nothing can be sent.
    run_to_end(&db, "flaky", json!({}), "succeeded").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let events: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT kind, run_id FROM crm_sync.notification_events ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        events,
        vec![
            ("run_failed".to_string(), failed),
            ("run_recovered".to_string(), recovered)
        ]
    );
    assert_eq!(receiver.received().len(), 4, "{:#?}", receiver.received());
    let states: Vec<(String, i32)> = deliveries(&db)
        .await
        .into_iter()
        .map(|d| (d.1, d.2))
        .collect();
    assert_eq!(states, vec![("delivered".to_string(), 1); 4]);

    notifier.stop().await;
    worker.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn filters_apply_and_a_new_webhook_does_not_replay_earlier_events() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let hook = |name: &str, extra: &str| {
        format!(
            "\n[[notifications.webhooks]]\nname = \"{name}\"\nurl = {}\nformat = \"json\"\n{extra}\n",
            url_file(dir.path(), name, &receiver.url(&format!("/hooks/{name}")))
        )
    };
    let first = format!(
        "{FLAKY}{}{}{}",
        hook("all", ""),
        hook("quiet-only", "pipelines = [\"quiet\"]"),
        hook("recovery-only", "events = [\"recovery\"]"),
    );
    let config = db.config(&first).await;
    let worker = RunningWorker::start(&db, &config).await;

    // No notifier is running: the failure waits in the outbox.
    let failed = run_to_end(&db, "flaky", json!({"fail_times": 1}), "failed").await;
    // A webhook added now must not hear about that failure, only about what happens next.
    let config = db.config(&format!("{first}{}", hook("late", ""))).await;
    let notifier = RunningNotifier::start(&db, &config).await;
    let recovered = run_to_end(&db, "flaky", json!({}), "succeeded").await;
    let quiet_failed = run_to_end(&db, "quiet", json!({"fail_times": 1}), "failed").await;

    wait_until(
        &db.pool,
        "SELECT count(*) = 7 FROM crm_sync.notification_deliveries WHERE state = 'delivered'",
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let heard = |path: &str| -> Vec<(String, String)> {
        receiver
            .on(path)
            .into_iter()
            .map(|r| {
                (
                    r.body["event"].as_str().unwrap().to_string(),
                    r.body["run_id"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let ev = |kind: &str, id: Uuid| (kind.to_string(), id.to_string());
    let mut all = heard("/hooks/all");
    all.sort();
    let mut expected_all = vec![
        ev("run_failed", failed),
        ev("run_recovered", recovered),
        ev("run_failed", quiet_failed),
    ];
    expected_all.sort();
    assert_eq!(all, expected_all);
    assert_eq!(
        heard("/hooks/quiet-only"),
        vec![ev("run_failed", quiet_failed)]
    );
    assert_eq!(
        heard("/hooks/recovery-only"),
        vec![ev("run_recovered", recovered)]
    );
    assert_eq!(
        heard("/hooks/late"),
        vec![
            ev("run_recovered", recovered),
            ev("run_failed", quiet_failed)
        ]
    );
    assert_eq!(receiver.received().len(), 7);

    notifier.stop().await;
    worker.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn a_recovery_is_the_first_success_after_a_failure_even_within_one_statement() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    db.config(&format!(
        "{FLAKY}\n[[notifications.webhooks]]\nname = \"ops\"\nurl = {}\nformat = \"json\"\n",
        url_file(dir.path(), "ops", "http://127.0.0.1:9/hooks/ops")
    ))
    .await;
    let runs: Vec<Uuid> = sqlx::query_scalar("SELECT crm_sync.enqueue_runs('flaky', 5, 'sql')")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let finish = |ids: &[Uuid], status: &str| {
        sqlx::query(
            "UPDATE crm_sync.runs SET status = $2, finished_at = clock_timestamp() WHERE id = ANY($1)",
        )
        .bind(ids.to_vec())
        .bind(status.to_string())
        .execute(&db.pool)
    };
    finish(&runs[..1], "cancelled").await.unwrap();
    finish(&runs[1..2], "failed").await.unwrap();
    // One statement finishes three runs (as a batched completion does): the first is the recovery, the
    // others follow a success. A cancelled run is no outcome at all and does not count as "previous".
    finish(&runs[2..5], "succeeded").await.unwrap();
    let events: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT kind, run_id FROM crm_sync.notification_events ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let first_success: Uuid = sqlx::query_scalar(
        "SELECT id FROM crm_sync.runs WHERE id = ANY($1) ORDER BY finished_at, id LIMIT 1",
    )
    .bind(runs[2..5].to_vec())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        events,
        vec![
            ("run_failed".to_string(), runs[1]),
            ("run_recovered".to_string(), first_success)
        ]
    );
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM crm_sync.notification_deliveries WHERE webhook = 'ops' AND state = 'pending'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(pending, 2);
}

#[tokio::test]
async fn failing_receivers_are_retried_with_backoff_then_given_up_after_max_attempts() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await;
    receiver.script(
        "/hooks/flaky",
        &[
            Reply::Status(500, "try later"),
            Reply::Status(500, "try later"),
        ],
    );
    receiver.always("/hooks/down", 503);
    let dir = tempfile::tempdir().unwrap();
    let config = db
        .config(&format!(
            r#"{FLAKY}
[[notifications.webhooks]]
name = "flaky-receiver"
url = {flaky}
format = "json"
retry_backoff = "100ms"

[[notifications.webhooks]]
name = "down-receiver"
url = {down}
format = "slack"
max_attempts = 3
retry_backoff = "50ms"
"#,
            flaky = url_file(dir.path(), "flaky", &receiver.url("/hooks/flaky")),
            down = url_file(dir.path(), "down", &receiver.url("/hooks/down")),
        ))
        .await;
    let worker = RunningWorker::start(&db, &config).await;
    let notifier = RunningNotifier::start(&db, &config).await;
    run_to_end(&db, "flaky", json!({"fail_times": 1}), "failed").await;

    let tries = receiver
        .wait_for("/hooks/flaky", 3, Duration::from_secs(10))
        .await;
    wait_until(
        &db.pool,
        "SELECT count(*) = 2 FROM crm_sync.notification_deliveries WHERE state <> 'pending'",
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    let attempts: Vec<&str> = tries.iter().map(|r| r.attempt.as_str()).collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert!(tries.iter().all(|r| r.event_id == tries[0].event_id));
    // Equal jitter keeps at least half of each delay: 100ms, then 200ms.
    assert!(tries[1].at - tries[0].at >= Duration::from_millis(50));
    assert!(tries[2].at - tries[1].at >= Duration::from_millis(100));
    assert_eq!(receiver.on("/hooks/down").len(), 3);

    let d = deliveries(&db).await;
    let flaky = d.iter().find(|d| d.0 == "flaky-receiver").unwrap();
    assert_eq!(
        (flaky.1.as_str(), flaky.2, flaky.3),
        ("delivered", 3, Some(200))
    );
    assert_eq!(
        flaky.4.as_deref(),
        Some("HTTP 500 Internal Server Error: try later")
    );
    let down = d.iter().find(|d| d.0 == "down-receiver").unwrap();
    assert_eq!((down.1.as_str(), down.2, down.3), ("failed", 3, Some(503)));
    assert_eq!(down.4.as_deref(), Some("HTTP 503 Service Unavailable: ok"));

    // Every attempt is counted by webhook and outcome; the URL is never a label.
    let text = notifier.metrics.render();
    for (webhook, outcome, n) in [
        ("flaky-receiver", "retry", 2),
        ("flaky-receiver", "delivered", 1),
        ("down-receiver", "retry", 2),
        ("down-receiver", "failed", 1),
    ] {
        let line = format!(
            "crm_sync_notifications_total{{outcome=\"{outcome}\",webhook=\"{webhook}\"}} {n}"
        );
        assert!(text.contains(&line), "{line} missing from:\n{text}");
    }
    assert!(!text.contains("/hooks/"));

    notifier.stop().await;
    worker.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn two_notifier_processes_send_each_delivery_exactly_once() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await;
    // Slow answers widen the window in which both processes go for the same deliveries.
    *receiver.state.delay.lock().unwrap() = Duration::from_millis(20);
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(
        dir.path(),
        &db,
        &format!(
            r#"
[worker]
poll_interval = "100ms"
concurrency = 8

[[pipelines]]
name = "broken"
max_concurrent_runs = 0
source = {{ kind = "noop", fail_times = 1, fail_kind = "terminal" }}

[[notifications.webhooks]]
name = "a"
url = {a}
format = "json"

[[notifications.webhooks]]
name = "b"
url = {b}
format = "slack"
"#,
            a = url_file(dir.path(), "a", &receiver.url("/hooks/a")),
            b = url_file(dir.path(), "b", &receiver.url("/hooks/b")),
        ),
    );
    let mut one = spawn_binary(&config, &["worker"], &dir.path().join("one.log"));
    let mut two = spawn_binary(
        &config,
        &["serve", "--no-api", "--no-scheduler"],
        &dir.path().join("two.log"),
    );
    wait_until(
        &db.pool,
        "SELECT count(*) = 2 FROM crm_sync.workers WHERE stopped_at IS NULL AND 'worker' = ANY (roles)",
        Duration::from_secs(30),
    )
    .await;

    const RUNS: usize = 30;
    sqlx::query("SELECT crm_sync.enqueue_runs('broken', $1, 'sql')")
        .bind(RUNS as i32)
        .execute(&db.pool)
        .await
        .unwrap();
    let expected = 2 * RUNS;
    wait_until(
        &db.pool,
        &format!(
            "SELECT count(*) = {expected} FROM crm_sync.notification_deliveries WHERE state = 'delivered'"
        ),
        Duration::from_secs(60),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let received = receiver.received();
    let distinct: HashSet<(String, String)> = received
        .iter()
        .map(|r| (r.path.clone(), r.event_id.clone()))
        .collect();
    assert_eq!(distinct.len(), expected);
    assert_eq!(received.len(), expected, "some message was sent twice");
    assert!(received.iter().all(|r| r.attempt == "1"));
    let max_attempts: i32 =
        sqlx::query_scalar("SELECT max(attempts) FROM crm_sync.notification_deliveries")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(max_attempts, 1);

    sigterm_and_wait(&mut one);
    sigterm_and_wait(&mut two);
    let sent_by = |log: &str| {
        std::fs::read_to_string(dir.path().join(log))
            .unwrap()
            .matches("webhook delivered")
            .count()
    };
    let (by_one, by_two) = (sent_by("one.log"), sent_by("two.log"));
    eprintln!("deliveries sent: worker {by_one}, serve {by_two}");
    assert_eq!(by_one + by_two, expected);
    receiver.stop().await;
}

#[tokio::test]
async fn the_webhook_url_never_appears_in_output_tables_or_errors() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await;
    // The receiver echoes the secret path in its error page, as many frameworks do.
    receiver.script(
        "/hooks/T0/SECRET-XYZ-ECHO",
        &[Reply::Status(
            404,
            "Cannot POST /hooks/T0/SECRET-XYZ-ECHO (token SECRET-XYZ-ECHO)",
        )],
    );
    receiver.script(
        "/hooks/T2/SECRET-XYZ-SLOW",
        &[Reply::Sleep(Duration::from_secs(3))],
    );
    let dir = tempfile::tempdir().unwrap();
    let echo_url = receiver.url("/hooks/T0/SECRET-XYZ-ECHO");
    let dead_url = format!(
        "http://127.0.0.1:{}/hooks/T1/SECRET-XYZ-DEAD",
        closed_port()
    );
    let config = common::write_config(
        dir.path(),
        &db,
        &format!(
            r#"{FLAKY}
[[notifications.webhooks]]
name = "echo-hook"
url = {{ env = "CRM_SYNC_TEST_ECHO_HOOK" }}
format = "slack"
retry_backoff = "50ms"

[[notifications.webhooks]]
name = "dead-hook"
url = {{ env = "CRM_SYNC_TEST_DEAD_HOOK" }}
format = "json"
max_attempts = 2
retry_backoff = "50ms"

[[notifications.webhooks]]
name = "slow-hook"
url = {slow}
format = "json"
max_attempts = 1
timeout = "300ms"
"#,
            slow = url_file(
                dir.path(),
                "slow",
                &receiver.url("/hooks/T2/SECRET-XYZ-SLOW")
            ),
        ),
    );
    let (out_log, err_log) = (dir.path().join("out.log"), dir.path().join("err.log"));
    let mut serve = Command::new(common::binary())
        .arg("--config")
        .arg(&config)
        .args(["serve", "--no-api", "--no-scheduler"])
        .env_remove("DATABASE_URL")
        .env("CRM_SYNC_TEST_ECHO_HOOK", &echo_url)
        .env("CRM_SYNC_TEST_DEAD_HOOK", &dead_url)
        // Debug: also what reqwest, hyper and sqlx say about their requests.
        .env("RUST_LOG", "debug")
        .stdout(std::fs::File::create(&out_log).unwrap())
        .stderr(std::fs::File::create(&err_log).unwrap())
        .spawn()
        .unwrap();

    let (code, out, err) = run_binary(
        &config,
        &["run", "flaky", "--params", r#"{"fail_times": 1}"#, "--wait"],
    );
    assert_eq!(code, 1, "the run must fail: {err}");
    let (code, check_out, check_err) = run_binary(&config, &["check-config"]);
    assert_eq!(code, 0, "{check_err}");
    assert!(check_out.contains("webhook echo-hook"), "{check_out}");
    wait_until(
        &db.pool,
        "SELECT count(*) = 3 FROM crm_sync.notification_deliveries WHERE state <> 'pending'",
        Duration::from_secs(20),
    )
    .await;
    sigterm_and_wait(&mut serve);
    receiver.stop().await;

    let d = deliveries(&db).await;
    let by = |name: &str| d.iter().find(|d| d.0 == name).unwrap().clone();
    let echo = by("echo-hook");
    assert_eq!((echo.1.as_str(), echo.2), ("delivered", 2));
    let echo_error = echo.4.unwrap();
    assert!(
        echo_error.starts_with("HTTP 404 Not Found: Cannot POST *** (token ***)"),
        "{echo_error}"
    );
    let dead = by("dead-hook");
    assert_eq!((dead.1.as_str(), dead.2, dead.3), ("failed", 2, None));
    let dead_error = dead.4.unwrap();
    assert!(dead_error.contains("Connection refused"), "{dead_error}");
    let slow = by("slow-hook");
    assert_eq!((slow.1.as_str(), slow.2), ("failed", 1));
    let slow_error = slow.4.unwrap();
    assert!(slow_error.contains("timed out"), "{slow_error}");

    let logs = format!(
        "{}\n{}\n{out}\n{err}\n{check_out}\n{check_err}",
        std::fs::read_to_string(&out_log).unwrap(),
        std::fs::read_to_string(&err_log).unwrap()
    );
    assert!(
        logs.contains("ERROR") && logs.contains("dead-hook") && logs.contains("giving up"),
        "the give-up is logged at error with the webhook's name:\n{logs}"
    );
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'crm_sync'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(tables.contains(&"notification_deliveries".to_string()));
    let mut dump = String::new();
    for table in &tables {
        let rows: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM crm_sync.{table} t"
        )))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        dump.push_str(&rows);
    }
    assert!(dump.contains("echo-hook") && dump.contains("Connection refused"));
    for secret in ["SECRET-XYZ", "/hooks/T"] {
        assert!(!logs.contains(secret), "{secret} in the output:\n{logs}");
        assert!(!dump.contains(secret), "{secret} in the tables:\n{dump}");
    }
}

#[tokio::test]
async fn serve_no_notifier_leaves_deliveries_in_the_outbox() {
    let db = TestDb::new().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(
        dir.path(),
        &db,
        &format!(
            "{FLAKY}\n[[notifications.webhooks]]\nname = \"ops\"\nurl = {}\nformat = \"json\"\n",
            url_file(dir.path(), "ops", &receiver.url("/hooks/ops"))
        ),
    );
    let mut serve = spawn_binary(
        &config,
        &["serve", "--no-api", "--no-scheduler", "--no-notifier"],
        &dir.path().join("serve.log"),
    );
    let (code, _, err) = run_binary(
        &config,
        &["run", "flaky", "--params", r#"{"fail_times": 1}"#, "--wait"],
    );
    assert_eq!(code, 1, "{err}");
    // Ten polling intervals: a notifier would have sent it by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sigterm_and_wait(&mut serve);
    assert!(receiver.received().is_empty());
    let d = deliveries(&db).await;
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].1.as_str(), d[0].2), ("pending", 0));
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(!log.contains("notifier started"), "{log}");
    receiver.stop().await;
}

#[test]
fn check_config_names_the_line_and_problem_of_bad_webhooks() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"[[pipelines]]
name = "accounts"
source = { kind = "noop" }

[[notifications.webhooks]]
name = "literal"
url = "https://hooks.slack.com/services/T0/B0/SECRET-IN-CONFIG"
format = "slack"

[[notifications.webhooks]]
name = "teams"
url = { env = "TEAMS_URL" }
format = "teams"

[[notifications.webhooks]]
name = "filtered"
url = { env = "OPS_URL" }
format = "json"
pipelines = ["accounts", "acounts"]
"#,
    )
    .unwrap();
    let (code, out, err) = run_binary(&bad, &["check-config"]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("3 problems found"), "{err}");
    assert!(
        err.contains(
            "bad.toml:5: notifications.webhooks[0] \"literal\".url: a literal URL is not allowed"
        ),
        "{err}"
    );
    assert!(
        err.contains("bad.toml:10: notifications.webhooks[1] \"teams\".format: unknown variant `teams`, expected `slack` or `json`"),
        "{err}"
    );
    assert!(
        err.contains("bad.toml:15: notifications.webhooks[2] \"filtered\".pipelines: unknown pipeline \"acounts\" (configured: accounts)"),
        "{err}"
    );
    assert!(!err.contains("SECRET-IN-CONFIG"), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[pipelines]]\nname = \"accounts\"\nsource = { kind = \"noop\" }\n\n[[notifications.webhooks]]\nname = \"ops-slack\"\nurl = { env = \"SLACK_WEBHOOK_URL\" }\nformat = \"slack\"\npipelines = [\"accounts\"]\n",
    )
    .unwrap();
    let (code, out, err) = run_binary(&good, &["check-config"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("webhook ops-slack") && out.contains("run_failed, run_recovered for accounts"),
        "{out}"
    );
}
