//! Customer data and secrets on disk are private to the user crm-sync runs as. A pipeline run with
//! a local backup leaves only 0700 directories and 0600 files behind (raw backup, staging object),
//! whatever the umask (the tests run with 022). Secret and token files that other users can read,
//! or that group or other users can write, are refused, as libpq refuses such a `.pgpass`, with
//! the file, its mode and the fix; group-readable ones are accepted with a warning.

use super::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestDb, run_error, run_pipeline};
use crm_sync::fixtures::ezfocus::{EzFocusConfig, EzFocusFixture};
use crm_sync::private_fs::mode;

/// Every directory and file under `dir` (itself included), with its mode.
fn modes_under(dir: &Path, out: &mut Vec<(PathBuf, u32)>) {
    out.push((dir.to_path_buf(), mode(dir).unwrap()));
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            modes_under(&path, out);
        } else {
            out.push((path.clone(), mode(&path).unwrap()));
        }
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// One run of the EZ Focus example against a fixture, with its secret files and backups under
/// `dir`; `prepare` sees the secrets' folder before the run.
async fn run_example(db: &TestDb, dir: &Path, prepare: impl FnOnce(&Path)) -> (uuid::Uuid, String) {
    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let text = common::ezfocus::example_config(&fixture, dir, &dir.join("backups"));
    prepare(dir);
    let config = db.config(&text).await;
    run_pipeline(db, &config, "ezfocus_accounts", Duration::from_secs(60)).await
}

#[tokio::test]
async fn a_pipeline_run_leaves_only_private_backup_and_staging_files() {
    let (db, dir) = (TestDb::new().await, tempfile::tempdir().unwrap());
    let backups = dir.path().join("backups");
    let (run, status) = run_example(&db, dir.path(), |_| {}).await;
    assert_eq!(status, "succeeded", "{}", run_error(&db.pool, run).await);

    let mut found = Vec::new();
    modes_under(&backups, &mut found);
    let files: Vec<_> = found.iter().filter(|(p, _)| p.is_file()).collect();
    assert!(
        files
            .iter()
            .any(|(p, _)| p.to_string_lossy().contains("/staging/"))
            && files
                .iter()
                .any(|(p, _)| p.to_string_lossy().contains("/raw/")),
        "expected the raw backup and the staging object: {found:?}"
    );
    for (path, m) in &found {
        let expected = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*m, expected, "{} has mode {m:04o}", path.display());
    }
}

#[tokio::test]
async fn a_secret_file_others_can_read_fails_the_run_naming_the_file_its_mode_and_the_fix() {
    let (db, dir) = (TestDb::new().await, tempfile::tempdir().unwrap());
    let password = dir.path().join("EZFOCUS_PASSWORD");
    let (run, status) = run_example(&db, dir.path(), |secrets| {
        chmod(&secrets.join("EZFOCUS_PASSWORD"), 0o644)
    })
    .await;
    assert_eq!(status, "failed");
    let p = password.display();
    let error = run_error(&db.pool, run).await;
    assert!(
        error.contains(&format!(
            "source credentials are not configured: secret file {p} has mode 0644: \
             other users can read it; run chmod 600 {p} (or chmod 640 for a group that must read it)"
        )),
        "{error}"
    );
}

/// `crm-sync serve` with its admin token in a file of mode `file_mode`: (exit status if it ended
/// within 20 s, its log). A server that starts is checked to accept the token, then stopped.
async fn serve_with_token_file(db: &TestDb, dir: &Path, file_mode: u32) -> (Option<i32>, String) {
    let token = format!("file-token-{}", uuid::Uuid::new_v4());
    let token_file = dir.join(format!("admin_tokens_{file_mode:o}"));
    crm_sync::private_fs::write_new(&token_file, format!("{token}\n").as_bytes()).unwrap();
    chmod(&token_file, file_mode);
    let port = common::emulators::free_port();
    let config = common::write_config(
        dir,
        db,
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let log = dir.join(format!("serve_{file_mode:o}.log"));
    let mut child = Command::new(common::binary())
        .arg("--config")
        .arg(&config)
        .args(["serve", "--no-workers", "--no-scheduler"])
        .env_remove("DATABASE_URL")
        .env_remove("CRM_SYNC_ADMIN_TOKENS")
        .env_remove("CRM_SYNC_READ_TOKENS")
        .env("CRM_SYNC_ADMIN_TOKENS_FILE", &token_file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        let whoami = client
            .get(format!("http://127.0.0.1:{port}/api/whoami"))
            .bearer_auth(&token)
            .send()
            .await;
        if whoami.is_ok_and(|r| r.status().is_success()) {
            common::terminate(&mut child, Duration::from_secs(20));
            break None;
        }
        assert!(
            Instant::now() < deadline,
            "serve neither answered nor exited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(&token), "the token reached the log:\n{text}");
    (exited, text)
}

#[tokio::test]
async fn token_files_others_can_read_are_refused_and_group_readable_ones_warned_about() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    for refused in [0o644, 0o604, 0o660] {
        let (exited, log) = serve_with_token_file(&db, dir.path(), refused).await;
        assert_eq!(exited, Some(1), "mode {refused:o}: {log}");
        let path = dir.path().join(format!("admin_tokens_{refused:o}"));
        let why = if refused & 0o004 != 0 {
            "other users can read it"
        } else {
            "users other than its owner can write it"
        };
        assert!(
            log.contains(&format!(
                "CRM_SYNC_ADMIN_TOKENS_FILE: token file {p} has mode {refused:04o}: {why}; run chmod 600 {p}",
                p = path.display()
            )),
            "mode {refused:o}: {log}"
        );
    }
    let (exited, log) = serve_with_token_file(&db, dir.path(), 0o640).await;
    assert_eq!(
        exited, None,
        "a group-readable token file is accepted: {log}"
    );
    assert!(
        log.contains("is readable by its group (mode 0640)"),
        "no warning: {log}"
    );
    let (exited, log) = serve_with_token_file(&db, dir.path(), 0o600).await;
    assert_eq!(exited, None, "{log}");
    assert!(!log.contains("readable by its group"), "{log}");
}
