//! Human-readable output of `runs` and `show` (the `--json` forms print the same records as JSON).

use chrono::{DateTime, SecondsFormat, Utc};

use crate::config::Config;
use crate::history::{RunDetail, RunSummary};
use crate::scheduler;

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".into())
}

fn secs(d: Option<f64>) -> String {
    d.map(|d| format!("{d:.2}s")).unwrap_or_else(|| "-".into())
}

fn one_line(s: &str, max: usize) -> String {
    let flat = s.replace('\n', " ");
    if flat.chars().count() <= max {
        flat
    } else {
        format!("{}...", flat.chars().take(max).collect::<String>())
    }
}

pub fn print_runs(runs: &[RunSummary]) {
    if runs.is_empty() {
        println!("no runs");
        return;
    }
    println!(
        "{:<36}  {:<20}  {:<9}  {:<8}  {:<20}  {:>8}  ERROR",
        "RUN_ID", "PIPELINE", "STATUS", "TRIGGER", "CREATED", "DURATION"
    );
    for r in runs {
        println!(
            "{:<36}  {:<20}  {:<9}  {:<8}  {:<20}  {:>8}  {}",
            r.id,
            one_line(&r.pipeline, 20),
            r.status,
            r.trigger,
            time(Some(r.created_at)),
            secs(r.duration_secs()),
            r.error
                .as_deref()
                .map(|e| one_line(e, 80))
                .unwrap_or_default()
        );
    }
}

pub fn print_run(d: &RunDetail) {
    let r = &d.run;
    println!("run        {}", r.id);
    println!("pipeline   {}", r.pipeline);
    println!("batch_id   {}", r.batch_id);
    println!("status     {}", r.status);
    println!("trigger    {}", r.trigger);
    if let Some(of) = r.retry_of {
        println!("retry of   {of}");
    }
    if let Some(of) = r.rerun_of {
        println!("rerun of   {of}");
    }
    if r.params.as_object().is_some_and(|o| !o.is_empty()) {
        println!("params     {}", r.params);
    }
    println!("created    {}", time(Some(r.created_at)));
    println!("started    {}", time(r.started_at));
    println!("finished   {}", time(r.finished_at));
    println!("duration   {}", secs(r.duration_secs()));
    if let Some(e) = &r.error {
        println!("error      {e}");
    }
    println!("steps:");
    for s in &d.steps {
        let took = match (s.started_at, s.finished_at) {
            (Some(a), Some(b)) => Some((b - a).num_milliseconds() as f64 / 1000.0),
            _ => None,
        };
        println!(
            "  {}. {:<12} {:<9} attempts {}/{}  {}",
            s.position,
            s.name,
            s.status,
            s.attempts,
            s.max_attempts,
            secs(took)
        );
        if let Some(run) = s.reused_from_run {
            println!("       checkpoint reused from run {run}");
        }
        if let Some(out) = &s.output {
            if out["write"] == "merge" {
                println!(
                    "       merge  {} inserted, {} updated, {} unchanged, {} deleted",
                    out["inserted"], out["updated"], out["unchanged"], out["deleted"]
                );
            }
            println!("       output {}", one_line(&out.to_string(), 200));
        }
        if let Some(e) = &s.error {
            println!("       error  {}", one_line(e, 200));
        }
        for a in &s.attempt_log {
            println!(
                "       attempt {}  {:<9}  worker {}  {} .. {}{}",
                a.attempt,
                a.outcome,
                a.worker_id,
                time(Some(a.started_at)),
                time(a.finished_at),
                a.error
                    .as_deref()
                    .map(|e| format!("  {}", one_line(e, 120)))
                    .unwrap_or_default()
            );
        }
    }
}

/// `crm-sync schedules`: the next fire times of every pipeline, local and UTC.
pub fn print_schedules(config: &Config, count: usize, now: DateTime<Utc>) -> anyhow::Result<()> {
    if config.pipelines.is_empty() {
        println!("no pipelines configured");
    }
    for p in &config.pipelines {
        let Some(s) = scheduler::parse_schedule(p)
            .map_err(|e| anyhow::anyhow!("pipeline \"{}\": {e}", p.name))?
        else {
            println!("{}: manual only (no schedule)", p.name);
            continue;
        };
        let state = if p.enabled {
            ""
        } else {
            " [disabled: not scheduled]"
        };
        println!(
            "{}: \"{}\" in {} (catch-up: {}){state}",
            p.name,
            s.schedule.expression(),
            s.schedule.timezone(),
            s.catch_up
        );
        let mut after = now;
        for _ in 0..count {
            let Some(next) = s.schedule.next_after(after) else {
                println!("  (no further occurrence)");
                break;
            };
            let local = next.with_timezone(&s.schedule.timezone());
            println!(
                "  {}  =  {}",
                local.format("%Y-%m-%d %H:%M:%S %Z (%:z)"),
                next.format("%Y-%m-%d %H:%M:%S UTC")
            );
            after = next;
        }
    }
    Ok(())
}
