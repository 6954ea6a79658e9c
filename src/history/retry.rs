//! What a retry of a finished run would do, for the console's Retry button and API clients: the
//! run that already retried it (a second retry is refused), and why it failed (a validation failure
//! retried re-checks the same staged batch and fails the same way).
//!
//! Kept apart from the run queries above it in `history.rs` (which others extend).

use serde::Serialize;
use uuid::Uuid;

use super::{RunSummary, StepRecord};
use crate::db::Db;
use crate::pipeline::VALIDATE;

/// Whether the error that failed a run's step was worth another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Network trouble, timeouts, a lost worker: failed only because its attempts ran out.
    Retryable,
    /// Bad credentials, a validation failure, an unparseable payload: failed at once.
    Terminal,
}

/// The step that failed a run, and how.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunFailure {
    /// The failed step's name.
    pub step: String,
    pub class: ErrorClass,
    /// A retry would repeat the failure: the step checks the batch the run already staged (a
    /// validation failure), and a retry resumes in the same batch. A rerun fetches a new batch.
    pub retry_repeats_failure: bool,
}

/// The step that failed `run` and its error class (from the run error the queue writes,
/// `step NAME failed (attempt N of M, not retryable): ...`); `None` unless the run failed in a step.
pub fn failure(run: &RunSummary, steps: &[StepRecord]) -> Option<RunFailure> {
    if run.status != "failed" {
        return None;
    }
    let step = steps.iter().find(|s| s.status == "failed")?;
    let error = run.error.as_deref().unwrap_or_default();
    let head = error.split_once("): ").map_or(error, |(head, _)| head);
    let class = if head.starts_with(&format!("step {} failed (", step.name))
        && head.ends_with(", not retryable")
    {
        ErrorClass::Terminal
    } else {
        ErrorClass::Retryable
    };
    Some(RunFailure {
        step: step.name.clone(),
        class,
        retry_repeats_failure: step.name == VALIDATE && class == ErrorClass::Terminal,
    })
}

/// The run that retried `run` (at most one: a second retry is refused). Only a failed or cancelled
/// run can have one, so others cost no query.
pub async fn retried_by(pool: &Db, run: &RunSummary) -> Result<Option<Uuid>, sqlx::Error> {
    if !matches!(run.status.as_str(), "failed" | "cancelled") {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT id FROM crm_sync.runs WHERE retry_of = $1")
        .bind(run.id)
        .fetch_optional(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(status: &str, error: &str) -> RunSummary {
        RunSummary {
            id: Uuid::nil(),
            pipeline: "p".into(),
            batch_id: "b".into(),
            trigger: "api".into(),
            status: status.into(),
            params: serde_json::json!({}),
            retry_of: None,
            rerun_of: None,
            scheduled_for: None,
            created_at: chrono::Utc::now(),
            started_at: None,
            finished_at: None,
            error: Some(error.into()),
            rows_loaded: None,
        }
    }

    fn step(name: &str, status: &str) -> StepRecord {
        StepRecord {
            id: 1,
            name: name.into(),
            position: 1,
            status: status.into(),
            attempts: 1,
            max_attempts: 3,
            started_at: None,
            finished_at: None,
            output: None,
            error: None,
            reused_from_run: None,
            fingerprint: None,
            lease_owner: None,
            attempt_started_at: None,
            attempt_log: Vec::new(),
        }
    }

    #[test]
    fn a_terminal_validation_failure_repeats_on_retry_others_do_not() {
        let steps = [step("transform", "succeeded"), step("validate", "failed")];
        let terminal = "step validate failed (attempt 1 of 3, not retryable): validation failed; \
                        the destination was left as it was: 5 rows, fewer than min_rows = 2600";
        let f = failure(&run("failed", terminal), &steps).unwrap();
        assert_eq!(
            (f.step.as_str(), f.class),
            ("validate", ErrorClass::Terminal)
        );
        assert!(f.retry_repeats_failure);

        let exhausted = "step validate failed (attempt 3 of 3, no attempts left): cannot read the \
                         staging object: not retryable): x";
        let f = failure(&run("failed", exhausted), &steps).unwrap();
        assert_eq!(f.class, ErrorClass::Retryable);
        assert!(!f.retry_repeats_failure);

        let steps = [step("extract", "failed")];
        let f = failure(
            &run(
                "failed",
                "step extract failed (attempt 1 of 3, not retryable): 401",
            ),
            &steps,
        )
        .unwrap();
        assert_eq!(
            (f.step.as_str(), f.class),
            ("extract", ErrorClass::Terminal)
        );
        assert!(
            !f.retry_repeats_failure,
            "new credentials can make a retry pass"
        );
        assert!(failure(&run("cancelled", "cancelled"), &steps).is_none());
    }
}
