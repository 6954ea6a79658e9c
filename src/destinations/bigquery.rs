//! The `bigquery` destination: one load job from the staged NDJSON in Cloud Storage with
//! WRITE_TRUNCATE and an explicit schema, polled to completion. BigQuery applies a load job
//! atomically, so the table holds the previous batch or the new one; streaming inserts are never used
//! (streamed rows cannot be truncated for up to 90 minutes).

use serde_json::{Value, json};

use crate::gcp::bigquery::{BigQueryError, BigQueryLoader, ColumnSpec, ColumnType as BqType};
use crate::gcp::{CredentialsConfig, ErrorClass};
use crate::pipeline::{StepContext, StepError};
use crate::schema::ColumnType;

/// Where the table is and how to reach it.
pub struct Target<'a> {
    pub project: &'a str,
    pub dataset: &'a str,
    pub table: &'a str,
    pub endpoint: Option<&'a str>,
    pub credentials: &'a CredentialsConfig,
}

/// The explicit schema: the transform's columns (nullable) and the two batch columns (required).
pub fn schema(data: &[(&str, ColumnType)], batch: &str, timestamp: &str) -> Vec<ColumnSpec> {
    let mut schema: Vec<ColumnSpec> = data
        .iter()
        .map(|(n, t)| ColumnSpec::nullable(*n, bq_type(*t)))
        .collect();
    schema.push(ColumnSpec::required(batch, BqType::String));
    schema.push(ColumnSpec::required(timestamp, BqType::Timestamp));
    schema
}

fn bq_type(t: ColumnType) -> BqType {
    match t {
        ColumnType::String => BqType::String,
        ColumnType::Integer => BqType::Int64,
        ColumnType::Float => BqType::Float64,
        ColumnType::Boolean => BqType::Bool,
        ColumnType::Date => BqType::Date,
        ColumnType::Timestamp => BqType::Timestamp,
        ColumnType::Numeric => BqType::Numeric,
    }
}

/// Loads `gs_uri` into the table, replacing its content; checks the row count.
pub async fn load(
    target: &Target<'_>,
    schema: &[ColumnSpec],
    gs_uri: &str,
    expected_rows: u64,
    ctx: &StepContext,
) -> Result<Value, StepError> {
    let loader = BigQueryLoader::new(
        target.endpoint.map(str::to_string),
        target.credentials.into(),
    )
    .await
    .map_err(bq_error)?;
    loader
        .ensure_dataset(target.project, target.dataset)
        .await
        .map_err(bq_error)?;
    // One job id per claim: a retry of the same call attaches to the job it may already have created.
    let job_id = format!(
        "crm_sync_{}_{}_{}",
        ctx.batch_id
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_"),
        ctx.step_id,
        ctx.fence
    );
    let outcome = loader
        .load_truncate_with_job_id(
            target.project,
            target.dataset,
            target.table,
            gs_uri,
            schema,
            &job_id,
        )
        .await
        .map_err(bq_error)?;
    if outcome.output_rows != expected_rows {
        return Err(StepError::terminal(format!(
            "BigQuery loaded {} rows but the batch has {expected_rows}",
            outcome.output_rows
        )));
    }
    Ok(json!({
        "table": format!("{}.{}.{}", target.project, target.dataset, target.table),
        "rows": expected_rows,
        "job_id": outcome.job_id,
        "source": gs_uri,
        "batch_id": ctx.batch_id,
    }))
}

fn bq_error(e: BigQueryError) -> StepError {
    let message = format!("BigQuery load failed: {e}");
    match e.class() {
        ErrorClass::Retryable => StepError::retryable(message),
        ErrorClass::Terminal => StepError::terminal(message),
    }
}
