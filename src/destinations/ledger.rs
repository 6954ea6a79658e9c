//! The load ledger: exactly-once loads into a PostgreSQL warehouse, including one apart from
//! crm-sync's own database (a destination `url`), where the load and the step's completion cannot
//! share a transaction.
//!
//! Two small tables in the destination database, created on first use (schema `crm_sync_ledger`):
//! - `fences`: per destination table, the fencing token of the attempt that owns it. Tokens come
//!   from one sequence in crm-sync's database and only grow, so they compare across steps and runs.
//!   An attempt claims the table before loading (its own short transaction), and its load commits
//!   only if it still owns the table at the end (checked under the row lock, in the load's
//!   transaction): a worker that lost its lease and was taken over can never commit after the newer
//!   attempt's claim. A newer attempt waits for a live older one (another run's load) and takes the
//!   table from a stale one, ending that one's transaction at once (its backend is found by the
//!   `application_name` its load transaction carries), so a stopped worker cannot hold the table.
//! - `loads`: one row per (table, batch), written in the load's own transaction with the load's
//!   output. A retry that finds its batch there completes without loading again (a kill -9 between
//!   the warehouse commit and the completion loses nothing and doubles nothing), with the counts the
//!   load recorded.
//!
//! Every statement runs inside an explicit transaction on a connection without named statements,
//! so the ledger works through a transaction-mode pooler too.

use std::time::Duration;

use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tracing::{info, warn};

use crate::pipeline::{StepContext, StepError};
use crate::queue::{self, Lease};

/// How long a load waits between looks at a table another live attempt is loading.
const WAIT_FOR_HOLDER: Duration = Duration::from_millis(500);

const CREATE: [&str; 3] = [
    "CREATE SCHEMA IF NOT EXISTS crm_sync_ledger",
    "CREATE TABLE IF NOT EXISTS crm_sync_ledger.fences (
         target      text PRIMARY KEY,
         fence       bigint NOT NULL,
         step_id     bigint NOT NULL,
         updated_at  timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS crm_sync_ledger.loads (
         target       text NOT NULL,
         batch_id     text NOT NULL,
         pipeline     text NOT NULL,
         step_id      bigint NOT NULL,
         fence        bigint NOT NULL,
         output       jsonb NOT NULL,
         committed_at timestamptz NOT NULL DEFAULT now(),
         PRIMARY KEY (target, batch_id))",
];

/// The `application_name` of the transaction that loads under `fence`.
pub fn loader_name(fence: i64) -> String {
    format!("crm-sync load f{fence}")
}

/// Creates the ledger tables if missing (serialised by a transaction-scoped lock, so that two first
/// loads at once do not race on the catalog).
pub async fn ensure(conn: &mut PgConnection) -> Result<(), StepError> {
    let mut tx = conn.begin().await.map_err(ledger_error)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('crm_sync_ledger'))")
        .persistent(false)
        .execute(&mut *tx)
        .await
        .map_err(ledger_error)?;
    for sql in CREATE {
        sqlx::query(sql)
            .persistent(false)
            .execute(&mut *tx)
            .await
            .map_err(ledger_error)?;
    }
    tx.commit().await.map_err(ledger_error)
}

/// The output recorded when `batch_id` was committed into `target`, if it was.
pub async fn committed(
    conn: &mut PgConnection,
    target: &str,
    batch_id: &str,
) -> Result<Option<Value>, StepError> {
    let mut tx = conn.begin().await.map_err(ledger_error)?;
    let output: Option<Value> = sqlx::query_scalar(
        "SELECT output FROM crm_sync_ledger.loads WHERE target = $1 AND batch_id = $2",
    )
    .persistent(false)
    .bind(target)
    .bind(batch_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(ledger_error)?;
    tx.commit().await.map_err(ledger_error)?;
    Ok(output)
}

/// Makes this attempt the owner of `target`: waits while a live older attempt of another step loads
/// it, takes it from a stale one (ending that one's transaction), and fails when a newer attempt
/// already owns it (this attempt's lease was lost).
pub async fn claim(
    conn: &mut PgConnection,
    target: &str,
    ctx: &StepContext,
) -> Result<(), StepError> {
    loop {
        let mut tx = conn.begin().await.map_err(ledger_error)?;
        sqlx::query(
            "INSERT INTO crm_sync_ledger.fences (target, fence, step_id) VALUES ($1, 0, 0)
             ON CONFLICT (target) DO NOTHING",
        )
        .persistent(false)
        .bind(target)
        .execute(&mut *tx)
        .await
        .map_err(ledger_error)?;
        let (owner, owner_step): (i64, i64) = sqlx::query_as(
            "SELECT fence, step_id FROM crm_sync_ledger.fences WHERE target = $1 FOR UPDATE",
        )
        .persistent(false)
        .bind(target)
        .fetch_one(&mut *tx)
        .await
        .map_err(ledger_error)?;
        if owner > ctx.fence {
            return Err(StepError::retryable(format!(
                "lease lost: a newer attempt (fence {owner}) owns {target}; nothing was written"
            )));
        }
        if owner < ctx.fence && owner_step != ctx.step_id && owner > 0 {
            let holder = Lease {
                step_id: owner_step,
                fence: owner,
            };
            if queue::lease_held(&ctx.pool, holder)
                .await
                .map_err(StepError::from_db)?
            {
                // Another run's load of this table is in progress: loads of one table take turns.
                tx.rollback().await.map_err(ledger_error)?;
                tokio::time::sleep(WAIT_FOR_HOLDER).await;
                continue;
            }
        }
        sqlx::query(
            "UPDATE crm_sync_ledger.fences SET fence = $2, step_id = $3, updated_at = now() WHERE target = $1",
        ).persistent(false)
        .bind(target)
        .bind(ctx.fence)
        .bind(ctx.step_id)
        .execute(&mut *tx)
        .await
        .map_err(ledger_error)?;
        tx.commit().await.map_err(ledger_error)?;
        if owner > 0 && owner < ctx.fence {
            end_stale_loader(conn, owner).await;
        }
        return Ok(());
    }
}

/// Ends the transaction of a stale attempt still loading under `fence` (a stopped or cut-off
/// worker): it could never commit, and its row locks would hold this load up.
async fn end_stale_loader(conn: &mut PgConnection, fence: i64) {
    let ended: Result<Vec<i32>, sqlx::Error> = async {
        let mut tx = conn.begin().await?;
        // OFFSET 0 keeps the filter below the call: only the stale loader is ended.
        let pids = sqlx::query_scalar(
            "SELECT pid FROM (SELECT pid FROM pg_stat_activity
                               WHERE application_name = $1 AND datname = current_database()
                                 AND pid <> pg_backend_pid() OFFSET 0) stale
              WHERE pg_terminate_backend(pid)",
        )
        .persistent(false)
        .bind(loader_name(fence))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(pids)
    }
    .await;
    match ended {
        Ok(pids) if pids.is_empty() => {}
        Ok(pids) => {
            info!(
                fence,
                ?pids,
                "ended the transaction of a stale load of the same table"
            )
        }
        Err(e) => {
            warn!(error = %e, fence, "cannot end a stale load's transaction; waiting for it instead")
        }
    }
}

/// Names the load's transaction (see [`end_stale_loader`]).
pub async fn mark_loader(tx: &mut PgConnection, fence: i64) -> Result<(), StepError> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET LOCAL application_name = '{}'",
        loader_name(fence)
    )))
    .persistent(false)
    .execute(tx)
    .await
    .map_err(ledger_error)?;
    Ok(())
}

/// Inside the load's transaction, just before it commits: checks that this attempt still owns the
/// table (under the row lock, so no newer claim can slip in before the commit) and records the batch.
pub async fn seal(
    tx: &mut PgConnection,
    target: &str,
    ctx: &StepContext,
    output: &Value,
) -> Result<(), StepError> {
    let owner: i64 =
        sqlx::query_scalar("SELECT fence FROM crm_sync_ledger.fences WHERE target = $1 FOR UPDATE")
            .persistent(false)
            .bind(target)
            .fetch_one(&mut *tx)
            .await
            .map_err(ledger_error)?;
    if owner != ctx.fence {
        return Err(StepError::retryable(format!(
            "lease lost during the load: a newer attempt (fence {owner}) owns {target}; rolled back"
        )));
    }
    sqlx::query(
        "INSERT INTO crm_sync_ledger.loads (target, batch_id, pipeline, step_id, fence, output)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .persistent(false)
    .bind(target)
    .bind(&ctx.batch_id)
    .bind(&ctx.pipeline)
    .bind(ctx.step_id)
    .bind(ctx.fence)
    .bind(output)
    .execute(&mut *tx)
    .await
    .map_err(ledger_error)?;
    Ok(())
}

fn ledger_error(e: sqlx::Error) -> StepError {
    StepError::retryable(format!("the load ledger in the destination database: {e}"))
}
