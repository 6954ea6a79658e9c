//! Failure and recovery notifications to webhooks (Slack or plain JSON), durable and retried.
//!
//! Nobody watches a scheduled sync until its data is missed, so a failed run must tell someone, and a
//! later success must say it is over. The database decides and remembers (an outbox): a trigger on
//! `crm_sync.runs` writes an event and one delivery per matching webhook in the transaction that finished
//! the run, then NOTIFYs. The [`Notifier`] (inside `crm-sync serve` and `crm-sync worker`) wakes on that
//! NOTIFY, or polls, claims due deliveries, POSTs them and records each outcome, retrying with
//! exponential backoff and jitter until `max_attempts`. Claims use `FOR UPDATE SKIP LOCKED` and a lease,
//! so any number of notifier processes send each delivery once; a notifier killed mid-send leaves the
//! delivery to be retried after the lease (at least once, never lost).
//!
//! - `store`: registration of webhooks, claims and outcomes (SQL functions in `migrations/`);
//! - `payload`: the JSON and Slack bodies;
//! - `deliver`: the POST, and errors scrubbed of the URL (a secret, never logged or stored).

mod deliver;
pub mod payload;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::db::Db;
use futures::future::join_all;
use tokio::sync::{Notify, broadcast};

use crate::registry::Heard;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, WebhookConfig};
use crate::metrics::Metrics;
use crate::worker::retry_delay;
use payload::RunFacts;
use store::{AttemptResult, ClaimedDelivery, Recorded};

/// The channel the run trigger NOTIFYs when it created deliveries.
pub const CHANNEL: &str = "crm_sync_notifications";
/// Deliveries claimed (and sent concurrently) per round.
const CLAIM_BATCH: i32 = 8;
/// A claim's lease is the webhook's timeout plus this: time to record the outcome after the POST.
const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// Sends the deliveries of the configured webhooks until shut down; see the module docs.
pub struct Notifier {
    pool: Db,
    webhooks: HashMap<String, WebhookConfig>,
    names: Vec<String>,
    console_base: String,
    poll_interval: Duration,
    /// What the process's direct connection hears (see [`Presence`](crate::registry::Presence));
    /// `None`: polling only.
    wakeups: Option<broadcast::Receiver<Heard>>,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
}

impl Notifier {
    /// A notifier for `config`'s webhooks (none configured: nothing to do, so the caller should not
    /// start one). Polls at `[worker] poll_interval` when no NOTIFY arrives.
    pub fn new(pool: Db, config: &Config) -> anyhow::Result<Notifier> {
        let webhooks: HashMap<String, WebhookConfig> = config
            .notifications
            .webhooks
            .iter()
            .map(|w| (w.name.clone(), w.clone()))
            .collect();
        let mut names: Vec<String> = webhooks.keys().cloned().collect();
        names.sort();
        Ok(Notifier {
            pool,
            webhooks,
            names,
            console_base: config.server.console_base(),
            poll_interval: config.worker.poll_interval,
            wakeups: None,
            client: deliver::client()?,
            metrics: Metrics::new(),
        })
    }

    /// Wakes on the NOTIFYs the process's direct connection hears, instead of polling alone.
    pub fn with_wakeups(mut self, wakeups: Option<broadcast::Receiver<Heard>>) -> Self {
        self.wakeups = wakeups;
        self
    }

    /// Counts deliveries in `metrics` (the process's, served on `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Runs until `shutdown` is cancelled; sends already started are finished first (each is bounded
    /// by its webhook's timeout). Database errors are logged and retried, never fatal: the outbox keeps
    /// the deliveries until they can be sent.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        for w in self.webhooks.values() {
            if let Err(e) = w.url.resolve() {
                warn!(webhook = %w.name, error = %e, "webhook URL not available; its messages wait and are retried");
            }
        }
        info!(webhooks = %self.names.join(","), "notifier started");
        let wake = Arc::new(Notify::new());
        let stop_listening = shutdown.child_token();
        let listener = tokio::spawn(listen(
            self.wakeups.take(),
            wake.clone(),
            stop_listening.clone(),
        ));
        while !shutdown.is_cancelled() {
            let claimed =
                match store::claim(&self.pool, &self.names, CLAIM_BATCH, LEASE_MARGIN).await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "claiming webhook deliveries failed; trying again");
                        Vec::new()
                    }
                };
            let full = claimed.len() == CLAIM_BATCH as usize;
            join_all(claimed.into_iter().map(|d| self.deliver(d))).await;
            if full {
                continue;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        stop_listening.cancel();
        let _ = listener.await;
        info!("notifier stopped");
        Ok(())
    }

    /// One attempt at one claimed delivery: build, send, record, log.
    async fn deliver(&self, d: ClaimedDelivery) {
        let Some(hook) = self.webhooks.get(&d.webhook) else {
            return; // claimed only by name from this map
        };
        let facts = self.facts(&d);
        let body = payload::body(hook.format, &facts);
        let id = deliver::MessageId {
            event_id: d.event_id,
            attempt: d.attempt,
        };
        let sent = deliver::post(&self.client, &hook.url, hook.timeout, &body, id).await;
        let retry_in = retry_delay(
            d.attempt,
            hook.retry_backoff,
            hook.retry_backoff_max,
            sent.retry_after,
        );
        let result = AttemptResult {
            delivered: sent.delivered,
            status: sent.status,
            error: sent.error.clone(),
            retry_in,
        };
        let error = sent.error.as_deref().unwrap_or("");
        let recorded = self.record(&d, &result).await;
        let outcome = match recorded {
            Some(Recorded::Delivered) => Some("delivered"),
            Some(Recorded::Retry) => Some("retry"),
            Some(Recorded::Failed) => Some("failed"),
            _ => None,
        };
        if let Some(outcome) = outcome {
            self.metrics
                .notifications_total
                .with_label_values(&[&d.webhook, outcome])
                .inc();
        }
        match recorded {
            Some(Recorded::Delivered) => info!(
                webhook = %d.webhook, delivery_id = d.delivery_id, event = %d.kind, run_id = %d.run_id,
                pipeline = %d.pipeline, attempt = d.attempt, "webhook delivered"
            ),
            Some(Recorded::Retry) => warn!(
                webhook = %d.webhook, delivery_id = d.delivery_id, event = %d.kind, run_id = %d.run_id,
                attempt = d.attempt, max_attempts = d.max_attempts, error,
                retry_in_ms = retry_in.as_millis() as u64,
                "webhook delivery failed; will retry"
            ),
            Some(Recorded::Failed) => error!(
                webhook = %d.webhook, delivery_id = d.delivery_id, event = %d.kind, run_id = %d.run_id,
                pipeline = %d.pipeline, attempts = d.attempt, error,
                "webhook delivery failed; giving up after its last attempt"
            ),
            Some(Recorded::Discarded) => warn!(
                webhook = %d.webhook, delivery_id = d.delivery_id, attempt = d.attempt,
                "webhook attempt outlived its lease; another notifier has taken the delivery over"
            ),
            None => {}
        }
    }

    /// Records an outcome, retrying database errors for as long as the claim's lease margin lasts
    /// (after that the delivery is claimed again anyway).
    async fn record(&self, d: &ClaimedDelivery, result: &AttemptResult) -> Option<Recorded> {
        let deadline = tokio::time::Instant::now() + LEASE_MARGIN;
        loop {
            match store::record(&self.pool, d, result).await {
                Ok(r) => return Some(r),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    warn!(webhook = %d.webhook, delivery_id = d.delivery_id, error = %e,
                          "recording a webhook attempt failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    error!(webhook = %d.webhook, delivery_id = d.delivery_id, error = %e,
                           "could not record a webhook attempt; it will be retried after its lease");
                    return None;
                }
            }
        }
    }

    fn facts(&self, d: &ClaimedDelivery) -> RunFacts {
        RunFacts {
            event: d.kind.clone(),
            pipeline: d.pipeline.clone(),
            run_id: d.run_id,
            batch_id: d.batch_id.clone(),
            status: d.run_status.clone(),
            failed_step: d.failed_step.clone(),
            error: d.run_error.clone(),
            attempts: d.run_attempts,
            finished_at: d.finished_at,
            console_url: format!("{}/runs/{}", self.console_base, d.run_id),
        }
    }
}

/// Turns NOTIFYs on [`CHANNEL`] heard by the process's direct connection into wake-ups (polling
/// covers the gaps and a process without one).
async fn listen(
    heard: Option<broadcast::Receiver<Heard>>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let Some(mut heard) = heard else {
        return;
    };
    loop {
        let next = tokio::select! {
            n = heard.recv() => n,
            _ = stop.cancelled() => return,
        };
        match next {
            Ok(Heard::Notify { channel, .. }) if channel == CHANNEL => wake.notify_one(),
            Ok(Heard::Notify { .. }) => {}
            Ok(Heard::Reconnected) | Err(broadcast::error::RecvError::Lagged(_)) => {
                wake.notify_one()
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
