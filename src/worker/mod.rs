//! The worker: claims due steps, runs them with a timeout while heartbeats keep their leases, and
//! reports each outcome back to the queue.
//!
//! Four tasks share one [`Shared`] state:
//! - the claim loop takes as many steps as there are free slots, in one round trip, whenever a NOTIFY,
//!   a freed slot or the polling timer wakes it;
//! - each claimed step runs in its own tokio task, bounded by the step timeout;
//! - the flusher collects finished steps and records them in batches (one round trip for many
//!   successes), retrying through database outages so that no result is dropped while its lease holds;
//! - the heartbeat renews the leases of in-flight steps, abandons those it lost (cancelled, taken
//!   over) and re-queues steps whose worker died (expired leases).
//!
//! On shutdown the claim loop stops, in-flight steps get `shutdown_grace` to finish, and the rest are
//! released to the queue without spending an attempt.

mod backoff;

pub use backoff::retry_delay;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::db::Db;
use futures::FutureExt;
use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::config::Config;
use crate::metrics::{BusySlot, Metrics};
use crate::pipeline::{Executor, StepContext, StepDone, StepError};
use crate::queue::{self, CANCEL_CHANNEL, ClaimedStep, FailOutcome, Lease, STEPS_CHANNEL};
use crate::registry::{Heard, Presence, ProcessInfo, Role};

/// How one worker process behaves; built from `[worker]` and the connection settings of the config.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Unique per process: recorded on every attempt it makes.
    pub id: String,
    pub concurrency: usize,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub shutdown_grace: Duration,
    pub claim_batch: usize,
    /// A direct connection (never a transaction-mode pooler) for LISTEN wake-ups and the liveness
    /// lock of a worker that runs on its own; `None`: polling, and the lease alone tells a dead
    /// worker.
    pub direct_url: Option<String>,
}

impl WorkerOptions {
    pub fn from_config(config: &Config) -> Self {
        let w = &config.worker;
        let direct = crate::db::direct_url(config).map(str::to_string);
        Self {
            id: crate::registry::processes::new_process_id(),
            concurrency: w.concurrency,
            lease: w.lease,
            poll_interval: w.poll_interval,
            shutdown_grace: w.shutdown_grace,
            claim_batch: w.claim_batch,
            direct_url: direct,
        }
    }
}

/// What a worker did, returned when it stops.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerStats {
    pub succeeded: u64,
    pub failed_attempts: u64,
    pub released: u64,
}

/// A worker over one pool; see the module docs.
pub struct Worker {
    pool: Db,
    executor: Executor,
    opts: WorkerOptions,
    metrics: Arc<Metrics>,
    /// The process's presence when `serve` runs several roles; a worker alone keeps its own.
    presence: Option<Arc<Presence>>,
}

struct InFlight {
    fence: i64,
    run_id: Uuid,
    abort: AbortHandle,
}

struct Finished {
    step: ClaimedStep,
    result: Result<StepDone, StepError>,
    elapsed: Duration,
    _slot: Slot,
}

/// A worker slot held by a step: freed (and no longer counted busy) when dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _busy: BusySlot,
}

struct Shared {
    /// The process's liveness: no claims while others may take it for dead.
    presence: Arc<Presence>,
    pool: Db,
    executor: Executor,
    opts: WorkerOptions,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    /// Wakes the claim loop: new work announced, or a slot freed.
    wake: Notify,
    in_flight: Mutex<HashMap<i64, InFlight>>,
    succeeded: AtomicU64,
    failed_attempts: AtomicU64,
}

impl Worker {
    pub fn new(pool: Db, executor: Executor, opts: WorkerOptions) -> Self {
        Self {
            pool,
            executor,
            opts,
            metrics: Metrics::new(),
            presence: None,
        }
    }

    /// Runs as part of a process whose presence (row, heartbeat, liveness lock) is already kept;
    /// its id must be this worker's.
    pub fn with_presence(mut self, presence: Arc<Presence>) -> Self {
        debug_assert_eq!(presence.id(), self.opts.id);
        self.presence = Some(presence);
        self
    }

    /// Records into `metrics` (the process's, served on `/metrics`) instead of a private set.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn id(&self) -> &str {
        &self.opts.id
    }

    /// Runs until `shutdown` is cancelled, then drains or releases in-flight steps and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<WorkerStats> {
        let own_presence = match &self.presence {
            Some(_) => None,
            None => Some(
                Presence::start(
                    self.pool.clone(),
                    self.opts.direct_url.as_deref(),
                    &[STEPS_CHANNEL, CANCEL_CHANNEL],
                    ProcessInfo {
                        id: self.opts.id.clone(),
                        roles: vec![Role::Worker],
                        concurrency: self.opts.concurrency,
                        lease: self.opts.lease,
                    },
                    self.executor.config(),
                )
                .await?,
            ),
        };
        let presence = self
            .presence
            .clone()
            .or(own_presence.clone())
            .expect("a worker runs with a presence");
        let heard = presence.subscribe();
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(self.opts.concurrency)),
            presence,
            pool: self.pool,
            executor: self.executor,
            opts: self.opts,
            metrics: self.metrics,
            wake: Notify::new(),
            in_flight: Mutex::new(HashMap::new()),
            succeeded: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
        });
        shared
            .metrics
            .worker_slots
            .add(shared.opts.concurrency as i64);
        info!(worker = %shared.opts.id, concurrency = shared.opts.concurrency, "worker started");

        let background = CancellationToken::new();
        let listener = tokio::spawn(listen(shared.clone(), heard, background.clone()));
        let heartbeat = tokio::spawn(heartbeat(shared.clone(), background.clone()));
        let (done_tx, done_rx) = mpsc::channel::<Finished>(shared.opts.concurrency.max(16) * 2);
        let flusher = tokio::spawn(flush(shared.clone(), done_rx));

        claim_loop(&shared, &done_tx, &shutdown).await;
        info!(worker = %shared.opts.id, "stopping: no new claims");
        drop(done_tx);
        let released = drain(&shared, flusher).await;

        background.cancel();
        let _ = listener.await;
        let _ = heartbeat.await;
        if let Some(presence) = own_presence {
            presence.stop().await;
        }
        shared
            .metrics
            .worker_slots
            .sub(shared.opts.concurrency as i64);
        let stats = WorkerStats {
            succeeded: shared.succeeded.load(Ordering::Relaxed),
            failed_attempts: shared.failed_attempts.load(Ordering::Relaxed),
            released,
        };
        info!(worker = %shared.opts.id, succeeded = stats.succeeded, released, "worker stopped");
        Ok(stats)
    }
}

async fn claim_loop(
    shared: &Arc<Shared>,
    done_tx: &mpsc::Sender<Finished>,
    shutdown: &CancellationToken,
) {
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let free = shared
            .slots
            .available_permits()
            .min(shared.opts.claim_batch);
        if free > 0 && shared.presence.alive() {
            let claim = queue::claim(
                &shared.pool,
                &shared.opts.id,
                free,
                shared.opts.lease,
                shared.executor.served(),
            );
            match claim.await {
                Ok(steps) => {
                    failures = 0;
                    let full = steps.len() == free;
                    for step in steps {
                        let permit = shared
                            .slots
                            .clone()
                            .try_acquire_owned()
                            .expect("claimed no more than the free slots");
                        start_step(shared, step, permit, done_tx.clone());
                    }
                    if full {
                        continue;
                    }
                }
                Err(e) => {
                    failures += 1;
                    let pause = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                    warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "claiming steps failed");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(shared.opts.poll_interval) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

fn start_step(
    shared: &Arc<Shared>,
    step: ClaimedStep,
    permit: OwnedSemaphorePermit,
    done_tx: mpsc::Sender<Finished>,
) {
    let span = step_span(&step);
    let slot = Slot {
        _permit: permit,
        _busy: shared.metrics.busy_slot(),
    };
    let ctx = StepContext {
        pool: shared.pool.clone(),
        worker_id: shared.opts.id.clone(),
        step_id: step.step_id,
        run_id: step.run_id,
        batch_id: step.batch_id.clone(),
        pipeline: step.pipeline.clone(),
        step_name: step.step_name.clone(),
        attempt: step.attempt,
        fence: step.fence,
        params: step.params.clone(),
        inputs: step.inputs.clone(),
    };
    let executor = shared.executor.clone();
    let timeout = Duration::from_millis(step.timeout_ms.max(1) as u64);
    let (step_id, fence, run_id) = (step.step_id, step.fence, step.run_id);

    let mut in_flight = shared.in_flight.lock().expect("in-flight map poisoned");
    let handle = tokio::spawn(
        async move {
            debug!("step started");
            let started = Instant::now();
            let run = AssertUnwindSafe(executor.run_step(&ctx)).catch_unwind();
            let result = match tokio::time::timeout(timeout, run).await {
                Ok(Ok(result)) => result,
                Ok(Err(panic)) => Err(StepError::retryable(format!(
                    "step panicked: {}",
                    panic_message(&panic)
                ))),
                Err(_) => Err(StepError::retryable(format!(
                    "step timed out after {}",
                    humantime::format_duration(timeout)
                ))),
            };
            let finished = Finished {
                step,
                result,
                elapsed: started.elapsed(),
                _slot: slot,
            };
            // The flusher only goes away after every sender is dropped, so this cannot fail.
            let _ = done_tx.send(finished).await;
        }
        .instrument(span),
    );
    in_flight.insert(
        step_id,
        InFlight {
            fence,
            run_id,
            abort: handle.abort_handle(),
        },
    );
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Records finished steps: successes in batches, failures one by one (they are rarer and each needs
/// its own backoff). Database errors are retried until the write goes through.
async fn flush(shared: Arc<Shared>, mut done_rx: mpsc::Receiver<Finished>) {
    let mut batch = Vec::with_capacity(shared.opts.claim_batch);
    while done_rx.recv_many(&mut batch, shared.opts.claim_batch).await > 0 {
        let (ok, failed): (Vec<_>, Vec<_>) = batch.drain(..).partition(|f| f.result.is_ok());
        if !ok.is_empty() {
            record_successes(&shared, &ok).await;
        }
        for finished in &failed {
            record_failure(&shared, finished).await;
        }
        {
            let mut in_flight = shared.in_flight.lock().expect("in-flight map poisoned");
            for f in ok.iter().chain(failed.iter()) {
                if in_flight
                    .get(&f.step.step_id)
                    .is_some_and(|i| i.fence == f.step.fence)
                {
                    in_flight.remove(&f.step.step_id);
                }
            }
        }
        // Dropping the batches frees their slots.
        drop(ok);
        drop(failed);
        shared.wake.notify_one();
    }
}

async fn record_successes(shared: &Shared, ok: &[Finished]) {
    let done: Vec<(Lease, Value)> = ok
        .iter()
        .filter_map(|f| match &f.result {
            Ok(StepDone::Output(v)) => Some((f.step.lease(), v.clone())),
            _ => None,
        })
        .collect();
    let accepted = if done.is_empty() {
        Default::default()
    } else {
        persist("completing steps", || {
            queue::complete(&shared.pool, &shared.opts.id, &done)
        })
        .await
    };
    for f in ok {
        let _span = step_span(&f.step).entered();
        let committed = matches!(f.result, Ok(StepDone::Committed(_)));
        if committed || accepted.contains(&f.step.step_id) {
            shared.succeeded.fetch_add(1, Ordering::Relaxed);
            count_success(shared, f);
            info!(duration_ms = f.elapsed.as_millis() as u64, "step succeeded");
        } else {
            warn!(
                "step finished after its lease was lost (cancelled or taken over); result discarded"
            );
        }
    }
}

async fn record_failure(shared: &Shared, f: &Finished) {
    let Err(error) = &f.result else { return };
    shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
    let (base, max) = shared
        .executor
        .pipeline(&f.step.pipeline)
        .map(|p| (p.retry_backoff, p.retry_backoff_max))
        .unwrap_or((Duration::from_secs(1), Duration::from_secs(600)));
    // A source's Retry-After can say anything (u64::MAX seconds): capped, so that now + delay cannot
    // overflow (chrono panics on it).
    let delay =
        retry_delay(f.step.attempt, base, max, error.retry_after).min(crate::config::MAX_DURATION);
    let retry_at = chrono::Utc::now()
        + chrono::Duration::from_std(delay).expect("at most MAX_DURATION fits a chrono Duration");
    let outcome = persist("recording a failed attempt", || {
        queue::fail(
            &shared.pool,
            &shared.opts.id,
            f.step.lease(),
            &error.message,
            error.is_retryable(),
            retry_at,
        )
    })
    .await;
    let _span = step_span(&f.step).entered();
    let (metrics, step) = (&shared.metrics, &f.step);
    if outcome != FailOutcome::Discarded {
        metrics.step_attempt(&step.pipeline, &step.step_name, f.elapsed);
    }
    match outcome {
        FailOutcome::Retry => metrics
            .step_retries_total
            .with_label_values(&[&step.pipeline, &step.step_name])
            .inc(),
        FailOutcome::Failed => metrics.run_finished(&step.pipeline, &step.trigger, "failed"),
        FailOutcome::Discarded => {}
    }
    match outcome {
        FailOutcome::Retry => warn!(
            error = %error.message,
            retry_in_ms = delay.as_millis() as u64,
            "step failed; will retry"
        ),
        FailOutcome::Failed => {
            error!(error = %error.message, retryable = error.is_retryable(), "step failed; run failed")
        }
        FailOutcome::Discarded => {
            warn!(error = %error.message, "step failed after its lease was lost; ignored")
        }
    }
}

/// The metrics of a step whose success was recorded: its duration, its rows, and its run if it was
/// the pipeline's last step.
fn count_success(shared: &Shared, f: &Finished) {
    let (metrics, step) = (&shared.metrics, &f.step);
    metrics.step_attempt(&step.pipeline, &step.step_name, f.elapsed);
    let rows = f
        .result
        .as_ref()
        .ok()
        .and_then(|done| done.output().get("rows"))
        .and_then(Value::as_u64);
    match (step.step_name.as_str(), rows) {
        (crate::pipeline::TRANSFORM, Some(rows)) => metrics
            .rows_extracted_total
            .with_label_values(&[&step.pipeline])
            .inc_by(rows),
        (crate::pipeline::LOAD, Some(rows)) => metrics
            .rows_loaded_total
            .with_label_values(&[&step.pipeline])
            .inc_by(rows),
        _ => {}
    }
    if step.step_name == crate::pipeline::LOAD
        && let Ok(done) = &f.result
        && done.output()["write"] == "merge"
    {
        for change in ["inserted", "updated", "unchanged", "deleted"] {
            if let Some(n) = done.output()[change].as_u64() {
                metrics
                    .merge_rows_total
                    .with_label_values(&[&step.pipeline, change])
                    .inc_by(n);
            }
        }
    }
    // Rows a merge's transform left out for an empty or repeated key.
    if step.step_name == crate::pipeline::TRANSFORM
        && let Ok(done) = &f.result
        && let Some(skipped) = done.output()["skipped"].as_object()
        && !skipped.is_empty()
    {
        metrics
            .merge_rows_total
            .with_label_values(&[&step.pipeline, "skipped"])
            .inc_by(skipped.values().filter_map(Value::as_u64).sum());
    }
    let last_step = shared
        .executor
        .pipeline(&step.pipeline)
        .is_some_and(|p| p.step_names().len() == step.step_position as usize);
    if last_step {
        metrics.run_finished(&step.pipeline, &step.trigger, "succeeded");
    }
}

fn step_span(step: &ClaimedStep) -> tracing::Span {
    info_span!(
        "step",
        run_id = %step.run_id,
        batch_id = %step.batch_id,
        pipeline = %step.pipeline,
        step = %step.step_name,
        attempt = step.attempt,
    )
}

/// Retries a queue write until it succeeds: the result of finished work must not be dropped because
/// PostgreSQL restarted. Fencing makes a late write harmless.
async fn persist<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, queue::QueueError>>,
{
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) => {
                failures += 1;
                let pause = Duration::from_millis(50 * 2u64.pow(failures.min(7)));
                warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "{what} failed");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Renews leases every third of the lease and reaps steps whose worker died.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let every = (shared.opts.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let leases: Vec<Lease> = {
            let in_flight = shared.in_flight.lock().expect("in-flight map poisoned");
            in_flight
                .iter()
                .map(|(&step_id, i)| Lease {
                    step_id,
                    fence: i.fence,
                })
                .collect()
        };
        match queue::heartbeat(&shared.pool, &shared.opts.id, &leases, shared.opts.lease).await {
            Ok(held) => {
                let lost: Vec<i64> = leases
                    .iter()
                    .filter(|l| !held.contains(&l.step_id))
                    .map(|l| l.step_id)
                    .collect();
                abandon(
                    &shared,
                    |step_id, _| lost.contains(&step_id),
                    "lease lost (cancelled or taken over)",
                );
            }
            Err(e) => warn!(error = %e, "renewing leases failed"),
        }
        match queue::reap_expired(&shared.pool).await {
            Ok(0) => {}
            Ok(n) => info!(
                steps = n,
                "re-queued steps whose worker stopped renewing its lease"
            ),
            Err(e) => warn!(error = %e, "reaping expired leases failed"),
        }
    }
}

/// Stops the in-flight steps matching `which`: their results could no longer be recorded.
fn abandon(shared: &Shared, which: impl Fn(i64, &InFlight) -> bool, why: &str) {
    let mut in_flight = shared.in_flight.lock().expect("in-flight map poisoned");
    // A finished task's result is already with the flusher, which settles it either way.
    let ids: Vec<i64> = in_flight
        .iter()
        .filter(|(id, i)| !i.abort.is_finished() && which(**id, i))
        .map(|(id, _)| *id)
        .collect();
    for id in ids {
        if let Some(i) = in_flight.remove(&id) {
            i.abort.abort();
            warn!(step_id = id, run_id = %i.run_id, "{why}; step stopped");
        }
    }
    shared.wake.notify_one();
}

/// Turns NOTIFYs into wake-ups and cancellations into aborted steps. Polling covers any gap.
async fn listen(
    shared: Arc<Shared>,
    heard: Option<broadcast::Receiver<Heard>>,
    stop: CancellationToken,
) {
    let Some(mut heard) = heard else {
        info!(
            poll_interval_ms = shared.opts.poll_interval.as_millis() as u64,
            "no direct connection for LISTEN (pooler = \"transaction\" without listen_url): polling"
        );
        return;
    };
    shared.wake.notify_one();
    loop {
        let next = tokio::select! {
            n = heard.recv() => n,
            _ = stop.cancelled() => return,
        };
        match next {
            Ok(Heard::Notify { channel, payload }) if channel == CANCEL_CHANNEL => {
                if let Ok(run_id) = payload.parse::<Uuid>() {
                    abandon(&shared, |_, i| i.run_id == run_id, "run cancelled");
                }
            }
            Ok(Heard::Notify { channel, .. }) if channel == STEPS_CHANNEL => {
                shared.wake.notify_one()
            }
            Ok(Heard::Notify { .. }) => {}
            // Reconnected, or notifications dropped for a slow reader: look again.
            Ok(Heard::Reconnected) | Err(broadcast::error::RecvError::Lagged(_)) => {
                shared.wake.notify_one()
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// After the claim loop stopped: wait up to the grace period for in-flight steps, then stop the rest
/// and release them to the queue. Returns how many were released.
async fn drain(shared: &Arc<Shared>, flusher: JoinHandle<()>) -> u64 {
    let deadline = tokio::time::Instant::now() + shared.opts.shutdown_grace;
    loop {
        if shared
            .in_flight
            .lock()
            .expect("in-flight map poisoned")
            .is_empty()
        {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let n = shared
                .in_flight
                .lock()
                .expect("in-flight map poisoned")
                .len();
            warn!(
                steps = n,
                "grace period over: stopping the steps still running"
            );
            let in_flight = shared.in_flight.lock().expect("in-flight map poisoned");
            for i in in_flight.values() {
                i.abort.abort();
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every task has finished or been aborted, so the flusher ends once it has recorded what came in.
    let _ = flusher.await;
    let leftover: Vec<Lease> = {
        let mut in_flight = shared.in_flight.lock().expect("in-flight map poisoned");
        in_flight
            .drain()
            .map(|(step_id, i)| Lease {
                step_id,
                fence: i.fence,
            })
            .collect()
    };
    if leftover.is_empty() {
        return 0;
    }
    match queue::release(&shared.pool, &shared.opts.id, &leftover).await {
        Ok(n) => {
            info!(steps = n, "released unfinished steps to the queue");
            n
        }
        Err(e) => {
            error!(error = %e, "releasing steps failed; they return to the queue when their lease expires");
            0
        }
    }
}
