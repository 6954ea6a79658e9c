//! The admin HTTP API over real HTTP: health from the history, bearer tokens in two scopes, runs
//! triggered, read, retried and cancelled, and clear JSON errors for bad input.

mod common;
#[path = "api/http_server.rs"]
mod http_server;
#[path = "api/streams.rs"]
mod streams;

use std::sync::Arc;
use std::time::Duration;

use common::{ApiServer, RunningWorker, TestDb, wait_for_run};
use crm_sync::metrics::Metrics;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

const ADMIN: &str = "Ta8Kq3Vw7Nx2Lp9Rb5Hm4Zc6Jd";
const READER: &str = "Tr5Xn8Qw2Vk7Lb4Pz9Hc3Mj6Yd";

struct Api {
    base: String,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    _server: ApiServer,
}

impl Api {
    async fn start(db: &TestDb, config: &crm_sync::config::Config) -> Api {
        let server = ApiServer::start(db, config, ADMIN, READER).await;
        Api {
            base: server.base.clone(),
            client: reqwest::Client::new(),
            metrics: server.metrics.clone(),
            _server: server,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn metrics(&self) -> String {
        let resp = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        resp.text().await.unwrap()
    }
}

/// Polls `check` until it holds; fails the test after `timeout`.
async fn eventually<F, Fut>(timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the sample of `name` whose labels include every `labels` pair.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let metric = l.split(['{', ' ']).next().unwrap_or_default();
            metric == name
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

const CONFIG: &str = r#"
[worker]
poll_interval = "100ms"

[[pipelines]]
name = "noop"
freshness_sla = "1h"
retry_backoff = "10ms"
source = { kind = "noop" }

[[pipelines]]
name = "broken"
source = { kind = "noop", fail_times = 1, fail_kind = "terminal" }

[[pipelines]]
name = "flaky"
retry_backoff = "10ms"
source = { kind = "noop", fail_times = 1, steps = 2, fail_step = "noop_2" }

[[pipelines]]
name = "slow"
source = { kind = "noop", sleep_ms = 700, steps = 2 }
"#;

#[tokio::test]
async fn health_reflects_the_history() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    let api = Api::start(&db, &config).await;
    assert_eq!(
        api.call("GET", "/healthz", None, None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        api.call("GET", "/readyz", None, None).await.0,
        StatusCode::OK
    );
    let (status, body) = api.call("GET", "/health/pipelines", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["stale"], json!(["noop"]));

    let worker = RunningWorker::start(&db, &config).await;
    let (status, body) = api
        .call("POST", "/api/pipelines/noop/runs", Some(ADMIN), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        wait_for_run(&db.pool, id, Duration::from_secs(10)).await,
        "succeeded"
    );
    worker.stop().await;
    let (status, body) = api.call("GET", "/health/pipelines", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let noop = body["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pipeline"] == "noop")
        .unwrap();
    assert_eq!(noop["last_status"], "succeeded", "{body}");
}

#[tokio::test]
async fn tokens_scopes_and_run_actions() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    let api = Api::start(&db, &config).await;

    let (status, body) = api.call("GET", "/api/runs", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"].as_str().unwrap().contains("bearer token"),
        "{body}"
    );
    assert_eq!(
        api.call("GET", "/api/runs", Some("wrong-token-0000000000"), None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.call("GET", "/api/runs", Some(READER), None).await.0,
        StatusCode::OK
    );
    let (status, body) = api
        .call("POST", "/api/pipelines/noop/runs", Some(READER), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("needs an admin token"),
        "{body}"
    );

    // Idempotency-Key: a repeat returns the same run.
    let post = |key: &'static str| {
        api.client
            .post(format!("{}/api/pipelines/broken/runs", api.base))
            .bearer_auth(ADMIN)
            .header("Idempotency-Key", key)
            .json(&json!({"note": "from the API test"}))
            .send()
    };
    let first: Value = post("k-1").await.unwrap().json().await.unwrap();
    let again: Value = post("k-1").await.unwrap().json().await.unwrap();
    assert_eq!(first["id"], again["id"]);
    let failed: Uuid = first["id"].as_str().unwrap().parse().unwrap();

    let worker = RunningWorker::start(&db, &config).await;
    assert_eq!(
        wait_for_run(&db.pool, failed, Duration::from_secs(10)).await,
        "failed"
    );
    let (status, body) = api
        .call("GET", &format!("/api/runs/{failed}"), Some(READER), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["steps"][0]["attempt_log"][0]["outcome"], "failed",
        "{body}"
    );
    assert_eq!(body["params"], json!({"note": "from the API test"}));
    // Why it failed, for clients deciding between Retry and Rerun.
    assert_eq!(
        body["failure"],
        json!({"step": "noop", "class": "terminal", "retry_repeats_failure": false}),
        "{body}"
    );
    assert_eq!(body["retried_by"], Value::Null, "{body}");

    let (status, body) = api
        .call(
            "POST",
            &format!("/api/runs/{failed}/retry"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let retried: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        wait_for_run(&db.pool, retried, Duration::from_secs(10)).await,
        "succeeded"
    );
    worker.stop().await;
    let (status, body) = api
        .call(
            "POST",
            &format!("/api/runs/{failed}/retry"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (_, body) = api
        .call("GET", &format!("/api/runs/{failed}"), Some(READER), None)
        .await;
    assert_eq!(body["retried_by"], json!(retried), "the retry is named");
    let (status, body) = api
        .call(
            "POST",
            &format!("/api/runs/{retried}/rerun"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let rerun = body["id"].as_str().unwrap().to_string();
    let (status, _) = api
        .call(
            "POST",
            &format!("/api/runs/{rerun}/cancel"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = api
        .call("GET", "/api/runs?status=cancelled", Some(READER), None)
        .await;
    assert_eq!(body["runs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_input_gets_a_4xx_that_names_the_problem() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    let api = Api::start(&db, &config).await;
    let cases: Vec<(&str, String, Option<Value>, StatusCode, &str)> = vec![
        (
            "POST",
            "/api/pipelines/nope/runs".into(),
            None,
            StatusCode::NOT_FOUND,
            "unknown pipeline \"nope\"",
        ),
        (
            "POST",
            "/api/pipelines/noop/runs".into(),
            Some(json!([1])),
            StatusCode::BAD_REQUEST,
            "must be a JSON object",
        ),
        (
            "GET",
            "/api/runs/not-a-uuid".into(),
            None,
            StatusCode::BAD_REQUEST,
            "is not a run id",
        ),
        (
            "GET",
            format!("/api/runs/{}", Uuid::nil()),
            None,
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            "GET",
            "/api/runs?status=done".into(),
            None,
            StatusCode::BAD_REQUEST,
            "status \"done\"",
        ),
        (
            "GET",
            "/api/runs?limit=0".into(),
            None,
            StatusCode::BAD_REQUEST,
            "limit must be",
        ),
        (
            "GET",
            "/api/runs?colour=red".into(),
            None,
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            "POST",
            format!("/api/runs/{}/cancel", Uuid::nil()),
            None,
            StatusCode::NOT_FOUND,
            "not found",
        ),
    ];
    for (method, path, body, expected, message) in cases {
        let (status, reply) = api.call(method, &path, Some(ADMIN), body).await;
        assert_eq!(status, expected, "{method} {path}: {reply}");
        assert!(
            reply["error"]
                .as_str()
                .unwrap_or_default()
                .contains(message),
            "{method} {path}: {reply}"
        );
    }
    let big = "x".repeat(100_000);
    let (status, _) = api
        .call(
            "POST",
            "/api/pipelines/noop/runs",
            Some(ADMIN),
            Some(json!({ "big": big })),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn metrics_count_runs_retries_and_read_the_queue() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    let api = Api::start(&db, &config).await;

    // Nothing ran yet: the queue gauges are there, the never-succeeded SLA pipeline is stale.
    let text = api.metrics().await;
    assert_eq!(
        sample(&text, "crm_sync_queue_depth", &[("state", "queued")]),
        Some(0.0)
    );
    assert_eq!(sample(&text, "crm_sync_workers_alive", &[]), Some(0.0));
    assert_eq!(
        sample(&text, "crm_sync_pipeline_stale", &[("pipeline", "noop")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "crm_sync_pipeline_freshness_sla_seconds",
            &[("pipeline", "noop")]
        ),
        Some(3600.0)
    );
    assert_eq!(
        sample(&text, "crm_sync_pipeline_stale", &[("pipeline", "broken")]),
        None
    );
    assert!(text.contains("crm_sync_build_info{version=\""), "{text}");

    // Work waiting with no worker: counted as queued, and aged.
    let mut ids = Vec::new();
    for pipeline in ["noop", "broken", "flaky"] {
        let (status, body) = api
            .call(
                "POST",
                &format!("/api/pipelines/{pipeline}/runs"),
                Some(ADMIN),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        ids.push(body["id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = api.metrics().await;
    assert_eq!(
        sample(&text, "crm_sync_queue_depth", &[("state", "queued")]),
        Some(3.0)
    );
    let age = sample(&text, "crm_sync_oldest_queued_step_age_seconds", &[]).unwrap();
    assert!(age >= 0.2, "oldest queued age {age}");

    let worker = RunningWorker::start_with_metrics(&db, &config, api.metrics.clone()).await;
    let expected = ["succeeded", "failed", "succeeded"];
    for (id, want) in ids.iter().zip(expected) {
        assert_eq!(
            wait_for_run(&db.pool, *id, Duration::from_secs(10)).await,
            want
        );
    }
    // A run held by the worker while we look.
    let (_, body) = api
        .call("POST", "/api/pipelines/slow/runs", Some(ADMIN), None)
        .await;
    let slow: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    eventually(Duration::from_secs(5), || async {
        let text = api.metrics().await;
        sample(&text, "crm_sync_worker_busy_slots", &[]) == Some(1.0)
            && sample(&text, "crm_sync_queue_depth", &[("state", "running")]) == Some(1.0)
    })
    .await;
    let text = api.metrics().await;
    assert_eq!(sample(&text, "crm_sync_workers_alive", &[]), Some(1.0));
    assert_eq!(
        sample(&text, "crm_sync_worker_slots", &[]),
        Some(config.worker.concurrency as f64)
    );
    let (status, _) = api
        .call(
            "POST",
            &format!("/api/runs/{slow}/cancel"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually(Duration::from_secs(5), || async {
        sample(&api.metrics().await, "crm_sync_worker_busy_slots", &[]) == Some(0.0)
    })
    .await;
    worker.stop().await;

    let text = api.metrics().await;
    let runs = |pipeline: &str, status: &str| {
        sample(
            &text,
            "crm_sync_runs_total",
            &[
                ("pipeline", pipeline),
                ("status", status),
                ("trigger", "api"),
            ],
        )
    };
    assert_eq!(runs("noop", "succeeded"), Some(1.0), "{text}");
    assert_eq!(runs("broken", "failed"), Some(1.0));
    assert_eq!(runs("flaky", "succeeded"), Some(1.0));
    assert_eq!(runs("flaky", "failed"), None);
    assert_eq!(runs("slow", "cancelled"), Some(1.0));
    assert_eq!(
        sample(
            &text,
            "crm_sync_step_retries_total",
            &[("pipeline", "flaky"), ("step", "noop_2")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "crm_sync_step_retries_total",
            &[("pipeline", "flaky"), ("step", "noop_1")]
        ),
        None
    );
    // Every attempt is timed: flaky's second step ran twice.
    assert_eq!(
        sample(
            &text,
            "crm_sync_step_duration_seconds_count",
            &[("pipeline", "flaky"), ("step", "noop_2")]
        ),
        Some(2.0)
    );
    let last = sample(
        &text,
        "crm_sync_last_success_timestamp_seconds",
        &[("pipeline", "noop")],
    )
    .expect("noop succeeded");
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((now - last).abs() < 60.0, "last success {last}, now {now}");
    assert_eq!(
        sample(&text, "crm_sync_pipeline_stale", &[("pipeline", "noop")]),
        Some(0.0)
    );
    assert_eq!(sample(&text, "crm_sync_workers_alive", &[]), Some(0.0));
    // Labels never carry run ids.
    for id in ids.iter().chain([&slow]) {
        assert!(!text.contains(&id.to_string()));
    }
}

#[tokio::test]
async fn run_events_stream_state_changes_until_the_run_ends() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    let api = Api::start(&db, &config).await;
    let (_, body) = api
        .call("POST", "/api/pipelines/slow/runs", Some(ADMIN), None)
        .await;
    let id: Uuid = body["id"].as_str().unwrap().parse().unwrap();

    let (status, body) = api
        .call("GET", &format!("/api/runs/{id}/events"), None, None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = api
        .call(
            "GET",
            &format!("/api/runs/{}/events", Uuid::nil()),
            Some(READER),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let resp = api
        .client
        .get(format!("{}/api/runs/{id}/events", api.base))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let worker = RunningWorker::start(&db, &config).await;
    // The stream ends by itself once the run has finished.
    let text = tokio::time::timeout(Duration::from_secs(20), resp.text())
        .await
        .expect("the stream ended after the run finished")
        .unwrap();
    worker.stop().await;

    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let kind = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((kind.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect();
    assert_eq!(events[0].0, "snapshot", "{text}");
    assert_eq!(events[0].1["status"], "queued");
    let step_states: Vec<(String, String)> = events
        .iter()
        .filter(|(k, _)| k == "step")
        .map(|(_, d)| {
            (
                d["name"].as_str().unwrap().into(),
                d["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    for step in ["noop_1", "noop_2"] {
        for state in ["running", "succeeded"] {
            assert!(
                step_states.contains(&(step.into(), state.into())),
                "{step} {state} missing from {step_states:?}"
            );
        }
    }
    let run_states: Vec<&str> = events
        .iter()
        .filter(|(k, _)| k == "run")
        .map(|(_, d)| d["status"].as_str().unwrap())
        .collect();
    assert_eq!(run_states, ["running", "succeeded"], "{text}");
}

#[tokio::test]
async fn openapi_documents_every_route() {
    let db = TestDb::new().await;
    let config = db.config(CONFIG).await;
    let api = Api::start(&db, &config).await;
    let (status, doc) = api.call("GET", "/api/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let schemas = &doc["components"]["schemas"];
    for field in ["retried_by", "failure"] {
        // RunDetail is the run summary (flattened) and its own fields: `allOf`.
        let parts = schemas["RunDetail"]["allOf"].as_array().unwrap();
        assert!(
            parts.iter().any(|p| p["properties"][field].is_object()),
            "RunDetail.{field} undocumented: {}",
            schemas["RunDetail"]
        );
    }
    assert!(schemas["RunFailure"]["properties"]["retry_repeats_failure"].is_object());
    let documented: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let routes = [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/health/pipelines"),
        ("GET", "/metrics"),
        ("GET", "/api/openapi.json"),
        ("GET", "/api/whoami"),
        ("GET", "/api/events"),
        ("GET", "/api/pipelines"),
        ("POST", "/api/pipelines/{name}/runs"),
        ("POST", "/api/pipelines/{name}/disable"),
        ("POST", "/api/pipelines/{name}/enable"),
        ("GET", "/api/runs"),
        ("GET", "/api/runs/{id}"),
        ("GET", "/api/runs/{id}/events"),
        ("POST", "/api/runs/{id}/retry"),
        ("POST", "/api/runs/{id}/rerun"),
        ("POST", "/api/runs/{id}/cancel"),
    ];
    for (method, path) in routes {
        assert!(
            documented.contains(&(method.to_string(), path.to_string())),
            "{method} {path} is not in the OpenAPI document: {documented:?}"
        );
    }
    assert_eq!(documented.len(), routes.len(), "{documented:?}");
    // Every documented operation is routed: the router answers it (a missing route would be an
    // empty 404 or a 405, never a JSON body naming the problem).
    for (method, path) in documented.iter().filter(|(_, p)| p != "/api/events") {
        let concrete = path
            .replace("{name}", "noop")
            .replace("{id}", &Uuid::nil().to_string());
        let resp = api
            .client
            .request(method.parse().unwrap(), format!("{}{concrete}", api.base))
            .bearer_auth(READER)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.text().await.unwrap();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            status != StatusCode::NOT_FOUND || body.contains("not found"),
            "{method} {path} is not routed: {status} {body}"
        );
    }
    // Admin-only operations say so, and the bearer scheme is declared.
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(
        doc["components"]["schemas"]["RunDetail"].is_object(),
        "{doc}"
    );
}

#[tokio::test]
async fn console_support_scope_pipelines_and_the_all_runs_stream() {
    let db = TestDb::new().await;
    let scheduled = CONFIG.replacen(
        "name = \"noop\"\n",
        "name = \"noop\"\nschedule = \"0 2 * * *\"\ntimezone = \"Asia/Singapore\"\n",
        1,
    );
    let config = db.config(&scheduled).await;
    let api = Api::start(&db, &config).await;

    let (status, me) = api.call("GET", "/api/whoami", Some(READER), None).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["scope"], "read");
    let (_, me) = api.call("GET", "/api/whoami", Some(ADMIN), None).await;
    assert_eq!(me["scope"], "admin");

    let (status, body) = api.call("GET", "/api/pipelines", Some(READER), None).await;
    assert_eq!(status, StatusCode::OK);
    let by_name = |name: &str| {
        body["pipelines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not listed: {body}"))
    };
    let noop = &by_name("noop");
    assert_eq!(noop["served"], false, "no worker runs: {noop}");
    let local = noop["next_fire_local"].as_str().unwrap();
    assert!(local.ends_with("T02:00:00+08:00"), "{noop}");
    let utc: chrono::DateTime<chrono::Utc> =
        noop["next_fire_utc"].as_str().unwrap().parse().unwrap();
    assert_eq!(utc.format("%H:%M").to_string(), "18:00");
    assert_eq!(noop["freshness_sla_s"], 3600);
    assert_eq!(noop["stale"], true);
    assert_eq!(noop["last_status"], Value::Null);
    assert_eq!(by_name("broken")["next_fire_utc"], Value::Null);

    // The all-runs stream reports a new run and its status changes.
    let resp = api
        .client
        .get(format!("{}/api/events", api.base))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, created) = api
        .client
        .post(format!("{}/api/pipelines/noop/runs", api.base))
        .bearer_auth(ADMIN)
        .header("X-Crm-Sync-Client", "console")
        .send()
        .await
        .map(|r| ((), r))
        .unwrap();
    let id = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let worker = RunningWorker::start(&db, &config).await;
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let seen_success = tokio::time::timeout(Duration::from_secs(15), async {
        use futures_util::StreamExt;
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains(&format!("\"id\":\"{id}\""))
                && text.contains("\"status\":\"succeeded\"")
            {
                return;
            }
        }
    })
    .await;
    worker.stop().await;
    assert!(
        seen_success.is_ok(),
        "no succeeded event for {id} in: {text}"
    );
    assert!(text.contains("event: run"), "{text}");
    assert!(text.contains("\"trigger\":\"console\""), "{text}");

    let (_, after) = api.call("GET", "/api/pipelines", Some(READER), None).await;
    let noop = after["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "noop")
        .unwrap();
    assert_eq!(noop["last_status"], "succeeded");
    assert_eq!(noop["stale"], false);
}

/// `/readyz` says which of its two 503s it is: the database cannot be reached, or it is reached and
/// its schema is not migrated.
#[tokio::test]
async fn readyz_tells_an_unreachable_database_from_an_outdated_schema() {
    let readyz = |pool: crm_sync::db::Db| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = crm_sync::api::AppState::new(
            pool,
            Arc::new(crm_sync::config::Config::parse("", std::path::Path::new("t.toml")).unwrap()),
            crm_sync::api::Tokens::default(),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(crm_sync::api::serve(listener, state, stop.clone()));
        let resp = reqwest::get(format!("{base}/readyz")).await.unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        stop.cancel();
        (status, body)
    };

    // Reached, never migrated.
    let empty = TestDb::empty().await;
    let (status, body) = readyz(empty.pool.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("schema is not current"),
        "{body}"
    );

    // Nothing listens where the pool points.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let unreachable = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(2))
        .connect_lazy(&format!("postgres://postgres@127.0.0.1:{port}/postgres"))
        .unwrap();
    let (status, body) = readyz(unreachable.into()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["reason"], "database unreachable", "{body}");

    // And migrated: ready.
    let db = TestDb::new().await;
    let (status, body) = readyz(db.pool.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
