//! `crm-sync demo`: the whole product on one machine in one command. It creates and migrates its
//! database, starts both stand-in CRMs in-process, writes a config for the two reference pipelines
//! (local backups, PostgreSQL destinations), runs both end to end, prints what happened and where
//! the data is, then keeps serving the console and API (and the scheduler and workers) until Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Roles, serve_until, stop_on_signal};
use crate::config::Config;
use crate::fixtures::ezfocus::{self, EzFocusConfig, EzFocusFixture};
use crate::fixtures::qashier::{self, QashierConfig, QashierFixture};
use crate::history;
use crate::queue::{self, Trigger};

/// Both reference pipelines as a team would run them (a test keeps this file in step with the
/// single-pipeline examples).
const EXAMPLE: &str = include_str!("../../examples/crm-sync.toml");
/// EZ Focus into GCS and BigQuery, for `--gcp-project` / `--gcs-bucket`.
const EXAMPLE_GCP: &str = include_str!("../../examples/ezfocus_gcp.toml");
const EZFOCUS_GCP: &str = "ezfocus_accounts_gcp";
/// The database used when `DATABASE_URL` is not set.
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/crm_sync_demo";
const EZFOCUS: &str = "ezfocus_accounts";
const QASHIER: &str = "qashier_customers";
/// How long the demo waits for its two runs.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// What `crm-sync demo` was asked for.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Where the demo keeps its config, secrets, admin token and backups.
    #[arg(long, default_value = "crm-sync-demo")]
    pub dir: PathBuf,
    /// Address of the console and API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Print the summary and exit instead of serving until Ctrl-C.
    #[arg(long)]
    pub exit: bool,
    #[command(flatten)]
    pub gcp: DemoGcp,
}

/// Optionally also run EZ Focus into GCS and BigQuery (`examples/ezfocus_gcp.toml`): given a project
/// and a bucket, with Application Default Credentials, or against the emulators with their endpoints.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoGcp {
    /// Google Cloud project of the bucket and the BigQuery dataset.
    #[arg(long, env = "CRM_SYNC_DEMO_GCP_PROJECT", requires = "gcs_bucket")]
    pub gcp_project: Option<String>,
    /// The GCS bucket for the raw and staged objects (created if missing).
    #[arg(long, env = "CRM_SYNC_DEMO_GCS_BUCKET", requires = "gcp_project")]
    pub gcs_bucket: Option<String>,
    /// The BigQuery dataset (created if missing).
    #[arg(long, default_value = "crm_sync_demo")]
    pub bigquery_dataset: String,
    /// A GCS emulator (fake-gcs-server) instead of Google: no credentials are sent.
    #[arg(
        long,
        env = "CRM_SYNC_DEMO_GCS_ENDPOINT",
        requires = "bigquery_endpoint"
    )]
    pub gcs_endpoint: Option<String>,
    /// A BigQuery emulator (bqemulator) instead of Google: no credentials are sent.
    #[arg(
        long,
        env = "CRM_SYNC_DEMO_BIGQUERY_ENDPOINT",
        requires = "gcs_endpoint"
    )]
    pub bigquery_endpoint: Option<String>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let database_url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string());
    // Written into the demo's config so the other commands find the database, unless it holds a
    // password (then DATABASE_URL stays the only place it lives).
    let has_password = reqwest::Url::parse(&database_url).is_ok_and(|u| u.password().is_some());
    println!("crm-sync demo");
    println!("  database    {}", redact_password(&database_url));
    if crate::db::create_database_if_missing(&database_url)
        .await
        .context("is PostgreSQL running? set DATABASE_URL to point at it")?
    {
        println!("              (created)");
    }

    let dir = absolute(&args.dir)?;
    let secrets_dir = dir.join("secrets");
    let backups_dir = dir.join("backups");
    for d in [&dir, &secrets_dir, &backups_dir] {
        crate::private_fs::create_dir_all(d)
            .with_context(|| format!("cannot create {}", d.display()))?;
    }
    // Directories of an earlier demo may predate private modes.
    restrict(&secrets_dir, 0o700)?;
    restrict(&backups_dir, 0o700)?;

    let ez = EzFocusFixture::start_on_free_port(EzFocusConfig::default())
        .await
        .context("starting the EZ Focus fixture")?;
    let qa = QashierFixture::start_on_free_port(QashierConfig::default())
        .await
        .context("starting the Qashier fixture")?;
    println!("  EZ Focus    stand-in CRM at {}", ez.base_url());
    println!("  Qashier     stand-in back office at {}", qa.base_url());

    let chromium = crate::sources::browser::BrowserExportConfig::new(
        qa.login_url(),
        crate::secrets::SecretRef::env("QASHIER_USERNAME"),
        crate::secrets::SecretRef::env("QASHIER_PASSWORD"),
    )
    .chromium_path()
    .ok()
    .filter(|p| p.is_file());
    if chromium.is_none() {
        println!(
            "  Chromium    not found: the Qashier pipeline (a browser export) is left out.\n              \
             Install it (Debian/Ubuntu: sudo apt-get install chromium) and run the demo again."
        );
    }

    let mut text = demo_config(
        &ez,
        &qa,
        &secrets_dir,
        &backups_dir,
        args.listen,
        (!has_password).then_some(database_url.as_str()),
        chromium.is_some(),
    )?;
    let with_gcp = args.gcp.gcp_project.is_some();
    if with_gcp {
        text.push_str(&gcp_pipeline(&args.gcp, &ez, &secrets_dir).await?);
    }
    let config_path = dir.join("crm-sync.toml");
    std::fs::write(&config_path, &text)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let mut config = Config::parse(&text, &config_path)
        .map_err(|e| anyhow::anyhow!("the demo config is invalid: {e}"))?;
    config.database_url = Some(database_url.clone());
    println!("  config      {}", config_path.display());

    let pool = crate::db::connect(&database_url, 4, config.pooler).await?;
    crate::db::migrate(&pool, true).await?;
    crate::registry::register_config(&pool, &config, "demo", false).await?;

    let (token, token_path) = admin_token(&dir)?;
    crate::api::check_token_strength(
        &token_path.display().to_string(),
        std::slice::from_ref(&token),
    )?;
    let shutdown = CancellationToken::new();
    let mut service = tokio::spawn(serve_until(
        config.clone(),
        Roles::everything(),
        None,
        Some(crate::api::Tokens::new(vec![token], Vec::new())),
        shutdown.clone(),
    ));

    let mut names = vec![EZFOCUS];
    if chromium.is_some() {
        names.push(QASHIER);
    }
    if with_gcp {
        names.push(EZFOCUS_GCP);
    }
    println!();
    let mut runs = Vec::new();
    for name in &names {
        let id = queue::enqueue(&pool, name, &serde_json::json!({}), None, Trigger::Cli).await?;
        println!("  started {name} (run {id})");
        runs.push(id);
    }
    let started = Instant::now();
    let outcome = tokio::select! {
        o = wait_all(&pool, &runs) => o,
        r = service_ended(&mut service) => return r,
    };
    let all_ok = outcome?;
    println!();
    for id in &runs {
        print_run(&pool, *id).await?;
    }
    println!(
        "\n  the demo runs took {:.1} s",
        started.elapsed().as_secs_f64()
    );

    println!("\nWhere to look:");
    println!(
        "  console     http://{}/   (sign in with the admin token: cat {})",
        args.listen,
        token_path.display()
    );
    println!(
        "  runs        crm-sync --config {} runs",
        config_path.display()
    );
    println!(
        "  data        psql \"{}\" -c 'SELECT count(*) FROM ezfocus.accounts_list'",
        redact_password(&database_url)
    );
    println!("  backups     {}", backups_dir.display());

    if args.exit {
        shutdown.cancel();
    } else {
        println!("\nServing the console, API, workers and scheduler; Ctrl-C to stop.");
        tokio::spawn(stop_on_signal(shutdown.clone()));
    }
    let _ = service.await;
    pool.close().await;
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The example config wired to the in-process fixtures, with secrets in files and local backups.
fn demo_config(
    ez: &EzFocusFixture,
    qa: &QashierFixture,
    secrets_dir: &Path,
    backups_dir: &Path,
    listen: SocketAddr,
    database_url: Option<&str>,
    with_qashier: bool,
) -> anyhow::Result<String> {
    let mut secrets: Vec<(&str, &str)> = ezfocus::EXAMPLE_SECRETS.to_vec();
    secrets.push(("QASHIER_USERNAME", qashier::DEFAULT_USERNAME));
    secrets.push(("QASHIER_PASSWORD", qashier::DEFAULT_PASSWORD));
    let mut body = crate::fixtures::with_secret_files(EXAMPLE, secrets_dir, &secrets)
        .context("writing the demo's secret files")?
        .replace("http://127.0.0.1:8081", &ez.base_url())
        .replace(
            "http://127.0.0.1:8082/#/login?redirect=/customer-management",
            &qa.login_url(),
        )
        .replace("./crm-sync-backups", &backups_dir.display().to_string());
    if !with_qashier {
        let start = body
            .find("\n[[pipelines]]\nname = \"qashier_customers\"")
            .context("the example config has no qashier_customers pipeline")?;
        body.truncate(start + 1);
    }
    let mut text = String::from(
        "# Written by `crm-sync demo`: both reference pipelines against the stand-in CRMs started by\n\
         # the demo (their ports change every time). Secrets are the fixtures' demo credentials.\n",
    );
    if let Some(url) = database_url {
        text.push_str(&format!("database_url = \"{url}\"\n"));
    }
    text.push_str(&format!("\n[server]\nlisten = \"{listen}\"\n\n"));
    text.push_str(&body);
    Ok(text)
}

/// `examples/ezfocus_gcp.toml`'s pipeline as `ezfocus_accounts_gcp`, on the demo's fixture, the given
/// project, bucket and dataset; the bucket is created if missing.
async fn gcp_pipeline(
    gcp: &DemoGcp,
    ez: &EzFocusFixture,
    secrets_dir: &Path,
) -> anyhow::Result<String> {
    let (Some(project), Some(bucket)) = (&gcp.gcp_project, &gcp.gcs_bucket) else {
        bail!("--gcp-project and --gcs-bucket go together");
    };
    let auth = if gcp.gcs_endpoint.is_some() {
        crate::gcp::GcpAuth::Anonymous
    } else {
        crate::gcp::GcpAuth::ApplicationDefault
    };
    let store =
        crate::gcp::gcs::GcsStore::new(gcp.gcs_endpoint.clone(), Some(project.clone()), auth)
            .await
            .context("connecting to GCS")?;
    store
        .ensure_bucket(bucket)
        .await
        .with_context(|| format!("creating the bucket {bucket}"))?;
    let start = EXAMPLE_GCP
        .find("[[pipelines]]")
        .context("examples/ezfocus_gcp.toml has no pipeline")?;
    let mut text = crate::fixtures::with_secret_files(
        &EXAMPLE_GCP[start..],
        secrets_dir,
        &ezfocus::EXAMPLE_SECRETS,
    )?
    .replace(
        "name = \"ezfocus_accounts\"",
        &format!("name = \"{EZFOCUS_GCP}\""),
    )
    .replace("http://127.0.0.1:8081", &ez.base_url())
    .replace("my-company-crm-backups", bucket)
    .replace("my-gcp-project", project)
    .replace(
        "dataset = \"crm\"",
        &format!("dataset = \"{}\"", gcp.bigquery_dataset),
    );
    if let (Some(gcs), Some(bq)) = (&gcp.gcs_endpoint, &gcp.bigquery_endpoint) {
        text = text
            .replace(
                "credentials = \"application_default\"\n\n[pipelines.transform]",
                &format!(
                    "credentials = \"anonymous\"\nendpoint = \"{gcs}\"\n\n[pipelines.transform]"
                ),
            )
            .replace(
                "table = \"Accounts_List\"\ncredentials = \"application_default\"",
                &format!(
                    "table = \"Accounts_List\"\ncredentials = \"anonymous\"\nendpoint = \"{bq}\""
                ),
            );
        if text.contains("application_default") {
            bail!(
                "examples/ezfocus_gcp.toml changed shape: the emulator endpoints could not be set"
            );
        }
    }
    println!(
        "  GCP         EZ Focus also into gs://{bucket} and BigQuery {project}.{}.Accounts_List{}",
        gcp.bigquery_dataset,
        if gcp.gcs_endpoint.is_some() {
            " (emulators)"
        } else {
            ""
        }
    );
    Ok(format!("\n{text}"))
}

/// The admin token kept in `DIR/admin-token`. Never printed: the user reads the file. It is created
/// with mode 0600 from the start (a fresh file, `O_EXCL | O_NOFOLLOW`, renamed into place). An
/// existing token file that group or other users can read is not trusted (anyone may have copied
/// the token): a new token replaces it, and the demo says so. A symbolic link there is refused.
fn admin_token(dir: &Path) -> anyhow::Result<(String, PathBuf)> {
    let path = dir.join("admin-token");
    if let Some(existing) = existing_token(&path)? {
        return Ok((existing, path));
    }
    let token = format!(
        "demo-{}",
        Uuid::new_v4().simple().to_string() + &Uuid::new_v4().simple().to_string()
    );
    crate::private_fs::replace(&path, format!("{token}\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok((token, path))
}

/// The token of an earlier demo in `path`, if there is a private one (mode 0600 or stricter, at
/// least 16 characters). Read without following a symbolic link.
fn existing_token(path: &Path) -> anyhow::Result<Option<String>> {
    use std::io::Read;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let mut file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => bail!(
            "{} is a symbolic link; the demo keeps its admin token in a file of its own and does \
             not follow links there: remove it and run the demo again",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_file() {
        bail!("{} is not a regular file: remove it", path.display());
    }
    if mode & 0o077 != 0 {
        println!(
            "  admin token {} could be read by other users (mode {mode:04o}): replaced by a new one",
            path.display()
        );
        return Ok(None);
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let token = text.trim();
    Ok((token.len() >= 16).then(|| token.to_string()))
}

async fn wait_all(pool: &crate::db::Db, runs: &[Uuid]) -> anyhow::Result<bool> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let mut done = 0;
        let mut ok = true;
        for id in runs {
            let (status, _) = history::run_status(pool, *id)
                .await?
                .context("a demo run disappeared")?;
            match status.as_str() {
                "succeeded" => done += 1,
                "failed" | "cancelled" => {
                    done += 1;
                    ok = false;
                }
                _ => {}
            }
        }
        if done == runs.len() {
            return Ok(ok);
        }
        if Instant::now() > deadline {
            bail!(
                "the demo runs did not finish within {}",
                humantime::format_duration(RUN_TIMEOUT)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The service task ended before the runs did: that is an error (port taken, database gone).
async fn service_ended(
    service: &mut tokio::task::JoinHandle<anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    match service.await {
        Ok(Ok(_)) => bail!("the service stopped before the demo runs finished"),
        Ok(Err(e)) => Err(e.context("the demo service failed")),
        Err(e) => bail!("the demo service panicked: {e}"),
    }
}

async fn print_run(pool: &crate::db::Db, id: Uuid) -> anyhow::Result<()> {
    let detail = history::run_detail(pool, id)
        .await?
        .context("a demo run disappeared")?;
    let run = &detail.run;
    let duration = run.duration_secs().unwrap_or_default();
    let table = detail
        .steps
        .iter()
        .find_map(|s| s.output.as_ref()?.get("table")?.as_str().map(String::from))
        .unwrap_or_default();
    match run.status.as_str() {
        "succeeded" => println!(
            "  {:<18} succeeded in {duration:.1} s: {} rows into {table} (batch {})",
            run.pipeline,
            run.rows_loaded.unwrap_or_default(),
            run.batch_id
        ),
        status => println!(
            "  {:<18} {status} after {duration:.1} s: {}",
            run.pipeline,
            run.error.as_deref().unwrap_or("no error recorded")
        ),
    }
    for step in &detail.steps {
        if let Some(object) = step.output.as_ref().and_then(|o| o.get("object"))
            && let Some(object) = object.as_str()
        {
            println!("  {:<18}   {} object: {object}", "", step.name);
        }
    }
    Ok(())
}

/// `postgres://user:secret@host/db` as `postgres://user:***@host/db`.
fn redact_password(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(unparseable DATABASE_URL)".to_string(),
    }
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    })
}

fn restrict(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot restrict {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::{admin_token, redact_password};
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &std::path::Path) -> u32 {
        crate::private_fs::mode(path).unwrap()
    }

    #[test]
    fn the_admin_token_is_private_from_creation_and_a_readable_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (token, path) = admin_token(dir.path()).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            admin_token(dir.path()).unwrap().0,
            token,
            "kept across runs"
        );

        // A token file others can read (an older demo, a copy): a new token in a new 0600 file.
        let old = "demo-world-readable-token-0123456789";
        std::fs::write(&path, old).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (new, _) = admin_token(dir.path()).unwrap();
        assert_ne!(new, old);
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), new);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_symbolic_link_in_place_of_the_admin_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "not a token").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("admin-token")).unwrap();
        let err = admin_token(dir.path()).unwrap_err().to_string();
        assert!(err.contains("admin-token is a symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "not a token");
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact_password("postgres://app:s3cret@db:5432/crm"),
            "postgres://app:***@db:5432/crm"
        );
        assert_eq!(
            redact_password("postgres://postgres@127.0.0.1:5432/crm_sync_demo"),
            "postgres://postgres@127.0.0.1:5432/crm_sync_demo"
        );
        assert!(!redact_password("not a url s3cret").contains("s3cret"));
    }
}
