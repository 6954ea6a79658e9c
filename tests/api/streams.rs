//! Event streams under load: one change feed per process, the API on its own pool, caps per token and
//! in all, and streams that end when the process shuts down. `crm-sync serve` runs as a child process
//! here, as it does in production, so that its pools and its SIGTERM handling are the real ones.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use super::common::emulators::free_port;
use super::common::{ApiServer, TestDb, binary, terminate, write_config};

const ADMIN: &str = "streams-admin-Q7vR2xK9mP4wL8nT";
/// Four read tokens: 4 x 50 streams reach the overall cap of 200.
const READERS: [&str; 4] = [
    "streams-read-A1b2C3d4E5f6G7h8",
    "streams-read-J9k8L7m6N5p4Q3r2",
    "streams-read-S1t2U3v4W5x6Y7z8",
    "streams-read-Z9y8X7w6V5u4T3s2",
];

/// The pipelines `serve` runs; `elsewhere` is registered and queued, but no process here serves it.
const SERVED: &str = r#"
[worker]
poll_interval = "100ms"
shutdown_grace = "3s"

[[pipelines]]
name = "quick"
retry_backoff = "10ms"
source = { kind = "noop", steps = 2 }
"#;

const ELSEWHERE: &str = r#"
[[pipelines]]
name = "elsewhere"
source = { kind = "noop" }
"#;

/// `crm-sync serve` on a free port with the test tokens, until dropped.
struct Serve {
    child: Child,
    base: String,
}

impl Serve {
    async fn start(db: &TestDb, dir: &Path) -> Serve {
        let port = free_port();
        let config = write_config(
            dir,
            db,
            &format!("{SERVED}\n[server]\nlisten = \"127.0.0.1:{port}\"\n"),
        );
        let log = std::fs::File::create(dir.join("serve.log")).unwrap();
        let child = Command::new(binary())
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env_remove("DATABASE_URL")
            .env("CRM_SYNC_ADMIN_TOKENS", ADMIN)
            .env("CRM_SYNC_READ_TOKENS", READERS.join(","))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn crm-sync serve");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{base}/readyz")).send().await
                && r.status() == StatusCode::OK
            {
                break;
            }
            assert!(Instant::now() < deadline, "serve did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Serve { child, base }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens `count` streams on `path` with `token` and reads them in the background, as console tabs
/// do; each task ends when its stream ends and returns how long it stayed open.
async fn open_streams(
    base: &str,
    path: &str,
    token: &str,
    count: usize,
) -> Vec<tokio::task::JoinHandle<Instant>> {
    let mut readers = Vec::new();
    for _ in 0..count {
        // A client per stream: each its own connection, as separate tabs or scripts.
        let resp = reqwest::Client::new()
            .get(format!("{base}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "opening {path}");
        readers.push(tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            while let Some(Ok(_)) = body.next().await {}
            Instant::now()
        }));
    }
    readers
}

/// Triggers `quick` through the API and returns the time until it succeeded.
async fn end_to_end(db: &TestDb, base: &str) -> Duration {
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/pipelines/quick/runs"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let id: Uuid = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    loop {
        let status: String = sqlx::query_scalar("SELECT status FROM crm_sync.runs WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        match status.as_str() {
            "succeeded" => return started.elapsed(),
            "failed" | "cancelled" => panic!("run {id} {status}"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "run {id} hangs"
        );
    }
}

/// The median of nine end-to-end times.
async fn median_end_to_end(db: &TestDb, base: &str) -> Duration {
    let mut times = Vec::new();
    for _ in 0..9 {
        times.push(end_to_end(db, base).await);
    }
    times.sort();
    times[4]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_over_twenty_thousand_queued_runs_leave_other_runs_alone() {
    let db = TestDb::new().await;
    db.config(ELSEWHERE).await;
    let mut queued = 0;
    for _ in 0..2 {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM crm_sync.enqueue_runs('elsewhere', 10000, 'api')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        queued += n;
    }
    assert_eq!(queued, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&db, dir.path()).await;
    end_to_end(&db, &serve.base).await; // warm up
    let idle = median_end_to_end(&db, &serve.base).await;

    // 150 all-runs streams (console lists) and 50 followers of queued runs (console run pages).
    let mut streams = Vec::new();
    for token in &READERS[..3] {
        streams.extend(open_streams(&serve.base, "/api/events", token, 50).await);
    }
    let followed: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM crm_sync.runs WHERE pipeline = 'elsewhere' ORDER BY created_at LIMIT 50",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for id in followed {
        let path = format!("/api/runs/{id}/events");
        streams.extend(open_streams(&serve.base, &path, READERS[3], 1).await);
    }
    // Past the overall cap: refused with a body that says why.
    let refused = reqwest::Client::new()
        .get(format!("{}/api/events", serve.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("on this server"),
        "{body}"
    );

    let loaded = median_end_to_end(&db, &serve.base).await;
    println!(
        "unrelated run end to end: {idle:?} idle, {loaded:?} with 200 streams over 20,000 queued runs"
    );
    assert!(
        loaded <= idle * 2,
        "200 event streams slowed an unrelated run from {idle:?} to {loaded:?}"
    );
    assert!(
        streams.iter().all(|s| !s.is_finished()),
        "streams stay open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_twenty_open_streams_exits_within_the_grace_period() {
    let db = TestDb::new().await;
    db.config(ELSEWHERE).await;
    let waiting: Uuid = sqlx::query_scalar("SELECT crm_sync.enqueue_run('elsewhere')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(&db, dir.path()).await;
    let mut streams = open_streams(&serve.base, "/api/events", READERS[0], 10).await;
    let path = format!("/api/runs/{waiting}/events");
    streams.extend(open_streams(&serve.base, &path, READERS[1], 10).await);

    let asked = Instant::now();
    let status = terminate(&mut serve.child, Duration::from_secs(3));
    let took = asked.elapsed();
    println!("serve exited {took:?} after SIGTERM with 20 open streams");
    assert!(status.success(), "serve exited with {status}");
    for stream in streams {
        let ended = tokio::time::timeout(Duration::from_secs(1), stream)
            .await
            .expect("every stream ended with the process")
            .unwrap();
        assert!(ended.duration_since(asked) < Duration::from_secs(3));
    }
}

#[tokio::test]
async fn streams_past_the_caps_get_429_and_a_closed_stream_frees_its_slot() {
    let db = TestDb::new().await;
    let mut config = db.config(ELSEWHERE).await;
    config.server.max_event_streams = 3;
    config.server.max_event_streams_per_token = 2;
    let server = ApiServer::start(&db, &config, ADMIN, READERS[0]).await;
    let base = &server.base;
    let open = |token: &'static str| {
        let url = format!("{base}/api/events");
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        }
    };
    let first = open(READERS[0]).await;
    let _second = open(READERS[0]).await;
    let third = open(READERS[0]).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = third.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("with this token (2 of 2)"), "{error}");
    assert!(!error.contains(READERS[0]), "the token is not echoed");

    let _admin = open(ADMIN).await;
    let over = open(ADMIN).await;
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = over.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("on this server (3 of 3)"),
        "{body}"
    );

    // A tab closed: its slot comes back.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let again = open(READERS[0]).await;
        if again.status() == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "a closed stream kept its slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
