//! The `noop` source: steps that only wait (and fail on purpose when asked). It exercises the whole
//! queue (claims, leases, retries, history) without touching any system, which makes it the smoke test
//! and the benchmark pipeline.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::pipeline::{StepContext, StepError};

/// `source = { kind = "noop", sleep_ms = 0, fail_times = 0, steps = 1 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoopConfig {
    /// How long each step sleeps.
    #[serde(default)]
    pub sleep_ms: u64,
    /// The first `fail_times` attempts of each failing step (counted over the whole batch, so a retry of
    /// the run continues the count) fail.
    #[serde(default)]
    pub fail_times: u32,
    /// Whether those failures are retryable (the default) or terminal.
    #[serde(default)]
    pub fail_kind: FailKind,
    /// Only the step with this name fails (default: every step).
    #[serde(default)]
    pub fail_step: Option<String>,
    /// Number of no-op steps in each run.
    #[serde(default = "one")]
    pub steps: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailKind {
    #[default]
    Retryable,
    Terminal,
}

impl NoopConfig {
    /// Checks values serde cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.steps == 0 || self.steps > 50 {
            return Err("noop steps must be between 1 and 50".into());
        }
        if self.sleep_ms > 24 * 3600 * 1000 {
            return Err("noop sleep_ms must be at most one day".into());
        }
        if let Some(step) = &self.fail_step
            && !step_names(self.steps).contains(step)
        {
            return Err(format!(
                "noop fail_step \"{step}\" is not one of the steps {:?}",
                step_names(self.steps)
            ));
        }
        Ok(())
    }
}

/// `noop` for one step, `noop_1` .. `noop_N` for several.
pub fn step_names(steps: u32) -> Vec<String> {
    if steps <= 1 {
        vec!["noop".to_string()]
    } else {
        (1..=steps).map(|i| format!("noop_{i}")).collect()
    }
}

/// Runs one no-op step. Run params `sleep_ms` and `fail_times` override the config for that run
/// (handy for smoke tests from SQL: `SELECT crm_sync.enqueue_run('noop', '{"sleep_ms": 5000}')`).
pub async fn run_step(config: &NoopConfig, ctx: &StepContext) -> Result<Value, StepError> {
    let sleep_ms = param_u64(&ctx.params, "sleep_ms")?.unwrap_or(config.sleep_ms);
    let fail_times = param_u64(&ctx.params, "fail_times")?.unwrap_or(u64::from(config.fail_times));
    if sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
    }
    let failing_step = config
        .fail_step
        .as_deref()
        .is_none_or(|s| s == ctx.step_name);
    if fail_times > 0 && failing_step {
        let attempt = ctx.batch_attempt().await.map_err(StepError::from_db)?;
        if attempt <= fail_times {
            let message = format!("noop: planned failure {attempt} of {fail_times}");
            return Err(match config.fail_kind {
                FailKind::Retryable => StepError::retryable(message),
                FailKind::Terminal => StepError::terminal(message),
            });
        }
    }
    Ok(json!({ "slept_ms": sleep_ms }))
}

fn param_u64(params: &Value, key: &str) -> Result<Option<u64>, StepError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            StepError::terminal(format!(
                "run parameter {key} must be a non-negative integer, got {v}"
            ))
        }),
    }
}
