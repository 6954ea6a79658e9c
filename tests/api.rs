//! The admin HTTP API over real HTTP: health from the history, bearer tokens in two scopes, runs
//! triggered, read, retried and cancelled, and clear JSON errors for bad input.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{RunningWorker, TestDb, wait_for_run};
use crm_sync::api::{self, AppState, Tokens};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const ADMIN: &str = "admin-token-for-tests-0001";
const READER: &str = "read-token-for-tests-0001";

struct Api {
    base: String,
    client: reqwest::Client,
    stop: CancellationToken,
}

impl Api {
    async fn start(db: &TestDb, config: &crm_sync::config::Config) -> Api {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = AppState {
            pool: db.pool.clone(),
            config: Arc::new(config.clone()),
            tokens: Arc::new(Tokens::new(vec![ADMIN.into()], vec![READER.into()])),
        };
        let stop = CancellationToken::new();
        tokio::spawn(api::serve(listener, state, stop.clone()));
        Api {
            base,
            client: reqwest::Client::new(),
            stop,
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
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
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
    assert_eq!(body["pipelines"][1]["last_status"], "succeeded");
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
