//! What a pipeline's steps are and how each one runs.
//!
//! A pipeline is source -> backup -> transform -> validate -> load; each step is a durable job in the
//! queue whose output (a checkpoint) the next step reads. The `noop` source has only no-op steps.

pub mod registry;
mod step;

pub use step::{ErrorClass, StepContext, StepError};

use std::sync::Arc;

use serde_json::Value;

use crate::config::{Config, PipelineConfig, SourceConfig};
use crate::sources;

/// The names of a pipeline's steps, in the order they run.
pub fn step_names(pipeline: &PipelineConfig) -> Vec<String> {
    match &pipeline.source {
        SourceConfig::Noop(noop) => sources::noop::step_names(noop.steps),
    }
}

/// Runs claimed steps against the pipelines of the config this process loaded.
#[derive(Clone)]
pub struct Executor {
    config: Arc<Config>,
}

impl Executor {
    pub fn new(config: Arc<Config>) -> Self {
        Self { config }
    }

    /// The pipeline config for a step, as this process knows it.
    pub fn pipeline(&self, name: &str) -> Option<&PipelineConfig> {
        self.config.pipeline(name)
    }

    /// Runs one step to its checkpoint (the JSON stored as the step's output).
    pub async fn run_step(&self, ctx: &StepContext) -> Result<Value, StepError> {
        let Some(pipeline) = self.config.pipeline(&ctx.pipeline) else {
            return Err(StepError::terminal(format!(
                "pipeline \"{}\" is not in this worker's config",
                ctx.pipeline
            )));
        };
        match &pipeline.source {
            SourceConfig::Noop(noop) => sources::noop::run_step(noop, ctx).await,
        }
    }
}
