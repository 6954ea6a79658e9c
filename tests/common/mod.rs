//! Test support: a fresh, migrated database per test (dropped afterwards), config files, in-process
//! workers and the real `crm-sync` binary as child processes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crm_sync::config::Config;
use crm_sync::db::Db;
use crm_sync::pipeline::Executor;
use crm_sync::registry;
use crm_sync::worker::{Worker, WorkerOptions, WorkerStats};
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The server tests create their databases on (`CRM_SYNC_TEST_ADMIN_URL` to point elsewhere).
pub fn admin_url() -> String {
    std::env::var("CRM_SYNC_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own for one test, migrated; dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: Db,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let db = Self::empty().await;
        crm_sync::db::migrate(&db.pool, true)
            .await
            .expect("migrate");
        db
    }

    /// A database of its own with no schema at all (upgrade tests apply older migrations to it).
    pub async fn empty() -> TestDb {
        let name = format!("crm_sync_test_{}", Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("connect admin");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let base = admin_url();
        let url = match base.rfind('/') {
            Some(i) => format!("{}/{name}", &base[..i]),
            None => panic!("admin url has no database part: {base}"),
        };
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await
            .expect("connect test db");
        TestDb {
            name,
            url,
            pool: Db::from(pool),
        }
    }

    /// Loads `pipelines` (TOML) into a config pointing at this database and registers it.
    pub async fn config(&self, toml_text: &str) -> Config {
        let text = format!("database_url = \"{}\"\n{toml_text}", self.url);
        let config = Config::parse(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"));
        registry::register_config(&self.pool, &config, "test", false)
            .await
            .expect("register pipelines");
        config
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        run_as_admin(vec![format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )]);
    }
}

/// Runs `statements` on the admin database, one after the other, ignoring failures (clean-up in
/// `Drop`).
pub fn run_as_admin(statements: Vec<String>) {
    run_blocking(admin_url(), statements);
}

/// Runs `statements` on the database at `url`, ignoring failures: on a thread with its own
/// runtime, since Drop cannot be async and the test's runtime may be gone.
pub fn run_blocking(url: String, statements: Vec<String>) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            if let Ok(pool) = PgPoolOptions::new().max_connections(1).connect(&url).await {
                for sql in statements {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                }
                pool.close().await;
            }
        })
    })
    .join();
}

/// An in-process worker on its own pool; stop it with [`RunningWorker::stop`].
pub struct RunningWorker {
    pub id: String,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<WorkerStats>>,
}

impl RunningWorker {
    pub async fn start(db: &TestDb, config: &Config) -> RunningWorker {
        Self::start_with_metrics(db, config, crm_sync::metrics::Metrics::new()).await
    }

    /// A worker that records into `metrics` (e.g. the ones an API under test serves).
    pub async fn start_with_metrics(
        db: &TestDb,
        config: &Config,
        metrics: Arc<crm_sync::metrics::Metrics>,
    ) -> RunningWorker {
        let pool = PgPoolOptions::new()
            .max_connections(config.worker.max_connections)
            .connect(&db.url)
            .await
            .unwrap();
        let opts = WorkerOptions::from_config(config);
        let id = opts.id.clone();
        let worker = Worker::new(pool.into(), Executor::new(Arc::new(config.clone())), opts)
            .with_metrics(metrics);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        RunningWorker {
            id,
            shutdown,
            handle,
        }
    }

    pub async fn stop(self) -> WorkerStats {
        self.shutdown.cancel();
        self.handle
            .await
            .expect("worker task")
            .expect("worker result")
    }
}

/// Waits until the run reaches a final status and returns it.
pub async fn wait_for_run(pool: &Db, id: Uuid, timeout: Duration) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status: String = sqlx::query_scalar("SELECT status FROM crm_sync.runs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .expect("run exists");
        if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run {id} still {status} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Starts a worker, enqueues one run of `pipeline`, waits up to `timeout` for it to finish, stops the
/// worker; returns the run id and its final status.
pub async fn run_pipeline(
    db: &TestDb,
    config: &Config,
    pipeline: &str,
    timeout: Duration,
) -> (Uuid, String) {
    run_pipeline_with_metrics(
        db,
        config,
        pipeline,
        timeout,
        crm_sync::metrics::Metrics::new(),
    )
    .await
}

/// [`run_pipeline`] with a worker that records into `metrics`.
pub async fn run_pipeline_with_metrics(
    db: &TestDb,
    config: &Config,
    pipeline: &str,
    timeout: Duration,
    metrics: Arc<crm_sync::metrics::Metrics>,
) -> (Uuid, String) {
    let worker = RunningWorker::start_with_metrics(db, config, metrics).await;
    let id = crm_sync::queue::enqueue(
        &db.pool,
        pipeline,
        &serde_json::json!({}),
        None,
        crm_sync::queue::Trigger::Cli,
    )
    .await
    .expect("enqueue");
    let status = wait_for_run(&db.pool, id, timeout).await;
    worker.stop().await;
    (id, status)
}

/// The batch id of a run.
pub async fn batch_of(pool: &Db, run: Uuid) -> String {
    sqlx::query_scalar("SELECT batch_id FROM crm_sync.runs WHERE id = $1")
        .bind(run)
        .fetch_one(pool)
        .await
        .expect("run exists")
}

/// Rows per batch_id in a destination table.
pub async fn table_batches(pool: &Db, table: &str) -> Vec<(String, i64)> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT batch_id::text, count(*) FROM {table} GROUP BY batch_id"
    )))
    .fetch_all(pool)
    .await
    .expect("destination table readable")
}

/// A run's error text ("" when it has none).
pub async fn run_error(pool: &Db, run: Uuid) -> String {
    sqlx::query_scalar::<_, Option<String>>("SELECT error FROM crm_sync.runs WHERE id = $1")
        .bind(run)
        .fetch_one(pool)
        .await
        .expect("run exists")
        .unwrap_or_default()
}

/// Polls `query` (one boolean) until it is true.
pub async fn wait_until(pool: &Db, query: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let done: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_string()))
            .fetch_one(pool)
            .await
            .expect("poll query");
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {query}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The `crm-sync` binary built for these tests.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_crm-sync"))
}

/// Writes a config file for child processes into `dir`.
pub fn write_config(dir: &Path, db: &TestDb, toml_text: &str) -> PathBuf {
    let path = dir.join("crm-sync.toml");
    let mut text = format!("database_url = \"{}\"\n{toml_text}", db.url);
    // Processes that serve HTTP (serve, even with --no-api) must not fight over port 8080.
    if !toml_text.contains("[server]") {
        text.push_str("\n[server]\nlisten = \"127.0.0.1:0\"\n");
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `crm-sync ARGS` with the given config, logs to `log`.
pub fn spawn_binary(config: &Path, args: &[&str], log: &Path) -> Child {
    let log_file = std::fs::File::create(log).unwrap();
    Command::new(binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn crm-sync")
}

/// SIGTERM, then waits up to `timeout` for the process to exit; returns its exit status.
pub fn terminate(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    use nix::sys::signal::{Signal, kill};
    // The child is not reaped yet, so its pid cannot have been reused.
    let _ = kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    );
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {} did not exit within {timeout:?} of SIGTERM",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `crm-sync ARGS` to completion and returns (exit code, stdout, stderr).
pub fn run_binary(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run crm-sync");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
pub mod browser;
pub mod compose;
pub mod consistency;
pub mod emulators;
pub mod ezfocus;
pub mod pgbouncer;
pub mod private_postgres;
pub mod qashier;
pub mod relay;

/// `serve`'s whole HTTP surface (API, console, metrics) in-process on a free port; stopped on drop.
pub struct ApiServer {
    pub base: String,
    /// The process metrics the server exports (give them to workers to see their counts).
    pub metrics: Arc<crm_sync::metrics::Metrics>,
    stop: CancellationToken,
}

impl ApiServer {
    pub async fn start(db: &TestDb, config: &Config, admin: &str, reader: &str) -> ApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = crm_sync::api::AppState::new(
            db.pool.clone(),
            Arc::new(config.clone()),
            crm_sync::api::Tokens::new(vec![admin.into()], vec![reader.into()]),
        );
        let metrics = state.metrics.clone();
        let stop = CancellationToken::new();
        tokio::spawn(crm_sync::api::serve(listener, state, stop.clone()));
        ApiServer {
            base,
            metrics,
            stop,
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An example config with its destination switched to merge (see [`crm_sync::fixtures::merge_mode`]).
pub fn merge_mode(example: &str) -> String {
    let text = crm_sync::fixtures::merge_mode(example);
    assert!(
        text.lines().any(|l| l.starts_with("write = \"merge\"")),
        "the example has no commented write = \"merge\" block"
    );
    text
}

/// A step's output (`null` when the step has none).
pub async fn step_output(pool: &Db, run: Uuid, step: &str) -> serde_json::Value {
    sqlx::query_scalar::<_, Option<serde_json::Value>>(
        "SELECT output FROM crm_sync.steps WHERE run_id = $1 AND name = $2",
    )
    .bind(run)
    .bind(step)
    .fetch_one(pool)
    .await
    .expect("step exists")
    .unwrap_or_default()
}

/// A merge load's inserted, updated, unchanged and deleted counts.
pub fn merge_counts(load_output: &serde_json::Value) -> [i64; 4] {
    ["inserted", "updated", "unchanged", "deleted"].map(|k| load_output[k].as_i64().unwrap_or(-1))
}
