//! The admin API under fire, against the real `crm-sync serve` (API, workers, scheduler in one
//! process): schemathesis generates requests from /api/openapi.json (valid and invalid, plus stateful
//! sequences that follow the links between operations) with an admin token, and checks every answer
//! against the document; then hand-made malformed requests (oversized, bad JSON, wrong content type,
//! huge headers, NUL bytes, broken encodings). Afterwards the process must not have panicked, must
//! still be healthy, and must still run a pipeline.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestDb;
use serde_json::{Value, json};

const ADMIN: &str = "Fa9Nq4Wv7Kx2Lr8Tb3Hp6Zm5Jd";
const READER: &str = "Fr2Vx8Nq5Kw9Lt3Pb7Hm4Zj6Yd";

/// A few noop pipelines: quick, failing (so retry has something to do), slow (cancel), multi-step,
/// scheduled. No freshness SLA: a stale pipeline's documented 503 on /health/pipelines is what
/// tests/api.rs checks; here every 5xx is a defect.
const PIPELINES: &str = r#"
[worker]
concurrency = 8
poll_interval = "100ms"

[[pipelines]]
name = "noop"
source = { kind = "noop" }

[[pipelines]]
name = "flaky"
max_attempts = 2
retry_backoff = "10ms"
source = { kind = "noop", fail_times = 2 }

[[pipelines]]
name = "slow"
max_concurrent_runs = 0
source = { kind = "noop", sleep_ms = 300 }

[[pipelines]]
name = "steps.three"
source = { kind = "noop", steps = 3 }

[[pipelines]]
name = "nightly"
schedule = "0 1 * * *"
timezone = "America/Toronto"
source = { kind = "noop" }
"#;

/// `crm-sync serve` as a child process with admin and read tokens; killed on drop.
struct Serve {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Serve {
    async fn start(db: &TestDb, dir: &Path) -> Serve {
        let port = free_port();
        let config = common::write_config(
            dir,
            db,
            // No lockout: schemathesis sends wrong tokens, and locked out it would reach no handler.
            &format!(
                "{PIPELINES}\n[server]\nlisten = \"127.0.0.1:{port}\"\nauth_failures_per_minute = 0\n"
            ),
        );
        let log = dir.join("serve.log");
        let child = Command::new(common::binary())
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env_remove("DATABASE_URL")
            .env("CRM_SYNC_ADMIN_TOKENS", ADMIN)
            .env("CRM_SYNC_READ_TOKENS", READER)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn crm-sync serve");
        let serve = Serve {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        serve.wait_ready().await;
        serve
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/readyz", self.base)).await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "serve not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Still running, no panic in its log, ready, and a run still goes through.
    async fn assert_healthy(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "serve exited:\n{}",
            self.log()
        );
        let log = self.log();
        assert!(!log.contains("panicked"), "serve panicked:\n{log}");
        self.wait_ready().await;
        let http = reqwest::Client::new();
        let created: Value = http
            .post(format!("{}/api/pipelines/noop/runs", self.base))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["id"].as_str().expect("run id").to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let run: Value = http
                .get(format!("{}/api/runs/{id}", self.base))
                .bearer_auth(READER)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if run["status"] == "succeeded" {
                break;
            }
            assert!(Instant::now() < deadline, "run after fuzzing: {run}");
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `st` executable: `CRM_SYNC_SCHEMATHESIS_BIN`, or what `scripts/schemathesis.sh install` prints.
fn schemathesis() -> PathBuf {
    if let Ok(bin) = std::env::var("CRM_SYNC_SCHEMATHESIS_BIN") {
        return bin.into();
    }
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/schemathesis.sh"
    ))
    .arg("install")
    .stderr(Stdio::inherit())
    .output()
    .expect("run scripts/schemathesis.sh");
    assert!(
        out.status.success(),
        "scripts/schemathesis.sh install failed"
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("SCHEMATHESIS_BIN="))
        .expect("SCHEMATHESIS_BIN= line")
        .into()
}

/// The newest report file in `dir` whose name starts with `prefix`.
fn report(dir: &Path, prefix: &str) -> Value {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    files.sort();
    let file = files
        .pop()
        .unwrap_or_else(|| panic!("no {prefix} report in {dir:?}"));
    serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_or_schema_violation() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(&db, dir.path()).await;
    let st = schemathesis();
    let seed = std::env::var("CRM_SYNC_FUZZ_SEED").unwrap_or_else(|_| "20261124".into());
    let examples = std::env::var("CRM_SYNC_FUZZ_EXAMPLES").unwrap_or_else(|_| "100".into());
    let reports = dir.path().join("reports");
    let started = Instant::now();
    let out = Command::new(&st)
        .arg("run")
        .arg(format!("{}/api/openapi.json", serve.base))
        .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
        .args(["--checks", "all"])
        .args(["--max-examples", &examples, "--seed", &seed])
        // The event streams never end by design: a fuzzer request would wait for its timeout.
        .args(["--exclude-path", "/api/events"])
        .args(["--exclude-path", "/api/runs/{id}/events"])
        .args(["--request-timeout", "10", "--workers", "1"])
        .args(["--report", "json,har", "--report-dir"])
        .arg(&reports)
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .output()
        .expect("run schemathesis");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);

    let summary = report(&reports, "json-");
    let har = report(&reports, "har-");
    let entries = har["log"]["entries"].as_array().expect("HAR entries");
    let mut by_status = std::collections::BTreeMap::<i64, usize>::new();
    for e in entries {
        *by_status
            .entry(e["response"]["status"].as_i64().unwrap_or(0))
            .or_default() += 1;
    }
    let server_errors: usize = by_status
        .iter()
        .filter(|(s, _)| **s >= 500)
        .map(|(_, n)| n)
        .sum();
    let failures = summary["failures"].as_array().cloned().unwrap_or_default();
    eprintln!(
        "schemathesis {} (seed {seed}, {examples} examples per operation): {} of {} operations tested, \
         {} test cases, {} requests in {:.0?}; {} failures, {server_errors} 5xx; statuses {by_status:?}",
        summary["schemathesis_version"],
        summary["operations"]["tested"],
        summary["operations"]["total"],
        summary["test_cases"]["generated"],
        entries.len(),
        elapsed,
        failures.len(),
    );

    assert_eq!(
        summary["operations"]["tested"].as_u64(),
        summary["operations"]["selected"].as_u64(),
        "{stdout}"
    );
    assert!(
        entries.len() > 300,
        "too few requests for a fuzzing run: {}",
        entries.len()
    );
    assert!(
        failures.is_empty() && summary["errors"].as_array().is_none_or(Vec::is_empty),
        "schemathesis found problems:\n{stdout}"
    );
    assert_eq!(server_errors, 0, "{stdout}");
    assert!(
        out.status.success(),
        "st exited {:?}:\n{stdout}",
        out.status
    );
    serve.assert_healthy().await;
}

/// A raw HTTP/1.1 exchange (reqwest refuses to send some of these), returning the status and body.
async fn raw(base: &str, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    // The server may answer and close before it has read everything (a too-large header).
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn malformed_requests_get_a_4xx_naming_the_problem() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(&db, dir.path()).await;
    let base = serve.base.clone();
    let http = reqwest::Client::new();
    let post = |body: Vec<u8>, content_type: Option<&str>| {
        let mut req = http
            .post(format!("{base}/api/pipelines/noop/runs"))
            .bearer_auth(ADMIN)
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        req
    };
    let json_ct = Some("application/json");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "1 MiB body",
            post(vec![b' '; 1 << 20], json_ct),
            413,
            "larger than 64 KiB",
        ),
        (
            "65 KiB of params",
            post(
                json!({ "x": "y".repeat(65 * 1024) })
                    .to_string()
                    .into_bytes(),
                json_ct,
            ),
            413,
            "larger than 64 KiB",
        ),
        (
            "truncated JSON",
            post(b"{\"sleep_ms\": ".to_vec(), json_ct),
            400,
            "not valid JSON: EOF while parsing",
        ),
        (
            "trailing garbage",
            post(b"{} {}".to_vec(), json_ct),
            400,
            "not valid JSON: trailing characters",
        ),
        (
            "not UTF-8",
            post(
                vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'],
                json_ct,
            ),
            400,
            "not valid JSON",
        ),
        (
            "nested 10,000 deep",
            post(deep.into_bytes(), json_ct),
            400,
            "recursion limit exceeded",
        ),
        (
            "an array",
            post(b"[1, 2]".to_vec(), json_ct),
            400,
            "must be a JSON object of run parameters, not an array",
        ),
        (
            "a NUL character",
            post(br#"{"a": "x\u0000y"}"#.to_vec(), json_ct),
            400,
            "params.a contains a NUL character",
        ),
        (
            "a number too large",
            post(br#"{"a": 1e308}"#.to_vec(), json_ct),
            400,
            "params.a is a number too large",
        ),
        (
            "a number past f64",
            post(br#"{"a": 1e400}"#.to_vec(), json_ct),
            400,
            "number out of range",
        ),
        (
            "text/plain",
            post(b"{}".to_vec(), Some("text/plain")),
            415,
            "Content-Type \"text/plain\" is not JSON",
        ),
        (
            "form encoded (curl -d)",
            post(
                b"sleep_ms=5".to_vec(),
                Some("application/x-www-form-urlencoded"),
            ),
            415,
            "is not JSON",
        ),
        (
            "no content type",
            post(b"{\"sleep_ms\": 5}".to_vec(), None),
            415,
            "the body has no Content-Type",
        ),
        (
            "a 100 KB Idempotency-Key",
            post(Vec::new(), None).header("idempotency-key", "k".repeat(100_000)),
            400,
            "Idempotency-Key must be 1-200",
        ),
        (
            "a 100 KB token",
            http.get(format!("{base}/api/runs"))
                .bearer_auth("t".repeat(100_000)),
            401,
            "missing or malformed bearer token",
        ),
        (
            "no token on an event stream",
            http.get(format!("{base}/api/events")),
            401,
            "missing or malformed bearer token",
        ),
        (
            "a bad run id on an event stream",
            http.get(format!("{base}/api/runs/nope/events"))
                .bearer_auth(ADMIN),
            400,
            "\"nope\" is not a run id",
        ),
        (
            "a NUL in a pipeline name",
            http.post(format!("{base}/api/pipelines/no%00op/runs"))
                .bearer_auth(ADMIN),
            400,
            "pipeline name contains a NUL character",
        ),
        (
            "a NUL in a filter",
            http.get(format!("{base}/api/runs?pipeline=a%00b"))
                .bearer_auth(ADMIN),
            400,
            "pipeline must not contain NUL characters",
        ),
        (
            "the year 0",
            http.get(format!("{base}/api/runs?before=0000-01-01T00:00:00Z"))
                .bearer_auth(ADMIN),
            400,
            "before must be an RFC 3339 instant between the years 1 and 9999",
        ),
        (
            "limit not a number",
            http.get(format!("{base}/api/runs?limit=1e3"))
                .bearer_auth(ADMIN),
            400,
            "limit: invalid digit",
        ),
        (
            "percent-encoding of invalid UTF-8",
            http.get(format!("{base}/api/runs/%ff%fe"))
                .bearer_auth(ADMIN),
            400,
            "UTF-8",
        ),
        (
            "an unknown route",
            http.get(format!("{base}/api/nothing-here"))
                .bearer_auth(ADMIN),
            404,
            "not found",
        ),
        (
            "a wrong method",
            http.delete(format!("{base}/api/runs")).bearer_auth(ADMIN),
            405,
            "method not allowed",
        ),
    ];
    let count = cases.len();
    for (what, request, status, message) in cases {
        // The server answers an oversized body (413) before reading all of it and closes the
        // connection; a client still writing may see a broken pipe instead of the answer. That race
        // is the client's, so such a send is tried again (the answer itself is still checked).
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            match request.try_clone().expect("cloneable request").send().await {
                Ok(resp) => break resp,
                Err(e) if e.is_request() && attempt < 5 => {
                    eprintln!("{what}: attempt {attempt}: {e}; trying again");
                }
                Err(e) => panic!("{what}: {e}"),
            }
        };
        let got = resp.status().as_u16();
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
        let body = resp.text().await.unwrap();
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(content_type, "application/json", "{what}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{what}: {body}"));
        let error = error["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(message),
            "{what}: want {message:?} in {error:?}"
        );
        assert!(error.len() < 1000, "{what}: the error repeats the input");
    }

    // Past hyper's header buffer (~400 KB) the connection gets 431 from hyper itself, before any
    // handler: the status names the problem, there is no body to make JSON.
    let huge = format!(
        "GET /api/runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nX-Big: {}\r\n\r\n",
        "h".repeat(1 << 20)
    );
    let (status, _) = raw(&base, huge.as_bytes()).await;
    assert_eq!(status, 431, "1 MiB header");
    let many: String = (0..500).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (status, _) = raw(
        &base,
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 431, "500 headers");
    let (status, body) = raw(
        &base,
        b"GET /api/runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
    )
    .await;
    assert_eq!(status, 401, "a non-ASCII token: {body}");
    let (status, _) = raw(&base, b"NOT-HTTP\r\n\r\n").await;
    assert_eq!(status, 400, "garbage request line");

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_sync.runs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "a malformed request created a run");
    eprintln!("{count} malformed requests and 4 raw ones refused with a 4xx naming the problem");
    serve.assert_healthy().await;
}
