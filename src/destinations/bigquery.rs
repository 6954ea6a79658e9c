//! The `bigquery` destination: one load job from the staged NDJSON in Cloud Storage with
//! WRITE_TRUNCATE and an explicit schema, polled to completion. BigQuery applies a load job
//! atomically, so the table holds the previous batch or the new one; streaming inserts are never used
//! (streamed rows cannot be truncated for up to 90 minutes).

use serde_json::{Value, json};

use super::{DeleteMode, MergeSettings};
use crate::gcp::bigquery::{BigQueryError, BigQueryLoader, ColumnSpec, ColumnType as BqType};
use crate::gcp::{CredentialsConfig, ErrorClass};
use crate::pipeline::{StepContext, StepError};
use crate::queue::{self, Lease};
use crate::schema::ColumnType;

/// Where the table is and how to reach it.
pub struct Target<'a> {
    pub project: &'a str,
    pub dataset: &'a str,
    pub table: &'a str,
    pub endpoint: Option<&'a str>,
    /// Where a new dataset goes and jobs run; `None`: BigQuery's default.
    pub location: Option<&'a str>,
    pub credentials: &'a CredentialsConfig,
}

impl Target<'_> {
    /// A client for the target's project, with its dataset created if missing.
    async fn connect(&self) -> Result<BigQueryLoader, StepError> {
        let mut loader =
            BigQueryLoader::new(self.endpoint.map(str::to_string), self.credentials.into())
                .await
                .map_err(bq_error)?;
        if let Some(location) = self.location {
            loader = loader.with_location(location);
        }
        loader
            .ensure_dataset(self.project, self.dataset)
            .await
            .map_err(bq_error)?;
        Ok(loader)
    }
}

/// The bookkeeping columns a merged table gets besides the batch's (as in the PostgreSQL merge).
const MERGE_COLUMNS: [(&str, BqType); 4] = [
    ("first_seen_batch", BqType::String),
    ("row_hash", BqType::String),
    ("deleted_at", BqType::Timestamp),
    ("deleted_in_batch", BqType::String),
];

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
    let loader = target.connect().await?;
    // One job id per claim, made of the batch, the step and the fencing token: a repeat of the same
    // call attaches to the job it may already have created, and a later attempt (a worker that died
    // after starting the job, a retried run) finds an earlier attempt's job and uses its outcome
    // instead of loading again.
    let (current, earlier) = claims(ctx).await?;
    let mut found = None;
    for claim in earlier {
        if let Some(outcome) = loader
            .earlier_load(target.project, &load_job_id(&ctx.batch_id, claim))
            .await
            .map_err(bq_error)?
        {
            tracing::info!(job_id = %outcome.job_id, "an earlier attempt's load job already loaded this batch; using it");
            found = Some(outcome);
            break;
        }
    }
    let outcome = match found {
        Some(outcome) => outcome,
        None => loader
            .load_truncate_with_job_id(
                target.project,
                target.dataset,
                target.table,
                gs_uri,
                schema,
                &load_job_id(&ctx.batch_id, current),
            )
            .await
            .map_err(bq_error)?,
    };
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
        "write": "replace",
    }))
}

/// This attempt's claim, and the claims earlier attempts at this step of the batch held (newest
/// first): the jobs they may have started are named after them.
async fn claims(ctx: &StepContext) -> Result<(Lease, Vec<Lease>), StepError> {
    let current = Lease {
        step_id: ctx.step_id,
        fence: ctx.fence,
    };
    let earlier = queue::earlier_claims(&ctx.pool, &ctx.batch_id, &ctx.step_name, current)
        .await
        .map_err(StepError::from_db)?;
    Ok((current, earlier))
}

/// The id of the load job of one claim of a load step: `crm_sync_<batch>_<step>_<fence>`.
pub fn load_job_id(batch_id: &str, claim: Lease) -> String {
    format!(
        "crm_sync_{}_{}_{}",
        batch_id.replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_"),
        claim.step_id,
        claim.fence
    )
}

fn bq_error(e: BigQueryError) -> StepError {
    let message = format!("BigQuery load failed: {e}");
    match e.class() {
        ErrorClass::Retryable => StepError::retryable(message),
        ErrorClass::Terminal => StepError::terminal(message),
    }
}

/// The column names a merge writes: the transform's, then the batch and timestamp columns.
pub struct MergeColumns<'a> {
    pub data: &'a [&'a str],
    pub batch: &'a str,
    pub timestamp: &'a str,
}

/// Merges the batch at `gs_uri` into the table by key: a load job into a staging table of its own,
/// then one MERGE statement (atomic in BigQuery), then the staging table is dropped. New keys are
/// inserted, changed rows (by `row_hash`) updated, unchanged rows left alone, missing keys
/// soft-deleted or deleted; a share of deletions above `max_delete_share` fails, changing nothing.
pub async fn merge(
    target: &Target<'_>,
    schema: &[ColumnSpec],
    columns: &MergeColumns<'_>,
    m: &MergeSettings,
    gs_uri: &str,
    expected_rows: u64,
    ctx: &StepContext,
) -> Result<Value, StepError> {
    let loader = target.connect().await?;
    if !ctx
        .batch_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(StepError::terminal(format!(
            "batch id \"{}\" cannot be written into a MERGE statement",
            ctx.batch_id
        )));
    }
    // An earlier attempt whose MERGE ran (its worker died before recording it) already applied
    // this batch: complete with the output it worked out, do not merge again.
    let (current, earlier) = claims(ctx).await?;
    for claim in earlier {
        let job_id = merge_job_id(&ctx.batch_id, claim);
        if loader
            .earlier_job(target.project, &job_id)
            .await
            .map_err(bq_error)?
            .is_some()
            && let Some(output) = queue::job_output(&ctx.pool, &job_id)
                .await
                .map_err(StepError::from_db)?
        {
            tracing::info!(job_id = %job_id, "an earlier attempt's MERGE already applied this batch; using its output");
            return Ok(output);
        }
    }
    let safe_batch = ctx.batch_id.replace('-', "_");
    let stage = format!("{}__crm_sync_stage_{safe_batch}", target.table);
    let job_id = format!("crm_sync_stage_{safe_batch}_{}_{}", ctx.step_id, ctx.fence);
    let outcome = loader
        .load_truncate_with_job_id(
            target.project,
            target.dataset,
            &stage,
            gs_uri,
            schema,
            &job_id,
        )
        .await
        .map_err(bq_error)?;
    if outcome.output_rows != expected_rows {
        return Err(StepError::terminal(format!(
            "BigQuery staged {} rows but the batch has {expected_rows}",
            outcome.output_rows
        )));
    }
    let mut full_schema = schema.to_vec();
    full_schema.extend(
        MERGE_COLUMNS
            .iter()
            .map(|(name, ty)| ColumnSpec::nullable(*name, *ty)),
    );
    loader
        .ensure_table(target.project, target.dataset, target.table, &full_schema)
        .await
        .map_err(bq_error)?;
    let (p, d) = (target.project, target.dataset);
    let t = format!("`{p}.{d}.{}`", target.table);
    let s = format!("`{p}.{d}.{stage}`");
    let run = |sql: String| {
        let loader = &loader;
        async move { loader.query_rows(p, &sql).await.map_err(bq_error) }
    };
    // A table that an earlier replace made gets the merge's columns.
    for (col, ty) in MERGE_COLUMNS {
        run(format!(
            "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {col} {}",
            ty.sql()
        ))
        .await?;
    }
    // Null key parts equal each other, as in the PostgreSQL merge and the validate step.
    let on = m
        .key
        .iter()
        .map(|k| format!("T.{k} IS NOT DISTINCT FROM S.{k}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let hash = |alias: &str| {
        format!(
            "TO_HEX(MD5(TO_JSON_STRING(STRUCT({}))))",
            columns
                .data
                .iter()
                .map(|c| format!("{alias}.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // Rows a key cannot tell apart (an empty key, or a key on several rows: what a replace may have
    // left) are removed first, so that every count below is a count of keys; the batch brings
    // their keys back. BigQuery has no unique index to keep them out, so this is checked each time.
    let key_json = |alias: &str| {
        format!(
            "TO_JSON_STRING(STRUCT({}))",
            m.key
                .iter()
                .map(|k| format!("{alias}{k}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let empty = m
        .key
        .iter()
        .map(|k| format!("(T.{k} IS NULL OR CAST(T.{k} AS STRING) = '')"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let unkeyable = format!(
        "({empty}) OR {} IN (SELECT {} FROM {t} GROUP BY 1 HAVING COUNT(*) > 1)",
        key_json("T."),
        key_json(""),
    );
    let found = run(format!("SELECT COUNT(*) AS n FROM {t} T WHERE {unkeyable}")).await?;
    let unkeyable_removed = number(&found, "n");
    if unkeyable_removed > 0 {
        run(format!("DELETE FROM {t} T WHERE {unkeyable}")).await?;
    }
    let counts = run(format!(
        "SELECT
           (SELECT COUNT(*) FROM {s} S WHERE NOT EXISTS (SELECT 1 FROM {t} T WHERE {on})) AS inserted,
           (SELECT COUNT(*) FROM {s} S JOIN {t} T ON {on}
             WHERE T.row_hash IS NULL OR T.row_hash != {hs} OR T.deleted_at IS NOT NULL) AS updated,
           (SELECT COUNT(*) FROM {t} T WHERE T.deleted_at IS NULL
             AND NOT EXISTS (SELECT 1 FROM {s} S WHERE {on})) AS to_delete,
           (SELECT COUNT(*) FROM {t} T WHERE T.deleted_at IS NULL) AS live",
        hs = hash("S"),
    ))
    .await?;
    let count = |name: &str| number(&counts, name);
    let (inserted, updated, to_delete, live) = (
        count("inserted"),
        count("updated"),
        count("to_delete"),
        count("live"),
    );
    if live > 0 && to_delete as f64 > m.max_delete_share * live as f64 {
        let _ = run(format!("DROP TABLE IF EXISTS {s}")).await;
        return Err(StepError::terminal(format!(
            "the merge would delete {to_delete} of {live} live rows ({:.0} %), more than max_delete_share \
             ({:.0} %); nothing was changed (is the extract truncated?)",
            to_delete as f64 * 100.0 / live as f64,
            m.max_delete_share * 100.0
        )));
    }
    let all: Vec<&str> = columns
        .data
        .iter()
        .copied()
        .chain([columns.batch, columns.timestamp])
        .collect();
    let set = all
        .iter()
        .map(|c| format!("{c} = S.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let when_missing = match m.deletes {
        DeleteMode::Soft => format!(
            "UPDATE SET deleted_at = CURRENT_TIMESTAMP(), deleted_in_batch = '{}'",
            ctx.batch_id
        ),
        DeleteMode::Hard => "DELETE".to_string(),
    };
    let output = json!({
        "table": format!("{}.{}.{}", target.project, target.dataset, target.table),
        "rows": expected_rows,
        "source": gs_uri,
        "batch_id": ctx.batch_id,
        "write": "merge",
        "inserted": inserted,
        "updated": updated,
        "unchanged": expected_rows as i64 - inserted - updated,
        "deleted": to_delete,
        "unkeyable_removed": unkeyable_removed,
    });
    // The MERGE runs as a job whose id names this claim, and its output is kept first: a later
    // attempt that finds the job done completes with it (see the top of this function).
    let job_id = merge_job_id(&ctx.batch_id, current);
    queue::record_job_output(&ctx.pool, &job_id, ctx.step_id, &output)
        .await
        .map_err(StepError::from_db)?;
    let merge_sql = format!(
        "MERGE {t} T
         USING (SELECT *, {hs} AS crm_sync_row_hash FROM {s} S) S
         ON {on}
         WHEN MATCHED AND (T.row_hash IS NULL OR T.row_hash != S.crm_sync_row_hash OR T.deleted_at IS NOT NULL) THEN
           UPDATE SET {set}, row_hash = S.crm_sync_row_hash, deleted_at = NULL, deleted_in_batch = NULL
         WHEN NOT MATCHED THEN
           INSERT ({cols}, first_seen_batch, row_hash)
           VALUES ({svals}, S.{batch}, S.crm_sync_row_hash)
         WHEN NOT MATCHED BY SOURCE AND T.deleted_at IS NULL THEN {when_missing}",
        hs = hash("S"),
        cols = all.join(", "),
        svals = all
            .iter()
            .map(|c| format!("S.{c}"))
            .collect::<Vec<_>>()
            .join(", "),
        batch = columns.batch,
    );
    loader
        .run_statement_with_job_id(p, &merge_sql, &job_id)
        .await
        .map_err(bq_error)?;
    run(format!("DROP TABLE IF EXISTS {s}")).await?;
    Ok(output)
}

/// The id of the MERGE job of one claim of a merge load: `crm_sync_merge_<batch>_<step>_<fence>`.
pub fn merge_job_id(batch_id: &str, claim: Lease) -> String {
    load_job_id(batch_id, claim).replacen("crm_sync_", "crm_sync_merge_", 1)
}

/// A number in the first row of a query's result (BigQuery returns INT64 as a string).
fn number(rows: &[Value], name: &str) -> i64 {
    rows.first()
        .and_then(|r| r.get(name))
        .and_then(|v| v.as_str().and_then(|s| s.parse().ok()).or(v.as_i64()))
        .unwrap_or(0)
}
