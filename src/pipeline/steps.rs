//! The four steps of a data pipeline. Each reads the checkpoints of the steps before it (`ctx.inputs`)
//! and returns its own.

use std::io::BufReader;

use chrono::Utc;
use serde_json::{Value, json};

use super::{EXTRACT, StepContext, StepDone, StepError, TRANSFORM, VALIDATE};
use crate::backup;
use crate::config::{PipelineConfig, SourceConfig};
use crate::destinations::{DestinationConfig, bigquery, postgres};
use crate::keys::KeyDisplay;
use crate::sources;
use crate::transform::{self, TransformKind};
use crate::validate::{self, ValidationReport};

pub async fn extract(pipeline: &PipelineConfig, ctx: &StepContext) -> Result<Value, StepError> {
    let tz: chrono_tz::Tz = pipeline.timezone.parse().unwrap_or(chrono_tz::UTC);
    let name = |ext: &str| {
        backup::object_name(
            pipeline.backup.path_template(),
            &pipeline.name,
            &ctx.batch_id,
            Utc::now(),
            tz,
            ext,
        )
    };
    let store = pipeline.backup.store().await?;
    match &pipeline.source {
        SourceConfig::HttpJson(http) => sources::http::extract(http, &store, &name("json")).await,
        SourceConfig::Ezfocus(ez) => {
            sources::http::extract(&ez.to_http(), &store, &name("json")).await
        }
        SourceConfig::BrowserExport(browser) => {
            extract_browser(pipeline, browser, &store, &name("csv"), ctx).await
        }
        SourceConfig::Noop(_) => Err(StepError::terminal("a noop pipeline has no extract step")),
    }
}

/// Downloads the export with headless Chromium and backs it up as downloaded; on failure the page's
/// screenshot goes to the backup store and its URI into the error.
async fn extract_browser(
    pipeline: &PipelineConfig,
    config: &sources::browser::BrowserExportConfig,
    store: &backup::BackupStore,
    object: &str,
    ctx: &StepContext,
) -> Result<Value, StepError> {
    let work_dir =
        std::env::temp_dir().join(format!("crm-sync-export-{}", uuid::Uuid::new_v4().simple()));
    let result = sources::browser::export(config, &work_dir).await;
    let outcome = match result {
        Ok(download) => store.copy_file(object, &download.path).await.map(|info| {
            json!({
                "object": info.uri,
                "bytes": info.bytes,
                "sha256": info.sha256,
                "suggested_name": download.suggested_name,
            })
        }),
        Err(mut e) => {
            let mut message = e.to_string();
            if let Some(png) = e.take_screenshot() {
                let shot = format!(
                    "{}/screenshots/{}_attempt{}.png",
                    pipeline.name, ctx.batch_id, ctx.attempt
                );
                let body = futures::stream::iter([Ok::<_, StepError>(bytes::Bytes::from(png))]);
                match store.put_stream(&shot, body).await {
                    Ok(info) => message = format!("{message} (screenshot: {})", info.uri),
                    Err(se) => {
                        message = format!("{message} (the screenshot could not be stored: {se})")
                    }
                }
            }
            Err(if e.is_retryable() {
                StepError::retryable(message)
            } else {
                StepError::terminal(message)
            })
        }
    };
    let _ = tokio::fs::remove_dir_all(&work_dir).await;
    outcome
}

pub async fn transform(pipeline: &PipelineConfig, ctx: &StepContext) -> Result<Value, StepError> {
    let config = pipeline
        .transform
        .clone()
        .ok_or_else(|| StepError::terminal("the pipeline has no [transform]"))?;
    let raw_copy = backup::local_copy(input_str(ctx, EXTRACT, "object")?, &pipeline.backup).await?;
    let raw = raw_copy.path.clone();
    let store = pipeline.backup.store().await?;
    let staging_name = format!("{}/staging/{}.ndjson", pipeline.name, ctx.batch_id);
    let batch_id = ctx.batch_id.clone();
    let staging_tmp = store.temp_path(&staging_name)?;
    let tmp = staging_tmp.clone();
    // A merge allowed to skip dirty keys leaves them out here; the validate step caps how many.
    let mut keys = pipeline
        .destination
        .as_ref()
        .and_then(|d| d.merge())
        .filter(|m| m.skip_dirty_keys > 0)
        .map(|m| transform::KeyFilter::new(m.key, KeyDisplay::for_pipeline(pipeline)));
    let stats = tokio::task::spawn_blocking(move || {
        let input = std::fs::File::open(&raw).map_err(|e| {
            StepError::retryable(format!("cannot open the raw backup {}: {e}", raw.display()))
        })?;
        let output = crate::private_fs::create_new(&tmp)
            .map_err(|e| StepError::retryable(format!("cannot create the staging object: {e}")))?;
        let convert = match config.kind {
            TransformKind::Json => transform::json_to_ndjson::<std::fs::File, &std::fs::File>,
            TransformKind::Csv => transform::csv_to_ndjson::<std::fs::File, &std::fs::File>,
        };
        let stats = convert(
            &config,
            input,
            &output,
            &batch_id,
            Utc::now(),
            keys.as_mut(),
        )?;
        output
            .sync_all()
            .map_err(|e| StepError::retryable(format!("cannot write the staging object: {e}")))?;
        Ok::<_, StepError>(stats)
    })
    .await
    .map_err(|e| StepError::retryable(format!("transform task failed: {e}")))?;
    let stats = match stats {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&staging_tmp);
            return Err(e);
        }
    };
    drop(raw_copy);
    let info = store.put_file(&staging_name, &staging_tmp).await?;
    Ok(json!({
        "object": info.uri,
        "bytes": info.bytes,
        "sha256": info.sha256,
        "rows": stats.rows,
        "warnings": stats.warnings,
        "dropped_fields": stats.dropped_fields,
        "skipped": stats.skipped,
        "skipped_keys": stats.skipped_keys,
    }))
}

pub async fn validate(pipeline: &PipelineConfig, ctx: &StepContext) -> Result<Value, StepError> {
    let mut config = pipeline.validate.clone().unwrap_or_default();
    // A merge needs every key present and unique in the batch: the gate says which keys are not.
    let merge = pipeline.destination.as_ref().and_then(|d| d.merge());
    if let Some(m) = &merge {
        config.checks.push(validate::Check {
            columns: m.key.clone(),
            rule: validate::Rule::MergeKey,
            severity: validate::Severity::Error,
            max_violations: 0,
        });
    }
    // Rows the transform left out for their keys (its checkpoint is a TransformStats plus the
    // staging object's fields): at most `skip_dirty_keys` of them.
    let transform::TransformStats {
        rows,
        skipped,
        skipped_keys,
        ..
    } = transform_stats(&ctx.inputs)?;
    let staging_copy =
        backup::local_copy(input_str(ctx, TRANSFORM, "object")?, &pipeline.backup).await?;
    let staging = staging_copy.path.clone();
    let previous = previous_rows(ctx).await?;
    let keys = KeyDisplay::for_pipeline(pipeline);
    let report: ValidationReport = tokio::task::spawn_blocking(move || {
        validate::validate(
            &config,
            previous,
            || std::fs::File::open(&staging).map(|f| BufReader::with_capacity(256 * 1024, f)),
            rows,
            &keys,
        )
    })
    .await
    .map_err(|e| StepError::retryable(format!("validation task failed: {e}")))??;
    drop(staging_copy);
    let mut report = report;
    let total_skipped: u64 = skipped.values().sum();
    if let Some(m) = merge.filter(|_| total_skipped > 0) {
        let what = skipped
            .iter()
            .map(|(reason, n)| format!("{reason}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let named = if skipped_keys.is_empty() {
            String::new()
        } else {
            format!(" (e.g. {})", skipped_keys.join(", "))
        };
        if total_skipped > m.skip_dirty_keys {
            report.errors.push(format!(
                "{total_skipped} rows have an empty or repeated merge key ({what}){named}, more than skip_dirty_keys = {}",
                m.skip_dirty_keys
            ));
        }
        for (reason, n) in skipped {
            report.warnings.insert(format!("left out: {reason}"), n);
        }
    }
    if !report.errors.is_empty() {
        return Err(StepError::terminal(format!(
            "validation failed; the destination was left as it was: {}",
            report.errors.join("; ")
        )));
    }
    serde_json::to_value(&report).map_err(|e| StepError::terminal(e.to_string()))
}

pub async fn load(pipeline: &PipelineConfig, ctx: &StepContext) -> Result<StepDone, StepError> {
    let transform = pipeline
        .transform
        .as_ref()
        .ok_or_else(|| StepError::terminal("the pipeline has no [transform]"))?;
    let staging_uri = input_str(ctx, TRANSFORM, "object")?;
    let rows = input(ctx, TRANSFORM, "rows")?.as_u64().unwrap_or(0);
    let data: Vec<_> = transform
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.column_type))
        .collect();
    match &pipeline.destination {
        Some(DestinationConfig::Postgres {
            table,
            url,
            create_table,
            ..
        }) => {
            let staging = backup::local_copy(staging_uri, &pipeline.backup).await?;
            let spec = postgres::LoadSpec {
                table,
                url: url.as_ref(),
                create_table: create_table.as_deref(),
                columns: postgres::Columns {
                    data,
                    batch: &transform.batch_column,
                    timestamp: &transform.timestamp_column,
                },
                merge: pipeline.destination.as_ref().and_then(|d| d.merge()),
                keys: KeyDisplay::for_pipeline(pipeline),
                staging: &staging.path,
                expected_rows: rows,
            };
            postgres::load(&spec, ctx).await
        }
        Some(DestinationConfig::Bigquery {
            project,
            dataset,
            table,
            endpoint,
            location,
            credentials,
            ..
        }) => {
            let target = bigquery::Target {
                project,
                dataset,
                table,
                endpoint: endpoint.as_deref(),
                location: location.as_deref(),
                credentials,
            };
            let schema =
                bigquery::schema(&data, &transform.batch_column, &transform.timestamp_column);
            match pipeline.destination.as_ref().and_then(|d| d.merge()) {
                None => bigquery::load(&target, &schema, staging_uri, rows, ctx).await,
                Some(m) => {
                    let data_names: Vec<&str> = data.iter().map(|(n, _)| *n).collect();
                    let columns = bigquery::MergeColumns {
                        data: &data_names,
                        batch: &transform.batch_column,
                        timestamp: &transform.timestamp_column,
                    };
                    bigquery::merge(&target, &schema, &columns, &m, staging_uri, rows, ctx).await
                }
            }
            .map(StepDone::Output)
        }
        None => Err(StepError::terminal("the pipeline has no [destination]")),
    }
}

/// A field of an earlier step's checkpoint.
/// The transform's checkpoint read as its statistics. A checkpoint that does not read as them (a
/// shape drift, a hand-edited row) is a terminal error naming the field: a default would turn skipped
/// rows into none and bypass the `skip_dirty_keys` cap.
fn transform_stats(inputs: &Value) -> Result<transform::TransformStats, StepError> {
    let checkpoint = inputs
        .get(TRANSFORM)
        .ok_or_else(|| StepError::terminal(format!("the {TRANSFORM} checkpoint is missing")))?;
    serde_path_to_error::deserialize(checkpoint).map_err(|e| {
        StepError::terminal(format!(
            "the {TRANSFORM} checkpoint does not read as transform statistics: field `{}`: {}",
            e.path(),
            e.inner()
        ))
    })
}

fn input<'a>(ctx: &'a StepContext, step: &str, field: &str) -> Result<&'a Value, StepError> {
    ctx.inputs
        .get(step)
        .and_then(|o| o.get(field))
        .ok_or_else(|| StepError::terminal(format!("the {step} checkpoint has no {field}")))
}

fn input_str<'a>(ctx: &'a StepContext, step: &str, field: &str) -> Result<&'a str, StepError> {
    input(ctx, step, field)?
        .as_str()
        .ok_or_else(|| StepError::terminal(format!("the {step} checkpoint's {field} is not text")))
}

/// Rows of the last successful batch of this pipeline (the drift check's baseline).
async fn previous_rows(ctx: &StepContext) -> Result<Option<u64>, StepError> {
    let rows: Option<i64> = sqlx::query_scalar(
        "SELECT (s.output->>'rows')::bigint FROM crm_sync.runs r
           JOIN crm_sync.steps s ON s.run_id = r.id AND s.name = $3
          WHERE r.pipeline = $1 AND r.status = 'succeeded' AND r.batch_id <> $2
          ORDER BY r.finished_at DESC LIMIT 1",
    )
    .bind(&ctx.pipeline)
    .bind(&ctx.batch_id)
    .bind(VALIDATE)
    .fetch_optional(&ctx.pool)
    .await
    .map_err(StepError::from_db)?
    .flatten();
    Ok(rows.map(|r| r.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transform_checkpoint_of_another_shape_fails_loudly_naming_the_field() {
        let good = json!({ "transform": {
            "object": "file:///x", "rows": 3, "warnings": {}, "dropped_fields": [],
            "skipped": { "duplicate id": 2 }, "skipped_keys": ["key#00000000 at row 2"],
        }});
        let stats = transform_stats(&good).unwrap();
        assert_eq!((stats.rows, stats.skipped["duplicate id"]), (3, 2));
        // Written before rows were skipped at all: no skipped fields, none skipped.
        let older = json!({ "transform": { "rows": 3, "warnings": {}, "dropped_fields": [] } });
        assert!(transform_stats(&older).unwrap().skipped.is_empty());

        let drifted = json!({ "transform": {
            "rows": 3, "warnings": {}, "dropped_fields": [], "skipped": { "duplicate id": "two" },
        }});
        let e = transform_stats(&drifted).unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        let message = e.to_string();
        assert!(
            message.contains("field `skipped.duplicate id`"),
            "{message}"
        );
        assert!(
            message.contains("invalid type: string \"two\""),
            "{message}"
        );
        let missing = transform_stats(&json!({})).unwrap_err().to_string();
        assert!(
            missing.contains("the transform checkpoint is missing"),
            "{missing}"
        );
        let no_rows = json!({ "transform": { "warnings": {}, "dropped_fields": [] } });
        let e = transform_stats(&no_rows).unwrap_err().to_string();
        assert!(e.contains("missing field `rows`"), "{e}");
    }
}
