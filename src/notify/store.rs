//! The notification outbox in PostgreSQL: webhook registration, claims and outcomes. The state changes
//! are SQL functions (`migrations/20261124000005_notifications.sql`), as for the step queue, so that
//! several notifier processes share one protocol; these are their typed wrappers.

use std::time::Duration;

use crate::db::Db;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// One claimed attempt at one delivery, with the facts its payload needs. The attempt number is the
/// fencing token of [`record`].
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedDelivery {
    pub delivery_id: i64,
    pub webhook: String,
    /// 1-based; already counted in `crm_sync.notification_deliveries.attempts`.
    pub attempt: i32,
    pub max_attempts: i32,
    pub event_id: i64,
    /// `run_failed` or `run_recovered`.
    pub kind: String,
    pub run_id: Uuid,
    pub pipeline: String,
    pub batch_id: String,
    pub run_status: String,
    pub run_error: Option<String>,
    /// The run's first failed step, read when sending (none for a recovery).
    pub failed_step: Option<String>,
    /// Step attempts the run made, retries included.
    pub run_attempts: i32,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What became of a recorded attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Delivered,
    /// Failed with attempts left: due again after the backoff.
    Retry,
    /// Failed, and that was the last attempt.
    Failed,
    /// The attempt's lease ran out and another notifier claimed the delivery again: this outcome is void.
    Discarded,
}

/// Claims up to `limit` due deliveries of `webhooks`, each leased for its webhook's timeout plus
/// `margin`.
pub async fn claim(
    pool: &Db,
    webhooks: &[String],
    limit: i32,
    margin: Duration,
) -> Result<Vec<ClaimedDelivery>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM crm_sync.claim_deliveries($1, $2, $3)")
        .bind(webhooks)
        .bind(limit)
        .bind(i64::try_from(margin.as_millis()).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await
}

/// How one attempt ended, as stored. `error` must already be free of the URL.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub delivered: bool,
    /// HTTP status, when the receiver answered.
    pub status: Option<u16>,
    pub error: Option<String>,
    /// When not delivered: how long until the next attempt.
    pub retry_in: Duration,
}

/// Records an attempt's outcome, fenced by its attempt number.
pub async fn record(
    pool: &Db,
    delivery: &ClaimedDelivery,
    result: &AttemptResult,
) -> Result<Recorded, sqlx::Error> {
    let outcome: String =
        sqlx::query_scalar("SELECT crm_sync.record_delivery($1, $2, $3, $4, $5, $6)")
            .bind(delivery.delivery_id)
            .bind(delivery.attempt)
            .bind(result.delivered)
            .bind(result.status.map(i32::from))
            .bind(result.error.as_deref())
            .bind(i64::try_from(result.retry_in.as_millis()).unwrap_or(i64::MAX))
            .fetch_one(pool)
            .await?;
    Ok(match outcome.as_str() {
        "delivered" => Recorded::Delivered,
        "retry" => Recorded::Retry,
        "failed" => Recorded::Failed,
        _ => Recorded::Discarded,
    })
}
