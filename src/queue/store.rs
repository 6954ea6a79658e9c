//! Calls to the queue's SQL functions.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use crate::db::Db;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{ClaimedStep, FailOutcome, Lease, QueueError, Served, Trigger};

/// Enqueues one run of `pipeline` and returns its id. With an idempotency key, a repeat returns the
/// run the key already names (and a reuse with other parameters is a [`QueueError::Conflict`]).
pub async fn enqueue(
    pool: &Db,
    pipeline: &str,
    params: &Value,
    idempotency_key: Option<&str>,
    trigger: Trigger,
) -> Result<Uuid, QueueError> {
    check_no_nul("pipeline name", pipeline)?;
    if let Some(key) = idempotency_key {
        check_no_nul("idempotency key", key)?;
    }
    if let Some(at) = nul_in_json(params, "params") {
        return Err(QueueError::Invalid(format!(
            "{at} contains a NUL character (\\u0000), which PostgreSQL cannot store"
        )));
    }
    retry_on_conflict(|| async {
        sqlx::query_scalar("SELECT crm_sync.enqueue_run_as($1, $2, $3, $4, NULL)")
            .bind(pipeline)
            .bind(params)
            .bind(idempotency_key)
            .bind(trigger.as_str())
            .fetch_one(pool)
            .await
    })
    .await
}

/// Enqueues `count` runs of `pipeline` in one statement (benchmarks, back-fills).
pub async fn enqueue_many(
    pool: &Db,
    pipeline: &str,
    count: u32,
    trigger: Trigger,
) -> Result<Vec<Uuid>, QueueError> {
    Ok(
        sqlx::query_scalar("SELECT crm_sync.enqueue_runs($1, $2, $3)")
            .bind(pipeline)
            .bind(i32::try_from(count).unwrap_or(i32::MAX))
            .bind(trigger.as_str())
            .fetch_all(pool)
            .await?,
    )
}

/// Claims up to `limit` due steps of the `served` pipelines for `worker`, each with a lease of
/// `lease`; the steps of other pipelines wait for a worker that serves them.
pub async fn claim(
    pool: &Db,
    worker: &str,
    limit: usize,
    lease: Duration,
    served: &Served,
) -> Result<Vec<ClaimedStep>, QueueError> {
    Ok(
        sqlx::query_as::<_, ClaimedStep>("SELECT * FROM crm_sync.claim_steps($1, $2, $3, $4, $5)")
            .bind(worker)
            .bind(i32::try_from(limit).unwrap_or(i32::MAX))
            .bind(millis(lease))
            .bind(&served.pipelines)
            .bind(&served.fingerprints)
            .fetch_all(pool)
            .await?,
    )
}

/// Completes a batch of steps with their outputs. Returns the leases that were accepted; the others
/// had been lost (taken over, cancelled or reaped) and their outputs were discarded.
pub async fn complete(
    pool: &Db,
    worker: &str,
    done: &[(Lease, Value)],
) -> Result<HashSet<i64>, QueueError> {
    let ids: Vec<i64> = done.iter().map(|(l, _)| l.step_id).collect();
    let fences: Vec<i64> = done.iter().map(|(l, _)| l.fence).collect();
    let outputs: Vec<Value> = done.iter().map(|(_, o)| o.clone()).collect();
    let accepted: Vec<i64> = retry_on_conflict(|| async {
        sqlx::query_scalar("SELECT * FROM crm_sync.complete_steps($1, $2, $3, $4)")
            .bind(worker)
            .bind(&ids)
            .bind(&fences)
            .bind(&outputs)
            .fetch_all(pool)
            .await
    })
    .await?;
    Ok(accepted.into_iter().collect())
}

/// Completes one step inside the caller's transaction (a load that commits its batch and its
/// completion together); false when the lease had been lost, and the caller must roll back.
pub async fn complete_in(
    conn: &mut sqlx::PgConnection,
    worker: &str,
    lease: Lease,
    output: &Value,
) -> Result<bool, sqlx::Error> {
    let accepted: Vec<i64> =
        sqlx::query_scalar("SELECT * FROM crm_sync.complete_steps($1, $2, $3, $4)")
            .persistent(false)
            .bind(worker)
            .bind(vec![lease.step_id])
            .bind(vec![lease.fence])
            .bind(vec![output.clone()])
            .fetch_all(conn)
            .await?;
    Ok(!accepted.is_empty())
}

/// Whether this claim of the step still holds (not taken over, cancelled or reaped).
pub async fn lease_held(pool: &Db, lease: Lease) -> Result<bool, sqlx::Error> {
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM crm_sync.steps WHERE id = $1 AND fence = $2 AND status = 'running'",
    )
    .bind(lease.step_id)
    .bind(lease.fence)
    .fetch_optional(pool)
    .await?;
    Ok(held.is_some())
}

/// The claims (step id, fencing token) that earlier attempts at step `step` of batch `batch_id`
/// held, in this run and the runs it retried, newest first: a load that must not run twice looks for
/// what they started (BigQuery job ids are made of them).
pub async fn earlier_claims(
    pool: &Db,
    batch_id: &str,
    step: &str,
    current: Lease,
) -> Result<Vec<Lease>, sqlx::Error> {
    let claims: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT a.step_id, a.fence FROM crm_sync.attempts a
           JOIN crm_sync.steps s ON s.id = a.step_id
           JOIN crm_sync.runs r ON r.id = s.run_id
          WHERE r.batch_id = $1 AND s.name = $2 AND NOT (a.step_id = $3 AND a.fence = $4)
          ORDER BY a.fence DESC",
    )
    .bind(batch_id)
    .bind(step)
    .bind(current.step_id)
    .bind(current.fence)
    .fetch_all(pool)
    .await?;
    Ok(claims
        .into_iter()
        .map(|(step_id, fence)| Lease { step_id, fence })
        .collect())
}

/// Keeps the output a step worked out before starting external job `job_id` (see
/// `crm_sync.job_outputs`), so that a later attempt finding the job done can complete with it.
pub async fn record_job_output(
    pool: &Db,
    job_id: &str,
    step_id: i64,
    output: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO crm_sync.job_outputs (job_id, step_id, output) VALUES ($1, $2, $3)
         ON CONFLICT (job_id) DO UPDATE SET output = EXCLUDED.output",
    )
    .bind(job_id)
    .bind(step_id)
    .bind(output)
    .execute(pool)
    .await?;
    Ok(())
}

/// The output recorded for external job `job_id`, if any.
pub async fn job_output(pool: &Db, job_id: &str) -> Result<Option<Value>, sqlx::Error> {
    sqlx::query_scalar("SELECT output FROM crm_sync.job_outputs WHERE job_id = $1")
        .bind(job_id)
        .fetch_optional(pool)
        .await
}

/// Records a failed attempt; see [`FailOutcome`].
pub async fn fail(
    pool: &Db,
    worker: &str,
    lease: Lease,
    error: &str,
    retryable: bool,
    retry_at: DateTime<Utc>,
) -> Result<FailOutcome, QueueError> {
    let outcome: String = retry_on_conflict(|| async {
        sqlx::query_scalar("SELECT crm_sync.fail_step($1, $2, $3, $4, $5, $6)")
            .bind(worker)
            .bind(lease.step_id)
            .bind(lease.fence)
            .bind(error)
            .bind(retryable)
            .bind(retry_at)
            .fetch_one(pool)
            .await
    })
    .await?;
    Ok(match outcome.as_str() {
        "retry" => FailOutcome::Retry,
        "failed" => FailOutcome::Failed,
        _ => FailOutcome::Discarded,
    })
}

/// Renews leases; returns the step ids still held by this worker.
pub async fn heartbeat(
    pool: &Db,
    worker: &str,
    leases: &[Lease],
    lease: Duration,
) -> Result<HashSet<i64>, QueueError> {
    let (ids, fences) = split(leases);
    let held: Vec<i64> = sqlx::query_scalar("SELECT * FROM crm_sync.heartbeat($1, $2, $3, $4)")
        .bind(worker)
        .bind(&ids)
        .bind(&fences)
        .bind(millis(lease))
        .fetch_all(pool)
        .await?;
    Ok(held.into_iter().collect())
}

/// Gives steps back to the queue without spending an attempt.
pub async fn release(pool: &Db, worker: &str, leases: &[Lease]) -> Result<u64, QueueError> {
    let (ids, fences) = split(leases);
    let n: i32 = sqlx::query_scalar("SELECT crm_sync.release_steps($1, $2, $3)")
        .bind(worker)
        .bind(&ids)
        .bind(&fences)
        .fetch_one(pool)
        .await?;
    Ok(n.max(0) as u64)
}

/// Re-queues (or fails) steps whose lease expired; returns how many.
pub async fn reap_expired(pool: &Db) -> Result<u64, QueueError> {
    let n: i32 = retry_on_conflict(|| async {
        sqlx::query_scalar("SELECT crm_sync.reap_expired_leases()")
            .fetch_one(pool)
            .await
    })
    .await?;
    Ok(n.max(0) as u64)
}

/// Cancels a queued or running run.
pub async fn cancel(pool: &Db, run_id: Uuid) -> Result<(), QueueError> {
    retry_on_conflict(|| async {
        sqlx::query_scalar::<_, String>("SELECT crm_sync.cancel_run($1)")
            .bind(run_id)
            .fetch_one(pool)
            .await
    })
    .await?;
    Ok(())
}

/// Resumes a failed or cancelled run as a new run of the same batch; returns the new run's id.
pub async fn retry(pool: &Db, run_id: Uuid) -> Result<Uuid, QueueError> {
    retry_on_conflict(|| async {
        sqlx::query_scalar("SELECT crm_sync.retry_run($1)")
            .bind(run_id)
            .fetch_one(pool)
            .await
    })
    .await
}

/// Runs a run's pipeline again as a fresh batch with the same parameters; returns the new run's id.
pub async fn rerun(pool: &Db, run_id: Uuid, trigger: Trigger) -> Result<Uuid, QueueError> {
    retry_on_conflict(|| async {
        sqlx::query_scalar("SELECT crm_sync.rerun_run($1, $2)")
            .bind(run_id)
            .bind(trigger.as_str())
            .fetch_one(pool)
            .await
    })
    .await
}

/// PostgreSQL text cannot hold NUL, and its error for one ("invalid byte sequence") names neither the
/// argument nor the cause: refuse it here with a message that does.
fn check_no_nul(what: &str, value: &str) -> Result<(), QueueError> {
    if value.contains('\0') {
        return Err(QueueError::Invalid(format!(
            "the {what} contains a NUL character"
        )));
    }
    Ok(())
}

/// Where in `value` a NUL character is (in a key or a string), as a path like `params.a[2]`; jsonb
/// cannot store one.
fn nul_in_json(value: &Value, at: &str) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(at.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_in_json(v, &format!("{at}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(format!("a key of {at}"))
            } else {
                nul_in_json(
                    v,
                    &format!("{at}.{}", k.chars().take(40).collect::<String>()),
                )
            }
        }),
        _ => None,
    }
}

fn split(leases: &[Lease]) -> (Vec<i64>, Vec<i64>) {
    leases.iter().map(|l| (l.step_id, l.fence)).unzip()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Runs a statement again when PostgreSQL aborted it for a deadlock or a serialization failure: both
/// are safe to repeat because each queue function is one transaction.
async fn retry_on_conflict<T, F, Fut>(mut op: F) -> Result<T, QueueError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut tries = 0;
    loop {
        match op().await {
            Err(e) if tries < 5 && is_transient_conflict(&e) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(5 * tries)).await;
            }
            other => return other.map_err(QueueError::from),
        }
    }
}

fn is_transient_conflict(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40P01" || c == "40001")
}
