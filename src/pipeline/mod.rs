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
use crate::{backup, sources};

/// The names of a pipeline's steps, in the order they run.
pub fn step_names(pipeline: &PipelineConfig) -> Vec<String> {
    match &pipeline.source {
        SourceConfig::Noop(noop) => sources::noop::step_names(noop.steps),
        // Transform, validate and load follow as they are built (issue 4).
        SourceConfig::HttpJson(_) | SourceConfig::Ezfocus(_) => vec![EXTRACT.to_string()],
    }
}

/// The step that fetches from the source and writes the raw backup.
pub const EXTRACT: &str = "extract";

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
        match (&pipeline.source, ctx.step_name.as_str()) {
            (SourceConfig::Noop(noop), _) => sources::noop::run_step(noop, ctx).await,
            (SourceConfig::HttpJson(http), EXTRACT) => extract_http(pipeline, http, ctx).await,
            (SourceConfig::Ezfocus(ez), EXTRACT) => {
                extract_http(pipeline, &ez.to_http(), ctx).await
            }
            (_, other) => Err(StepError::terminal(format!(
                "pipeline \"{}\" has no step \"{other}\" in this worker's config",
                pipeline.name
            ))),
        }
    }
}

async fn extract_http(
    pipeline: &PipelineConfig,
    http: &sources::http::HttpJsonConfig,
    ctx: &StepContext,
) -> Result<Value, StepError> {
    let tz: chrono_tz::Tz = pipeline.timezone.parse().unwrap_or(chrono_tz::UTC);
    let object = backup::object_name(
        pipeline.backup.path_template(),
        &pipeline.name,
        &ctx.batch_id,
        chrono::Utc::now(),
        tz,
        "json",
    );
    sources::http::extract(http, &pipeline.backup.store(), &object).await
}
