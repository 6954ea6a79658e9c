//! Secrets never leave the places they belong. One run of the real binaries with recognisable secret
//! values everywhere a secret goes (the EZ Focus key from the environment, user and password, the
//! password from a secret file, admin and read API tokens, two webhook URLs with a secret path, and
//! a database password in DATABASE_URL for a role of its own): a successful EZ Focus run, a run
//! refused with 401 and one failing with 500 by a source that echoes the request (query string and
//! Authorization header) back in its answer, failure webhooks to a local receiver, CLI errors and
//! check-config on a broken file. Then everything the service wrote or answered is searched: logs at
//! RUST_LOG=debug in text and JSON, every API response and /metrics, the crm_sync schema (pg_dump),
//! the webhook requests, backup objects (names and contents).

mod common;
#[path = "secrets/private_files.rs"]
mod private_files;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use base64::Engine;
use common::{TestDb, wait_until};
use crm_sync::fixtures::ezfocus::{Dataset, EzFocusConfig, EzFocusFixture};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;

const EZ_KEY: &str = "5ec7e75e-c7e7-4e7a-8e7a-5ec7e75ec7e7";
const EZ_USER: &str = "SECRET-USER-b71f0d";
const EZ_PASSWORD: &str = "SECRET-PASS-e0c9a4";
const ADMIN_TOKEN: &str = "SECRET-ADMIN-TOKEN-4c1d7e92";
const READ_TOKEN: &str = "SECRET-READ-TOKEN-93ab07f1";
const HOOK_SECRET: &str = "SECRET-HOOK-2f8e61";
const SLACK_SECRET: &str = "SECRET-SLACK-7d3c95";
const DB_PASSWORD: &str = "SECRET-DB-PW-a64be3";

/// A database role with a password of its own; dropped after the test with what it owns and was
/// granted in the test database (the ezfocus schema it created).
struct Role(String, String);

impl Role {
    async fn create(db: &TestDb) -> Role {
        let name = format!("crm_sync_secret_{}", &db.name[14..]);
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&common::admin_url())
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {name} LOGIN PASSWORD '{DB_PASSWORD}'"
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
        // In the test database: what the service needs (the destination schema is its to create).
        for grant in [
            format!("GRANT CONNECT, CREATE ON DATABASE {} TO {name}", db.name),
            format!("GRANT USAGE, CREATE ON SCHEMA crm_sync TO {name}"),
            format!("GRANT ALL ON ALL TABLES IN SCHEMA crm_sync TO {name}"),
            format!("GRANT ALL ON ALL SEQUENCES IN SCHEMA crm_sync TO {name}"),
            format!("GRANT SELECT ON public._sqlx_migrations TO {name}"),
            // `migrate` runs CREATE TABLE IF NOT EXISTS _sqlx_migrations first.
            format!("GRANT CREATE ON SCHEMA public TO {name}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(grant))
                .execute(&db.pool)
                .await
                .unwrap();
        }
        Role(name, db.url.clone())
    }

    /// The DSN that logs in as this role, password included.
    fn url(&self, db: &TestDb) -> String {
        db.url.replacen(
            "postgres://postgres@",
            &format!("postgres://{}:{DB_PASSWORD}@", self.0),
            1,
        )
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let name = &self.0;
        common::run_blocking(self.1.clone(), vec![format!("DROP OWNED BY {name}")]);
        common::run_as_admin(vec![format!("DROP ROLE IF EXISTS {name}")]);
    }
}

/// A local HTTP server that answers every request with `status` from the path's first segment
/// (`/e401/..`, `/e500/..`; 200 otherwise) and a body echoing the whole request: a hostile source
/// that repeats the key in the query and the Authorization header, and the webhook receiver.
#[derive(Clone, Default)]
struct Echo {
    /// Each request line (method and URI, where a webhook's secret path belongs).
    lines: Arc<Mutex<Vec<String>>>,
    /// Each request's headers and body: what a webhook receiver gets to keep.
    seen: Arc<Mutex<Vec<String>>>,
}

async fn echo(
    State(echo): State<Echo>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    let request = format!("{method} {uri}\n{headers:?}\n{body}");
    echo.lines.lock().unwrap().push(format!("{method} {uri}"));
    echo.seen
        .lock()
        .unwrap()
        .push(format!("{headers:?}\n{body}"));
    let status = match uri.path().split('/').nth(1) {
        Some("e401") => StatusCode::UNAUTHORIZED,
        Some("e500") => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::OK,
    };
    (status, format!("you sent: {request}"))
}

async fn start_echo() -> (String, Echo) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = Echo::default();
    let app = axum::Router::new().fallback(echo).with_state(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, state)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `crm-sync ARGS` with the secrets in its environment (as a deployment would have them).
fn crm_sync(config: &Path, dsn: &str, format: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(common::binary());
    cmd.arg("--config")
        .arg(config)
        .args(["--log-format", format])
        .args(args)
        .env("DATABASE_URL", dsn)
        .env("RUST_LOG", "debug")
        .env("EZFOCUS_ACCOUNTS_KEY", EZ_KEY)
        .env("EZFOCUS_USERNAME", EZ_USER)
        .env("CRM_SYNC_ADMIN_TOKENS", ADMIN_TOKEN)
        .env("CRM_SYNC_READ_TOKENS", READ_TOKEN);
    cmd
}

fn spawn(mut cmd: Command, log: &Path) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn output(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    format!(
        "exit {:?}\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sigterm(child: &mut Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "process did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every file under `dir`: its path and contents, as text.
fn files(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).into_iter().flatten() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push_str(&format!("{}\n", path.display()));
            out.push_str(&String::from_utf8_lossy(&std::fs::read(&path).unwrap()));
        }
    }
}

// Two threads: the fixture and the receivers run on this runtime while the CLI runs block one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_api_tables_webhooks_or_backups() {
    let started = Instant::now();
    let db = TestDb::new().await;
    let role = Role::create(&db).await;
    let dsn = role.url(&db);
    let dir = tempfile::tempdir().unwrap();
    let backups = dir.path().join("backups");
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig {
        username: EZ_USER.into(),
        password: EZ_PASSWORD.into(),
        keys: [(EZ_KEY.to_string(), Dataset::Accounts)].into(),
        ..EzFocusConfig::default()
    })
    .await
    .unwrap();
    let (hostile, hostile_seen) = start_echo().await;
    let (hooks, hooks_seen) = start_echo().await;

    // The reference pipeline as examples/ezfocus.toml has it, its password in a secret file; two
    // more pipelines against the hostile source; two webhooks whose URLs carry a secret path.
    let password_file = dir.path().join("ezfocus_password");
    crm_sync::private_fs::write_new(&password_file, format!("{EZ_PASSWORD}\n").as_bytes()).unwrap();
    let slack_file = dir.path().join("slack_url");
    crm_sync::private_fs::write_new(
        &slack_file,
        format!("{hooks}/services/T0/{SLACK_SECRET}\n").as_bytes(),
    )
    .unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/ezfocus.toml"
    ))
    .unwrap()
    .replace("http://127.0.0.1:8081", &fixture.base_url())
    .replace("./crm-sync-backups", &backups.display().to_string())
    .replace(
        "password = { env = \"EZFOCUS_PASSWORD\" }",
        &format!("password = {{ file = \"{}\" }}", password_file.display()),
    )
    .replace("[worker]", "[worker]\npoll_interval = \"100ms\"");
    let hostile_pipeline = |name: &str, path: &str, attempts: u32| {
        format!(
            r#"
[[pipelines]]
name = "{name}"
max_attempts = {attempts}
retry_backoff = "50ms"

[pipelines.source]
kind = "ezfocus"
base_url = "{hostile}/{path}"
key = {{ env = "EZFOCUS_ACCOUNTS_KEY" }}
username = {{ env = "EZFOCUS_USERNAME" }}
password = {{ file = "{password}" }}

[pipelines.backup]
kind = "local"
dir = "{backups}"
path = "{name}/{{batch_id}}.json"
"#,
            password = password_file.display(),
            backups = backups.display(),
        )
    };
    let port = free_port();
    let config_text = format!(
        "{example}\n{}\n{}\n[server]\nlisten = \"127.0.0.1:{port}\"\n
[[notifications.webhooks]]
name = \"ops\"
url = {{ env = \"CRM_SYNC_TEST_HOOK\" }}
format = \"json\"
retry_backoff = \"50ms\"

[[notifications.webhooks]]
name = \"ops-slack\"
url = {{ file = \"{}\" }}
format = \"slack\"
retry_backoff = \"50ms\"
",
        hostile_pipeline("ez_denied", "e401", 1),
        hostile_pipeline("ez_broken", "e500", 2),
        slack_file.display()
    );
    let config = dir.path().join("crm-sync.toml");
    std::fs::write(&config, config_text).unwrap();
    let with_hook = |mut cmd: Command| {
        cmd.env("CRM_SYNC_TEST_HOOK", format!("{hooks}/hooks/{HOOK_SECRET}"));
        cmd
    };

    let mut corpus: BTreeMap<&str, String> = BTreeMap::new();
    corpus.insert(
        "migrate (json)",
        output(crm_sync(&config, &dsn, "json", &["migrate"])),
    );
    let serve_log = dir.path().join("serve.log");
    let worker_log = dir.path().join("worker.log");
    let mut serve = spawn(
        with_hook(crm_sync(&config, &dsn, "text", &["serve", "--no-workers"])),
        &serve_log,
    );
    let mut worker = spawn(
        with_hook(crm_sync(&config, &dsn, "json", &["worker"])),
        &worker_log,
    );

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(
            Instant::now() < deadline,
            "serve not ready: {}",
            std::fs::read_to_string(&serve_log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut api = String::new();
    let mut call = async |method: &str, path: &str, token: Option<&str>| -> Value {
        let mut req = http.request(method.parse().unwrap(), format!("{base}{path}"));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        let head = format!("{method} {path}: {} {:?}\n", resp.status(), resp.headers());
        let body = resp.text().await.unwrap();
        api.push_str(&head);
        api.push_str(&body);
        api.push('\n');
        serde_json::from_str(&body).unwrap_or(Value::Null)
    };

    // A successful run, a refused one, a failing one, started through the API.
    let mut runs = Vec::new();
    for pipeline in ["ezfocus_accounts", "ez_denied", "ez_broken"] {
        let created = call(
            "POST",
            &format!("/api/pipelines/{pipeline}/runs"),
            Some(ADMIN_TOKEN),
        )
        .await;
        runs.push((
            pipeline,
            created["id"].as_str().expect("run id").to_string(),
        ));
    }
    for (pipeline, id) in &runs {
        wait_until(
            &db.pool,
            &format!(
                "SELECT status IN ('succeeded', 'failed') FROM crm_sync.runs WHERE id = '{id}'"
            ),
            Duration::from_secs(60),
        )
        .await;
        let status: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT status FROM crm_sync.runs WHERE id = '{id}'"
        )))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let want = if *pipeline == "ezfocus_accounts" {
            "succeeded"
        } else {
            "failed"
        };
        assert_eq!(
            status,
            want,
            "{pipeline}: {}",
            common::run_error(&db.pool, id.parse().unwrap()).await
        );
    }
    // The CLI too: a run waited for, in text logs at debug.
    corpus.insert(
        "run --wait (text)",
        output(crm_sync(
            &config,
            &dsn,
            "text",
            &["run", "ezfocus_accounts", "--wait"],
        )),
    );
    // Two failures, two webhooks: four deliveries, each POSTed to a URL with a secret path.
    wait_until(
        &db.pool,
        "SELECT count(*) = 4 FROM crm_sync.notification_deliveries WHERE state = 'delivered'",
        Duration::from_secs(30),
    )
    .await;

    for (_, id) in &runs {
        call("GET", &format!("/api/runs/{id}"), Some(READ_TOKEN)).await;
        call("GET", &format!("/api/runs/{id}/events"), Some(READ_TOKEN)).await;
    }
    for path in [
        "/api/runs",
        "/api/runs?status=failed",
        "/api/pipelines",
        "/api/whoami",
        "/api/openapi.json",
    ] {
        call("GET", path, Some(READ_TOKEN)).await;
    }
    for path in [
        "/healthz",
        "/readyz",
        "/health/pipelines",
        "/metrics",
        "/api/runs",
    ] {
        call("GET", path, None).await;
    }
    call("GET", "/api/runs", Some("not-the-token-but-long-enough")).await;
    call(
        "POST",
        "/api/pipelines/ezfocus_accounts/runs",
        Some(READ_TOKEN),
    )
    .await;
    corpus.insert("API responses", api);

    // Errors from the CLI: a database that refuses connections, a malformed URL, a broken config.
    let host_port = dsn.split('@').nth(1).unwrap().split('/').next().unwrap();
    let closed = dsn.replacen(host_port, &format!("127.0.0.1:{}", free_port()), 1);
    corpus.insert(
        "runs, database down",
        output(crm_sync(&config, &closed, "text", &["runs"])),
    );
    let malformed = format!("postgres://{}:{DB_PASSWORD}@127.0.0.1:notaport/x", role.0);
    corpus.insert(
        "runs, malformed DSN",
        output(crm_sync(&config, &malformed, "json", &["runs"])),
    );
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        format!(
            "database_url = \"{dsn}\"\n{}\n[worker]\nconcurrency = \"{DB_PASSWORD}\"\n",
            std::fs::read_to_string(&config).unwrap().replace(
                "max_attempts = 5",
                &format!("max_attempts = \"{EZ_PASSWORD}\"")
            )
        ),
    )
    .unwrap();
    corpus.insert(
        "check-config, broken file",
        output(crm_sync(&broken, &dsn, "text", &["check-config"])),
    );

    sigterm(&mut worker);
    sigterm(&mut serve);
    corpus.insert(
        "serve log (text, debug)",
        std::fs::read_to_string(&serve_log).unwrap(),
    );
    corpus.insert(
        "worker log (json, debug)",
        std::fs::read_to_string(&worker_log).unwrap(),
    );

    let dump = Command::new("pg_dump")
        .args(["--schema=crm_sync", "--data-only", "--no-owner", &db.url])
        .output()
        .expect("pg_dump is installed");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    corpus.insert(
        "pg_dump crm_sync",
        String::from_utf8_lossy(&dump.stdout).into_owned(),
    );
    corpus.insert(
        "webhook requests (headers, bodies)",
        hooks_seen.seen.lock().unwrap().join("\n"),
    );
    let mut backup_files = String::new();
    files(&backups, &mut backup_files);
    corpus.insert("backup objects", backup_files);

    // The search is meaningful only if the secrets were used and the places filled.
    let hostile_requests = hostile_seen.lines.lock().unwrap().join("\n");
    assert!(
        hostile_requests.contains(EZ_KEY),
        "the hostile source got the key: {hostile_requests}"
    );
    assert_eq!(
        hostile_seen.seen.lock().unwrap().len(),
        3,
        "one 401, two 500"
    );
    assert!(fixture.request_count() >= 2);
    let hook_lines = hooks_seen.lines.lock().unwrap().join("\n");
    assert!(
        hook_lines.contains(HOOK_SECRET) && hook_lines.contains(SLACK_SECRET),
        "both webhooks were called: {hook_lines}"
    );
    assert!(corpus["webhook requests (headers, bodies)"].contains("run failed at step"));
    assert!(
        corpus["pg_dump crm_sync"].contains("HTTP 401")
            || corpus["pg_dump crm_sync"].contains("401")
    );
    assert!(corpus["check-config, broken file"].contains("problem"));
    assert!(corpus["runs, database down"].contains("exit Some(1)"));
    assert!(
        corpus["API responses"].contains("ez_broken")
            && corpus["API responses"].contains("crm_sync_queue_depth")
    );
    assert!(
        corpus["worker log (json, debug)"].contains("\"level\":\"DEBUG\""),
        "debug JSON logs"
    );
    assert!(
        corpus["serve log (text, debug)"].contains("DEBUG"),
        "debug text logs"
    );
    assert!(
        corpus["backup objects"].contains("ezfocus_accounts")
            || corpus["backup objects"].contains("accounts_")
    );

    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{EZ_USER}:{EZ_PASSWORD}"));
    let secrets = [
        ("EZ Focus key", EZ_KEY.to_string()),
        ("EZ Focus user", EZ_USER.to_string()),
        ("EZ Focus password", EZ_PASSWORD.to_string()),
        ("Basic credentials", basic),
        ("admin token", ADMIN_TOKEN.to_string()),
        ("read token", READ_TOKEN.to_string()),
        ("webhook path", HOOK_SECRET.to_string()),
        ("Slack webhook path", SLACK_SECRET.to_string()),
        ("database password", DB_PASSWORD.to_string()),
    ];
    let mut leaks = Vec::new();
    for (place, text) in &corpus {
        for (what, secret) in &secrets {
            if let Some(at) = text.find(secret.as_str()) {
                let from = text[..at]
                    .char_indices()
                    .rev()
                    .nth(150)
                    .map_or(0, |(i, _)| i);
                let context: String = text[from..].chars().take(400).collect();
                leaks.push(format!("{what} in {place}: ...{context}..."));
            }
        }
    }
    let sizes: Vec<String> = corpus
        .iter()
        .map(|(k, v)| format!("{k} {} KiB", v.len() / 1024))
        .collect();
    eprintln!(
        "{:.1?}: searched {} secrets in {} places ({} KiB: {}): {} leaks",
        started.elapsed(),
        secrets.len(),
        corpus.len(),
        corpus.values().map(String::len).sum::<usize>() / 1024,
        sizes.join(", "),
        leaks.len()
    );
    assert!(
        leaks.is_empty(),
        "{} leaks:\n{}",
        leaks.len(),
        leaks.join("\n\n")
    );
    drop(fixture);
}
