//! The live processes: every `serve`, `worker` and `scheduler` keeps a row in `crm_sync.workers` (its
//! roles, the pipelines its workers claim, a heartbeat) for as long as it runs.
//!
//! A process that can reach PostgreSQL directly also holds a session advisory lock on a connection of
//! its own: when the process dies (kill -9, a crash, a lost host), its session ends and the lock goes
//! with it at once, so the other processes re-queue its steps within about a second
//! (`crm_sync.reap_dead_workers`) instead of waiting for the lease to expire. The lease stays the bound
//! for a process that is alive but hung. Through a pooler in transaction mode session locks do not
//! work; there the lock is taken on `listen_url`'s direct connection, or not at all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::db::Db;
use sqlx::PgConnection;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
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

/// What the process's direct connection hears: a NOTIFY, or that the connection was lost and taken
/// again (notifications may have been missed in between: look again).
#[derive(Debug, Clone)]
pub enum Heard {
    Notify { channel: String, payload: String },
    Reconnected,
}

/// A live process's row, heartbeat and liveness lock; [`Presence::stop`] marks it stopped. Its
/// direct connection also LISTENs for the whole process: parts subscribe with
/// [`Presence::subscribe`], so a process holds one direct connection besides its pool.
pub struct Presence {
    id: String,
    pool: Db,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    heard: Option<broadcast::Sender<Heard>>,
    /// False while the liveness lock is lost (the direct connection dropped, e.g. PostgreSQL
    /// restarted): others take the process for dead then, so it claims nothing, registers nothing
    /// and judges nobody until it holds the lock again.
    holding: Arc<AtomicBool>,
}

/// Takes the liveness lock on the direct connection (reconnecting it first if it was lost).
async fn take_lock(listener: &mut PgListener, key: i32) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_lock(crm_sync.liveness_lock_class(), $1)")
        .persistent(false)
        .bind(key)
        .execute(listener)
        .await?;
    Ok(())
}

/// Forwards what the direct connection hears; when the connection drops, takes it and the lock
/// again (meanwhile other processes may take this one for dead and re-queue its steps: their
/// fencing makes this process's late results harmless).
async fn hear(
    mut listener: PgListener,
    key: i32,
    heard: broadcast::Sender<Heard>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            n = listener.try_recv() => n,
            _ = stop.cancelled() => return,
        };
        match next {
            Ok(Some(n)) => {
                let _ = heard.send(Heard::Notify {
                    channel: n.channel().to_string(),
                    payload: n.payload().to_string(),
                });
            }
            // The connection dropped (Ok(None) after sqlx reconnected it at once; an error when it
            // could not): the lock went with the session. Take both again, whenever the server
            // answers; until then other processes may take this one for dead.
            Ok(None) | Err(_) => {
                if let Err(e) = next {
                    warn!(error = %e, "direct connection lost");
                }
                while let Err(e) = take_lock(&mut listener, key).await {
                    warn!(error = %e, "cannot take the liveness lock again; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(RESCUE_EVERY) => {}
                        _ = stop.cancelled() => return,
                    }
                }
                info!("direct connection and liveness lock taken again");
                let _ = heard.send(Heard::Reconnected);
            }
        }
    }
}

impl Presence {
    /// Registers the process and the pipelines of its config (as the definitions of a live process),
    /// and keeps the row alive until [`Presence::stop`]. With `direct_url` (a direct connection,
    /// never a transaction-mode pooler) it also takes the process's liveness lock there and LISTENs
    /// on `channels`.
    pub async fn start(
        pool: Db,
        direct_url: Option<&str>,
        channels: &[&str],
        info: ProcessInfo,
        config: Arc<Config>,
    ) -> anyhow::Result<Arc<Presence>> {
        let direct = match direct_url {
            Some(url) => {
                let key: i32 =
                    sqlx::query_scalar("SELECT nextval('crm_sync.process_lock_keys')::int")
                        .fetch_one(&pool)
                        .await?;
                let mut listener = PgListener::connect(url).await.map_err(|e| {
                    anyhow::anyhow!("cannot open the direct connection (listen_url): {e}")
                })?;
                take_lock(&mut listener, key).await?;
                listener.listen_all(channels.iter().copied()).await?;
                Some((listener, key))
            }
            None => None,
        };
        let key = direct.as_ref().map(|(_, key)| *key);
        register_process(&pool, &info, &config, key).await?;
        let stop = CancellationToken::new();
        let holding = Arc::new(AtomicBool::new(true));
        let mut tasks = vec![tokio::spawn(keep_alive(
            pool.clone(),
            info.clone(),
            config,
            key,
            holding.clone(),
            stop.clone(),
        ))];
        let heard = direct.map(|(listener, key)| {
            let (tx, _) = broadcast::channel(1024);
            tasks.push(tokio::spawn(hear(listener, key, tx.clone(), stop.clone())));
            tx
        });
        Ok(Arc::new(Presence {
            id: info.id,
            pool,
            stop,
            tasks: Mutex::new(tasks),
            heard,
            holding,
        }))
    }

    /// Whether other processes can see this one alive: it holds its liveness lock (or uses none).
    /// A worker claims nothing while it is not.
    pub fn alive(&self) -> bool {
        self.holding.load(Ordering::SeqCst)
    }

    /// What the direct connection hears from now on; `None` without one (poll instead).
    pub fn subscribe(&self) -> Option<broadcast::Receiver<Heard>> {
        self.heard.as_ref().map(|tx| tx.subscribe())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Marks the process stopped and forgets its definitions; the liveness lock goes with its
    /// connection.
    pub async fn stop(&self) {
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("presence tasks lock"));
        for task in tasks {
            let _ = task.await;
        }
        let stopped = sqlx::query(
            "WITH gone AS (DELETE FROM crm_sync.pipeline_registrations WHERE process_id = $1)
             UPDATE crm_sync.workers SET stopped_at = now(), stop_reason = 'stopped' WHERE id = $1",
        )
        .persistent(false)
        .bind(&self.id)
        .execute(&self.pool)
        .await;
        if let Err(e) = stopped {
            warn!(error = %e, "cannot mark this process stopped; it counts as dead once its lease runs out");
        }
    }
}

/// The process's row and its pipelines' definitions, in one transaction: whoever sees the process
/// alive can enqueue its pipelines.
async fn register_process(
    pool: &Db,
    info: &ProcessInfo,
    config: &Config,
    lock_key: Option<i32>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    insert_row(&mut tx, info, config, lock_key).await?;
    let outcomes = crate::registry::register_in(&mut tx, config, &info.id, true).await?;
    tx.commit().await?;
    crate::registry::log_outcomes(pool, config, &outcomes).await
}

async fn insert_row(
    tx: &mut PgConnection,
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
    ).persistent(false)
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
    .execute(tx)
    .await?;
    Ok(())
}

/// Every second: rescues the steps of dead processes. Every third of the lease: the heartbeat, and
/// the registered definitions of pipelines whose holder stopped.
async fn keep_alive(
    pool: Db,
    info: ProcessInfo,
    config: Arc<Config>,
    lock_key: Option<i32>,
    holding: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let heartbeat_every = (info.lease / 3).max(Duration::from_millis(100));
    let mut last_heartbeat = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RESCUE_EVERY.min(heartbeat_every)) => {}
            _ = stop.cancelled() => return,
        }
        // Without its own lock (PostgreSQL restarted, say; the direct connection is being taken
        // again) others take this process for dead: it claims nothing, and judges nobody by locks
        // that are only being taken again, until it holds its own.
        if let Some(key) = lock_key {
            match holds_lock(&pool, key).await {
                Ok(held) => holding.store(held, Ordering::SeqCst),
                Err(e) => {
                    holding.store(false, Ordering::SeqCst);
                    warn!(error = %e, "cannot check this process's liveness lock");
                }
            }
            if !holding.load(Ordering::SeqCst) {
                continue;
            }
        }
        match sqlx::query_scalar::<_, i32>("SELECT crm_sync.reap_dead_workers()")
            .fetch_one(&pool)
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(steps = n, "re-queued the steps of processes that died"),
            Err(e) => warn!(error = %e, "looking for dead processes failed"),
        }
        if last_heartbeat.elapsed() >= heartbeat_every {
            last_heartbeat = Instant::now();
            if let Err(e) = heartbeat(&pool, &info, &config, lock_key).await {
                warn!(error = %e, "process heartbeat failed");
            }
        }
    }
}

/// Whether this process's liveness lock (`key`) is held now, as every other process sees it.
async fn holds_lock(pool: &Db, key: i32) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                           AND l.classid = crm_sync.liveness_lock_class()::oid AND l.objid = $1::oid
                           AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                              WHERE d.datname = current_database()))",
    )
    .bind(i64::from(key))
    .fetch_one(pool)
    .await
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
    ).persistent(false)
    .bind(&info.id)
    .fetch_optional(pool)
    .await?;
    if alive != Some(true) {
        warn!("this process had been taken for dead; registering it again");
        register_process(pool, info, config, lock_key).await?;
    }
    let changed: Vec<String> = sqlx::query_scalar("SELECT crm_sync.reconcile_registrations()")
        .persistent(false)
        .fetch_all(pool)
        .await?;
    for pipeline in changed {
        info!(pipeline = %pipeline, "the registered definition's last live holder stopped; a live process's definition is registered now");
    }
    Ok(())
}
