//! One change feed per process for the event streams: a single poller asks the database which runs
//! changed (themselves or a step) since its last look, every [`POLL`], reading only the changed rows
//! (`history::CHANGED_SINCE_SQL`, indexed by `updated_at`), and broadcasts the answer to every open stream.
//! It polls only while some stream listens, and stops with the process.
//!
//! Limits: at most `max_streams` streams at once, and `max_streams_per_token` per bearer token, so
//! that open console tabs or a script cannot take the API down; past them a stream is refused with
//! 429 and a body saying why.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::Db;
use crate::history::{self, RunSummary};

/// How often the feed looks for changes.
pub const POLL: Duration = Duration::from_millis(250);

/// How far each look reaches back before the previous one: a change is dated when its statement ran
/// (a new run when its transaction began), and its transaction may commit later. A change committed
/// more than this after it was dated is missed by the all-runs streams (a followed run is re-read on
/// its next change). Changes already broadcast are not sent again.
const MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// What changed since the previous tick.
#[derive(Debug, Default)]
pub struct Tick {
    /// Every run that changed, itself or one of its steps.
    pub changed: HashSet<Uuid>,
    /// Their summaries, as `GET /api/runs` lists them.
    pub runs: Vec<ChangedRun>,
}

/// A changed run's summary, serialized once for every stream.
#[derive(Debug)]
pub struct ChangedRun {
    pub id: Uuid,
    pub status: String,
    /// The summary as JSON, the data of a `run` event.
    pub json: String,
}

impl From<RunSummary> for ChangedRun {
    fn from(run: RunSummary) -> Self {
        Self {
            id: run.id,
            json: serde_json::to_string(&run).unwrap_or_default(),
            status: run.status,
        }
    }
}

/// The process's change feed and its stream limits; see the module docs.
pub struct ChangeFeed {
    pool: Db,
    shutdown: CancellationToken,
    tx: broadcast::Sender<Arc<Tick>>,
    started: OnceLock<()>,
    limits: StreamLimits,
    open: Mutex<HashMap<[u8; 16], usize>>,
}

/// How many event streams may be open at once.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    pub total: usize,
    pub per_token: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            total: 200,
            per_token: 50,
        }
    }
}

/// A slot of the stream limits, given back when the stream ends.
pub struct StreamSlot {
    feed: Arc<ChangeFeed>,
    token: [u8; 16],
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.feed.open.lock().expect("stream slots lock");
        if let Some(n) = open.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.token);
            }
        }
    }
}

impl ChangeFeed {
    pub fn new(pool: Db, limits: StreamLimits) -> Arc<Self> {
        let (tx, _) = broadcast::channel(64);
        Arc::new(Self {
            pool,
            shutdown: CancellationToken::new(),
            tx,
            started: OnceLock::new(),
            limits,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Ends every stream and the poller (the process is shutting down).
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Completes when the process shuts down: streams end with it.
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.shutdown.clone().cancelled_owned()
    }

    /// A slot for one more stream of `token`, or why not.
    pub fn open_stream(self: &Arc<Self>, token: &str) -> Result<StreamSlot, String> {
        let key: [u8; 16] = Sha256::digest(token.as_bytes())[..16]
            .try_into()
            .expect("16 bytes");
        let mut open = self.open.lock().expect("stream slots lock");
        let total: usize = open.values().sum();
        let mine = open.get(&key).copied().unwrap_or(0);
        if total >= self.limits.total {
            return Err(format!(
                "too many event streams open on this server ({total} of {}); close some (each console tab may hold one) and try again",
                self.limits.total
            ));
        }
        if mine >= self.limits.per_token {
            return Err(format!(
                "too many event streams open with this token ({mine} of {}); close some (each console tab may hold one) and try again",
                self.limits.per_token
            ));
        }
        *open.entry(key).or_insert(0) += 1;
        Ok(StreamSlot {
            feed: self.clone(),
            token: key,
        })
    }

    /// The ticks from now on; starts the poller the first time.
    pub fn subscribe(self: &Arc<Self>) -> broadcast::Receiver<Arc<Tick>> {
        let rx = self.tx.subscribe();
        self.started.get_or_init(|| {
            tokio::spawn(poll(self.clone()));
        });
        rx
    }
}

async fn poll(feed: Arc<ChangeFeed>) {
    let mut since: Option<DateTime<Utc>> = None;
    // The latest change already broadcast per run, for runs changed within the margin.
    let mut sent: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = feed.shutdown.cancelled() => return,
        }
        if feed.tx.receiver_count() == 0 {
            // Nobody listens: start afresh when someone does.
            since = None;
            sent.clear();
            continue;
        }
        let look_from = match since {
            Some(t) => t - MARGIN,
            None => match sqlx::query_scalar("SELECT clock_timestamp()")
                .fetch_one(&feed.pool)
                .await
            {
                Ok(now) => {
                    since = Some(now);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the event streams' change feed cannot read the clock");
                    continue;
                }
            },
        };
        let (at, changed) = match history::changed_since(&feed.pool, look_from).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "the event streams' change feed failed to look");
                continue;
            }
        };
        since = Some(at);
        let fresh: Vec<Uuid> = changed
            .iter()
            .filter(|(id, changed_at)| sent.get(id).is_none_or(|s| changed_at > s))
            .map(|(id, _)| *id)
            .collect();
        sent.extend(changed);
        sent.retain(|_, t| *t > at - MARGIN * 2);
        if fresh.is_empty() {
            continue;
        }
        let runs = match history::runs_by_id(&feed.pool, &fresh).await {
            Ok(runs) => runs.into_iter().map(ChangedRun::from).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "the event streams' change feed failed to read runs");
                Vec::new()
            }
        };
        let _ = feed.tx.send(Arc::new(Tick {
            changed: fresh.into_iter().collect(),
            runs,
        }));
    }
}
