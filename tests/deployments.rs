//! Real deployments: several `crm-sync` processes with different config files against one database
//! (real binaries, real PostgreSQL). Registration never disables or changes what a config does not
//! mention; a worker claims only the pipelines its config defines and a pipeline no live worker
//! serves waits, reported; a rolling upgrade fails nothing and runs every tick once; a killed
//! worker's steps return to the queue in about a second; steps record the definition they ran under.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{TestDb, run_binary, spawn_binary, terminate, wait_for_run, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use uuid::Uuid;

/// A config file `name` in `dir` for `db` with `body` (a free port for serve's HTTP).
fn config_file(dir: &Path, name: &str, db: &TestDb, body: &str) -> PathBuf {
    let path = dir.join(name);
    let text = format!(
        "database_url = \"{}\"\n\n[server]\nlisten = \"127.0.0.1:{}\"\n\n{body}",
        db.url,
        free_port()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `[server] listen` address written into a config file.
fn listen_of(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text.lines().find(|l| l.starts_with("listen = ")).unwrap();
    line.trim_start_matches("listen = ")
        .trim_matches('"')
        .to_string()
}

fn spawn(config: &Path, args: &[&str], dir: &Path, log: &str) -> Proc {
    Proc(spawn_binary(config, args, &dir.join(log)))
}

/// A `crm-sync` child process, killed and reaped if the test ends (or fails) without stopping it,
/// so that a failed test leaves no process behind.
struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGCONT);
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `crm-sync pipelines --json` with `config`.
fn pipelines(config: &Path) -> Vec<Value> {
    let (code, out, err) = run_binary(config, &["pipelines", "--json"]);
    assert_eq!(code, 0, "crm-sync pipelines failed: {err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn pipeline<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("pipeline {name} not listed: {list:?}"))
}

fn psql_enqueue(db: &TestDb, pipeline: &str) -> Uuid {
    let out = Command::new("psql")
        .args([
            &db.url,
            "-At",
            "-c",
            &format!("SELECT crm_sync.enqueue_run('{pipeline}')"),
        ])
        .output()
        .expect("psql is installed");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

async fn live_processes(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM crm_sync.live_processes")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn wait_for_live(db: &TestDb, n: i64) {
    wait_until(
        &db.pool,
        &format!("SELECT count(*) >= {n} FROM crm_sync.live_processes"),
        Duration::from_secs(30),
    )
    .await;
}

async fn statuses(db: &TestDb, pipeline: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT status FROM crm_sync.runs WHERE pipeline = $1 ORDER BY created_at")
        .bind(pipeline)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

const WORKER: &str = "[worker]\npoll_interval = \"200ms\"\n\n";

#[tokio::test]
async fn a_pipeline_no_live_worker_serves_waits_reported_and_runs_when_one_starts() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let p1 = "[[pipelines]]\nname = \"p1\"\nsource = { kind = \"noop\" }\n";
    let p2 = "[[pipelines]]\nname = \"p2\"\nmax_concurrent_runs = 0\nsource = { kind = \"noop\", steps = 2 }\n";
    let a = config_file(dir.path(), "a.toml", &db, &format!("{WORKER}{p1}"));
    let b = config_file(dir.path(), "b.toml", &db, &format!("{WORKER}{p1}\n{p2}"));

    // B's config is registered (migrate registers), but only A runs: serve with the API.
    let (code, out, err) = run_binary(&b, &["migrate"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut serve_a = spawn(&a, &["serve", "--no-scheduler"], dir.path(), "a.log");
    wait_for_live(&db, 1).await;
    let p1_run = psql_enqueue(&db, "p1");
    let waiting: Vec<Uuid> = (0..3).map(|_| psql_enqueue(&db, "p2")).collect();
    assert_eq!(
        wait_for_run(&db.pool, p1_run, Duration::from_secs(20)).await,
        "succeeded"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(statuses(&db, "p2").await, ["queued", "queued", "queued"]);
    let attempts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
          WHERE s.pipeline = 'p2'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 0, "no worker may claim (or fail) p2's steps");

    // Reported: crm-sync pipelines, /health/pipelines, the metric.
    let list = pipelines(&a);
    assert_eq!(pipeline(&list, "p2")["served"], false);
    assert_eq!(pipeline(&list, "p2")["unserved_steps"], 3);
    assert_eq!(pipeline(&list, "p1")["served"], true);
    let (_, table, _) = run_binary(&a, &["pipelines"]);
    assert!(table.contains("NO: 3 steps wait"), "{table}");
    let base = format!("http://{}", listen_of(&a));
    let health = reqwest::get(format!("{base}/health/pipelines"))
        .await
        .unwrap();
    assert_eq!(health.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = health.json().await.unwrap();
    assert_eq!(body["status"], "unserved");
    assert_eq!(body["unserved"], serde_json::json!(["p2"]));
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("crm_sync_pipeline_unserved_steps{pipeline=\"p2\"} 3"),
        "{metrics}"
    );

    // B starts: p2's runs go through, and nothing is unserved any more.
    let mut worker_b = spawn(&b, &["worker"], dir.path(), "b.log");
    for run in &waiting {
        assert_eq!(
            wait_for_run(&db.pool, *run, Duration::from_secs(30)).await,
            "succeeded"
        );
    }
    let list = pipelines(&a);
    assert_eq!(pipeline(&list, "p2")["served"], true);
    assert_eq!(pipeline(&list, "p2")["unserved_steps"], 0);
    let health = reqwest::get(format!("{base}/health/pipelines"))
        .await
        .unwrap();
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    assert!(terminate(&mut serve_a, Duration::from_secs(30)).success());
    assert!(terminate(&mut worker_b, Duration::from_secs(30)).success());
}

#[tokio::test]
async fn a_cli_with_another_config_leaves_what_it_does_not_mention_untouched() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let production = config_file(
        dir.path(),
        "production.toml",
        &db,
        "[[pipelines]]\nname = \"accounts\"\nschedule = \"*/2 * * * * *\"\ncatch_up = \"skip\"\nmax_attempts = 7\nmax_concurrent_runs = 0\nsource = { kind = \"noop\" }\n\n\
         [[notifications.webhooks]]\nname = \"ops\"\nurl = { env = \"OPS_WEBHOOK_URL\" }\nformat = \"json\"\n",
    );
    let laptop = config_file(
        dir.path(),
        "laptop.toml",
        &db,
        "[[pipelines]]\nname = \"x\"\nsource = { kind = \"noop\" }\n",
    );
    let mut scheduler = spawn(&production, &["scheduler"], dir.path(), "scheduler.log");
    wait_until(
        &db.pool,
        "SELECT count(*) >= 1 FROM crm_sync.runs WHERE pipeline = 'accounts' AND trigger = 'schedule'",
        Duration::from_secs(20),
    )
    .await;
    let before: (bool, i32, String, String, bool) = sqlx::query_as(
        "SELECT p.enabled, p.max_attempts, p.schedule, p.fingerprint, w.enabled
           FROM crm_sync.pipelines p, crm_sync.webhooks w WHERE p.name = 'accounts' AND w.name = 'ops'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();

    // The quick start's command with another config against the same database.
    let (code, out, err) = run_binary(&laptop, &["run", "x"]);
    assert_eq!(code, 0, "{out}{err}");
    let after: (bool, i32, String, String, bool) = sqlx::query_as(
        "SELECT p.enabled, p.max_attempts, p.schedule, p.fingerprint, w.enabled
           FROM crm_sync.pipelines p, crm_sync.webhooks w WHERE p.name = 'accounts' AND w.name = 'ops'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(before, after);
    assert_eq!(after.1, 7);
    assert!(after.0 && after.4, "enabled flags untouched: {after:?}");

    // A scheduled tick still fires after it.
    let cli_done: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    wait_until(
        &db.pool,
        &format!(
            "SELECT count(*) >= 1 FROM crm_sync.runs WHERE pipeline = 'accounts' AND trigger = 'schedule'
               AND created_at > '{cli_done}'"
        ),
        Duration::from_secs(20),
    )
    .await;
    assert!(terminate(&mut scheduler, Duration::from_secs(30)).success());
}

#[tokio::test]
async fn enqueue_from_sql_is_accepted_right_after_migrate() {
    let db = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "c.toml",
        &db,
        "[[pipelines]]\nname = \"noop\"\nsource = { kind = \"noop\" }\n",
    );
    let (code, out, err) = run_binary(&config, &["migrate"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 pipeline(s) registered"), "{out}");
    let run = psql_enqueue(&db, "noop");
    assert_eq!(statuses(&db, "noop").await, ["queued"]);
    let (_, show, _) = run_binary(&config, &["show", &run.to_string()]);
    assert!(show.contains("status     queued"), "{show}");
}

/// v1: `tick` every 2 s and `fixed` (max_attempts 3); v2 also has `added`, and `fixed` with
/// max_attempts 5.
fn upgrade_config(version: u32) -> String {
    let fixed_attempts = if version == 1 { 3 } else { 5 };
    let mut text = format!(
        "[worker]\npoll_interval = \"200ms\"\n\n\
         [[pipelines]]\nname = \"tick\"\nschedule = \"*/2 * * * * *\"\nmax_concurrent_runs = 0\nsource = {{ kind = \"noop\", sleep_ms = 50 }}\n\n\
         [[pipelines]]\nname = \"fixed\"\nmax_attempts = {fixed_attempts}\nmax_concurrent_runs = 0\nsource = {{ kind = \"noop\", steps = 2, sleep_ms = 100 }}\n"
    );
    if version == 2 {
        text.push_str("\n[[pipelines]]\nname = \"added\"\nschedule = \"*/2 * * * * *\"\nmax_concurrent_runs = 0\nsource = { kind = \"noop\", steps = 2 }\n");
    }
    text
}

async fn registered_attempts(db: &TestDb, pipeline: &str) -> i32 {
    sqlx::query_scalar("SELECT max_attempts FROM crm_sync.pipelines WHERE name = $1")
        .bind(pipeline)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_rolling_upgrade_fails_nothing_and_runs_every_tick_once() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let v1 = config_file(dir.path(), "v1.toml", &db, &upgrade_config(1));
    let v2 = config_file(dir.path(), "v2.toml", &db, &upgrade_config(2));
    let mut old = start_version(&v1, dir.path(), "v1");
    wait_for_live(&db, 3).await;
    let feeding = tokio::spawn(feed(db.url.clone(), "fixed", 40));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // v2 beside v1: the conflict on `fixed` is reported, v1's definition stays while v1 lives.
    let mut new = start_version(&v2, dir.path(), "v2");
    wait_for_live(&db, 6).await;
    let list = pipelines(&v2);
    assert_eq!(pipeline(&list, "fixed")["definitions"], 2, "{list:?}");
    assert_eq!(pipeline(&list, "tick")["definitions"], 1, "{list:?}");
    assert_eq!(pipeline(&list, "added")["served"], true);
    let (_, table, _) = run_binary(&v2, &["pipelines"]);
    assert!(table.contains("CONFLICT"), "{table}");
    assert_eq!(registered_attempts(&db, "fixed").await, 3);
    let v2_log = std::fs::read_to_string(dir.path().join("v2-0.log")).unwrap();
    assert!(
        v2_log.contains("defines the pipeline differently from a live process"),
        "{v2_log}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;

    // v1 stops: v2's definition takes over within a heartbeat, the conflict is gone.
    for child in &mut old {
        assert!(terminate(child, Duration::from_secs(40)).success());
    }
    wait_until(
        &db.pool,
        "SELECT max_attempts = 5 FROM crm_sync.pipelines WHERE name = 'fixed'",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(pipeline(&pipelines(&v2), "fixed")["definitions"], 1);
    feeding.await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for child in &mut new {
        assert!(terminate(child, Duration::from_secs(40)).success());
    }

    // Nothing failed; every run finished.
    let bad: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT pipeline, status, error FROM crm_sync.runs WHERE status NOT IN ('succeeded', 'queued', 'running')",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(bad.is_empty(), "runs that did not succeed: {bad:?}");
    // Every tick once: scheduled runs are 2 s apart, none missing between the first and the last.
    for p in ["tick", "added"] {
        let ticks: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT scheduled_for FROM crm_sync.runs WHERE pipeline = $1 AND trigger = 'schedule'
              ORDER BY scheduled_for",
        )
        .bind(p)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert!(ticks.len() >= 4, "{p}: only {} ticks", ticks.len());
        for pair in ticks.windows(2) {
            assert_eq!(
                (pair[1] - pair[0]).num_seconds(),
                2,
                "{p}: ticks {} and {} are not consecutive",
                pair[0],
                pair[1]
            );
        }
    }
}

/// Two workers and a scheduler with `config`.
fn start_version(config: &Path, dir: &Path, version: &str) -> Vec<Proc> {
    vec![
        spawn(config, &["worker"], dir, &format!("{version}-0.log")),
        spawn(config, &["worker"], dir, &format!("{version}-1.log")),
        spawn(
            config,
            &["scheduler"],
            dir,
            &format!("{version}-scheduler.log"),
        ),
    ]
}

/// Enqueues `n` runs of `pipeline` from SQL, one every 200 ms.
async fn feed(url: String, pipeline: &'static str, n: usize) {
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    for _ in 0..n {
        sqlx::query("SELECT crm_sync.enqueue_run($1)")
            .bind(pipeline)
            .execute(&pool)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// kill -9 of a worker holding a step (default 30 s lease): another worker starts the step within
/// 3 s, without waiting for the lease.
#[tokio::test]
async fn a_killed_workers_step_is_restarted_elsewhere_within_seconds() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "c.toml",
        &db,
        "[[pipelines]]\nname = \"slow\"\nsource = { kind = \"noop\", sleep_ms = 4000 }\n",
    );
    let mut a = spawn(&config, &["worker"], dir.path(), "a.log");
    wait_for_live(&db, 1).await;
    let run = psql_enqueue(&db, "slow");
    wait_until(
        &db.pool,
        &format!("SELECT EXISTS (SELECT 1 FROM crm_sync.steps WHERE run_id = '{run}' AND status = 'running')"),
        Duration::from_secs(20),
    )
    .await;
    let mut b = spawn(&config, &["worker"], dir.path(), "b.log");
    wait_for_live(&db, 2).await;
    let lease: i64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM lease_expires_at - now())::bigint FROM crm_sync.steps WHERE run_id = $1",
    )
    .bind(run)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(lease > 20, "the default 30 s lease holds: {lease} s left");

    kill(Pid::from_raw(a.id() as i32), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    let _ = a.wait();
    wait_until(
        &db.pool,
        &format!(
            "SELECT EXISTS (SELECT 1 FROM crm_sync.steps WHERE run_id = '{run}' AND status = 'running' AND attempts = 2)"
        ),
        Duration::from_secs(10),
    )
    .await;
    let restarted = killed.elapsed();
    assert!(
        restarted < Duration::from_secs(3),
        "the step restarted {restarted:?} after the kill"
    );
    assert_eq!(
        wait_for_run(&db.pool, run, Duration::from_secs(20)).await,
        "succeeded"
    );
    let lost: String = sqlx::query_scalar(
        "SELECT a.error FROM crm_sync.attempts a WHERE a.run_id = $1 AND a.outcome = 'lost'",
    )
    .bind(run)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(lost.contains("died"), "{lost}");
    let stopped: Option<String> = sqlx::query_scalar(
        "SELECT stop_reason FROM crm_sync.workers WHERE pid = $1 ORDER BY started_at DESC LIMIT 1",
    )
    .bind(a.id() as i32)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(stopped.is_some_and(|r| r.contains("session ended")));
    assert!(terminate(&mut b, Duration::from_secs(30)).success());
}

/// Three workers with default settings, one killed -9 every 2 s (and replaced), 200 two-step runs:
/// every run finishes, each step succeeded exactly once.
#[tokio::test]
async fn chaos_kill_nine_every_two_seconds_finishes_every_run_once() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "c.toml",
        &db,
        // Default settings (30 s lease, one run of the pipeline at a time), as in the report.
        "[[pipelines]]\nname = \"two\"\nsource = { kind = \"noop\", steps = 2, sleep_ms = 50 }\n",
    );
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| spawn(&config, &["worker"], dir.path(), &format!("w{i}.log")))
        .collect();
    wait_for_live(&db, 3).await;
    sqlx::query("SELECT crm_sync.enqueue_runs('two', 200, 'sql')")
        .execute(&db.pool)
        .await
        .unwrap();
    let started = Instant::now();
    let mut spawned = 3;
    let mut kills = 0;
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM crm_sync.runs WHERE status IN ('queued', 'running')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if open == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{open} runs still open after 5 minutes ({kills} kills)"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let victim = workers.remove(kills % workers.len());
        kill(Pid::from_raw(victim.id() as i32), Signal::SIGKILL).unwrap();
        let mut victim = victim;
        let _ = victim.wait();
        kills += 1;
        workers.push(spawn(
            &config,
            &["worker"],
            dir.path(),
            &format!("w{spawned}.log"),
        ));
        spawned += 1;
    }
    let took = started.elapsed();
    for child in &mut workers {
        assert!(terminate(child, Duration::from_secs(40)).success());
    }
    let (succeeded, other): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status <> 'succeeded')
           FROM crm_sync.runs",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((succeeded, other), (200, 0));
    let not_once: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT s.id FROM crm_sync.steps s
                                 LEFT JOIN crm_sync.attempts a ON a.step_id = s.id AND a.outcome = 'succeeded'
                                GROUP BY s.id HAVING count(a.id) <> 1) x",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(not_once, 0, "every step succeeded exactly once");
    println!(
        "200 two-step runs through {kills} kills in {:.1} s",
        took.as_secs_f64()
    );
    assert!(kills >= 2, "the scenario must kill workers ({kills} kills)");
}

#[tokio::test]
async fn a_run_whose_steps_ran_under_different_definitions_says_so() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let body = |attempts: u32| {
        format!(
            "{WORKER}[[pipelines]]\nname = \"two\"\nmax_attempts = {attempts}\nsource = {{ kind = \"noop\", steps = 2, fail_times = 1, fail_kind = \"terminal\", fail_step = \"noop_2\" }}\n"
        )
    };
    let v1 = config_file(dir.path(), "v1.toml", &db, &body(1));
    let v2 = config_file(dir.path(), "v2.toml", &db, &body(2));
    let mut worker = spawn(&v1, &["worker"], dir.path(), "v1.log");
    wait_for_live(&db, 1).await;
    let (code, out, _) = run_binary(&v1, &["run", "two", "--wait"]);
    assert_ne!(code, 0, "the first run fails at noop_2");
    let failed = out.trim().to_string();
    assert!(terminate(&mut worker, Duration::from_secs(30)).success());

    // The retry runs under v2: noop_1's checkpoint is v1's, noop_2 runs under v2.
    let mut worker = spawn(&v2, &["worker"], dir.path(), "v2.log");
    let (code, out, err) = run_binary(&v2, &["retry", &failed, "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    let retried = out.trim();
    let (_, show, _) = run_binary(&v2, &["show", retried]);
    assert!(show.contains("CHANGED DURING THE RUN"), "{show}");
    let (_, json, _) = run_binary(&v2, &["show", retried, "--json"]);
    let detail: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        detail["definitions"].as_array().unwrap().len(),
        2,
        "{detail}"
    );
    assert!(terminate(&mut worker, Duration::from_secs(30)).success());
    assert_eq!(live_processes(&db).await, 0);
}

#[tokio::test]
async fn the_queue_benchmark_claims_only_its_own_pipeline_and_vacuums_nothing() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "c.toml",
        &db,
        "[[pipelines]]\nname = \"real\"\nsource = { kind = \"noop\" }\n",
    );
    let (code, _, err) = run_binary(&config, &["migrate"]);
    assert_eq!(code, 0, "{err}");
    let real = psql_enqueue(&db, "real");
    let (code, out, err) = run_binary(&config, &["bench", "queue", "--jobs", "300"]);
    assert_eq!(code, 0, "{out}{err}");
    let (status, attempts): (String, i32) = sqlx::query_as(
        "SELECT r.status, s.attempts FROM crm_sync.runs r JOIN crm_sync.steps s ON s.run_id = r.id
          WHERE r.id = $1",
    )
    .bind(real)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), attempts), ("queued", 0));
    let vacuumed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_user_tables WHERE schemaname = 'crm_sync' AND last_vacuum IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(vacuumed, 0, "the benchmark ran VACUUM on crm-sync's tables");
}

#[tokio::test]
async fn disabling_is_explicit_and_shared_by_every_process() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "c.toml",
        &db,
        "[[pipelines]]\nname = \"p\"\nsource = { kind = \"noop\" }\n\n[[pipelines]]\nname = \"retired\"\nenabled = false\nsource = { kind = \"noop\" }\n",
    );
    let (code, _, err) = run_binary(&config, &["migrate"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run_binary(&config, &["pipelines", "disable", "p"]);
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = run_binary(&config, &["run", "p"]);
    assert_ne!(code, 0);
    assert!(err.contains("disabled by cli:"), "{err}");
    // A process starting with a config that has p enabled does not undo the operator.
    let (code, _, _) = run_binary(&config, &["migrate"]);
    assert_eq!(code, 0);
    let list = pipelines(&config);
    assert_eq!(pipeline(&list, "p")["enabled"], false);
    assert_eq!(pipeline(&list, "p")["disabled_by"], "operator");
    let (code, _, _) = run_binary(&config, &["pipelines", "enable", "p"]);
    assert_eq!(code, 0);
    let (code, _, err) = run_binary(&config, &["run", "p"]);
    assert_eq!(code, 0, "{err}");
    // A config's enabled = false is the other way to retire; enable says why it stays.
    let (code, _, err) = run_binary(&config, &["pipelines", "enable", "retired"]);
    assert_ne!(code, 0);
    assert!(err.contains("disabled by its config"), "{err}");
    let (code, _, err) = run_binary(&config, &["pipelines", "disable", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown pipeline \"nope\""), "{err}");
}

// ------------------------------------------------------------------ a warehouse apart from crm-sync

/// The EZ Focus example over `rows` accounts loading into `warehouse` (a database of its own, named
/// by a secret file), replace or merge, with `lease`.
fn warehouse_config(
    fixture: &crm_sync::fixtures::ezfocus::EzFocusFixture,
    dir: &Path,
    rows: usize,
    warehouse: &TestDb,
    merge: bool,
    lease: &str,
) -> String {
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let url_file = secrets.join("warehouse_url");
    crm_sync::private_fs::write_new(&url_file, warehouse.url.as_bytes()).unwrap();
    let mut text = common::ezfocus::example_config(fixture, &secrets, &dir.join("backups"))
        .replace("[worker]", &format!("[worker]\nlease = \"{lease}\""))
        .replace("schedule = \"0 1 * * *\"\n", "")
        .replace("min_rows = 2600", "min_rows = 1")
        .replace("max_rows = 2700", &format!("max_rows = {rows}"))
        .replace(
            "max_violations = 10",
            &format!("max_violations = {}", rows / 50 + 10),
        )
        .replace(
            "table = \"ezfocus.accounts_list\"",
            &format!(
                "table = \"ezfocus.accounts_list\"\nurl = {{ file = \"{}\" }}",
                url_file.display()
            ),
        );
    if merge {
        text = common::merge_mode(&text).replace(
            "skip_dirty_keys = 10",
            &format!("skip_dirty_keys = {}", rows / 100 + 10),
        );
    }
    text
}

async fn fixture(rows: usize) -> crm_sync::fixtures::ezfocus::EzFocusFixture {
    crm_sync::fixtures::ezfocus::EzFocusFixture::start_on_free_port(
        crm_sync::fixtures::ezfocus::EzFocusConfig::with_rows(rows),
    )
    .await
    .unwrap()
}

/// The load step of `run`: (id, status).
async fn load_step(db: &TestDb, run: Uuid) -> (i64, String) {
    sqlx::query_as("SELECT id, status FROM crm_sync.steps WHERE run_id = $1 AND name = 'load'")
        .bind(run)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// The ledger rows of the warehouse: (batch_id, fence, output, xmin of the row).
async fn ledger_rows(warehouse: &TestDb) -> Vec<(String, i64, Value, String)> {
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('crm_sync_ledger.loads') IS NOT NULL")
            .fetch_one(&warehouse.pool)
            .await
            .unwrap();
    if !exists {
        return Vec::new();
    }
    sqlx::query_as("SELECT batch_id, fence, output, xmin::text FROM crm_sync_ledger.loads")
        .fetch_all(&warehouse.pool)
        .await
        .unwrap()
}

/// The distinct transactions (xmin) that wrote the warehouse table's rows, and its row count.
async fn table_writers(warehouse: &TestDb) -> (Vec<String>, i64) {
    let writers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT xmin::text FROM ezfocus.accounts_list ORDER BY 1")
            .fetch_all(&warehouse.pool)
            .await
            .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ezfocus.accounts_list")
        .fetch_one(&warehouse.pool)
        .await
        .unwrap();
    (writers, rows)
}

/// Starts a worker with `config`, enqueues a run of the EZ Focus pipeline, waits until its load runs,
/// and holds crm-sync's completions back from then on (they write attempts; the load does not).
async fn start_load_and_hold_completions(
    db: &TestDb,
    config: &Path,
    dir: &Path,
) -> (Proc, Uuid, sqlx::Transaction<'static, sqlx::Postgres>) {
    let a = spawn(config, &["worker"], dir, "a.log");
    wait_for_live(db, 1).await;
    let run = psql_enqueue(db, "ezfocus_accounts");
    wait_until(
        &db.pool,
        &format!("SELECT EXISTS (SELECT 1 FROM crm_sync.steps WHERE run_id = '{run}' AND name = 'load' AND status = 'running')"),
        Duration::from_secs(120),
    )
    .await;
    let mut hold = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE crm_sync.attempts IN EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    (a, run, hold)
}

/// Once the worker waits to record its completion: kill -9, end its blocked backend (it would only
/// notice the lost client after its statement; a cut connection would end it), let completions go.
async fn kill_before_its_completion(
    db: &TestDb,
    worker: &mut Proc,
    hold: sqlx::Transaction<'static, sqlx::Postgres>,
) {
    wait_until(
        &db.pool,
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%complete_steps%')",
        Duration::from_secs(20),
    )
    .await;
    kill(Pid::from_raw(worker.id() as i32), Signal::SIGKILL).unwrap();
    let _ = worker.wait();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM (SELECT pid FROM pg_stat_activity
          WHERE wait_event_type = 'Lock' AND query LIKE '%complete_steps%' OFFSET 0) blocked",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    hold.rollback().await.unwrap();
}

/// kill -9 after the warehouse committed the batch but before crm-sync recorded the completion: the
/// next attempt finds the batch in the ledger and completes without loading again.
async fn killed_between_warehouse_commit_and_completion(merge: bool) {
    let db = TestDb::new().await;
    let warehouse = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    let rows = 20_000;
    let fixture = fixture(rows).await;
    let body = warehouse_config(&fixture, dir.path(), rows, &warehouse, merge, "30s");
    let config = config_file(dir.path(), "c.toml", &db, &body);
    let (mut a, run, hold) = start_load_and_hold_completions(&db, &config, dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ledger_rows(&warehouse).await.is_empty() {
        assert!(Instant::now() < deadline, "the warehouse never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        load_step(&db, run).await.1,
        "running",
        "completed too early"
    );
    kill_before_its_completion(&db, &mut a, hold).await;
    let first = ledger_rows(&warehouse).await;

    let mut b = spawn(&config, &["worker"], dir.path(), "b.log");
    assert_eq!(
        wait_for_run(&db.pool, run, Duration::from_secs(60)).await,
        "succeeded"
    );
    let ledger = ledger_rows(&warehouse).await;
    assert_eq!(ledger.len(), 1, "one batch, one ledger row: {ledger:?}");
    assert_eq!(ledger, first, "the ledger row is the first attempt's");
    let (writers, table_rows) = table_writers(&warehouse).await;
    assert_eq!(
        writers,
        [ledger[0].3.clone()],
        "every row was written by the one load transaction that wrote the ledger row"
    );
    let output = common::step_output(&db.pool, run, "load").await;
    assert_eq!(
        output, ledger[0].2,
        "the completion took the ledger's output"
    );
    assert_eq!(output["rows"].as_i64(), Some(table_rows));
    if merge {
        // The counts of the one merge that happened, not of a second one (which would say unchanged).
        let counts = common::merge_counts(&output);
        assert_eq!(counts, [table_rows, 0, 0, 0], "{output}");
    }
    let outcomes: Vec<String> = sqlx::query_scalar(
        "SELECT outcome FROM crm_sync.attempts WHERE step_id = $1 ORDER BY fence",
    )
    .bind(load_step(&db, run).await.0)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(outcomes, ["lost", "succeeded"]);
    assert!(terminate(&mut b, Duration::from_secs(30)).success());
    fixture.stop().await;
}

#[tokio::test]
async fn warehouse_apart_a_kill_between_commit_and_completion_loads_once() {
    killed_between_warehouse_commit_and_completion(false).await;
}

#[tokio::test]
async fn warehouse_apart_a_merge_is_not_applied_twice_after_such_a_kill() {
    killed_between_warehouse_commit_and_completion(true).await;
}

/// A worker stopped (SIGSTOP) in the middle of its COPY into the warehouse until its lease is taken
/// over and the run finished cannot commit when it is continued.
#[tokio::test]
async fn warehouse_apart_a_stopped_worker_cannot_commit_after_the_takeover() {
    let db = TestDb::new().await;
    let warehouse = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    let rows = 40_000;
    let fixture = fixture(rows).await;
    let body = warehouse_config(&fixture, dir.path(), rows, &warehouse, false, "2s");
    let config = config_file(dir.path(), "c.toml", &db, &body);
    let mut a = spawn(&config, &["worker"], dir.path(), "a.log");
    wait_for_live(&db, 1).await;
    // A first batch, so that the stopped load below holds the row locks of its DELETE.
    let first = psql_enqueue(&db, "ezfocus_accounts");
    assert_eq!(
        wait_for_run(&db.pool, first, Duration::from_secs(120)).await,
        "succeeded"
    );
    let run = psql_enqueue(&db, "ezfocus_accounts");
    // A's load transaction of this run is copying: stop A right there. (The transaction carries
    // the fencing token of the claim in its application_name.)
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "A's load never reached its COPY");
        let fence: Option<i64> = sqlx::query_scalar(
            "SELECT fence FROM crm_sync.steps WHERE run_id = $1 AND name = 'load' AND status = 'running'",
        )
        .bind(run)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some(fence) = fence {
            let copying: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = $1
                                   AND state = 'active' AND query LIKE 'COPY%')",
            )
            .bind(crm_sync::destinations::ledger::loader_name(fence))
            .fetch_one(&warehouse.pool)
            .await
            .unwrap();
            if copying {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill(Pid::from_raw(a.id() as i32), Signal::SIGSTOP).unwrap();
    let stopped_fence: i64 =
        sqlx::query_scalar("SELECT fence FROM crm_sync.steps WHERE run_id = $1 AND name = 'load'")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .unwrap();

    let mut b = spawn(&config, &["worker"], dir.path(), "b.log");
    let status = wait_for_run(&db.pool, run, Duration::from_secs(90)).await;
    kill(Pid::from_raw(a.id() as i32), Signal::SIGCONT).unwrap();
    assert_eq!(status, "succeeded");
    // A goes on: its COPY's connection was ended; whatever it does, nothing of it commits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let batch = common::batch_of(&db.pool, run).await;
    let ledger: Vec<_> = ledger_rows(&warehouse)
        .await
        .into_iter()
        .filter(|l| l.0 == batch)
        .collect();
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert!(
        ledger[0].1 > stopped_fence,
        "the committed load is the takeover's (fence {} > {stopped_fence})",
        ledger[0].1
    );
    let (writers, table_rows) = table_writers(&warehouse).await;
    assert_eq!(writers, [ledger[0].3.clone()]);
    assert_eq!(Some(table_rows), ledger[0].2["rows"].as_i64());
    let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap();
    assert!(
        log.contains("ended the transaction of a stale load"),
        "the takeover ended the stopped load's transaction:\n{log}"
    );
    assert!(a.try_wait().unwrap().is_none(), "A is still running");
    assert!(terminate(&mut a, Duration::from_secs(40)).success());
    assert!(terminate(&mut b, Duration::from_secs(40)).success());
    fixture.stop().await;
}

// ------------------------------------------------------------------ behind a transaction-mode pooler

/// Every role through PgBouncer 1.18 in transaction mode (a small server pool, so that statements of
/// different clients share server sessions): `migrate`, `serve` (API, scheduler, workers), a second
/// worker that holds its liveness lock on a direct `listen_url`, SQL enqueue through the pooler, the
/// CLI, and the EZ Focus pipeline end to end. Nothing may fail and nothing may mix up statements.
#[tokio::test]
async fn every_role_works_through_pgbouncer_in_transaction_mode() {
    let db = TestDb::empty().await;
    let bouncer =
        common::pgbouncer::PgBouncer::start_with("127.0.0.1:5432", &[("default_pool_size", "4")]);
    let pooled = bouncer.url(&db.name);
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture(2_700).await;
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let example = common::ezfocus::example_config(&fixture, &secrets, &dir.path().join("backups"))
        .replace("schedule = \"0 1 * * *\"\n", "");
    let pipelines = format!(
        "{example}\n[[pipelines]]\nname = \"tick\"\nschedule = \"*/2 * * * * *\"\nmax_concurrent_runs = 0\nsource = {{ kind = \"noop\", steps = 2 }}\n\n\
         [[pipelines]]\nname = \"many\"\nmax_concurrent_runs = 0\nsource = {{ kind = \"noop\", steps = 3, sleep_ms = 20 }}\n"
    );
    let write = |name: &str, extra: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "database_url = \"{pooled}\"\npooler = \"transaction\"\n{extra}\n[server]\nlisten = \"127.0.0.1:{}\"\n\n{pipelines}",
                free_port()
            ),
        )
        .unwrap();
        path
    };
    let through_pooler = write("pooled.toml", "");
    let with_direct = write("direct.toml", &format!("listen_url = \"{}\"", db.url));

    let (code, out, err) = run_binary(&through_pooler, &["migrate"]);
    assert_eq!(code, 0, "migrate through PgBouncer: {out}{err}");
    let mut serve = spawn(&through_pooler, &["serve"], dir.path(), "serve.log");
    let mut worker = spawn(&with_direct, &["worker"], dir.path(), "worker.log");
    wait_for_live(&db, 2).await;

    // SQL enqueue through the pooler, as pg_cron on Supabase would.
    let out = Command::new("psql")
        .args([
            &pooled,
            "-At",
            "-c",
            "SELECT crm_sync.enqueue_run('ezfocus_accounts')",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ezfocus: Uuid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let many: Vec<Uuid> = sqlx::query_scalar("SELECT crm_sync.enqueue_runs('many', 60, 'sql')")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let (code, out, err) = run_binary(&through_pooler, &["run", "many", "--wait"]);
    assert_eq!(code, 0, "run --wait through PgBouncer: {out}{err}");
    assert_eq!(
        wait_for_run(&db.pool, ezfocus, Duration::from_secs(120)).await,
        "succeeded",
        "{}",
        common::run_error(&db.pool, ezfocus).await
    );
    for run in &many {
        assert_eq!(
            wait_for_run(&db.pool, *run, Duration::from_secs(120)).await,
            "succeeded"
        );
    }
    wait_until(
        &db.pool,
        "SELECT count(*) >= 3 FROM crm_sync.runs WHERE pipeline = 'tick' AND trigger = 'schedule' AND status = 'succeeded'",
        Duration::from_secs(30),
    )
    .await;
    let loaded: i64 = sqlx::query_scalar("SELECT count(*) FROM ezfocus.accounts_list")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(loaded > 2_600, "{loaded} accounts loaded");
    // The run log is whole: a statement of another client run with ours would have broken it.
    common::consistency::assert_history_consistent(&db.pool).await;
    let (code, out, err) = run_binary(&through_pooler, &["pipelines", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"ezfocus_accounts\""), "{out}");
    let ready = reqwest::get(format!("http://{}/readyz", listen_of(&through_pooler)))
        .await
        .unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    // Only the process with a direct connection holds a liveness lock.
    let locks: Vec<(String, Option<i32>)> = sqlx::query_as(
        "SELECT config_path, lock_key FROM crm_sync.live_processes ORDER BY config_path",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(locks.len(), 2, "{locks:?}");
    assert!(
        locks[0].0.ends_with("direct.toml") && locks[0].1.is_some(),
        "{locks:?}"
    );
    assert!(
        locks[1].0.ends_with("pooled.toml") && locks[1].1.is_none(),
        "{locks:?}"
    );

    assert!(terminate(&mut serve, Duration::from_secs(40)).success());
    assert!(terminate(&mut worker, Duration::from_secs(40)).success());
    for log in ["serve.log", "worker.log"] {
        let text = std::fs::read_to_string(dir.path().join(log)).unwrap();
        for bad in ["prepared statement", "failed", "ERROR"] {
            assert!(!text.contains(bad), "{log} says {bad}:\n{text}");
        }
    }
    fixture.stop().await;
}

/// Processes of the previous release still run during an upgrade, and disable every pipeline and
/// webhook their config lacks with these very statements (src/pipeline/registry.rs and
/// src/notify/store.rs at 4bf8f69): the database ignores that now.
#[tokio::test]
async fn a_previous_releases_disable_by_omission_is_ignored() {
    let db = TestDb::new().await;
    db.config(
        "[[pipelines]]\nname = \"p\"\nsource = { kind = \"noop\" }\n\n\
         [[notifications.webhooks]]\nname = \"ops\"\nurl = { env = \"OPS_WEBHOOK_URL\" }\nformat = \"json\"\n",
    )
    .await;
    let theirs = vec!["their_only_pipeline"];
    sqlx::query(
        "UPDATE crm_sync.pipelines SET enabled = false, updated_at = now()
          WHERE enabled AND NOT (name = ANY($1)) AND left(name, 2) <> $2",
    )
    .bind(&theirs)
    .bind("__")
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE crm_sync.webhooks SET enabled = false, updated_at = now()
          WHERE enabled AND NOT (name = ANY($1))",
    )
    .bind(&theirs)
    .execute(&db.pool)
    .await
    .unwrap();
    let enabled: (bool, bool) = sqlx::query_as(
        "SELECT p.enabled, w.enabled FROM crm_sync.pipelines p, crm_sync.webhooks w
          WHERE p.name = 'p' AND w.name = 'ops'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(enabled, (true, true));
    psql_enqueue(&db, "p");
}

/// BigQuery merge: kill -9 after the MERGE job ran, before the completion was recorded. The next
/// attempt finds the earlier attempt's MERGE job done (its id names the claim) and completes with
/// the output worked out before it ran: the merge is neither applied nor counted twice.
#[tokio::test]
async fn bigquery_merge_killed_after_its_merge_job_completes_from_it() {
    use common::ezfocus::{BUCKET, PROJECT};
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture(2_700).await;
    let (gcs, bq) = common::emulators::gcp_with_bucket(PROJECT, BUCKET).await;
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let body = common::merge_mode(&common::ezfocus::gcp_example_config(
        &fixture,
        &secrets,
        &gcs.endpoint(),
        &bq.base_url(),
    ))
    .replace("schedule = \"0 1 * * *\"\n", "");
    let config = config_file(dir.path(), "c.toml", &db, &body);
    let (mut a, run, hold) = start_load_and_hold_completions(&db, &config, dir.path()).await;
    wait_until(
        &db.pool,
        "SELECT EXISTS (SELECT 1 FROM crm_sync.job_outputs)",
        Duration::from_secs(60),
    )
    .await;
    let job_id: String = sqlx::query_scalar("SELECT job_id FROM crm_sync.job_outputs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let loader = crm_sync::gcp::bigquery::BigQueryLoader::new(
        Some(bq.base_url()),
        crm_sync::gcp::GcpAuth::Anonymous,
    )
    .await
    .unwrap();
    assert!(
        loader
            .earlier_job(PROJECT, &job_id)
            .await
            .unwrap()
            .is_some(),
        "the MERGE job ran"
    );
    kill_before_its_completion(&db, &mut a, hold).await;
    let recorded: Value = sqlx::query_scalar("SELECT output FROM crm_sync.job_outputs")
        .fetch_one(&db.pool)
        .await
        .unwrap();

    let mut b = spawn(&config, &["worker"], dir.path(), "b.log");
    assert_eq!(
        wait_for_run(&db.pool, run, Duration::from_secs(90)).await,
        "succeeded"
    );
    let output = common::step_output(&db.pool, run, "load").await;
    assert_eq!(
        output, recorded,
        "the completion took the first MERGE's output"
    );
    let counts = common::merge_counts(&output);
    assert!(
        counts[0] > 2_600,
        "the first merge's inserts, not a second pass's: {output}"
    );
    let outcomes: Vec<String> = sqlx::query_scalar(
        "SELECT outcome FROM crm_sync.attempts WHERE step_id = $1 ORDER BY fence",
    )
    .bind(load_step(&db, run).await.0)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(outcomes, ["lost", "succeeded"]);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_sync.job_outputs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 1, "the second attempt ran no MERGE of its own");
    assert!(terminate(&mut b, Duration::from_secs(30)).success());
    fixture.stop().await;
}
