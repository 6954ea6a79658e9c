//! The `crm-sync` command line. Command names and flags are part of the external contract.

mod demo;
mod output;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::db::Db;
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bench;
use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::pipeline::Executor;
use crate::queue::{self, Trigger};
use crate::registry::{self, Presence, ProcessInfo, Role};
use crate::scheduler::Scheduler;
use crate::telemetry::{self, LogFormat};
use crate::worker::{Worker, WorkerOptions};
use crate::{db, history, retention};

#[derive(Parser, Debug)]
#[command(
    name = "crm-sync",
    version,
    about = "Scheduled CRM-to-warehouse syncs on a durable PostgreSQL job queue",
    after_help = "Examples:\n  crm-sync demo                          # the whole product on this machine\n  crm-sync --config crm-sync.toml migrate\n  crm-sync serve\n  crm-sync run ezfocus_accounts --wait\n  crm-sync runs --status failed\n  crm-sync retry 0b6c2f1e-...\n\nDATABASE_URL overrides the config's database_url."
)]
pub struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "CRM_SYNC_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "CRM_SYNC_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole product on this machine: both stand-in CRMs, both reference pipelines end to
    /// end into PostgreSQL, then the console and API until Ctrl-C.
    #[command(
        after_help = "Examples:\n  crm-sync demo                      # DATABASE_URL or postgres://postgres@127.0.0.1:5432/crm_sync_demo\n  DATABASE_URL=postgres://me@db/crm_demo crm-sync demo --listen 127.0.0.1:9000\n  crm-sync demo --exit               # print the summary and stop"
    )]
    Demo(demo::DemoArgs),
    /// Exit 0 when a crm-sync HTTP endpoint answers 200 (the container HEALTHCHECK; no curl needed).
    #[command(
        after_help = "Examples:\n  crm-sync healthcheck\n  crm-sync healthcheck --url http://127.0.0.1:9464/readyz"
    )]
    Healthcheck {
        /// The URL to probe.
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
        /// Give up after this long.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Create or upgrade the crm_sync schema.
    #[command(
        after_help = "Example:\n  DATABASE_URL=postgres://postgres@127.0.0.1/crm_sync crm-sync migrate"
    )]
    Migrate,
    /// Run the service: console, HTTP API and metrics on [server] listen, workers, scheduler and
    /// notifier, each switchable.
    #[command(
        after_help = "Examples:\n  crm-sync --config crm-sync.toml serve --concurrency 16\n  crm-sync serve --no-scheduler"
    )]
    Serve {
        /// Do not run workers in this process.
        #[arg(long)]
        no_workers: bool,
        /// Do not run the scheduler in this process.
        #[arg(long)]
        no_scheduler: bool,
        /// Do not serve /api (health and this process's /metrics stay on [server] listen).
        #[arg(long)]
        no_api: bool,
        /// Do not send webhook notifications from this process.
        #[arg(long)]
        no_notifier: bool,
        /// Do not prune old run history from this process ([retention]).
        #[arg(long)]
        no_retention: bool,
        /// Steps run at once (overrides [worker] concurrency).
        #[arg(long)]
        concurrency: Option<usize>,
    },
    /// Run only a worker: claim and run steps until SIGTERM.
    #[command(
        after_help = "Examples:\n  crm-sync worker --concurrency 4\n  crm-sync worker --listen 0.0.0.0:9464   # /healthz, /readyz, /metrics"
    )]
    Worker {
        /// Steps run at once (overrides [worker] concurrency).
        #[arg(long)]
        concurrency: Option<usize>,
        /// Serve /healthz, /readyz and this process's /metrics on this address.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run only the scheduler: turn cron ticks into runs until SIGTERM (any number of replicas).
    #[command(
        after_help = "Examples:\n  crm-sync --config crm-sync.toml scheduler\n  crm-sync scheduler --listen 0.0.0.0:9465"
    )]
    Scheduler {
        /// Serve /healthz, /readyz and this process's /metrics on this address.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// The registered pipelines of every config using the database: enabled, served by a live
    /// worker, defined the same way by every live process; disable or enable one.
    #[command(
        after_help = "Examples:\n  crm-sync pipelines\n  crm-sync pipelines --json\n  crm-sync pipelines disable ezfocus_accounts   # no ticks, no new runs, for every process\n  crm-sync pipelines enable ezfocus_accounts"
    )]
    Pipelines {
        #[command(subcommand)]
        action: Option<PipelinesAction>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List every pipeline's next fire times, in its own time zone and in UTC.
    #[command(after_help = "Examples:\n  crm-sync schedules\n  crm-sync schedules --count 5")]
    Schedules {
        /// Fire times shown per pipeline.
        #[arg(long, default_value_t = 3)]
        count: usize,
    },
    /// Enqueue a run of a pipeline.
    #[command(
        after_help = "Examples:\n  crm-sync run ezfocus_accounts\n  crm-sync run noop --wait --params '{\"sleep_ms\": 500}'"
    )]
    Run {
        /// The pipeline's name.
        name: String,
        /// Wait until the run finishes; exit non-zero unless it succeeded.
        #[arg(long)]
        wait: bool,
        /// Run parameters, a JSON object.
        #[arg(long, default_value = "{}")]
        params: String,
        /// Repeating a call with the same key returns the same run instead of a new one.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        wait_opts: WaitOpts,
    },
    /// List runs, newest first.
    #[command(
        after_help = "Examples:\n  crm-sync runs\n  crm-sync runs --pipeline ezfocus_accounts --status failed --json"
    )]
    Runs {
        #[arg(long)]
        pipeline: Option<String>,
        /// queued, running, succeeded, failed or cancelled.
        #[arg(long, value_parser = ["queued", "running", "succeeded", "failed", "cancelled"])]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show one run: steps, attempts, outputs and errors.
    #[command(after_help = "Example:\n  crm-sync show 0b6c2f1e-8c1d-4d4e-9a53-3f1f2d7b9e10 --json")]
    Show {
        run_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Resume a failed or cancelled run from the step that failed, in the same batch.
    #[command(
        after_help = "Example:\n  crm-sync retry 0b6c2f1e-8c1d-4d4e-9a53-3f1f2d7b9e10 --wait"
    )]
    Retry {
        run_id: String,
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        wait_opts: WaitOpts,
    },
    /// Run a run's pipeline again from scratch, as a new batch with the same parameters.
    #[command(after_help = "Example:\n  crm-sync rerun 0b6c2f1e-8c1d-4d4e-9a53-3f1f2d7b9e10")]
    Rerun {
        run_id: String,
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        wait_opts: WaitOpts,
    },
    /// Cancel a queued or running run.
    #[command(after_help = "Example:\n  crm-sync cancel 0b6c2f1e-8c1d-4d4e-9a53-3f1f2d7b9e10")]
    Cancel { run_id: String },
    /// Delete old run history now, as [retention] says, in batches (what `serve` does every interval).
    #[command(
        after_help = "Examples:\n  crm-sync prune --dry-run   # what would go, per pipeline and status; nothing is deleted\n  crm-sync prune"
    )]
    Prune {
        /// Show what would be deleted and delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate the config file and report every problem with its line.
    #[command(
        name = "check-config",
        after_help = "Example:\n  crm-sync --config crm-sync.toml check-config"
    )]
    CheckConfig,
    /// Serve a stand-in CRM (tests, the demo, trying a config) until Ctrl-C.
    #[command(
        subcommand,
        after_help = "Examples:\n  crm-sync fixture ezfocus --port 8081\n  crm-sync fixture qashier --host 0.0.0.0 --port 8082"
    )]
    Fixture(FixtureCommand),
    /// The project's own benchmarks; they print figures.
    #[command(
        subcommand,
        after_help = "Examples:\n  crm-sync bench queue --jobs 20000\n  crm-sync bench pipeline --rows 100000"
    )]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
enum PipelinesAction {
    /// Stop scheduling a pipeline and refuse new runs, for every process, until enabled again.
    #[command(after_help = "Example:\n  crm-sync pipelines disable ezfocus_accounts")]
    Disable {
        /// The pipeline's name.
        name: String,
    },
    /// Clear an operator's disable (a config's `enabled = false` stays in force).
    #[command(after_help = "Example:\n  crm-sync pipelines enable ezfocus_accounts")]
    Enable {
        /// The pipeline's name.
        name: String,
    },
}

#[derive(Args, Debug, Clone)]
struct WaitOpts {
    /// With --wait: give up after this long (e.g. 10m).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    wait_timeout: Duration,
}

#[derive(Subcommand, Debug)]
enum FixtureCommand {
    /// The EZ Focus accounts API: `GET /api` with Basic auth and a dataset key.
    #[command(
        after_help = "Example:\n  crm-sync fixture ezfocus --port 8081 --rows 2700 --edition 1\n  curl -u fixture-user:fixture-password 'http://127.0.0.1:8081/api?key=00000000-0000-4000-8000-00000000a001&prov=ON&seg=&tpcl=SUCC,LRS,MED'"
    )]
    Ezfocus {
        /// Address to bind (0.0.0.0 in a container).
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        #[arg(long, default_value_t = 8081)]
        port: u16,
        /// Accounts answered to the standard query (up to millions; streamed).
        #[arg(long, default_value_t = crate::fixtures::ezfocus::DEFAULT_ROWS)]
        rows: usize,
        /// Seed of the synthetic data: same seed, same bytes.
        #[arg(long, default_value_t = crate::fixtures::ezfocus::DEFAULT_SEED)]
        seed: u64,
        /// Edition of the list (0-9): each one updates, closes and opens a few accounts, so a
        /// merge pipeline run after a restart with the next edition has changes to apply.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=9))]
        edition: u32,
    },
    /// The Qashier back office: a login page, a slow customer list, Export and a CSV download.
    #[command(
        after_help = "Example:\n  crm-sync fixture qashier --port 8082\n  then open http://127.0.0.1:8082/#/login?redirect=/customer-management"
    )]
    Qashier {
        /// Address to bind (0.0.0.0 in a container).
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        #[arg(long, default_value_t = 8082)]
        port: u16,
        /// Customers in the export.
        #[arg(long, default_value_t = crate::fixtures::qashier::DEFAULT_ROWS)]
        rows: usize,
        /// How long the customer list takes to load before Export appears.
        #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
        list_delay: Duration,
        /// Edition of the customer list (0-9): each one changes, removes and adds a few customers.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=9))]
        edition: u32,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Queue throughput and enqueue-to-start latency with no-op runs.
    #[command(
        after_help = "Examples:\n  crm-sync bench queue --jobs 20000 --concurrency 200\n  crm-sync bench queue --latency --samples 200"
    )]
    Queue(bench::queue::QueueBenchArgs),
    /// Rows per second and peak memory of the EZ Focus pipeline over N synthetic accounts.
    #[command(
        after_help = "Examples:\n  crm-sync bench pipeline --rows 100000\n  crm-sync bench pipeline --rows 1000000 --destination postgres --json"
    )]
    Pipeline(bench::pipeline::PipelineBenchArgs),
}

/// Parses arguments, runs the command, and maps the outcome to an exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info,sqlx=warn",
    };
    telemetry::init(cli.log_format, default_filter);
    crate::gcp::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let explicit = cli.config != std::path::Path::new(DEFAULT_CONFIG_PATH);
    Config::load(&cli.config, explicit).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
}

async fn connect(config: &Config) -> anyhow::Result<Db> {
    db::connect(
        config.require_database_url()?,
        config.worker.max_connections,
        config.pooler,
    )
    .await
}

/// Connects and checks the schema is current.
async fn connect_ready(config: &Config) -> anyhow::Result<Db> {
    let pool = connect(config).await?;
    if !db::migrations_current(&pool).await? {
        bail!("the database schema is missing or outdated: run `crm-sync migrate` first");
    }
    Ok(pool)
}

/// [`connect_ready`], then registers the config's pipelines and webhooks for a command that runs once
/// (`run`, `retry`, `rerun`, `migrate`): a definition a live process holds is not replaced by it.
async fn connect_and_register(config: &Config, command: &str) -> anyhow::Result<Db> {
    let pool = connect_ready(config).await?;
    register_once(&pool, config, command).await?;
    Ok(pool)
}

async fn register_once(pool: &Db, config: &Config, command: &str) -> anyhow::Result<()> {
    let by = format!("{command}:{}", registry::processes::new_process_id());
    registry::register_config(pool, config, &by, false)
        .await
        .context("registering the config's pipelines")?;
    Ok(())
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::CheckConfig = cli.command {
        return Ok(check_config(&cli));
    }
    if let Command::Fixture(fixture) = cli.command {
        return serve_fixture(fixture).await;
    }
    if let Command::Demo(args) = cli.command {
        return demo::run(args).await;
    }
    if let Command::Healthcheck { url, timeout } = &cli.command {
        return healthcheck(url, *timeout).await;
    }
    let config = load_config(&cli)?;
    match cli.command {
        Command::CheckConfig
        | Command::Fixture(_)
        | Command::Demo(_)
        | Command::Healthcheck { .. } => {
            unreachable!("handled above")
        }
        Command::Migrate => migrate(&config).await,
        Command::Serve {
            no_workers,
            no_scheduler,
            no_api,
            no_notifier,
            no_retention,
            concurrency,
        } => {
            let roles = Roles {
                api: !no_api,
                ops_listen: no_api.then_some(config.server.listen),
                workers: !no_workers,
                scheduler: !no_scheduler,
                notifier: !no_notifier,
                retention: !no_retention,
            };
            serve(config, roles, concurrency).await
        }
        Command::Worker {
            concurrency,
            listen,
        } => serve(config, Roles::only_workers(listen), concurrency).await,
        Command::Scheduler { listen } => serve(config, Roles::only_scheduler(listen), None).await,
        Command::Pipelines { action, json } => {
            let pool = connect_ready(&config).await?;
            pipelines(&pool, action, json).await
        }
        Command::Schedules { count } => {
            output::print_schedules(&config, count, chrono::Utc::now())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            name,
            wait,
            params,
            idempotency_key,
            wait_opts,
        } => {
            let params: serde_json::Value = serde_json::from_str(&params)
                .with_context(|| format!("--params is not valid JSON: {params}"))?;
            if !params.is_object() {
                bail!("--params must be a JSON object, such as '{{\"sleep_ms\": 100}}'");
            }
            let pool = connect_and_register(&config, "run").await?;
            let id = queue::enqueue(
                &pool,
                &name,
                &params,
                idempotency_key.as_deref(),
                Trigger::Cli,
            )
            .await?;
            println!("{id}");
            finish_or_wait(&pool, id, wait, &wait_opts).await
        }
        Command::Runs {
            pipeline,
            status,
            limit,
            json,
        } => {
            let pool = connect(&config).await?;
            let filter = history::RunFilter {
                pipeline,
                status,
                before: None,
                limit,
            };
            let runs = history::list_runs(&pool, &filter).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                output::print_runs(&runs);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { run_id, json } => {
            let pool = connect(&config).await?;
            let id = parse_run_id(&run_id)?;
            let Some(detail) = history::run_detail(&pool, id).await? else {
                bail!("run {id} not found");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&detail)?);
            } else {
                output::print_run(&detail);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry {
            run_id,
            wait,
            wait_opts,
        } => {
            let pool = connect_and_register(&config, "retry").await?;
            let new = queue::retry(&pool, parse_run_id(&run_id)?).await?;
            println!("{new}");
            finish_or_wait(&pool, new, wait, &wait_opts).await
        }
        Command::Rerun {
            run_id,
            wait,
            wait_opts,
        } => {
            let pool = connect_and_register(&config, "rerun").await?;
            let new = queue::rerun(&pool, parse_run_id(&run_id)?, Trigger::Cli).await?;
            println!("{new}");
            finish_or_wait(&pool, new, wait, &wait_opts).await
        }
        Command::Cancel { run_id } => {
            let pool = connect(&config).await?;
            let id = parse_run_id(&run_id)?;
            queue::cancel(&pool, id).await?;
            println!("run {id} cancelled");
            Ok(ExitCode::SUCCESS)
        }
        Command::Prune { dry_run } => {
            let pool = connect_ready(&config).await?;
            let report = if dry_run {
                retention::dry_run(&pool, &config.retention).await?
            } else {
                let never = CancellationToken::new();
                retention::prune(&pool, &config.retention, Duration::ZERO, &never).await?
            };
            output::print_pruned(&report, &config.retention, dry_run);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Queue(args)) => {
            let pool = connect_ready(&config).await?;
            bench::queue::run(&config, pool, &args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Pipeline(args)) => {
            let pool = connect_ready(&config).await?;
            bench::pipeline::run(&config, pool, &args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `crm-sync pipelines [disable|enable NAME]`.
async fn pipelines(
    pool: &Db,
    action: Option<PipelinesAction>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let by = format!("cli:{}", registry::processes::new_process_id());
    match action {
        Some(PipelinesAction::Disable { name }) => {
            registry::set_enabled(pool, &name, false, &by).await?;
            println!(
                "pipeline {name} disabled: no scheduled ticks and no new runs until `crm-sync pipelines enable {name}`"
            );
        }
        Some(PipelinesAction::Enable { name }) => {
            registry::set_enabled(pool, &name, true, &by).await?;
            println!("pipeline {name} enabled");
        }
        None => {
            let list = registry::list(pool).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                output::print_pipelines(&list);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `crm-sync migrate`: creates the database if missing, applies the migrations (over `listen_url`'s
/// direct connection when there is one, so sqlx's migration lock holds), and registers the config's
/// pipelines, so that SQL callers can enqueue them at once.
async fn migrate(config: &Config) -> anyhow::Result<ExitCode> {
    let url = config.require_database_url()?;
    let direct = db::direct_url(config);
    if db::create_database_if_missing(direct.unwrap_or(url)).await? {
        println!("database created");
    }
    match direct {
        Some(direct) => {
            let pool = db::connect(direct, 1, crate::config::Pooler::None).await?;
            db::migrate(&pool, true).await?;
            pool.close().await;
        }
        None => {
            let pool = connect(config).await?;
            db::migrate(&pool, false).await?;
            pool.close().await;
        }
    }
    let pool = connect(config).await?;
    register_once(&pool, config, "migrate").await?;
    println!(
        "migrations applied; schema crm_sync is current; {} pipeline(s) registered",
        config.pipelines.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn check_config(cli: &Cli) -> ExitCode {
    let explicit = cli.config != std::path::Path::new(DEFAULT_CONFIG_PATH);
    match Config::load(&cli.config, explicit) {
        Ok(config) => {
            let from = config
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| format!("(no file at {DEFAULT_CONFIG_PATH})"));
            println!("{from}: OK, {} pipeline(s)", config.pipelines.len());
            for p in &config.pipelines {
                println!(
                    "  {:<24} steps: {}; schedule: {} ({}); max_attempts {}; step_timeout {}{}",
                    p.name,
                    p.step_names().join(" -> "),
                    p.schedule.as_deref().unwrap_or("manual only"),
                    p.timezone,
                    p.max_attempts,
                    humantime::format_duration(p.step_timeout),
                    if p.enabled { "" } else { "; disabled" },
                );
            }
            for w in &config.notifications.webhooks {
                let events: Vec<&str> = w.events.iter().map(|e| e.kind()).collect();
                let only = w.pipelines.as_ref().map(|p| p.join(", "));
                println!(
                    "  webhook {:<16} {} on {} for {}",
                    w.name,
                    w.format.as_str(),
                    events.join(", "),
                    only.as_deref().unwrap_or("every pipeline")
                );
            }
            println!(
                "  retention{}: {}, every {}",
                if config.retention.enabled {
                    ""
                } else {
                    " (disabled in serve)"
                },
                output::retention_policy(&config.retention),
                humantime::format_duration(config.retention.interval)
            );
            if config.database_url.is_none() {
                println!("note: no database_url in the file and DATABASE_URL is not set");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `crm-sync healthcheck`: one GET, exit 0 on 200; the reason on stderr otherwise.
async fn healthcheck(url: &str, timeout: Duration) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder().timeout(timeout).build()?;
    match client.get(url).send().await {
        Ok(resp) if resp.status().is_success() => Ok(ExitCode::SUCCESS),
        Ok(resp) => {
            eprintln!("unhealthy: {url} answered {}", resp.status());
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!(
                "unhealthy: {url}: {:#}",
                anyhow::Error::from(e.without_url())
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn serve_fixture(fixture: FixtureCommand) -> anyhow::Result<ExitCode> {
    use crate::fixtures::{ezfocus, qashier};
    let bind = |host: std::net::IpAddr, port: u16| async move {
        let addr = SocketAddr::new(host, port);
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))
    };
    match fixture {
        FixtureCommand::Ezfocus {
            host,
            port,
            rows,
            seed,
            edition,
        } => {
            let cfg = ezfocus::EzFocusConfig {
                rows,
                seed,
                edition,
                ..ezfocus::EzFocusConfig::default()
            };
            let key = cfg.accounts_key().unwrap_or_default().to_string();
            let answered =
                ezfocus::expected_account_count(&cfg, &ezfocus::AccountsQuery::standard());
            let server = ezfocus::EzFocusFixture::start(cfg, bind(host, port).await?).await?;
            println!(
                "EZ Focus fixture at {}/api ({answered} accounts, edition {edition})",
                server.base_url()
            );
            println!(
                "  user {} / password {}, accounts key {key}",
                ezfocus::DEFAULT_USERNAME,
                ezfocus::DEFAULT_PASSWORD
            );
            stop_on_signal(CancellationToken::new()).await;
            server.stop().await;
        }
        FixtureCommand::Qashier {
            host,
            port,
            rows,
            list_delay,
            edition,
        } => {
            let cfg = qashier::QashierConfig {
                rows,
                list_delay,
                edition,
                ..qashier::QashierConfig::default()
            };
            let server = qashier::QashierFixture::start(cfg, bind(host, port).await?).await?;
            println!(
                "Qashier fixture at {} (edition {edition})",
                server.login_url()
            );
            println!(
                "  user {} / password {}",
                qashier::DEFAULT_USERNAME,
                qashier::DEFAULT_PASSWORD
            );
            stop_on_signal(CancellationToken::new()).await;
            server.stop().await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_run_id(s: &str) -> anyhow::Result<Uuid> {
    s.parse().map_err(|_| {
        anyhow::anyhow!(
            "\"{s}\" is not a run id (a UUID such as 0b6c2f1e-8c1d-4d4e-9a53-3f1f2d7b9e10)"
        )
    })
}

/// Which parts of the service a process runs.
#[derive(Debug, Clone, Copy)]
struct Roles {
    /// The full HTTP API on `[server] listen`.
    api: bool,
    /// Without the API: health and metrics only, on this address.
    ops_listen: Option<SocketAddr>,
    workers: bool,
    scheduler: bool,
    /// Sends webhook notifications, when the config has webhooks.
    notifier: bool,
    /// Prunes old run history, when [retention] is enabled.
    retention: bool,
}

impl Roles {
    /// Everything `serve` runs by default.
    fn everything() -> Self {
        Self {
            api: true,
            ops_listen: None,
            workers: true,
            scheduler: true,
            notifier: true,
            retention: true,
        }
    }

    fn only_workers(ops_listen: Option<SocketAddr>) -> Self {
        Self {
            api: false,
            ops_listen,
            workers: true,
            scheduler: false,
            notifier: true,
            retention: false,
        }
    }

    fn only_scheduler(ops_listen: Option<SocketAddr>) -> Self {
        Self {
            api: false,
            ops_listen,
            workers: false,
            scheduler: true,
            notifier: false,
            retention: false,
        }
    }
}

/// Runs the chosen roles in this process until SIGTERM or Ctrl-C, then shuts each down gracefully.
async fn serve(
    config: Config,
    roles: Roles,
    concurrency: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    serve_until(config, roles, concurrency, None, shutdown).await
}

/// [`serve`] until `shutdown` is cancelled; `tokens` replace the environment's API tokens.
async fn serve_until(
    config: Config,
    roles: Roles,
    concurrency: Option<usize>,
    tokens: Option<crate::api::Tokens>,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let Roles {
        api,
        ops_listen,
        workers,
        scheduler,
        notifier,
        retention,
    } = roles;
    let notifier = notifier && !config.notifications.webhooks.is_empty();
    if !api && !workers && !scheduler && !notifier {
        bail!("nothing to run: --no-api, --no-workers and --no-scheduler leave no role");
    }
    let mut config = config;
    if let Some(c) = concurrency {
        if c == 0 {
            bail!("--concurrency must be at least 1");
        }
        config.worker.concurrency = c;
    }
    // The process's direct connection (LISTEN, liveness lock) counts against max_connections too.
    let direct = u32::from(db::direct_url(&config).is_some());
    let pool = db::connect(
        config.require_database_url()?,
        config.worker.max_connections.saturating_sub(direct).max(1),
        config.pooler,
    )
    .await?;
    if !db::migrations_current(&pool).await? {
        bail!("the database schema is missing or outdated: run `crm-sync migrate` first");
    }
    let opts = WorkerOptions::from_config(&config);
    let process_roles = [
        (workers, Role::Worker),
        (scheduler, Role::Scheduler),
        (api, Role::Api),
        (notifier, Role::Notifier),
    ];
    let presence = Presence::start(
        pool.clone(),
        opts.direct_url.as_deref(),
        &[
            crate::queue::STEPS_CHANNEL,
            crate::queue::CANCEL_CHANNEL,
            crate::notify::CHANNEL,
        ],
        ProcessInfo {
            id: opts.id.clone(),
            roles: process_roles
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, role)| *role)
                .collect(),
            concurrency: if workers {
                config.worker.concurrency
            } else {
                0
            },
            lease: config.worker.lease,
        },
        Arc::new(config.clone()),
    )
    .await?;
    let mut roles = tokio::task::JoinSet::new();
    let metrics = crate::metrics::Metrics::new();
    if api {
        let tokens = match tokens {
            Some(t) => t,
            None => crate::api::Tokens::from_env()?,
        };
        if tokens.is_empty() {
            tracing::warn!(
                "no API tokens (CRM_SYNC_ADMIN_TOKENS, CRM_SYNC_READ_TOKENS): /api answers 401 to everyone"
            );
        }
        let listener = bind(config.server.listen).await?;
        // The API's own small pool: streams and pages cannot take the workers' connections.
        let api_pool = db::connect(
            config.require_database_url()?,
            config.server.db_connections,
            config.pooler,
        )
        .await?;
        let state = crate::api::AppState::new(api_pool, Arc::new(config.clone()), tokens)
            .with_metrics(metrics.clone());
        roles.spawn(crate::api::serve(listener, state, shutdown.clone()));
    } else if let Some(addr) = ops_listen {
        let listener = bind(addr).await?;
        let mut state = crate::api::AppState::new(
            pool.clone(),
            Arc::new(config.clone()),
            crate::api::Tokens::default(),
        )
        .with_metrics(metrics.clone());
        state.cluster = None;
        let app = crate::api::ops_router(state);
        let limits = config.server.clone();
        roles.spawn(crate::api::serve_router(
            listener,
            app,
            limits,
            shutdown.clone(),
        ));
    }
    if scheduler {
        let scheduler = Scheduler::new(pool.clone(), &config)?.with_metrics(metrics.clone());
        roles.spawn(scheduler.run(shutdown.clone()));
    }
    if workers {
        let worker = Worker::new(pool.clone(), Executor::new(Arc::new(config.clone())), opts)
            .with_metrics(metrics.clone())
            .with_presence(presence.clone());
        let token = shutdown.clone();
        roles.spawn(async move { worker.run(token).await.map(|_| ()) });
    }
    if notifier {
        let notifier = crate::notify::Notifier::new(pool.clone(), &config)?
            .with_metrics(metrics.clone())
            .with_wakeups(presence.subscribe());
        roles.spawn(notifier.run(shutdown.clone()));
    }
    if retention && config.retention.enabled {
        let pruner = retention::Pruner::new(pool.clone(), &config.retention);
        roles.spawn(pruner.run(shutdown.clone()));
    }
    let mut result = Ok(());
    while let Some(done) = roles.join_next().await {
        // One role failing stops the others: a half-running service is worse than a restart.
        if let Err(e) = done.map_err(anyhow::Error::from).and_then(|r| r) {
            shutdown.cancel();
            result = Err(e);
        }
    }
    presence.stop().await;
    pool.close().await;
    result.map(|_| ExitCode::SUCCESS)
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// SIGTERM or Ctrl-C: stop claiming and shut down gracefully.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
    shutdown.cancel();
}

async fn finish_or_wait(
    pool: &Db,
    id: Uuid,
    wait: bool,
    opts: &WaitOpts,
) -> anyhow::Result<ExitCode> {
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = tokio::time::Instant::now() + opts.wait_timeout.min(crate::config::MAX_DURATION);
    loop {
        let Some((status, error)) = history::run_status(pool, id).await? else {
            bail!("run {id} disappeared while waiting");
        };
        match status.as_str() {
            "succeeded" => {
                eprintln!("run {id} succeeded");
                return Ok(ExitCode::SUCCESS);
            }
            "failed" | "cancelled" => {
                eprintln!("run {id} {status}: {}", error.unwrap_or_default());
                return Ok(ExitCode::FAILURE);
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "run {id} is still {status} after {}",
                humantime::format_duration(opts.wait_timeout)
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
