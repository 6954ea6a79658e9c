//! `crm-sync demo` as a newcomer runs it: the real binary creates its database, starts both stand-in
//! CRMs, runs both reference pipelines into PostgreSQL, prints where everything is, serves the
//! console and API until Ctrl-C; without Chromium it runs EZ Focus alone and says how to install it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::TestDb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sqlx::postgres::PgPoolOptions;

/// A database name the demo must create itself (TestDb's, dropped again first).
async fn missing_database() -> TestDb {
    let db = TestDb::new().await;
    db.pool.close().await;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&common::admin_url())
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {} WITH (FORCE)",
        db.name
    )))
    .execute(&admin)
    .await
    .unwrap();
    db
}

fn demo(db: &TestDb, cwd: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(common::binary());
    cmd.arg("demo")
        .args(args)
        .current_dir(cwd)
        .env("DATABASE_URL", &db.url)
        .env_remove("CRM_SYNC_ADMIN_TOKENS")
        .env_remove("RUST_LOG");
    cmd
}

/// `demo --exit` in `cwd` on a free port, with no Chromium to be found.
fn demo_once_without_chromium(db: &TestDb, cwd: &std::path::Path) -> std::process::Output {
    let listen = format!("127.0.0.1:{}", common::emulators::free_port());
    demo(db, cwd, &["--listen", &listen, "--exit"])
        .env("CHROMIUM", "/nonexistent/chromium")
        .output()
        .unwrap()
}

#[tokio::test]
async fn demo_runs_both_pipelines_then_serves_the_console_until_ctrl_c() {
    let db = missing_database().await;
    let cwd = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::emulators::free_port());
    let mut child = demo(&db, cwd.path(), &["--listen", &listen])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Read until the demo says it is serving (or ends).
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            out.push_str(&line);
            out.push('\n');
            if line.starts_with("Serving the console") {
                break;
            }
        }
        out
    });
    let out = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert!(out.contains("(created)"), "{out}");
    assert!(
        out.contains("ezfocus_accounts   succeeded")
            && out.contains("2700 rows into ezfocus.accounts_list"),
        "{out}"
    );
    assert!(
        out.contains("qashier_customers  succeeded")
            && out.contains("987 rows into backoffice.customers"),
        "{out}"
    );
    assert!(out.contains("extract object: file://"), "{out}");
    assert!(
        out.contains(&format!("console     http://{listen}/")),
        "{out}"
    );
    assert!(
        out.contains("Serving the console"),
        "demo did not reach serving:\n{out}"
    );

    // The data is where the summary says.
    let pool = PgPoolOptions::new().connect(&db.url).await.unwrap();
    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM ezfocus.accounts_list")
        .fetch_one(&pool)
        .await
        .unwrap();
    let customers: i64 = sqlx::query_scalar("SELECT count(*) FROM backoffice.customers")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((accounts, customers), (2700, 987));

    // The console and API answer with the token the demo wrote (and never printed).
    let token = std::fs::read_to_string(cwd.path().join("crm-sync-demo/admin-token")).unwrap();
    let token = token.trim();
    assert!(!out.contains(token), "the token was printed");
    let mode = std::fs::metadata(cwd.path().join("crm-sync-demo/admin-token"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600);
    let client = reqwest::Client::new();
    let page = client
        .get(format!("http://{listen}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), reqwest::StatusCode::OK);
    let runs: serde_json::Value = client
        .get(format!("http://{listen}/api/runs?status=succeeded"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(runs["runs"].as_array().unwrap().len(), 2, "{runs}");

    // The written config works with the other commands.
    let config = cwd.path().join("crm-sync-demo/crm-sync.toml");
    let (code, stdout, stderr) = common::run_binary(&config, &["runs"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("qashier_customers"), "{stdout}");

    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "demo did not stop on Ctrl-C"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}");
    pool.close().await;
}

#[tokio::test]
async fn without_chromium_the_demo_runs_ez_focus_and_says_how_to_install_it() {
    let db = missing_database().await;
    let cwd = tempfile::tempdir().unwrap();
    // An admin token left readable by everyone (an older demo): not trusted, replaced.
    let demo_dir = cwd.path().join("crm-sync-demo");
    std::fs::create_dir(&demo_dir).unwrap();
    // A random value, so no token is written into the test itself.
    let old_token = format!("demo-world-readable-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(demo_dir.join("admin-token"), &old_token).unwrap();
    std::fs::set_permissions(
        demo_dir.join("admin-token"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let out = demo_once_without_chromium(&db, cwd.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Chromium    not found"), "{stdout}");
    assert!(stdout.contains("apt-get install chromium"), "{stdout}");
    assert!(stdout.contains("ezfocus_accounts   succeeded"), "{stdout}");
    assert!(!stdout.contains("qashier_customers"), "{stdout}");
    let config = std::fs::read_to_string(cwd.path().join("crm-sync-demo/crm-sync.toml")).unwrap();
    assert!(!config.contains("name = \"qashier_customers\""), "{config}");
    let token_file = demo_dir.join("admin-token");
    assert!(
        stdout.contains(&format!(
            "admin token {} could be read by other users (mode 0644): replaced by a new one",
            token_file.display()
        )),
        "{stdout}"
    );
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_ne!(token.trim(), old_token);
    assert_eq!(crm_sync::private_fs::mode(&token_file).unwrap(), 0o600);
    for private in ["/secrets", "/backups", "/secrets/EZFOCUS_PASSWORD"] {
        let path = format!("{}{private}", demo_dir.display());
        let mode = crm_sync::private_fs::mode(std::path::Path::new(&path)).unwrap();
        assert_eq!(mode & 0o077, 0, "{path} has mode {mode:04o}");
    }
}

#[tokio::test]
async fn the_demo_refuses_a_symbolic_link_in_place_of_its_admin_token() {
    let db = missing_database().await;
    let cwd = tempfile::tempdir().unwrap();
    let demo_dir = cwd.path().join("crm-sync-demo");
    std::fs::create_dir(&demo_dir).unwrap();
    // Planted by another user: a link to where they could read what the demo writes.
    let planted = cwd.path().join("planted-token");
    std::os::unix::fs::symlink(&planted, demo_dir.join("admin-token")).unwrap();
    let out = demo_once_without_chromium(&db, cwd.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} is a symbolic link; the demo keeps its admin token in a file of its own",
            demo_dir.join("admin-token").display()
        )),
        "{stderr}"
    );
    assert!(!planted.exists(), "the demo wrote through the link");
}

#[tokio::test]
async fn with_gcp_settings_the_demo_also_loads_bigquery_through_gcs() {
    let db = missing_database().await;
    let gcs = common::emulators::FakeGcs::start().await;
    let bq = common::emulators::BqEmulator::start(&gcs.root).await;
    let cwd = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::emulators::free_port());
    let out = demo(
        &db,
        cwd.path(),
        &[
            "--listen",
            &listen,
            "--exit",
            "--gcp-project",
            "demo-project",
            "--gcs-bucket",
            "demo-backups",
            "--gcs-endpoint",
            &gcs.endpoint(),
            "--bigquery-endpoint",
            &bq.base_url(),
        ],
    )
    .env("CHROMIUM", "/nonexistent/chromium")
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ezfocus_accounts_gcp succeeded")
            && stdout.contains("2700 rows into demo-project.crm_sync_demo.Accounts_List"),
        "{stdout}"
    );
    assert!(
        stdout.contains("extract object: gs://demo-backups/accounts/raw/"),
        "{stdout}"
    );
    assert!(stdout.contains("ezfocus_accounts   succeeded"), "{stdout}");
    // The raw answer really is in the bucket.
    let raw = gcs.root.join("demo-backups/accounts/raw");
    assert_eq!(
        std::fs::read_dir(&raw).unwrap().count(),
        1,
        "{}",
        raw.display()
    );
}

#[tokio::test]
async fn a_weak_admin_token_left_by_an_earlier_demo_is_refused_with_how_to_make_one() {
    let db = missing_database().await;
    let cwd = tempfile::tempdir().unwrap();
    let demo_dir = cwd.path().join("crm-sync-demo");
    std::fs::create_dir(&demo_dir).unwrap();
    let token_file = demo_dir.join("admin-token");
    crm_sync::private_fs::write_new(&token_file, b"aaaaaaaaaaaaaaaa\n").unwrap();
    let out = demo_once_without_chromium(&db, cwd.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: token 1 of 1 is too weak",
            token_file.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("openssl rand -base64 32"), "{stderr}");
    assert!(
        !stderr.contains("aaaaaaaaaaaaaaaa"),
        "the token is not echoed: {stderr}"
    );
}
