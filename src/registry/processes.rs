//! The live processes: every `serve`, `worker` and `scheduler` keeps a row in `crm_sync.workers` (its
//! roles, the pipelines its workers claim, a heartbeat) for as long as it runs.
//!
//! A process that can reach PostgreSQL directly also holds a session advisory lock on a connection of
//! its own: when the process dies (kill -9, a crash, a lost host), its session ends and the lock goes
//! with it at once, so the other processes re-queue its steps within about a second
//! (`crm_sync.reap_dead_workers`) instead of waiting for the lease to expire. The lease stays the bound
//! for a process that is alive but hung. Through a pooler in transaction mode session locks do not
//! work; there the lock is taken on `listen_url`'s direct connection, or not at all.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::db::Db;
use sqlx::{Connection, PgConnection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;

/// How often a process looks for dead processes to rescue.
const RESCUE_EVERY: Duration = Duration::from_secs(1);

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Worker,
    Scheduler,
    Api,
    Notifier,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Scheduler => "scheduler",
            Role::Api => "api",
            Role::Notifier => "notifier",
        }
    }
}

/// Who a process is.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    /// `host-pid-xxxx`: readable in the run log, unique across restarts.
    pub id: String,
    pub roles: Vec<Role>,
    /// Steps its workers run at once (0 without the worker role).
    pub concurrency: usize,
    /// A process silent for longer than this is dead; heartbeats come every third of it.
    pub lease: Duration,
}

/// `host-pid-xxxx`.
pub fn new_process_id() -> String {
    format!(
        "{}-{}-{:04x}",
        hostname(),
        std::process::id(),
        rand::random::<u16>()
    )
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_string())
}

/// A live process's row, heartbeat and liveness lock; [`Presence::stop`] marks it stopped.
pub struct Presence {
    id: String,
    pool: Db,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// The session advisory lock that says "alive" while its connection lives.
struct LivenessLock {
    url: String,
    key: i32,
    conn: PgConnection,
}

impl LivenessLock {
    async fn take(url: &str, key: i32) -> Result<Self, sqlx::Error> {
        let mut conn = PgConnection::connect(url).await?;
        sqlx::query("SELECT pg_advisory_lock(crm_sync.liveness_lock_class(), $1)")
            .bind(key)
            .execute(&mut conn)
            .await?;
        Ok(Self {
            url: url.to_string(),
            key,
            conn,
        })
    }

    /// Whether the session (and so the lock) is still there; takes it again when it is not.
    /// Returns false when the lock had been lost.
    async fn keep(&mut self) -> bool {
        if self.conn.ping().await.is_ok() {
            return true;
        }
        warn!(
            "liveness connection lost; reconnecting (other processes may have re-queued our steps)"
        );
        match Self::take(&self.url, self.key).await {
            Ok(fresh) => *self = fresh,
            Err(e) => warn!(error = %e, "cannot take the liveness lock again; retrying"),
        }
        false
    }
}

impl Presence {
    /// Registers the process and the pipelines of its config (as the definitions of a live process),
    /// takes its liveness lock when `liveness_url` is given (a direct connection, never a
    /// transaction-mode pooler), and keeps the row alive until [`Presence::stop`].
    pub async fn start(
        pool: Db,
        liveness_url: Option<&str>,
        info: ProcessInfo,
        config: Arc<Config>,
    ) -> anyhow::Result<Arc<Presence>> {
        let lock = match liveness_url {
            Some(url) => {
                let key: i32 =
                    sqlx::query_scalar("SELECT nextval('crm_sync.process_lock_keys')::int")
                        .fetch_one(&pool)
                        .await?;
                Some(LivenessLock::take(url, key).await.map_err(|e| {
                    anyhow::anyhow!("cannot open the direct (liveness) connection: {e}")
                })?)
            }
            None => None,
        };
        insert_row(&pool, &info, &config, lock.as_ref().map(|l| l.key)).await?;
        crate::registry::register_config(&pool, &config, &info.id, true).await?;
        let presence = Arc::new(Presence {
            id: info.id.clone(),
            pool: pool.clone(),
            stop: CancellationToken::new(),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(keep_alive(pool, info, config, lock, presence.stop.clone()));
        *presence.task.lock().expect("presence task lock") = Some(task);
        Ok(presence)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Marks the process stopped and forgets its definitions; the liveness lock goes with its
    /// connection.
    pub async fn stop(&self) {
        self.stop.cancel();
        let task = self.task.lock().expect("presence task lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let stopped = sqlx::query(
            "WITH gone AS (DELETE FROM crm_sync.pipeline_registrations WHERE process_id = $1)
             UPDATE crm_sync.workers SET stopped_at = now(), stop_reason = 'stopped' WHERE id = $1",
        )
        .bind(&self.id)
        .execute(&self.pool)
        .await;
        if let Err(e) = stopped {
            warn!(error = %e, "cannot mark this process stopped; it counts as dead once its lease runs out");
        }
    }
}

async fn insert_row(
    pool: &Db,
    info: &ProcessInfo,
    config: &Config,
    lock_key: Option<i32>,
) -> Result<(), sqlx::Error> {
    let roles: Vec<&str> = info.roles.iter().map(|r| r.as_str()).collect();
    let pipelines: Vec<&str> = if info.roles.contains(&Role::Worker) {
        config.pipelines.iter().map(|p| p.name.as_str()).collect()
    } else {
        Vec::new()
    };
    sqlx::query(
        "INSERT INTO crm_sync.workers
                (id, hostname, pid, concurrency, lease_ms, roles, pipelines, version, config_path, lock_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (id) DO UPDATE
            SET heartbeat_at = now(), stopped_at = NULL, stop_reason = NULL, lease_ms = EXCLUDED.lease_ms,
                roles = EXCLUDED.roles, pipelines = EXCLUDED.pipelines, lock_key = EXCLUDED.lock_key",
    )
    .bind(&info.id)
    .bind(hostname())
    .bind(std::process::id() as i32)
    .bind(info.concurrency as i32)
    .bind(info.lease.as_millis().max(1) as i64)
    .bind(&roles)
    .bind(&pipelines)
    .bind(env!("CARGO_PKG_VERSION"))
    .bind(config.path.as_ref().map(|p| p.display().to_string()))
    .bind(lock_key)
    .execute(pool)
    .await?;
    Ok(())
}

/// Every second: keeps the liveness lock and rescues the steps of dead processes. Every third of the
/// lease: the heartbeat, and the registered definitions of pipelines whose holder stopped.
async fn keep_alive(
    pool: Db,
    info: ProcessInfo,
    config: Arc<Config>,
    mut lock: Option<LivenessLock>,
    stop: CancellationToken,
) {
    let heartbeat_every = (info.lease / 3).max(Duration::from_millis(100));
    let mut last_heartbeat = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RESCUE_EVERY.min(heartbeat_every)) => {}
            _ = stop.cancelled() => return,
        }
        let mut lost = false;
        if let Some(lock) = lock.as_mut() {
            lost = !lock.keep().await;
        }
        match sqlx::query_scalar::<_, i32>("SELECT crm_sync.reap_dead_workers()")
            .fetch_one(&pool)
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(steps = n, "re-queued the steps of processes that died"),
            Err(e) => warn!(error = %e, "looking for dead processes failed"),
        }
        if lost || last_heartbeat.elapsed() >= heartbeat_every {
            last_heartbeat = Instant::now();
            if let Err(e) = heartbeat(&pool, &info, &config, lock.as_ref().map(|l| l.key)).await {
                warn!(error = %e, "process heartbeat failed");
            }
        }
    }
}

/// Renews the row; a process that others took for dead (its row stopped, its definitions gone)
/// registers again. Then hands pipelines whose registered definition lost its last live holder to
/// a live one.
async fn heartbeat(
    pool: &Db,
    info: &ProcessInfo,
    config: &Config,
    lock_key: Option<i32>,
) -> anyhow::Result<()> {
    let alive: Option<bool> = sqlx::query_scalar(
        "UPDATE crm_sync.workers SET heartbeat_at = now() WHERE id = $1 RETURNING stopped_at IS NULL",
    )
    .bind(&info.id)
    .fetch_optional(pool)
    .await?;
    if alive != Some(true) {
        warn!("this process had been taken for dead; registering it again");
        insert_row(pool, info, config, lock_key).await?;
        crate::registry::register_config(pool, config, &info.id, true).await?;
    }
    let changed: Vec<String> = sqlx::query_scalar("SELECT crm_sync.reconcile_registrations()")
        .fetch_all(pool)
        .await?;
    for pipeline in changed {
        info!(pipeline = %pipeline, "the registered definition's last live holder stopped; a live process's definition is registered now");
    }
    Ok(())
}
