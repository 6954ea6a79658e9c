//! The monitoring kit in `deploy/` against the real tools and a live service: the Prometheus config
//! and alert rules through `promtool` (check and unit tests), the Grafana provisioning and dashboard
//! (JSON, datasource uids, PromQL syntax), and every `crm_sync_*` metric that a dashboard panel or an
//! alert queries looked up in the `/metrics` of a real `crm-sync serve` that ran a succeeding, a
//! failing (after a retry) and an EZ Focus pipeline into PostgreSQL; `promtool check metrics` lints
//! that scrape, and each metric of the contract is checked for its type, labels and values.
//!
//! promtool comes from Debian's `prometheus` package, which scripts/test.sh installs; without it
//! these tests fail (they never skip).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TestDb, run_binary, spawn_binary, wait_for_run, write_config};
use crm_sync::fixtures::ezfocus::{self, EzFocusConfig, EzFocusFixture};
use serde_json::Value;
use uuid::Uuid;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERTS_TEST: &str = "deploy/prometheus/alerts_test.yml";
const DASHBOARD: &str = "deploy/grafana/dashboards/crm-sync.json";
const DATASOURCE: &str = "deploy/grafana/provisioning/datasources/prometheus.yml";
const DASHBOARD_PROVIDER: &str = "deploy/grafana/provisioning/dashboards/crm-sync.yml";
/// The uid of the provisioned Prometheus datasource, which every panel must use.
const DATASOURCE_UID: &str = "prometheus";
const ALERT_NAMES: [&str; 7] = [
    "CrmSyncPipelineStale",
    "CrmSyncRunFailed",
    "CrmSyncQueueBackingUp",
    "CrmSyncNoWorkerAlive",
    "CrmSyncPipelineUnserved",
    "CrmSyncPipelineDefinitionConflict",
    "CrmSyncAuthFailureBurst",
];

// ------------------------------------------------------------------------------------------ promtool

/// promtool from `$PROMTOOL` or PATH; a missing promtool fails the test and says what to do.
fn promtool_path() -> PathBuf {
    let found = match std::env::var_os("PROMTOOL") {
        Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
        None => std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join("promtool"))
            .find(|p| p.is_file()),
    };
    found.unwrap_or_else(|| {
        panic!(
            "promtool not found (PROMTOOL={:?}, PATH={:?}): run scripts/test.sh, which installs it \
             (Debian's `prometheus` package: apt-get install --no-install-recommends prometheus)",
            std::env::var_os("PROMTOOL"),
            std::env::var_os("PATH")
        )
    })
}

/// Runs `promtool ARGS` in the repository root (with `stdin` piped in when given); panics with
/// promtool's whole output unless it exits 0. Returns that output.
fn promtool(args: &[&str], stdin: Option<&str>) -> String {
    let (ok, text) = promtool_run(args, stdin);
    assert!(ok, "promtool {} failed:\n{text}", args.join(" "));
    text
}

/// Runs `promtool ARGS` in the repository root: (exited 0, its whole output with the status).
fn promtool_run(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(promtool_path())
        .args(args)
        .current_dir(ROOT)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}({})",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status
    );
    (out.status.success(), text)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

fn list<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} is not a list: {v}"))
}

// ------------------------------------------------------------------------------------------- PromQL

/// The metric names an expression selects: identifiers outside string literals and comments that
/// start with `crm_sync_` (function names, keywords, label names and Grafana's `$variables` never
/// do). A metric named only inside a string (`{__name__="..."}`) is not found, on purpose: the
/// callers require at least one name per expression.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_digit() {
            // Numbers and durations (15m, 1e3, 0x1f, 1.5).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let ident: String = chars[start..i].iter().collect();
            if ident.starts_with("crm_sync_") && !names.contains(&ident) {
                names.push(ident);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// A Grafana query made plain PromQL: its variables replaced by values of their kind, and a
/// `label_values(SELECTOR, LABEL)` variable query turned into the selector.
fn grafana_to_promql(query: &str) -> String {
    let query = query.trim();
    if let Some(inner) = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
    {
        let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
        return format!("group({selector})");
    }
    query
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1d")
        .replace("$pipeline", ".*")
}

/// Every expression of alerts.yml: (where, expr).
fn alert_expressions() -> Vec<(String, String)> {
    let rules = yaml(ALERTS);
    let mut out = Vec::new();
    for group in list(&rules["groups"], "groups") {
        for rule in list(&group["rules"], "rules") {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .unwrap_or("?");
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("rule {name} has no expr"));
            out.push((format!("alert {name}"), expr.to_string()));
        }
    }
    out
}

/// Every panel of the dashboard, rows' collapsed panels included.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in list(&dashboard["panels"], "dashboard panels") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested.iter());
        }
    }
    out
}

/// Every query of the dashboard, as Grafana holds it: (where, query).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in all_panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                format!(
                    "panel \"{}\" target {}",
                    panel["title"].as_str().unwrap_or("?"),
                    target["refId"].as_str().unwrap_or("?")
                ),
                target["expr"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    for var in list(&dashboard["templating"]["list"], "templating.list") {
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap_or("");
        out.push((
            format!("variable ${}", var["name"].as_str().unwrap_or("?")),
            query.to_string(),
        ));
    }
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

// --------------------------------------------------------------------------- exposition text format

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape in the Prometheus text format: families' types and the samples.
#[derive(Debug, Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                scrape.types.insert(name.into(), kind.trim().into());
            } else if !line.is_empty() && !line.starts_with('#') {
                scrape.samples.push(parse_sample(line));
            }
        }
        scrape
    }

    fn has_sample(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// Samples named `name` carrying every `(label, value)` of `with`.
    fn matching<'a>(&'a self, name: &'a str, with: &'a [(&str, &str)]) -> Vec<&'a Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && with
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The sum of the matching samples; `None` when there is none.
    fn value(&self, name: &str, with: &[(&str, &str)]) -> Option<f64> {
        let m = self.matching(name, with);
        (!m.is_empty()).then(|| m.iter().map(|s| s.value).sum())
    }

    /// The distinct values of `label` over the samples named `name`.
    fn label_values(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        let chars: Vec<char> = rest.chars().collect();
        let mut i = 1;
        loop {
            while chars[i] == ' ' || chars[i] == ',' {
                i += 1;
            }
            if chars[i] == '}' {
                i += 1;
                break;
            }
            let key_start = i;
            while chars[i] != '=' {
                i += 1;
            }
            let key: String = chars[key_start..i].iter().collect::<String>();
            i += 2; // ="
            let mut value = String::new();
            while chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                    value.push(if chars[i] == 'n' { '\n' } else { chars[i] });
                } else {
                    value.push(chars[i]);
                }
                i += 1;
            }
            i += 1;
            labels.insert(key.trim().to_string(), value);
        }
        let consumed: usize = chars[..i].iter().map(|c| c.len_utf8()).sum();
        rest = &rest[consumed..];
    }
    let value_text = rest.split_whitespace().next().unwrap_or("");
    let value = value_text
        .parse()
        .unwrap_or_else(|_| panic!("bad sample value in: {line}"));
    Sample {
        name,
        labels,
        value,
    }
}

// --------------------------------------------------------------------------------- offline tests

#[test]
fn metric_names_are_found_outside_strings_and_comments() {
    assert_eq!(
        metric_names(
            r#"sum by (pipeline) (rate(crm_sync_a_total{job="crm_sync_not_a_metric", x='crm_sync_b\'c'}[5m]))
               / on() group_left crm_sync_c:ratio offset 15m # crm_sync_in_a_comment
               + 1e3 + crm_sync_a_total + $__rate_interval"#
        ),
        ["crm_sync_a_total", "crm_sync_c:ratio"]
    );
    assert!(metric_names(r#"{__name__="crm_sync_hidden"}"#).is_empty());
    assert_eq!(
        grafana_to_promql("label_values(crm_sync_x{a=\"b\"}, pipeline)"),
        "group(crm_sync_x{a=\"b\"})"
    );
    assert_eq!(
        grafana_to_promql("rate(crm_sync_y{pipeline=~\"$pipeline\"}[$__rate_interval])"),
        "rate(crm_sync_y{pipeline=~\".*\"}[5m])"
    );
}

#[test]
fn exposition_text_is_parsed_with_labels_and_histograms() {
    let scrape = Scrape::parse(
        "# HELP a_total A.\n# TYPE a_total counter\na_total{p=\"x\\\"y\",s=\"ok\"} 3\n\
         # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\ng 1.5e-3 1700000000000\n",
    );
    assert_eq!(scrape.types["a_total"], "counter");
    assert_eq!(scrape.types["h"], "histogram");
    assert_eq!(scrape.value("a_total", &[("p", "x\"y")]), Some(3.0));
    assert_eq!(scrape.value("a_total", &[("s", "failed")]), None);
    assert_eq!(scrape.value("h_bucket", &[("le", "+Inf")]), Some(2.0));
    assert_eq!(scrape.value("g", &[]), Some(0.0015));
    assert!(scrape.has_sample("h_count") && !scrape.has_sample("h"));
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    let out = promtool(&["check", "config", PROMETHEUS_CONFIG], None);
    assert!(out.contains("1 rule files found"), "{out}");
    let out = promtool(&["check", "rules", ALERTS], None);
    assert!(
        out.contains(&format!("{} rules found", ALERT_NAMES.len())),
        "{out}"
    );
    // promtool resolves alerts_test.yml's rule_files relative to the test file.
    let out = promtool(&["test", "rules", ALERTS_TEST], None);
    assert!(out.contains("SUCCESS"), "{out}");

    // Scrape job as docker compose names the service, and the rule file it loads.
    let config = yaml(PROMETHEUS_CONFIG);
    assert_eq!(config["rule_files"], serde_json::json!(["alerts.yml"]));
    let jobs = list(&config["scrape_configs"], "scrape_configs");
    let job = jobs
        .iter()
        .find(|j| j["job_name"] == "crm-sync")
        .expect("a crm-sync scrape job");
    assert_eq!(
        job["static_configs"][0]["targets"],
        serde_json::json!(["crm-sync:8080"])
    );

    // Each alert: a severity, a summary and a description, no per-run labels; and unit tests that
    // see it fire and see it stay quiet.
    let rules = yaml(ALERTS);
    let tests = yaml(ALERTS_TEST);
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in list(&tests["tests"], "tests") {
        for case in list(&test["alert_rule_test"], "alert_rule_test") {
            let name = case["alertname"].as_str().unwrap().to_string();
            if case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                fires.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let mut seen = Vec::new();
    for group in list(&rules["groups"], "groups") {
        for rule in list(&group["rules"], "rules") {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            seen.push(name.to_string());
            let labels = rule["labels"].as_object().expect("alert labels");
            assert_eq!(
                labels.keys().collect::<Vec<_>>(),
                ["severity"],
                "{name}: only a severity label (no run ids)"
            );
            assert!(
                ["warning", "critical"].contains(&labels["severity"].as_str().unwrap()),
                "{name}"
            );
            for key in ["summary", "description"] {
                assert!(
                    rule["annotations"][key]
                        .as_str()
                        .is_some_and(|s| !s.trim().is_empty()),
                    "{name} has no {key}"
                );
            }
            assert!(fires.contains(name), "no unit test sees {name} fire");
            assert!(quiet.contains(name), "no unit test sees {name} stay quiet");
        }
    }
    assert_eq!(seen, ALERT_NAMES);
}

#[test]
fn grafana_provisioning_and_dashboard_are_consistent() {
    let datasources = yaml(DATASOURCE);
    let ds = &list(&datasources["datasources"], "datasources")[0];
    assert_eq!(ds["uid"], DATASOURCE_UID);
    assert_eq!(ds["type"], "prometheus");
    assert_eq!(ds["url"], "http://prometheus:9090");
    let providers = yaml(DASHBOARD_PROVIDER);
    let provider = &list(&providers["providers"], "providers")[0];
    assert_eq!(provider["type"], "file");
    assert!(provider["options"]["path"].as_str().is_some());

    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "crm-sync");
    let schema = dashboard["schemaVersion"].as_i64().unwrap();
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    let panels = all_panels(&dashboard);
    assert!(panels.len() >= 12, "{} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("?");
        titles.push(title.to_string());
        assert!(
            ids.insert(panel["id"].as_i64().unwrap()),
            "duplicate panel id in \"{title}\""
        );
        assert_eq!(
            panel["datasource"]["uid"], DATASOURCE_UID,
            "panel \"{title}\" datasource"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_i64().unwrap(), grid["w"].as_i64().unwrap());
        assert!(
            x >= 0 && w > 0 && x + w <= 24 && grid["h"].as_i64().unwrap() > 0,
            "panel \"{title}\" gridPos {grid}"
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
        assert!(!targets.is_empty(), "panel \"{title}\" has no query");
        for target in targets {
            assert_eq!(
                target["datasource"]["uid"], DATASOURCE_UID,
                "panel \"{title}\" target datasource"
            );
        }
    }
    for var in list(&dashboard["templating"]["list"], "templating.list") {
        assert_eq!(var["datasource"]["uid"], DATASOURCE_UID, "variable {var}");
    }
    let pipeline = list(&dashboard["templating"]["list"], "templating.list")
        .iter()
        .find(|v| v["name"] == "pipeline")
        .expect("a pipeline variable");
    assert_eq!(pipeline["includeAll"], true);

    // Every query is PromQL that Prometheus parses: promtool checks them as recording rules.
    let mut rules = Vec::new();
    let mut places = Vec::new();
    for (i, (place, query)) in dashboard_queries(&dashboard).into_iter().enumerate() {
        places.push(format!("dashboard:query_{i} is {place}"));
        let expr = grafana_to_promql(&query);
        assert!(!expr.contains('$'), "{place}: unknown variable in {query}");
        assert!(
            !metric_names(&expr).is_empty(),
            "{place} selects no crm_sync_ metric: {query}"
        );
        rules.push(serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": expr}));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard_queries.yml");
    let doc = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, serde_yaml_ng::to_string(&doc).unwrap()).unwrap();
    let (ok, out) = promtool_run(&["check", "rules", file.to_str().unwrap()], None);
    assert!(
        ok,
        "a dashboard query is not valid PromQL:\n{out}\n{}",
        places.join("\n")
    );
}

// ------------------------------------------------------------------------------------ live scrape

/// The metric contract: family, type and label names of each sample (histograms add `le` on
/// `_bucket`).
const CONTRACT: [(&str, &str, &[&str]); 18] = [
    (
        "crm_sync_runs_total",
        "counter",
        &["pipeline", "status", "trigger"],
    ),
    (
        "crm_sync_step_duration_seconds",
        "histogram",
        &["pipeline", "step"],
    ),
    ("crm_sync_rows_extracted_total", "counter", &["pipeline"]),
    ("crm_sync_rows_loaded_total", "counter", &["pipeline"]),
    (
        "crm_sync_step_retries_total",
        "counter",
        &["pipeline", "step"],
    ),
    ("crm_sync_worker_busy_slots", "gauge", &[]),
    ("crm_sync_worker_slots", "gauge", &[]),
    ("crm_sync_scheduler_lag_seconds", "gauge", &[]),
    ("crm_sync_scheduler_ticks_total", "counter", &["outcome"]),
    ("crm_sync_build_info", "gauge", &["version"]),
    (
        "crm_sync_last_success_timestamp_seconds",
        "gauge",
        &["pipeline"],
    ),
    (
        "crm_sync_pipeline_freshness_sla_seconds",
        "gauge",
        &["pipeline"],
    ),
    ("crm_sync_pipeline_stale", "gauge", &["pipeline"]),
    ("crm_sync_pipeline_definitions", "gauge", &["pipeline"]),
    ("crm_sync_pipeline_unserved_steps", "gauge", &["pipeline"]),
    ("crm_sync_queue_depth", "gauge", &["state"]),
    ("crm_sync_oldest_queued_step_age_seconds", "gauge", &[]),
    ("crm_sync_workers_alive", "gauge", &[]),
];

const EZFOCUS: &str = "ezfocus_accounts";

/// `crm-sync serve`, stopped (SIGKILL) if the test ends before it does.
struct Serve {
    child: Child,
    log: PathBuf,
}

impl Serve {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The API address from serve's "HTTP listening addr=..." log line.
    async fn address(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if let Some(line) = log
                .lines()
                .find(|l| l.contains("crm_sync::api") && l.contains("listening addr="))
            {
                let addr = line
                    .split_once("addr=")
                    .map(|(_, a)| a.split_whitespace().next().unwrap_or(""))
                    .unwrap_or_else(|| panic!("no addr= in: {line}"));
                return addr.to_string();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("crm-sync serve exited ({status}):\n{log}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "crm-sync serve did not listen within 30s:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `crm-sync run NAME` through the CLI; returns the run id.
fn trigger(config: &Path, pipeline: &str) -> Uuid {
    let (code, out, err) = run_binary(config, &["run", pipeline]);
    assert_eq!(code, 0, "crm-sync run {pipeline}: {err}");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("crm-sync run {pipeline} printed no run id: {out}"))
}

/// Scrapes until every run counter the test expects is visible (the worker counts a run just after
/// its completion commits) and the scheduler has enqueued a tick, or 30 s pass; returns the last
/// body.
async fn scrape_when_counted(url: &str, expected: &[(&str, &str)]) -> String {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let resp = client
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp.text().await.unwrap();
        assert!(status.is_success(), "GET {url}: {status}\n{body}");
        assert!(
            content_type.starts_with("text/plain"),
            "GET {url}: Content-Type {content_type:?}, want the text format"
        );
        let scrape = Scrape::parse(&body);
        let counted = expected.iter().all(|(pipeline, status)| {
            scrape
                .value(
                    "crm_sync_runs_total",
                    &[("pipeline", pipeline), ("status", status)],
                )
                .is_some()
        }) && scrape
            .value("crm_sync_scheduler_ticks_total", &[("outcome", "enqueued")])
            .is_some_and(|v| v >= 1.0);
        if counted || tokio::time::Instant::now() >= deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn live_metrics_cover_every_metric_of_the_dashboard_and_the_alerts() {
    let promtool_bin = promtool_path(); // fail before any setup when promtool is missing
    let db = TestDb::new().await;
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let backups = dir.path().join("backups");
    std::fs::create_dir_all(&secrets).unwrap();

    // The EZ Focus example (its own [worker] table replaced by the test's), into PostgreSQL.
    let example = read("examples/ezfocus.toml");
    let ezfocus_pipeline = example
        .split_once("[[pipelines]]")
        .map(|(_, p)| format!("[[pipelines]]{p}"))
        .expect("examples/ezfocus.toml has a pipeline");
    let ezfocus_pipeline = crm_sync::fixtures::with_secret_files(
        &ezfocus_pipeline,
        &secrets,
        &ezfocus::EXAMPLE_SECRETS,
    )
    .unwrap()
    .replace("http://127.0.0.1:8081", &fixture.base_url())
    .replace("./crm-sync-backups", &backups.display().to_string())
    .replace("retry_backoff = \"10s\"", "retry_backoff = \"50ms\"");
    assert!(ezfocus_pipeline.contains(&fixture.base_url()));
    let concurrency = 4;
    let config = write_config(
        dir.path(),
        &db,
        &format!(
            r#"
[server]
listen = "127.0.0.1:0"

[worker]
concurrency = {concurrency}
poll_interval = "100ms"

# Succeeds.
[[pipelines]]
name = "smoke"
freshness_sla = "1h"
source = {{ kind = "noop" }}

# Fails its first attempt (re-queued: a retry), then its second and last: the run fails. It never
# succeeded, so with its freshness SLA it is stale.
[[pipelines]]
name = "flaky"
freshness_sla = "1h"
max_attempts = 2
retry_backoff = "50ms"
source = {{ kind = "noop", fail_times = 2 }}

# Scheduled every second: scheduler ticks and lag.
[[pipelines]]
name = "ticker"
schedule = "* * * * * *"
catch_up = "skip"
source = {{ kind = "noop" }}

{ezfocus_pipeline}"#
        ),
    );
    let log = dir.path().join("serve.log");
    let mut serve = Serve {
        child: spawn_binary(&config, &["serve"], &log),
        log,
    };
    let addr = serve.address().await;

    let runs = [
        ("smoke", "succeeded"),
        ("flaky", "failed"),
        (EZFOCUS, "succeeded"),
    ];
    for (pipeline, want) in runs {
        let id = trigger(&config, pipeline);
        let status = wait_for_run(&db.pool, id, Duration::from_secs(120)).await;
        assert_eq!(
            status,
            want,
            "{pipeline}: {}\n{}",
            common::run_error(&db.pool, id).await,
            serve.log()
        );
    }
    let body = scrape_when_counted(&format!("http://{addr}/metrics"), &runs).await;

    // The scrape passes promtool's linter as it is.
    let lint = Command::new(&promtool_bin)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(body.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics found problems ({}):\n{}{}\n--- scrape ---\n{body}",
        lint.status,
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    let scrape = Scrape::parse(&body);
    let mut problems = Vec::new();

    // Every metric a dashboard panel, the pipeline variable or an alert selects is in the scrape.
    let dashboard = dashboard();
    let mut queries = dashboard_queries(&dashboard);
    queries.extend(alert_expressions());
    let mut used = BTreeSet::new();
    for (place, query) in &queries {
        let names = metric_names(query);
        if names.is_empty() {
            problems.push(format!("{place} selects no crm_sync_ metric: {query}"));
        }
        for name in names {
            if !scrape.has_sample(&name) {
                problems.push(format!("{place}: {name} is not in the scrape"));
            }
            used.insert(name);
        }
    }

    // The contract: each family with its type and exactly its labels.
    for (family, kind, labels) in CONTRACT {
        match scrape.types.get(family) {
            None => problems.push(format!("{family}: no # TYPE line (missing)")),
            Some(t) if t != kind => problems.push(format!("{family}: type {t}, want {kind}")),
            Some(_) => {}
        }
        let names: Vec<String> = if kind == "histogram" {
            ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{family}{s}"))
                .collect()
        } else {
            vec![family.to_string()]
        };
        for name in &names {
            let samples = scrape.matching(name, &[]);
            if samples.is_empty() {
                problems.push(format!("{name}: no sample"));
            }
            for s in samples {
                let mut want: BTreeSet<&str> = labels.iter().copied().collect();
                if name.ends_with("_bucket") {
                    want.insert("le");
                }
                let got: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
                if got != want {
                    problems.push(format!("{name}: labels {got:?}, want {want:?}"));
                    break;
                }
            }
        }
    }

    // Values that follow from what ran.
    let mut expect = |what: String, got: Option<f64>, ok: &dyn Fn(f64) -> bool, want: &str| {
        if !got.is_some_and(ok) {
            problems.push(format!("{what} = {got:?}, want {want}"));
        }
    };
    for (pipeline, status) in runs {
        expect(
            format!("crm_sync_runs_total{{pipeline={pipeline},status={status},trigger=cli}}"),
            scrape.value(
                "crm_sync_runs_total",
                &[
                    ("pipeline", pipeline),
                    ("status", status),
                    ("trigger", "cli"),
                ],
            ),
            &|v| v == 1.0,
            "1",
        );
    }
    expect(
        "crm_sync_step_retries_total{pipeline=flaky,step=noop}".into(),
        scrape.value(
            "crm_sync_step_retries_total",
            &[("pipeline", "flaky"), ("step", "noop")],
        ),
        &|v| v == 1.0,
        "1 (first attempt re-queued, second failed the run)",
    );
    expect(
        "crm_sync_step_duration_seconds_count{pipeline=flaky,step=noop}".into(),
        scrape.value(
            "crm_sync_step_duration_seconds_count",
            &[("pipeline", "flaky"), ("step", "noop")],
        ),
        &|v| v == 2.0,
        "2 (every attempt)",
    );
    for step in ["extract", "transform", "validate", "load"] {
        expect(
            format!("crm_sync_step_duration_seconds_count{{pipeline={EZFOCUS},step={step}}}"),
            scrape.value(
                "crm_sync_step_duration_seconds_count",
                &[("pipeline", EZFOCUS), ("step", step)],
            ),
            &|v| v == 1.0,
            "1",
        );
    }
    let loaded: i64 = sqlx::query_scalar("SELECT count(*) FROM ezfocus.accounts_list")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(loaded > 0);
    let loaded = loaded as f64;
    expect(
        format!("crm_sync_rows_loaded_total{{pipeline={EZFOCUS}}}"),
        scrape.value("crm_sync_rows_loaded_total", &[("pipeline", EZFOCUS)]),
        &|v| v == loaded,
        &format!("{loaded} (rows in ezfocus.accounts_list)"),
    );
    expect(
        format!("crm_sync_rows_extracted_total{{pipeline={EZFOCUS}}}"),
        scrape.value("crm_sync_rows_extracted_total", &[("pipeline", EZFOCUS)]),
        &|v| v >= loaded,
        &format!(">= {loaded} (rows loaded)"),
    );
    expect(
        "crm_sync_worker_slots".into(),
        scrape.value("crm_sync_worker_slots", &[]),
        &|v| v == f64::from(concurrency),
        &concurrency.to_string(),
    );
    expect(
        "crm_sync_worker_busy_slots".into(),
        scrape.value("crm_sync_worker_busy_slots", &[]),
        &|v| (0.0..=f64::from(concurrency)).contains(&v),
        "between 0 and the slots",
    );
    expect(
        format!(
            "crm_sync_build_info{{version={}}}",
            env!("CARGO_PKG_VERSION")
        ),
        scrape.value(
            "crm_sync_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
        ),
        &|v| v == 1.0,
        "1",
    );
    expect(
        "crm_sync_scheduler_ticks_total{outcome=enqueued}".into(),
        scrape.value("crm_sync_scheduler_ticks_total", &[("outcome", "enqueued")]),
        &|v| v >= 1.0,
        ">= 1 (ticker is scheduled every second)",
    );
    expect(
        "crm_sync_scheduler_lag_seconds".into(),
        scrape.value("crm_sync_scheduler_lag_seconds", &[]),
        &|v| (0.0..60.0).contains(&v),
        "between 0 and 60",
    );
    // Cluster gauges, from PostgreSQL.
    for (pipeline, sla, stale) in [
        ("smoke", 3600.0, 0.0),
        ("flaky", 3600.0, 1.0),
        (EZFOCUS, 26.0 * 3600.0, 0.0),
    ] {
        expect(
            format!("crm_sync_pipeline_freshness_sla_seconds{{pipeline={pipeline}}}"),
            scrape.value(
                "crm_sync_pipeline_freshness_sla_seconds",
                &[("pipeline", pipeline)],
            ),
            &|v| v == sla,
            &sla.to_string(),
        );
        expect(
            format!("crm_sync_pipeline_stale{{pipeline={pipeline}}}"),
            scrape.value("crm_sync_pipeline_stale", &[("pipeline", pipeline)]),
            &|v| v == stale,
            &stale.to_string(),
        );
    }
    for (family, pipeline) in [
        ("crm_sync_pipeline_stale", "ticker"),
        ("crm_sync_pipeline_freshness_sla_seconds", "ticker"),
        ("crm_sync_last_success_timestamp_seconds", "flaky"),
    ] {
        if let Some(v) = scrape.value(family, &[("pipeline", pipeline)]) {
            expect(
                format!("{family}{{pipeline={pipeline}}}"),
                Some(v),
                &|_| false,
                "no sample",
            );
        }
    }
    for pipeline in ["smoke", EZFOCUS] {
        let finished: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM max(finished_at))::float8 FROM crm_sync.runs
              WHERE pipeline = $1 AND status = 'succeeded'",
        )
        .bind(pipeline)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        expect(
            format!("crm_sync_last_success_timestamp_seconds{{pipeline={pipeline}}}"),
            scrape.value(
                "crm_sync_last_success_timestamp_seconds",
                &[("pipeline", pipeline)],
            ),
            &|v| (v - finished).abs() < 1.0,
            &format!("{finished} (its last success's finished_at)"),
        );
    }
    let states = scrape.label_values("crm_sync_queue_depth", "state");
    let want_states: BTreeSet<String> = ["waiting", "queued", "delayed", "running"]
        .map(String::from)
        .into();
    for state in states.symmetric_difference(&want_states) {
        expect(
            format!("crm_sync_queue_depth{{state={state}}}"),
            scrape.value("crm_sync_queue_depth", &[("state", state)]),
            &|_| false,
            "a sample for each of waiting, queued, delayed, running and no other state",
        );
    }
    expect(
        "crm_sync_oldest_queued_step_age_seconds".into(),
        scrape.value("crm_sync_oldest_queued_step_age_seconds", &[]),
        &|v| v >= 0.0,
        ">= 0",
    );
    expect(
        "crm_sync_workers_alive".into(),
        scrape.value("crm_sync_workers_alive", &[]),
        &|v| v >= 1.0,
        ">= 1 (serve runs a worker)",
    );

    assert!(
        problems.is_empty(),
        "{} problem(s) with /metrics:\n  {}\n--- scrape ---\n{body}",
        problems.len(),
        problems.join("\n  ")
    );
    // The dashboard and the alerts between them query every metric of the contract.
    let unqueried: Vec<&str> = CONTRACT
        .iter()
        .map(|c| c.0)
        .filter(|family| {
            !used.iter().any(|u| {
                u == family
                    || u.strip_prefix(family)
                        .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
            })
        })
        .collect();
    assert!(
        unqueried.is_empty(),
        "no panel or alert queries {unqueried:?}"
    );

    // serve stops cleanly on SIGTERM.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = serve.child.wait().unwrap();
    assert!(status.success(), "serve exited {status}:\n{}", serve.log());
}
