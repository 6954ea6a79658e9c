//! The real `crm-sync` binary as separate processes: SQL-triggered runs, kill -9 mid-step, SIGTERM,
//! and the CLI's commands and exit codes.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{TestDb, run_binary, spawn_binary, wait_for_run, write_config};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uuid::Uuid;

const PIPELINES: &str = r#"
[worker]
concurrency = 4
lease = "1s"
poll_interval = "200ms"
shutdown_grace = "10s"

[[pipelines]]
name = "noop"
retry_backoff = "10ms"
source = { kind = "noop" }

[[pipelines]]
name = "slow"
max_attempts = 3
retry_backoff = "10ms"
source = { kind = "noop", sleep_ms = 3000 }

[[pipelines]]
name = "broken"
source = { kind = "noop", fail_times = 1, fail_kind = "terminal" }
"#;

async fn wait_for_worker(db: &TestDb, n: i64) {
    common::wait_until(
        &db.pool,
        &format!("SELECT count(*) >= {n} FROM crm_sync.workers WHERE stopped_at IS NULL"),
        Duration::from_secs(30),
    )
    .await;
}

async fn wait_for_step_running(db: &TestDb, run: Uuid) {
    common::wait_until(
        &db.pool,
        &format!("SELECT EXISTS (SELECT 1 FROM crm_sync.steps WHERE run_id = '{run}' AND status = 'running')"),
        Duration::from_secs(30),
    )
    .await;
}

fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_run_enqueued_from_psql_is_processed_by_a_worker_with_json_logs_and_metrics() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, PIPELINES);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let log = dir.path().join("worker.log");
    let mut worker = spawn_binary(
        &config,
        &["--log-format", "json", "worker", "--listen", &listen],
        &log,
    );
    wait_for_worker(&db, 1).await;

    let out = Command::new("psql")
        .args([&db.url, "-At", "-c", "SELECT crm_sync.enqueue_run('noop')"])
        .output()
        .expect("psql is installed");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Uuid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(
        wait_for_run(&db.pool, run, Duration::from_secs(15)).await,
        "succeeded"
    );
    let trigger: String = sqlx::query_scalar("SELECT trigger FROM crm_sync.runs WHERE id = $1")
        .bind(run)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(trigger, "sql");

    // The worker's own health and metrics port: its process metrics, not the cluster gauges.
    let base = format!("http://{listen}");
    let health = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .contains(r#"crm_sync_runs_total{pipeline="noop",status="succeeded",trigger="sql"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("crm_sync_worker_slots 4"), "{metrics}");
    assert!(!metrics.contains("crm_sync_queue_depth"), "{metrics}");
    let api = reqwest::get(format!("{base}/api/runs")).await.unwrap();
    assert_eq!(api.status(), reqwest::StatusCode::NOT_FOUND);

    kill(Pid::from_raw(worker.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut worker, Duration::from_secs(15)).success());

    // JSON logs: one object per line, the step's lines carrying the run's fields.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let done = lines
        .iter()
        .find(|l| l["message"] == "step succeeded")
        .expect("a step succeeded line");
    let span = &done["span"];
    assert_eq!(span["run_id"], run.to_string(), "{done}");
    assert_eq!(span["pipeline"], "noop", "{done}");
    assert_eq!(span["step"], "noop", "{done}");
    assert!(
        span["batch_id"].as_str().unwrap().starts_with("noop_"),
        "{done}"
    );
}

#[tokio::test]
async fn a_worker_killed_mid_step_loses_its_lease_and_another_worker_finishes_the_run() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, PIPELINES);
    let mut doomed = spawn_binary(&config, &["worker"], &dir.path().join("doomed.log"));
    wait_for_worker(&db, 1).await;
    let run: Uuid = sqlx::query_scalar("SELECT crm_sync.enqueue_run('slow')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    wait_for_step_running(&db, run).await;

    doomed.kill().unwrap(); // SIGKILL: no chance to clean up
    doomed.wait().unwrap();
    let mut survivor = spawn_binary(&config, &["worker"], &dir.path().join("survivor.log"));
    assert_eq!(
        wait_for_run(&db.pool, run, Duration::from_secs(60)).await,
        "succeeded"
    );

    let attempts: Vec<(String, String)> = sqlx::query_as(
        "SELECT worker_id, outcome FROM crm_sync.attempts WHERE run_id = $1 ORDER BY fence",
    )
    .bind(run)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0].1, "lost");
    assert_eq!(attempts[1].1, "succeeded");
    assert_ne!(
        attempts[0].0, attempts[1].0,
        "the same worker cannot have done both"
    );
    let successes = attempts.iter().filter(|a| a.1 == "succeeded").count();
    assert_eq!(successes, 1);

    kill(Pid::from_raw(survivor.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut survivor, Duration::from_secs(15)).success());
}

#[tokio::test]
async fn sigterm_lets_the_running_step_finish_then_exits_zero() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, PIPELINES);
    let mut worker = spawn_binary(&config, &["worker"], &dir.path().join("worker.log"));
    wait_for_worker(&db, 1).await;
    let run: Uuid =
        sqlx::query_scalar("SELECT crm_sync.enqueue_run('slow', '{\"sleep_ms\": 1500}')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    wait_for_step_running(&db, run).await;

    kill(Pid::from_raw(worker.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut worker, Duration::from_secs(15));
    assert!(status.success(), "worker exited with {status}");
    // The step finished inside the grace period; nothing is left claimed by the dead worker.
    assert_eq!(
        wait_for_run(&db.pool, run, Duration::from_secs(1)).await,
        "succeeded"
    );
    let (claimed, stopped): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM crm_sync.steps WHERE status = 'running' OR lease_owner IS NOT NULL),
                (SELECT count(*) FROM crm_sync.workers WHERE stopped_at IS NOT NULL)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((claimed, stopped), (0, 1));
}

#[tokio::test]
async fn sigterm_past_the_grace_period_releases_the_step_without_spending_an_attempt() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &db,
        &PIPELINES.replace("shutdown_grace = \"10s\"", "shutdown_grace = \"300ms\""),
    );
    let mut worker = spawn_binary(&config, &["worker"], &dir.path().join("worker.log"));
    wait_for_worker(&db, 1).await;
    let run: Uuid =
        sqlx::query_scalar("SELECT crm_sync.enqueue_run('slow', '{\"sleep_ms\": 60000}')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    wait_for_step_running(&db, run).await;

    kill(Pid::from_raw(worker.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut worker, Duration::from_secs(10));
    assert!(status.success(), "worker exited with {status}");
    let (step_status, attempts, lease_owner): (String, i32, Option<String>) = sqlx::query_as(
        "SELECT status, attempts, lease_owner FROM crm_sync.steps WHERE run_id = $1",
    )
    .bind(run)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (step_status.as_str(), attempts, lease_owner),
        ("queued", 0, None)
    );
    let outcome: String =
        sqlx::query_scalar("SELECT outcome FROM crm_sync.attempts WHERE run_id = $1")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(outcome, "released");
}

#[tokio::test]
async fn cli_run_wait_runs_show_retry_rerun_cancel_and_exit_codes() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, PIPELINES);
    let mut worker = spawn_binary(&config, &["worker"], &dir.path().join("worker.log"));
    wait_for_worker(&db, 1).await;

    let (code, out, err) = run_binary(&config, &["run", "noop", "--wait"]);
    assert_eq!(code, 0, "{err}");
    let ok_run: Uuid = out.trim().parse().unwrap();

    let (code, out, err) = run_binary(&config, &["run", "broken", "--wait"]);
    assert_eq!(code, 1, "run --wait must fail when the run fails: {err}");
    assert!(
        err.contains("failed") && err.contains("planned failure 1 of 1"),
        "{err}"
    );
    let failed_run: Uuid = out.trim().parse().unwrap();

    let (code, _, err) = run_binary(&config, &["run", "nope"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown pipeline \"nope\"") && err.contains("known pipelines"),
        "{err}"
    );
    let (code, _, err) = run_binary(&config, &["run", "noop", "--params", "[1]"]);
    assert_eq!(code, 1);
    assert!(err.contains("must be a JSON object"), "{err}");

    let (code, out, _) = run_binary(&config, &["runs", "--json"]);
    assert_eq!(code, 0);
    let runs: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(runs.len(), 2);
    let (code, out, _) = run_binary(&config, &["runs", "--status", "failed"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&failed_run.to_string()) && !out.contains(&ok_run.to_string()),
        "{out}"
    );

    let (code, out, _) = run_binary(&config, &["show", &failed_run.to_string()]);
    assert_eq!(code, 0);
    assert!(
        out.contains("status     failed") && out.contains("attempt 1  failed"),
        "{out}"
    );
    let (code, out, _) = run_binary(&config, &["show", &failed_run.to_string(), "--json"]);
    assert_eq!(code, 0);
    let detail: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        detail["steps"][0]["attempt_log"].as_array().unwrap().len(),
        1
    );
    let (code, _, err) = run_binary(&config, &["show", "not-a-run"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a run id"), "{err}");

    // The planned failure happened once in this batch, so the retry succeeds.
    let (code, out, err) = run_binary(&config, &["retry", &failed_run.to_string(), "--wait"]);
    assert_eq!(code, 0, "{err}");
    let retried: Uuid = out.trim().parse().unwrap();
    let (code, out, err) = run_binary(&config, &["rerun", &ok_run.to_string(), "--wait"]);
    assert_eq!(code, 0, "{err}");
    let rerun: Uuid = out.trim().parse().unwrap();
    let batches: Vec<(Uuid, String, Option<Uuid>, Option<Uuid>)> =
        sqlx::query_as("SELECT id, batch_id, retry_of, rerun_of FROM crm_sync.runs WHERE id = ANY($1) ORDER BY created_at")
            .bind(vec![ok_run, failed_run, retried, rerun])
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let batch_of = |id: Uuid| batches.iter().find(|b| b.0 == id).unwrap().clone();
    assert_eq!(
        batch_of(retried).1,
        batch_of(failed_run).1,
        "a retry keeps the batch"
    );
    assert_eq!(batch_of(retried).2, Some(failed_run));
    assert_ne!(
        batch_of(rerun).1,
        batch_of(ok_run).1,
        "a rerun is a new batch"
    );
    assert_eq!(batch_of(rerun).3, Some(ok_run));

    // One slow run holds the pipeline's only slot; the next one waits and can be cancelled.
    let (_, out, _) = run_binary(
        &config,
        &["run", "slow", "--params", "{\"sleep_ms\": 20000}"],
    );
    let holding: Uuid = out.trim().parse().unwrap();
    let (_, out, _) = run_binary(&config, &["run", "slow"]);
    let waiting: Uuid = out.trim().parse().unwrap();
    let (code, out, err) = run_binary(&config, &["cancel", &waiting.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cancelled"));
    let (code, _, err) = run_binary(&config, &["cancel", &waiting.to_string()]);
    assert_eq!(code, 1);
    assert!(err.contains("already cancelled"), "{err}");
    let (code, _, _) = run_binary(&config, &["cancel", &holding.to_string()]);
    assert_eq!(code, 0);

    kill(Pid::from_raw(worker.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut worker, Duration::from_secs(15)).success());
}

#[test]
fn check_config_reports_every_problem_with_its_line_and_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[worker]\nconcurrency = 0\n\n[[pipelines]]\nname = \"a b\"\nsource = { kind = \"noop\" }\n\n[[pipelines]]\nname = \"c\"\nmax_attempts = -1\nsource = { kind = \"noop\" }\n",
    )
    .unwrap();
    let (code, _, err) = run_binary(&bad, &["check-config"]);
    assert_eq!(code, 1);
    assert!(err.contains("3 problems found"), "{err}");
    assert!(err.contains("worker.concurrency"), "{err}");
    assert!(
        err.contains("bad.toml:4: pipelines[0] \"a b\".name"),
        "{err}"
    );
    assert!(err.contains("bad.toml:8: pipelines[1] \"c\""), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[pipelines]]\nname = \"noop\"\nsource = { kind = \"noop\", steps = 2 }\n",
    )
    .unwrap();
    let (code, out, err) = run_binary(&good, &["check-config"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("OK, 1 pipeline(s)") && out.contains("noop_1 -> noop_2"),
        "{out}"
    );

    let (code, _, err) = run_binary(&dir.path().join("missing.toml"), &["check-config"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read the config file"), "{err}");
}

/// Every command and subcommand's `--help` ends with at least one example.
#[test]
fn every_command_help_has_an_example() {
    fn commands(help: &str) -> Vec<String> {
        help.split("Commands:")
            .nth(1)
            .map(|rest| {
                rest.lines()
                    .skip(1)
                    .take_while(|l| l.starts_with("  "))
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|c| *c != "help")
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }
    fn check(path: &[String], checked: &mut Vec<String>) {
        let out = Command::new(common::binary())
            .args(path)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "crm-sync {path:?} --help failed");
        assert!(
            help.contains("Example"),
            "`crm-sync {} --help` shows no example:\n{help}",
            path.join(" ")
        );
        checked.push(path.join(" "));
        for sub in commands(&help) {
            let mut next = path.to_vec();
            next.push(sub);
            check(&next, checked);
        }
    }
    let mut checked = Vec::new();
    check(&[], &mut checked);
    for expected in [
        "demo",
        "serve",
        "worker",
        "fixture ezfocus",
        "bench queue",
        "healthcheck",
    ] {
        assert!(
            checked.iter().any(|c| c == expected),
            "{expected} not checked: {checked:?}"
        );
    }
    assert!(checked.len() >= 20, "{checked:?}");
}
