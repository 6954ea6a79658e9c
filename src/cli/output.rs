//! Human-readable output of `runs` and `show` (the `--json` forms print the same records as JSON).

use chrono::{DateTime, SecondsFormat, Utc};

use crate::config::{Config, RetentionConfig};
use crate::history::{RunDetail, RunSummary};
use crate::registry::PipelineStatus;
use crate::retention::PruneReport;
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
    match d.definitions.as_slice() {
        [] => {}
        [one] => println!("config     definition {one}"),
        many => {
            let by_definition: Vec<String> = many
                .iter()
                .map(|f| {
                    let steps: Vec<&str> = d
                        .steps
                        .iter()
                        .filter(|s| s.fingerprint.as_ref() == Some(f))
                        .map(|s| s.name.as_str())
                        .collect();
                    format!("{} under {f}", steps.join(", "))
                })
                .collect();
            println!(
                "config     CHANGED DURING THE RUN: its steps ran under {} definitions: {}",
                many.len(),
                by_definition.join("; ")
            );
        }
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
            if let Some(skipped) = out["skipped"].as_object().filter(|m| !m.is_empty()) {
                let what: Vec<String> = skipped.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                let keys: Vec<&str> = out["skipped_keys"]
                    .as_array()
                    .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
                    .unwrap_or_default();
                println!(
                    "       left out  {}{}",
                    what.join(", "),
                    if keys.is_empty() {
                        String::new()
                    } else {
                        format!(" (e.g. {})", keys.join(", "))
                    }
                );
            }
            println!("       output {}", one_line(&out.to_string(), 200));
        }
        if let Some(e) = &s.error {
            println!("       error  {}", one_line(e, 200));
        }
        for a in &s.attempt_log {
            println!(
                "       attempt {}  {:<9}  worker {}  definition {}  {} .. {}{}",
                a.attempt,
                a.outcome,
                a.worker_id,
                a.fingerprint.as_deref().unwrap_or("-"),
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

/// `crm-sync pipelines`: every registered pipeline, whether it is enabled, served, and defined the
/// same way by every live process.
pub fn print_pipelines(pipelines: &[PipelineStatus]) {
    if pipelines.is_empty() {
        println!(
            "no pipelines registered (run `crm-sync migrate` or start a process with a config)"
        );
        return;
    }
    println!(
        "{:<24}  {:<16}  {:<22}  {:<14}  {:<10}  {:>6}  {:>7}  DEFINITIONS",
        "PIPELINE", "ENABLED", "SERVED", "DEFINITION", "LAST RUN", "QUEUED", "RUNNING"
    );
    for p in pipelines {
        let enabled = match (&p.disabled_by, p.enabled) {
            (_, true) => "yes".to_string(),
            (Some(by), false) => format!("no ({by})"),
            (None, false) => "no".to_string(),
        };
        let served = if p.served {
            "yes".to_string()
        } else if p.unserved_steps > 0 {
            format!("NO: {} steps wait", p.unserved_steps)
        } else {
            "no live worker".to_string()
        };
        let live: Vec<String> = p
            .processes
            .iter()
            .map(|d| format!("{} ({})", d.fingerprint, d.process_id))
            .collect();
        let definitions = if p.conflict() {
            format!("CONFLICT: {}", live.join(", "))
        } else {
            live.join(", ")
        };
        println!(
            "{:<24}  {:<16}  {:<22}  {:<14}  {:<10}  {:>6}  {:>7}  {}",
            one_line(&p.name, 24),
            enabled,
            served,
            p.fingerprint.as_deref().unwrap_or("-"),
            p.last_status.as_deref().unwrap_or("-"),
            p.queued_runs,
            p.running_runs,
            definitions
        );
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

/// A retention age the way it is written in the config ("180d", "36h", "never"): humantime would
/// print 180 days as "5months 27days 19h 12m".
pub fn age(a: Option<std::time::Duration>) -> String {
    let Some(a) = a else {
        return "never".into();
    };
    let secs = a.as_secs();
    if a.subsec_nanos() == 0 && secs > 0 && secs % 86_400 == 0 {
        format!("{}d", secs / 86_400)
    } else if a.subsec_nanos() == 0 && secs > 0 && secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else {
        humantime::format_duration(a).to_string()
    }
}

/// The policy in one line (check-config, prune).
pub fn retention_policy(r: &RetentionConfig) -> String {
    format!(
        "succeeded {}, failed {}, cancelled {}; keep_last {} per pipeline and status; batches of {}",
        age(r.succeeded),
        age(r.failed),
        age(r.cancelled),
        r.keep_last,
        r.batch_size
    )
}

/// `crm-sync prune`: what was (or, dry, would be) deleted per pipeline and status, then the totals.
pub fn print_pruned(report: &PruneReport, policy: &RetentionConfig, dry_run: bool) {
    println!("retention: {}", retention_policy(policy));
    let verb = if dry_run { "would delete" } else { "deleted" };
    if report.deleted.is_empty() {
        println!("nothing to prune");
    } else {
        println!(
            "{:<24}  {:<9}  {:>8}  {:>9}  {:>9}  {:>6}  {:<20}  {:<20}",
            "PIPELINE",
            "STATUS",
            "RUNS",
            "STEPS",
            "ATTEMPTS",
            "EVENTS",
            "OLDEST_FINISHED",
            "NEWEST_FINISHED"
        );
        for d in report.deleted.iter().chain([&report.totals()]) {
            println!(
                "{:<24}  {:<9}  {:>8}  {:>9}  {:>9}  {:>6}  {:<20}  {:<20}",
                one_line(&d.pipeline, 24),
                d.status,
                d.runs,
                d.steps,
                d.attempts,
                d.notification_events,
                time(d.oldest_finished_at),
                time(d.newest_finished_at)
            );
        }
    }
    let t = report.totals();
    println!(
        "{verb} {} runs, {} steps, {} attempts, {} notification events, {} deliveries in {} batch(es), {:.2}s",
        t.runs,
        t.steps,
        t.attempts,
        t.notification_events,
        t.notification_deliveries,
        report.batch_runs.iter().filter(|n| **n > 0).count(),
        report.elapsed.as_secs_f64()
    );
    if report.workers > 0 {
        println!(
            "{verb} {} worker rows silent for more than {} days",
            report.workers,
            crate::retention::FORGET_WORKERS_AFTER.as_secs() / 86_400
        );
    }
    if dry_run {
        println!("dry run: nothing was deleted");
    }
}
