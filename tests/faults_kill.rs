//! kill -9 of a `crm-sync worker` process in each step of the real EZ Focus pipeline into
//! PostgreSQL: the fixture API over HTTP, a local backup, transform, validation and the atomic load.
//! After each kill another worker process takes the step over once the lease expires; the run
//! succeeds once, every step shows the lost attempt and one success, and the table holds exactly one
//! whole batch (the previous one until the new one commits).

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::{TestDb, spawn_binary, table_batches, terminate, wait_for_run, write_config};
use crm_sync::fixtures::ezfocus::{self, AccountsQuery, EzFocusConfig, EzFocusFixture, Fault};
use uuid::Uuid;

/// Enough accounts that each step runs for a second or more in a debug build (so the kill lands
/// inside it), few enough that the whole test stays well under a minute of work.
const ROWS: usize = 20_000;
const TABLE: &str = "ezfocus.accounts_list";

/// `examples/ezfocus.toml` on the fixture, scaled to `ROWS`, with a short lease so that a killed
/// worker's step is taken over within seconds.
fn pipeline_config(
    fixture: &EzFocusFixture,
    secrets: &std::path::Path,
    backups: &std::path::Path,
) -> String {
    let text = common::ezfocus::example_config(fixture, secrets, backups)
        .replace("min_rows = 2600", &format!("min_rows = {}", ROWS - 100))
        .replace("max_rows = 2700", &format!("max_rows = {ROWS}"))
        // The fixture's dirt scales with the row count (e.g. one empty accnt_no per 1,000 rows).
        .replace("max_violations = 10", "max_violations = 100")
        .replace("[worker]", "[worker]\nlease = \"2s\"");
    assert!(text.contains("lease = \"2s\"") && text.contains("max_violations = 100"));
    text
}

/// The `crm-sync worker` processes of the test, by pid.
struct Workers {
    config: std::path::PathBuf,
    dir: std::path::PathBuf,
    alive: Vec<Child>,
    started: usize,
}

impl Workers {
    fn spawn(&mut self) {
        self.started += 1;
        let log = self.dir.join(format!("worker{}.log", self.started));
        self.alive
            .push(spawn_binary(&self.config, &["worker"], &log));
    }

    /// SIGKILL the process whose worker id (`host-PID-xxxx`) is `worker_id`.
    fn kill(&mut self, worker_id: &str) {
        let pid: u32 = worker_id
            .rsplit('-')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in worker id {worker_id}"));
        let i = self
            .alive
            .iter()
            .position(|c| c.id() == pid)
            .unwrap_or_else(|| panic!("worker {worker_id} is not one of this test's processes"));
        let mut child = self.alive.remove(i);
        child.kill().unwrap(); // SIGKILL: no drain, no release, no goodbye
        child.wait().unwrap();
    }
}

async fn alive_workers(db: &TestDb, n: usize) {
    common::wait_until(
        &db.pool,
        &format!(
            "SELECT count(*) >= {n} FROM crm_sync.workers
              WHERE stopped_at IS NULL AND heartbeat_at > now() - interval '3 seconds'"
        ),
        Duration::from_secs(30),
    )
    .await;
}

/// Waits until `step` of `run` is in its first attempt and has been working for `into`, and returns
/// (lease owner, fence) of that attempt.
async fn first_attempt_in_progress(
    db: &TestDb,
    run: Uuid,
    step: &str,
    into: Duration,
) -> (String, i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT lease_owner, fence FROM crm_sync.steps
              WHERE run_id = $1 AND name = $2 AND status = 'running' AND attempts = 1
                AND attempt_started_at <= now() - $3 * interval '1 millisecond'",
        )
        .bind(run)
        .bind(step)
        .bind(into.as_millis() as i64)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some(row) = row {
            return row;
        }
        assert!(
            Instant::now() < deadline,
            "step {step} never ran for {into:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the load's COPY into the destination is streaming rows (its DELETE already done).
async fn copy_in_progress(db: &TestDb) {
    common::wait_until(
        &db.pool,
        &format!(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                             WHERE datname = current_database() AND state = 'active'
                               AND query LIKE 'COPY {TABLE} %')"
        ),
        Duration::from_secs(120),
    )
    .await;
}

#[tokio::test]
async fn a_worker_killed_in_each_step_is_replaced_and_the_run_completes_once() {
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::with_rows(ROWS))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (secrets, backups) = (dir.path().join("secrets"), dir.path().join("backups"));
    std::fs::create_dir_all(&secrets).unwrap();
    let config = write_config(
        dir.path(),
        &db,
        &pipeline_config(&fixture, &secrets, &backups),
    );
    let mut workers = Workers {
        config,
        dir: dir.path().to_path_buf(),
        alive: Vec::new(),
        started: 0,
    };
    workers.spawn();
    workers.spawn();
    alive_workers(&db, 2).await;

    // A first batch, so that the killed load has something to keep.
    let first: Uuid = sqlx::query_scalar("SELECT crm_sync.enqueue_run('ezfocus_accounts')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let status = wait_for_run(&db.pool, first, Duration::from_secs(180)).await;
    assert_eq!(
        status,
        "succeeded",
        "{}",
        common::run_error(&db.pool, first).await
    );
    let first_batch = common::batch_of(&db.pool, first).await;
    assert_eq!(
        table_batches(&db.pool, TABLE).await,
        vec![(first_batch.clone(), ROWS as i64)]
    );

    // The second run loses its worker once in every step. The slow body keeps the extract streaming
    // for a few seconds; the other steps take that long on 20,000 rows.
    fixture
        .faults()
        .set(Fault::SlowBody(Duration::from_millis(25)));
    let started = Instant::now();
    let run: Uuid = sqlx::query_scalar("SELECT crm_sync.enqueue_run('ezfocus_accounts')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mut killed = Vec::new();
    for step in ["extract", "transform", "validate", "load"] {
        let (owner, fence) = if step == "load" {
            copy_in_progress(&db).await;
            first_attempt_in_progress(&db, run, step, Duration::ZERO).await
        } else {
            first_attempt_in_progress(&db, run, step, Duration::from_millis(300)).await
        };
        workers.kill(&owner);
        // Still running under the dead worker's lease: the kill landed inside the step.
        let (status, now_fence, lease_owner): (String, i64, Option<String>) = sqlx::query_as(
            "SELECT status, fence, lease_owner FROM crm_sync.steps WHERE run_id = $1 AND name = $2",
        )
        .bind(run)
        .bind(step)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            (status.as_str(), now_fence, lease_owner.as_deref()),
            ("running", fence, Some(owner.as_str())),
            "the {step} step had already moved on when its worker was killed"
        );
        if step == "load" {
            // The dead worker's DELETE and half-done COPY never committed.
            assert_eq!(
                table_batches(&db.pool, TABLE).await,
                vec![(first_batch.clone(), ROWS as i64)],
                "a reader saw the killed load"
            );
        }
        println!(
            "killed {owner} in {step} after {:.1} s",
            started.elapsed().as_secs_f64()
        );
        killed.push((step, owner));
        workers.spawn();
    }
    let status = wait_for_run(&db.pool, run, Duration::from_secs(180)).await;
    assert_eq!(
        status,
        "succeeded",
        "{}",
        common::run_error(&db.pool, run).await
    );
    println!(
        "run finished {:.1} s after it was enqueued, 4 workers killed",
        started.elapsed().as_secs_f64()
    );

    // Each step: the attempt lost with its killed worker, then one success by another worker.
    for (step, owner) in &killed {
        let log: Vec<(String, String)> = sqlx::query_as(
            "SELECT a.outcome, a.worker_id FROM crm_sync.attempts a JOIN crm_sync.steps s ON s.id = a.step_id
              WHERE s.run_id = $1 AND s.name = $2 ORDER BY a.fence",
        )
        .bind(run)
        .bind(step)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(log.len(), 2, "{step}: {log:?}");
        assert_eq!(
            (log[0].0.as_str(), log[0].1.as_str()),
            ("lost", owner.as_str()),
            "{step}"
        );
        assert_eq!(log[1].0, "succeeded", "{step}");
        assert_ne!(
            &log[1].1, owner,
            "{step}: the dead worker cannot have finished it"
        );
    }
    let runs: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM crm_sync.runs ORDER BY created_at")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        runs,
        vec![(first, "succeeded".into()), (run, "succeeded".into())]
    );
    let batch = common::batch_of(&db.pool, run).await;
    assert_eq!(
        table_batches(&db.pool, TABLE).await,
        vec![(batch, ROWS as i64)]
    );
    common::consistency::assert_history_consistent(&db.pool).await;

    // The raw backup of the second run is the fixture's answer, whole; the killed extract left at
    // most a hidden `.partial-` file, never a visible object.
    let raw: serde_json::Value = sqlx::query_scalar(
        "SELECT output FROM crm_sync.steps WHERE run_id = $1 AND name = 'extract'",
    )
    .bind(run)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let path = raw["object"]
        .as_str()
        .unwrap()
        .strip_prefix("file://")
        .unwrap()
        .to_string();
    let expected = ezfocus::render_accounts_body(fixture.config(), &AccountsQuery::standard());
    assert!(
        std::fs::read(&path).unwrap() == expected,
        "the raw backup is not the answer"
    );

    for mut child in workers.alive.drain(..) {
        let status = terminate(&mut child, Duration::from_secs(30));
        assert!(status.success(), "a surviving worker exited with {status}");
    }
}
