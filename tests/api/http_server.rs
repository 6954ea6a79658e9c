//! The HTTP server against slow clients and token guessing: half-sent requests do not starve
//! `/healthz` or the API and are closed after `[server] header_timeout`; a full connection table
//! makes room; a burst of wrong tokens is refused with 429, logged once with the address, counted;
//! `serve` refuses weak and placeholder tokens.

use super::common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ApiServer, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN: &str = "Jx7qLw2Rk9VbT4nZp8HsC3mY6dFg";
const READER: &str = "Rd5tVk8Qn2Lw7Xj4Pb9Hs3Mc6Yz";
const HALF_SENT: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n";

async fn server(server_toml: &str) -> (TestDb, ApiServer) {
    let db = TestDb::new().await;
    let config = db.config(&format!("[server]\n{server_toml}")).await;
    let api = ApiServer::start(&db, &config, ADMIN, READER).await;
    (db, api)
}

/// `n` connections, each with a request whose headers never end.
async fn half_sent(base: &str, n: usize) -> Vec<TcpStream> {
    let addr = base.trim_start_matches("http://");
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connection {i} was not accepted within 2 s"))
            .expect("connect");
        s.write_all(HALF_SENT).await.expect("write half a request");
        conns.push(s);
    }
    conns
}

/// `/healthz` and an authenticated API route, each answered within 1 s.
async fn answers_within_a_second(base: &str) {
    let client = reqwest::Client::new();
    for (path, token) in [("/healthz", None), ("/api/whoami", Some(ADMIN))] {
        let started = Instant::now();
        let mut req = client.get(format!("{base}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = tokio::time::timeout(Duration::from_secs(1), req.send())
            .await
            .unwrap_or_else(|_| panic!("{path} did not answer within 1 s"))
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        eprintln!("{path} answered in {:?}", started.elapsed());
    }
}

/// Waits until the server closes `conn`; how long that took from `since`.
async fn closed_by_server(mut conn: TcpStream, since: Instant, limit: Duration) -> Duration {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((since + limit).into(), conn.read(&mut buf)).await {
            Err(_) => panic!("a half-sent connection was still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => {} // a 408 or similar before the close
        }
    }
}

#[tokio::test]
async fn half_sent_requests_do_not_starve_healthz_and_are_closed_after_the_header_timeout() {
    let (_db, api) = server("header_timeout = \"2s\"").await;
    let started = Instant::now();
    let conns = half_sent(&api.base, 500).await;
    eprintln!("500 half-sent requests opened in {:?}", started.elapsed());
    answers_within_a_second(&api.base).await;
    let closes = futures::future::join_all(
        conns
            .into_iter()
            .map(|c| closed_by_server(c, started, Duration::from_secs(10))),
    )
    .await;
    let last = closes.iter().max().unwrap();
    let first = closes.iter().min().unwrap();
    eprintln!("half-sent connections closed by the server after {first:?} .. {last:?}");
    assert!(
        *first >= Duration::from_millis(1500),
        "closed too early: {first:?}"
    );
}

#[tokio::test]
async fn at_the_connection_cap_the_longest_idle_connections_make_room() {
    let (_db, api) = server("header_timeout = \"60s\"\nmax_connections = 100").await;
    let started = Instant::now();
    let mut conns = half_sent(&api.base, 500).await;
    answers_within_a_second(&api.base).await;
    // The oldest half-sent connections were closed to make room; the newest are still open.
    let oldest = conns.remove(0);
    closed_by_server(oldest, started, Duration::from_secs(5)).await;
    let mut newest = conns.pop().unwrap();
    let mut buf = [0u8; 16];
    let still_open = tokio::time::timeout(Duration::from_millis(300), newest.read(&mut buf)).await;
    assert!(
        still_open.is_err(),
        "the newest connection was closed: {still_open:?}"
    );
}

/// A log sink for this thread's tracing events (the test's server runs on the same thread).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn counter(text: &str, reason: &str) -> f64 {
    let prefix = format!("crm_sync_http_auth_failures_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_burst_of_wrong_tokens_is_refused_logged_once_and_counted() {
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let (_db, api) = server("").await;
    let client = reqwest::Client::new();
    let whoami = |token: &str| {
        client
            .get(format!("{}/api/whoami", api.base))
            .bearer_auth(token)
            .send()
    };
    let wrong = "Wr0ngT0kenGuess-abcdefghijklmnop";
    let mut statuses = Vec::new();
    for _ in 0..15 {
        statuses.push(whoami(wrong).await.unwrap().status().as_u16());
    }
    assert_eq!(statuses[..10], [401; 10], "{statuses:?}");
    assert_eq!(statuses[10..], [429; 5], "{statuses:?}");
    // A locked-out address waits even with the right token (documented), and is told how long.
    let locked = whoami(ADMIN).await.unwrap();
    assert_eq!(locked.status().as_u16(), 429);
    let retry: u64 = locked.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After: {retry}");
    let body: serde_json::Value = locked.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("too many failed authentications")
    );

    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("API authentication failed"))
        .collect();
    assert_eq!(lines.len(), 1, "{logged}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("peer=127.0.0.1"),
        "{}",
        lines[0]
    );
    assert!(
        !logged.contains(wrong) && !logged.contains(ADMIN),
        "{logged}"
    );

    let metrics = reqwest::get(format!("{}/metrics", api.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(counter(&metrics, "wrong_token"), 10.0);
    assert_eq!(counter(&metrics, "locked_out"), 6.0);
}

/// `crm-sync serve` with `CRM_SYNC_ADMIN_TOKENS` set to `admin`: its exit code and stderr, or
/// `None` when it is still serving after 5 s (stopped then).
async fn serve_with_admin_tokens(db: &TestDb, admin: &str) -> Option<(i32, String)> {
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(dir.path(), db, "");
    let log = dir.path().join("serve.log");
    let mut child = std::process::Command::new(common::binary())
        .arg("--config")
        .arg(&config)
        .args(["serve", "--no-workers", "--no-scheduler"])
        .env_remove("DATABASE_URL")
        .env_remove("CRM_SYNC_READ_TOKENS")
        .env("CRM_SYNC_ADMIN_TOKENS", admin)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((
                status.code().unwrap_or(-1),
                std::fs::read_to_string(&log).unwrap(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::terminate(&mut child, Duration::from_secs(10));
    None
}

#[tokio::test]
async fn serve_refuses_weak_and_placeholder_tokens_and_says_how_to_make_one() {
    let db = TestDb::new().await;
    for (tokens, problem) in [
        (
            format!("{ADMIN},aaaaaaaaaaaaaaaa"),
            "token 2 of 2 is too weak: it has 1 distinct characters",
        ),
        (
            "local-admin-token-Change-Me-7f3a9c".to_string(),
            "token 1 of 1 is a placeholder",
        ),
    ] {
        let (code, stderr) = serve_with_admin_tokens(&db, &tokens)
            .await
            .unwrap_or_else(|| panic!("serve accepted {problem}"));
        assert_ne!(code, 0);
        assert!(
            stderr.contains(&format!("CRM_SYNC_ADMIN_TOKENS: {problem}")),
            "{stderr}"
        );
        assert!(stderr.contains("openssl rand -base64 32"), "{stderr}");
        assert!(
            !stderr.contains("aaaaaaaaaaaaaaaa") && !stderr.contains("7f3a9c"),
            "{stderr}"
        );
    }
    assert_eq!(
        serve_with_admin_tokens(&db, ADMIN).await,
        None,
        "a strong token was refused"
    );
}

/// The status line the server answers on `conn`, if any before it closes.
async fn status_line(conn: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    text.lines().next().unwrap_or("").to_string()
}

#[tokio::test]
async fn a_request_not_answered_in_time_gets_408_but_event_streams_stay_open() {
    let db = TestDb::new().await;
    let config = db
        .config(
            "[server]\nrequest_timeout = \"1s\"\n\n[[pipelines]]\nname = \"noop\"\nsource = { kind = \"noop\" }\n",
        )
        .await;
    let api = ApiServer::start(&db, &config, ADMIN, READER).await;
    let addr = api.base.trim_start_matches("http://");
    // Headers complete (so the header timer is done), the body never: only the request timeout ends it.
    let mut slow_body = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/pipelines/noop/runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"params\": "
    );
    slow_body.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let line = tokio::time::timeout(Duration::from_secs(5), status_line(&mut slow_body))
        .await
        .expect("no answer within 5 s to a request whose body never ends");
    assert!(line.starts_with("HTTP/1.1 408"), "{line:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    let mut events = TcpStream::connect(addr).await.unwrap();
    let get =
        format!("GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\r\n");
    events.write_all(get.as_bytes()).await.unwrap();
    assert!(status_line(&mut events).await.starts_with("HTTP/1.1 200"));
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < deadline {
        match tokio::time::timeout_at(deadline.into(), events.read(&mut buf)).await {
            Err(_) => break, // still open, nothing more to say
            Ok(Ok(n)) if n > 0 => {}
            Ok(r) => panic!("the event stream ended before 2.5 s (request_timeout 1s): {r:?}"),
        }
    }
}

#[tokio::test]
async fn on_shutdown_a_request_in_flight_finishes_then_new_connections_are_refused() {
    let db = TestDb::new().await;
    let config = db
        .config("[[pipelines]]\nname = \"noop\"\nsource = { kind = \"noop\" }\n")
        .await;
    let api = ApiServer::start(&db, &config, ADMIN, READER).await;
    let addr = api.base.trim_start_matches("http://").to_string();
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/pipelines/noop/runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(api); // cancels the server's shutdown token
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.write_all(b"}").await.unwrap();
    let line = tokio::time::timeout(Duration::from_secs(5), status_line(&mut conn))
        .await
        .expect("the request in flight was not answered");
    assert!(line.starts_with("HTTP/1.1 202"), "{line:?}");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest))
        .await
        .expect("the connection stayed open after its last answer")
        .unwrap();
    assert!(
        TcpStream::connect(&addr).await.is_err(),
        "still accepting after shutdown"
    );
}
