//! What a pipeline's steps are and how each one runs.
//!
//! A pipeline is source -> backup -> transform -> validate -> load. `extract` fetches from the source
//! straight into the raw backup; `transform` casts the raw records into a staging object; `validate`
//! gates the batch; `load` replaces the destination atomically. Each step is a durable job whose output
//! (a checkpoint) the next step reads, so a retry resumes where the run failed. The `noop` source has
//! only no-op steps.

mod step;
mod steps;

pub use step::{ErrorClass, StepContext, StepDone, StepError};

use std::sync::Arc;

use crate::config::{Config, PipelineConfig, SourceConfig};
use crate::queue::Served;
use crate::sources;

/// Fetches from the source into the raw backup.
pub const EXTRACT: &str = "extract";
/// Casts the raw records into the staging object.
pub const TRANSFORM: &str = "transform";
/// Gates the batch before anything is replaced.
pub const VALIDATE: &str = "validate";
/// Replaces the destination with the batch.
pub const LOAD: &str = "load";

/// The names of a pipeline's steps, in the order they run.
pub fn step_names(pipeline: &PipelineConfig) -> Vec<String> {
    if let SourceConfig::Noop(noop) = &pipeline.source {
        return sources::noop::step_names(noop.steps);
    }
    let mut steps = vec![EXTRACT];
    if pipeline.transform.is_some() {
        steps.push(TRANSFORM);
    }
    // A merge always passes the gate: its keys must be present and unique.
    let merges = pipeline
        .destination
        .as_ref()
        .is_some_and(|d| d.merge().is_some());
    if pipeline.validate.is_some() || merges {
        steps.push(VALIDATE);
    }
    if pipeline.destination.is_some() {
        steps.push(LOAD);
    }
    steps.into_iter().map(String::from).collect()
}

/// Runs claimed steps against the pipelines of the config this process loaded.
#[derive(Clone)]
pub struct Executor {
    config: Arc<Config>,
    served: Arc<Served>,
}

impl Executor {
    pub fn new(config: Arc<Config>) -> Self {
        let served = Served {
            pipelines: config.pipelines.iter().map(|p| p.name.clone()).collect(),
            fingerprints: config
                .pipelines
                .iter()
                .map(|p| p.fingerprint.clone())
                .collect(),
        };
        Self {
            config,
            served: Arc::new(served),
        }
    }

    /// The config this executor runs steps with.
    pub fn config(&self) -> Arc<Config> {
        self.config.clone()
    }

    /// What this executor can run: a worker claims nothing else.
    pub fn served(&self) -> &Served {
        &self.served
    }

    /// The pipeline config for a step, as this process knows it.
    pub fn pipeline(&self, name: &str) -> Option<&PipelineConfig> {
        self.config.pipeline(name)
    }

    /// Runs one step to its checkpoint (the JSON stored as the step's output).
    pub async fn run_step(&self, ctx: &StepContext) -> Result<StepDone, StepError> {
        let Some(pipeline) = self.config.pipeline(&ctx.pipeline) else {
            return Err(StepError::terminal(format!(
                "pipeline \"{}\" is not in this worker's config",
                ctx.pipeline
            )));
        };
        if let SourceConfig::Noop(noop) = &pipeline.source {
            return sources::noop::run_step(noop, ctx)
                .await
                .map(StepDone::Output);
        }
        match ctx.step_name.as_str() {
            EXTRACT => steps::extract(pipeline, ctx).await.map(StepDone::Output),
            TRANSFORM => steps::transform(pipeline, ctx).await.map(StepDone::Output),
            VALIDATE => steps::validate(pipeline, ctx).await.map(StepDone::Output),
            LOAD => steps::load(pipeline, ctx).await,
            other => Err(StepError::terminal(format!(
                "pipeline \"{}\" has no step \"{other}\" in this worker's config",
                pipeline.name
            ))),
        }
    }
}
