//! The database role of docker-compose.yml is enough for everything crm-sync does: the init
//! script's SQL (deploy/compose/postgres-init/crm-sync-role.psql) is run by psql against the local
//! PostgreSQL for a fresh role and database of this test's own, then, logged in as that role (not a
//! superuser), `crm-sync migrate`, `serve --no-workers` and a `worker` (as compose runs them) and
//! the EZ Focus reference pipeline end to end into PostgreSQL. The role and database are dropped
//! afterwards.

use super::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crm_sync::fixtures::ezfocus::{EzFocusConfig, EzFocusFixture};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// A role and its database made by the init script; both dropped on drop.
struct ComposeRole {
    role: String,
    database: String,
    password: String,
}

impl ComposeRole {
    /// Runs the init script's SQL as the superuser, as the postgres image does on its first start.
    fn create() -> ComposeRole {
        let suffix = Uuid::new_v4().simple().to_string();
        let created = ComposeRole {
            role: format!("crm_sync_role_{suffix}"),
            database: format!("crm_sync_roledb_{suffix}"),
            password: format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple()),
        };
        let out = Command::new("psql")
            .arg(common::admin_url())
            .args(["--no-psqlrc", "-v", &format!("role={}", created.role)])
            .args(["-v", &format!("database={}", created.database)])
            .arg("-f")
            .arg(common::compose::repo().join("deploy/compose/postgres-init/crm-sync-role.psql"))
            .env("CRM_SYNC_DB_PASSWORD", &created.password)
            .output()
            .expect("psql (PostgreSQL's client) on PATH");
        assert!(
            out.status.success(),
            "the init script failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        created
    }

    /// The DSN crm-sync uses: this role, its password, its database.
    fn url(&self) -> String {
        let admin = common::admin_url();
        let host = admin
            .split_once('@')
            .and_then(|(_, rest)| rest.rsplit_once('/'))
            .map(|(host, _)| host.to_string())
            .expect("admin url postgres://user@host:port/db");
        format!(
            "postgres://{}:{}@{host}/{}",
            self.role, self.password, self.database
        )
    }
}

impl Drop for ComposeRole {
    fn drop(&mut self) {
        common::run_as_admin(vec![
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database),
            format!("DROP ROLE IF EXISTS {}", self.role),
        ]);
    }
}

/// `crm-sync --config CONFIG ARGS` logged in as the role.
fn crm_sync(config: &Path, url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(common::binary());
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "info");
    cmd
}

fn spawn(mut cmd: Command, log: &Path) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn crm-sync")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_init_scripts_role_is_enough_to_migrate_serve_and_run_a_pipeline() {
    let role = ComposeRole::create();
    let url = role.url();
    let mut conn = PgConnection::connect(&url)
        .await
        .expect("log in as the role");
    let (superuser, createdb, createrole): (bool, bool, bool) = sqlx::query_as(
        "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!((superuser, createdb, createrole), (false, false, false));

    let fixture = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let config = dir.path().join("crm-sync.toml");
    let text = common::ezfocus::example_config(&fixture, &secrets, &dir.path().join("backups"));
    std::fs::write(
        &config,
        format!("{text}\n[server]\nlisten = \"127.0.0.1:0\"\n"),
    )
    .unwrap();

    let migrate = crm_sync(&config, &url, &["migrate"]).output().unwrap();
    assert!(
        migrate.status.success(),
        "migrate as the role: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let serve_log = dir.path().join("serve.log");
    let worker_log = dir.path().join("worker.log");
    let mut serve = crm_sync(&config, &url, &["serve", "--no-workers"]);
    serve
        .env(
            "CRM_SYNC_ADMIN_TOKENS",
            format!("compose-role-admin-{}", Uuid::new_v4()),
        )
        .env(
            "CRM_SYNC_READ_TOKENS",
            format!("compose-role-read-{}", Uuid::new_v4()),
        );
    let mut children = [
        spawn(serve, &serve_log),
        spawn(crm_sync(&config, &url, &["worker"]), &worker_log),
    ];
    let run = tokio::task::spawn_blocking({
        let (config, url) = (config.clone(), url.clone());
        move || {
            crm_sync(&config, &url, &["run", "ezfocus_accounts", "--wait"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    for child in &mut children {
        common::terminate(child, Duration::from_secs(30));
    }
    let logs = format!(
        "{}\n{}",
        std::fs::read_to_string(&serve_log).unwrap(),
        std::fs::read_to_string(&worker_log).unwrap()
    );
    assert!(
        run.status.success(),
        "the run as the role: {}{}\n{logs}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ezfocus.accounts_list")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, 2700);
    assert!(
        !logs.to_lowercase().contains("permission denied"),
        "something needed more than the role has:\n{logs}"
    );

    // Ending a stale loader (src/destinations/ledger.rs) needs no pg_signal_backend: the role may
    // end its own sessions, and every crm-sync process logs in as it.
    let mut other = PgConnection::connect(&url).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut other)
        .await
        .unwrap();
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(ended);
    conn.close().await.unwrap();
}
