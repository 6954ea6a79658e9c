//! `crm-sync bench pipeline`: the EZ Focus pipeline (`examples/ezfocus.toml`, embedded) over N
//! synthetic accounts from the in-process fixture -> local backup -> transform -> validate ->
//! PostgreSQL, run by the real worker. Prints rows per second per step and overall, and peak RSS, so
//! that streaming (flat memory as N grows) is measured, not assumed.
//!
//! `--write merge` measures the incremental load instead: a first run inserts the N accounts, then
//! the fixture moves to its next edition (about 1 % of the accounts updated, 1 % closed, 10 opened)
//! and the second run, the one reported, merges those changes into the N-row table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::db::Db;
use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::fixtures::ezfocus::{self, EzFocusConfig, EzFocusFixture};
use crate::pipeline::Executor;
use crate::queue::{self, Trigger};
use crate::registry;
use crate::worker::{Worker, WorkerOptions};

/// The benchmark's pipeline: the shipped example, so the figures are those of the real config.
const EXAMPLE: &str = include_str!("../../examples/ezfocus.toml");
const PIPELINE: &str = "__bench_ezfocus_accounts";

#[derive(clap::Args, Debug, Clone)]
pub struct PipelineBenchArgs {
    /// Accounts the fixture serves.
    #[arg(long, default_value_t = 100_000)]
    pub rows: usize,
    /// Where the batch is loaded (only `postgres` in this build).
    #[arg(long, default_value = "postgres", value_parser = ["postgres"])]
    pub destination: String,
    /// How the batch is written: `replace` (the example as shipped) or `merge` (its commented merge
    /// settings; the figures are those of a second run merging the fixture's next edition).
    #[arg(long, default_value = "replace", value_parser = ["replace", "merge"])]
    pub write: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct StepFigure {
    step: String,
    seconds: f64,
    rows_per_second: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    rows: u64,
    raw_bytes: u64,
    steps: Vec<StepFigure>,
    total_seconds: f64,
    rows_per_second: f64,
    peak_rss_mib: Option<f64>,
    /// `replace`, or `merge` with the reported run's counts.
    write: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    merge_counts: Option<serde_json::Value>,
}

pub async fn run(config: &Config, pool: Db, args: &PipelineBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rows > 0, "--rows must be at least 1");
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::with_rows(args.rows)).await?;
    let backups = tempdir()?;
    let merge = args.write == "merge";
    let bench = bench_config(config, &fixture.base_url(), &backups, args.rows, merge)?;
    let mut conn = pool.acquire().await?;
    registry::register(
        &mut conn,
        "bench",
        false,
        &registry::Registration::from(&bench.pipelines[0]),
    )
    .await?;
    drop(conn);

    let shutdown = CancellationToken::new();
    let worker = Worker::new(
        pool.clone(),
        Executor::new(Arc::new(bench.clone())),
        WorkerOptions::from_config(&bench),
    );
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    if merge {
        // The initial load; the run measured below merges the next edition into its table.
        run_once(&pool).await?;
        fixture.set_edition(1);
    }
    let started = Instant::now();
    let (id, status) = run_once(&pool).await?;
    let total = started.elapsed().as_secs_f64();
    shutdown.cancel();
    handle.await??;
    fixture.stop().await;
    let _ = std::fs::remove_dir_all(&backups);

    let steps: Vec<(String, f64, serde_json::Value)> = sqlx::query_as(
        "SELECT name, extract(epoch FROM finished_at - started_at)::float8, coalesce(output, '{}')
           FROM crm_sync.steps WHERE run_id = $1 ORDER BY position",
    )
    .bind(id)
    .fetch_all(&pool)
    .await?;
    let rows = steps
        .iter()
        .find(|s| s.0 == "transform")
        .and_then(|s| s.2["rows"].as_u64())
        .unwrap_or(0);
    let raw_bytes = steps
        .first()
        .and_then(|s| s.2["bytes"].as_u64())
        .unwrap_or(0);
    let merge_counts = steps
        .iter()
        .find(|s| s.0 == "load" && s.2["write"] == "merge")
        .map(|s| {
            json!({
                "inserted": s.2["inserted"], "updated": s.2["updated"],
                "unchanged": s.2["unchanged"], "deleted": s.2["deleted"],
            })
        });
    let report = Report {
        rows,
        raw_bytes,
        steps: steps
            .iter()
            .map(|(step, seconds, _)| StepFigure {
                step: step.clone(),
                seconds: *seconds,
                rows_per_second: rows as f64 / seconds.max(1e-9),
            })
            .collect(),
        total_seconds: total,
        rows_per_second: rows as f64 / total.max(1e-9),
        peak_rss_mib: super::queue::peak_rss_mib(),
        write: args.write.clone(),
        merge_counts,
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {}",
        bench_table()
    )))
    .execute(&pool)
    .await?;
    sqlx::query("DELETE FROM crm_sync.runs WHERE pipeline = $1")
        .bind(PIPELINE)
        .execute(&pool)
        .await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "bench pipeline: {} accounts ({:.1} MiB raw), fixture -> local backup -> transform -> validate -> {} {} ({status})",
            report.rows,
            report.raw_bytes as f64 / (1024.0 * 1024.0),
            args.destination,
            report.write,
        );
        if let Some(c) = &report.merge_counts {
            println!(
                "  merge of the next edition: {} inserted, {} updated, {} unchanged, {} deleted",
                c["inserted"], c["updated"], c["unchanged"], c["deleted"]
            );
        }
        for s in &report.steps {
            println!(
                "  {:<10} {:>8.3} s  {:>10.0} rows/s",
                s.step, s.seconds, s.rows_per_second
            );
        }
        println!(
            "  {:<10} {:>8.3} s  {:>10.0} rows/s (enqueue to success)",
            "overall", report.total_seconds, report.rows_per_second
        );
        match report.peak_rss_mib {
            Some(m) => println!("  peak RSS: {m:.1} MiB"),
            None => println!("  peak RSS: unknown"),
        }
    }
    Ok(())
}

/// Enqueues one run of the benchmark pipeline and waits for it to succeed.
async fn run_once(pool: &Db) -> anyhow::Result<(uuid::Uuid, String)> {
    let id = queue::enqueue(pool, PIPELINE, &json!({}), None, Trigger::Cli).await?;
    loop {
        let (status, error): (String, Option<String>) =
            sqlx::query_as("SELECT status, error FROM crm_sync.runs WHERE id = $1")
                .bind(id)
                .fetch_one(pool)
                .await?;
        match status.as_str() {
            "succeeded" => return Ok((id, status)),
            "failed" | "cancelled" => {
                anyhow::bail!("benchmark run {status}: {}", error.unwrap_or_default())
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn bench_table() -> &'static str {
    "crm_sync_bench.accounts_list"
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("crm-sync-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).context("creating the benchmark's backup directory")?;
    Ok(dir)
}

/// The example pipeline, renamed, pointed at the in-process fixture, with bounds for `rows`.
fn bench_config(
    config: &Config,
    base_url: &str,
    backups: &std::path::Path,
    rows: usize,
    merge: bool,
) -> anyhow::Result<Config> {
    let mut text = EXAMPLE
        .replace(
            "name = \"ezfocus_accounts\"",
            &format!("name = \"{PIPELINE}\""),
        )
        .replace("http://127.0.0.1:8081", base_url)
        .replace("./crm-sync-backups", &backups.display().to_string())
        .replace("ezfocus.accounts_list", bench_table())
        .replace("min_rows = 2600", "min_rows = 1")
        .replace("max_rows = 2700", &format!("max_rows = {rows}"))
        .replace(
            "max_violations = 10",
            &format!("max_violations = {}", rows / 50 + 10),
        )
        .replace("schedule = \"0 1 * * *\"\n", "");
    if merge {
        // The example's own merge settings, with room for the dirty keys of `rows` accounts.
        text = crate::fixtures::merge_mode(&text)
            .lines()
            .map(|l| {
                if l.starts_with("skip_dirty_keys = ") {
                    format!("skip_dirty_keys = {}", rows / 100 + 10)
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
    }
    text = crate::fixtures::with_secret_files(&text, backups, &ezfocus::EXAMPLE_SECRETS)?;
    let mut bench = Config::parse(&text, std::path::Path::new("(bench pipeline)"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    bench.database_url = config.database_url.clone();
    Ok(bench)
}
