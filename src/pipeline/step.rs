//! The contract between the worker and a step: what a step gets (its context) and how it fails.

use std::time::Duration;

use crate::db::Db;
use serde_json::Value;
use uuid::Uuid;

/// Everything a running step may know: who it is, its run's parameters, and the checkpoints of the
/// steps before it.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub pool: Db,
    /// The worker running the step (completions inside a load's transaction name it).
    pub worker_id: String,
    pub step_id: i64,
    pub run_id: Uuid,
    pub batch_id: String,
    pub pipeline: String,
    pub step_name: String,
    /// 1-based attempt of this step within this run.
    pub attempt: i32,
    /// The fencing token of this claim; writes that must be exclusive check it.
    pub fence: i64,
    pub params: Value,
    /// Outputs of the run's earlier succeeded steps, by step name.
    pub inputs: Value,
}

impl StepContext {
    /// This step's attempt number counted over the whole batch (a retry run continues the count):
    /// the attempts that ended before this one, plus this one.
    pub async fn batch_attempt(&self) -> Result<u64, sqlx::Error> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM crm_sync.attempts a
               JOIN crm_sync.steps s ON s.id = a.step_id
               JOIN crm_sync.runs r ON r.id = s.run_id
              WHERE r.batch_id = $1 AND s.name = $2 AND a.outcome <> 'released'",
        )
        .bind(&self.batch_id)
        .bind(&self.step_name)
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64 + 1)
    }
}

/// A step's success: its checkpoint, and whether the step already recorded its own completion (a load
/// into crm-sync's database commits the completion in its own transaction).
#[derive(Debug, Clone)]
pub enum StepDone {
    /// The worker records the completion.
    Output(Value),
    /// Already completed, in the same transaction as the step's writes.
    Committed(Value),
}

impl StepDone {
    pub fn output(&self) -> &Value {
        match self {
            StepDone::Output(v) | StepDone::Committed(v) => v,
        }
    }
}

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Network trouble, timeouts, 5xx, 429: try again after a backoff.
    Retryable,
    /// Bad credentials, validation failure, unparseable payload: fail the run at once.
    Terminal,
}

/// A step's failure: its class, a message fit for operators (never a secret), and an optional
/// server-requested delay (429 Retry-After).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    pub class: ErrorClass,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl StepError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Retryable,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn terminal(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Terminal,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Asks for at least this delay before the next attempt.
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// Database trouble inside a step is worth retrying.
    pub fn from_db(e: sqlx::Error) -> Self {
        Self::retryable(format!("database error: {e}"))
    }

    pub fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Retryable
    }
}
