//! Streaming is measured, not assumed: `crm-sync bench pipeline` at 100,000 and 1,000,000 accounts
//! must peak at about the same resident memory. Needs an optimised binary (a debug build takes minutes
//! for a million rows), so it is ignored by default; `scripts/test.sh` builds the release binary and
//! runs it with `CRM_SYNC_BENCH_BIN` set. The merge variant of the benchmark is checked here too.

mod common;

use std::process::Command;

use common::TestDb;

/// Runs `crm-sync bench pipeline ARGS --json` with `bin` and returns its report.
fn bench_report(
    bin: &std::path::Path,
    config: &std::path::Path,
    args: &[&str],
) -> serde_json::Value {
    let out = Command::new(bin)
        .args([
            "--config",
            &config.display().to_string(),
            "bench",
            "pipeline",
        ])
        .args(args)
        .arg("--json")
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "error")
        .output()
        .expect("run the benchmark");
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

fn peak_rss(bin: &str, config: &std::path::Path, rows: u32) -> f64 {
    let report = bench_report(bin.as_ref(), config, &["--rows", &rows.to_string()]);
    assert_eq!(report["rows"], rows, "{report}");
    println!("{rows} rows: {report}");
    report["peak_rss_mib"].as_f64().expect("peak RSS reported")
}

#[tokio::test]
#[ignore = "needs a release binary in CRM_SYNC_BENCH_BIN; scripts/test.sh runs it"]
async fn pipeline_memory_stays_flat_from_100k_to_1m_rows() {
    let bin = std::env::var("CRM_SYNC_BENCH_BIN")
        .expect("CRM_SYNC_BENCH_BIN names a release crm-sync binary");
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(dir.path(), &db, "");
    let small = peak_rss(&bin, &config, 100_000);
    let large = peak_rss(&bin, &config, 1_000_000);
    assert!(
        large <= small * 1.25 && small <= large * 1.25,
        "peak RSS {small:.1} MiB at 100k rows vs {large:.1} MiB at 1M rows: not within 25 %"
    );
}

/// `--write merge` measures a second run that merges the fixture's next edition (debug binary, a
/// few thousand rows: this checks what the benchmark reports, not how fast it is).
#[tokio::test]
async fn the_merge_benchmark_reports_the_merge_of_the_next_edition() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(dir.path(), &db, "");
    let report = bench_report(
        &common::binary(),
        &config,
        &["--rows", "3000", "--write", "merge"],
    );
    // Edition 1 of 3,000 accounts: 30 updated, 30 closed, 10 opened; 7 dirty keys left out.
    assert_eq!(report["write"], "merge", "{report}");
    assert_eq!(report["rows"], 2973, "{report}");
    assert_eq!(
        report["merge_counts"],
        serde_json::json!({ "inserted": 10, "updated": 30, "unchanged": 2933, "deleted": 30 }),
        "{report}"
    );
    let load = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "load")
        .expect("load step figure");
    assert!(load["rows_per_second"].as_f64().unwrap() > 0.0, "{report}");
}
