//! The durable step queue, kept in PostgreSQL.
//!
//! The logic lives in SQL functions (see `migrations/`), so that the CLI, the HTTP API, the workers and
//! plain SQL callers (pg_cron, psql) all go through the same code path. This module is the typed Rust
//! face of those functions. Each state change is one statement, and the batched ones
//! ([`claim`], [`complete`]) handle many steps per round trip.

mod store;

pub use store::*;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The PostgreSQL channel that says "a step became due": workers LISTEN on it.
pub const STEPS_CHANNEL: &str = "crm_sync_steps";
/// The channel that carries the id of a cancelled run, so its worker stops at once.
pub const CANCEL_CHANNEL: &str = "crm_sync_cancel";

/// Who asked for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    Api,
    Cli,
    Sql,
    Console,
    Retry,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Api => "api",
            Trigger::Cli => "cli",
            Trigger::Sql => "sql",
            Trigger::Console => "console",
            Trigger::Retry => "retry",
        }
    }
}

/// A step a worker has claimed: it holds the lease until it completes, fails or loses it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedStep {
    pub step_id: i64,
    pub run_id: Uuid,
    pub pipeline: String,
    pub step_name: String,
    pub step_position: i32,
    pub attempt: i32,
    /// The fencing token: completing requires it, and any later claim changes it.
    pub fence: i64,
    pub max_attempts: i32,
    pub timeout_ms: i64,
    pub batch_id: String,
    pub params: Value,
    pub inputs: Value,
    /// Who asked for the run (for `crm_sync_runs_total`).
    pub trigger: String,
}

impl ClaimedStep {
    /// The lease this claim holds.
    pub fn lease(&self) -> Lease {
        Lease {
            step_id: self.step_id,
            fence: self.fence,
        }
    }
}

/// The pipelines a worker claims steps of, with the fingerprints of their definitions (recorded on
/// every attempt): parallel lists, as `crm_sync.claim_steps` takes them.
#[derive(Debug, Clone, Default)]
pub struct Served {
    pub pipelines: Vec<String>,
    pub fingerprints: Vec<String>,
}

/// Identifies one claim of one step: the step and its fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub step_id: i64,
    pub fence: i64,
}

/// What became of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Re-queued for a later attempt.
    Retry,
    /// The step and its run failed.
    Failed,
    /// The lease had been lost; nothing was recorded by this worker.
    Discarded,
}

/// Errors of queue operations, classified for callers (the CLI's exit codes, the API's status codes).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The pipeline or run does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (run already finished, key reused, ...).
    #[error("{0}")]
    Conflict(String),
    /// The arguments are malformed (null, wrong JSON type).
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for QueueError {
    fn from(e: sqlx::Error) -> Self {
        let Some(db) = e.as_database_error() else {
            return QueueError::Database(e);
        };
        let mut message = db.message().to_string();
        if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            && let Some(hint) = pg.hint()
        {
            message = format!("{message} ({hint})");
        }
        match db.code().as_deref() {
            Some("P0002") => QueueError::NotFound(message),
            Some("55000") | Some("23505") => QueueError::Conflict(message),
            Some("22004") | Some("22023") | Some("22P02") | Some("22021") | Some("22P05")
            | Some("22003") => QueueError::Invalid(message),
            _ => QueueError::Database(e),
        }
    }
}
