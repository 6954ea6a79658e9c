//! The TOML config file: database, server, worker settings and the `[[pipelines]]`.
//!
//! Loading validates the whole file and reports every problem at once, each with its line and the
//! pipeline it belongs to, so `crm-sync check-config` is one round of fixes rather than one per error.
//! Secrets never live here: the only connection string that may appear is `database_url`, and the
//! `DATABASE_URL` environment variable overrides it. Webhook URLs (which carry their own token) are
//! secret references, never literals.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::backup::BackupConfig;
use crate::destinations::DestinationConfig;
use crate::scheduler::cron::CatchUp;
use crate::secrets::SecretRef;
use crate::transform::TransformConfig;
use crate::validate::ValidateConfig;

mod fingerprint;
mod http_limits;

pub use fingerprint::fingerprint;

/// Where the config file is looked for when neither `--config` nor `CRM_SYNC_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "./crm-sync.toml";

/// The whole, validated configuration of a crm-sync process.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages); `None` when no file was found at the default path.
    pub path: Option<PathBuf>,
    /// Connection string of the crm-sync database (`DATABASE_URL` wins over the file).
    pub database_url: Option<String>,
    /// A direct connection to the same database (not through a transaction-mode pooler) for LISTEN
    /// and the workers' liveness locks (`CRM_SYNC_LISTEN_URL` wins over the file).
    pub listen_url: Option<String>,
    /// What `database_url` reaches: the server itself, or a pooler in transaction mode
    /// (`CRM_SYNC_POOLER` wins over the file).
    pub pooler: Pooler,
    pub server: ServerConfig,
    pub worker: WorkerConfig,
    pub pipelines: Vec<PipelineConfig>,
    pub notifications: NotificationsConfig,
    pub retention: RetentionConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the admin API, metrics and console.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where people reach the console (behind a proxy, on another host name): the base of links sent
    /// in notifications. `None` means `http://{listen}`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Connections of the API's own pool to crm-sync's database, apart from the workers' pool so that
    /// pages and event streams can never take the connections claims, heartbeats and completions need.
    #[serde(default = "default_api_connections")]
    pub db_connections: u32,
    /// Event streams (`/api/events`, `/api/runs/{id}/events`) open at once, in all.
    #[serde(default = "default_max_event_streams")]
    pub max_event_streams: usize,
    /// Event streams open at once with one token (each console tab may hold one).
    #[serde(default = "default_max_event_streams_per_token")]
    pub max_event_streams_per_token: usize,
    /// Slow clients and connection floods: see [`http_limits`].
    #[serde(default = "http_limits::header_timeout", deserialize_with = "duration")]
    pub header_timeout: Duration,
    #[serde(
        default = "http_limits::request_timeout",
        deserialize_with = "duration"
    )]
    pub request_timeout: Duration,
    #[serde(default = "http_limits::max_connections")]
    pub max_connections: usize,
    #[serde(default = "http_limits::auth_failures_per_minute")]
    pub auth_failures_per_minute: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            public_url: None,
            db_connections: default_api_connections(),
            max_event_streams: default_max_event_streams(),
            max_event_streams_per_token: default_max_event_streams_per_token(),
            header_timeout: http_limits::header_timeout(),
            request_timeout: http_limits::request_timeout(),
            max_connections: http_limits::max_connections(),
            auth_failures_per_minute: http_limits::auth_failures_per_minute(),
        }
    }
}

fn default_api_connections() -> u32 {
    3
}

fn default_max_event_streams() -> usize {
    200
}

fn default_max_event_streams_per_token() -> usize {
    50
}

impl ServerConfig {
    /// The base URL of console links, without a trailing slash, so that a notification can point at
    /// `{base}/runs/{id}` wherever the console is actually reached.
    pub fn console_base(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("http://{}", self.listen),
        }
    }
}

/// What `database_url` connects to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooler {
    /// PostgreSQL itself, or a pooler in session mode: every connection is a session of its own.
    #[default]
    None,
    /// A pooler in transaction mode (PgBouncer, Supabase's port 6543): consecutive transactions of one
    /// connection may reach different server sessions, so no prepared statement, session setting,
    /// LISTEN or session lock outlives a transaction.
    Transaction,
}

impl std::str::FromStr for Pooler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Pooler::None),
            "transaction" => Ok(Pooler::Transaction),
            other => Err(format!(
                "pooler must be \"none\" or \"transaction\", not \"{}\"",
                shown(other)
            )),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// How a worker process claims and runs steps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Steps run at once by one worker process.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How long a claimed step stays ours without a heartbeat; a dead worker's steps are re-queued
    /// after this. Heartbeats renew it every third of it.
    #[serde(default = "default_lease", deserialize_with = "duration")]
    pub lease: Duration,
    /// Fallback polling interval when no NOTIFY arrives (retries that come due, lost notifications).
    #[serde(default = "default_poll_interval", deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// On SIGTERM, how long in-flight steps may take to finish before they are released to the queue.
    #[serde(default = "default_shutdown_grace", deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Most steps claimed or completed in one round trip.
    #[serde(default = "default_claim_batch")]
    pub claim_batch: usize,
    /// Connections in this process's pool.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: default_concurrency(),
            lease: default_lease(),
            poll_interval: default_poll_interval(),
            shutdown_grace: default_shutdown_grace(),
            claim_batch: default_claim_batch(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_concurrency() -> usize {
    8
}
fn default_lease() -> Duration {
    Duration::from_secs(30)
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_claim_batch() -> usize {
    100
}
fn default_max_connections() -> u32 {
    10
}

/// `[retention]`: how long finished runs are kept before `serve` (or `crm-sync prune`) deletes them
/// with their steps, attempts and notifications. Without a limit the history grows by every scheduled
/// run forever and the hot queries slow down with it; failures are kept longer because they are what
/// people come back to read. See docs/retention.md.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Whether `serve` prunes at all (`crm-sync prune` works either way).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Age after which succeeded runs go; `None` ("never") keeps them.
    #[serde(default = "default_keep_succeeded", deserialize_with = "retention_age")]
    pub succeeded: Option<Duration>,
    /// Age after which failed runs go; `None` ("never") keeps them.
    #[serde(default = "default_keep_failed", deserialize_with = "retention_age")]
    pub failed: Option<Duration>,
    /// Age after which cancelled runs go; `None` ("never") keeps them.
    #[serde(default = "default_keep_cancelled", deserialize_with = "retention_age")]
    pub cancelled: Option<Duration>,
    /// The newest runs of each pipeline and status that are kept whatever their age, so a pipeline
    /// that stopped running still shows its recent history.
    #[serde(default = "default_keep_last")]
    pub keep_last: u32,
    /// Most runs deleted in one transaction: short transactions and locks next to the live queue.
    #[serde(default = "default_prune_batch_size")]
    pub batch_size: u32,
    /// How often `serve` looks for runs to prune.
    #[serde(default = "default_prune_interval", deserialize_with = "duration")]
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            succeeded: default_keep_succeeded(),
            failed: default_keep_failed(),
            cancelled: default_keep_cancelled(),
            keep_last: default_keep_last(),
            batch_size: default_prune_batch_size(),
            interval: default_prune_interval(),
        }
    }
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn default_keep_succeeded() -> Option<Duration> {
    Some(DAY * 30)
}
fn default_keep_failed() -> Option<Duration> {
    Some(DAY * 180)
}
fn default_keep_cancelled() -> Option<Duration> {
    Some(DAY * 30)
}
fn default_keep_last() -> u32 {
    100
}
fn default_prune_batch_size() -> u32 {
    1000
}
fn default_prune_interval() -> Duration {
    Duration::from_secs(3600)
}

/// A retention age: a duration ("30d", "12w", "1h") or "never".
fn retention_age<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim() == "never" {
        return Ok(None);
    }
    humantime::parse_duration(&s).map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid age \"{s}\": {e} (write e.g. \"30d\", \"12w\", or \"never\")"
        ))
    })
}

/// One `[[pipelines]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub name: String,
    /// Cron expression; no schedule means the pipeline runs only when asked.
    #[serde(default)]
    pub schedule: Option<String>,
    /// IANA time zone the schedule is read in.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// A disabled pipeline is neither scheduled nor accepted for new runs.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The digest of this table as written ([`fingerprint`]), set when the file is parsed.
    #[serde(skip)]
    pub fingerprint: String,
    /// Attempts per step before the run fails (retryable errors only; terminal errors fail at once).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_step_timeout", deserialize_with = "duration")]
    pub step_timeout: Duration,
    /// First retry delay; doubles per attempt with jitter, capped by `retry_backoff_max`.
    #[serde(default = "default_retry_backoff", deserialize_with = "duration")]
    pub retry_backoff: Duration,
    #[serde(default = "default_retry_backoff_max", deserialize_with = "duration")]
    pub retry_backoff_max: Duration,
    /// Runs of this pipeline active at once (1 keeps two full refreshes from racing); 0 = no limit.
    #[serde(default = "default_max_concurrent_runs")]
    pub max_concurrent_runs: u32,
    /// What to do with ticks missed while no scheduler was running: "skip", "latest" (default),
    /// "all" (at most 100) or "all:N".
    #[serde(default = "default_catch_up")]
    pub catch_up: CatchUp,
    /// A pipeline whose last success is older than this is reported stale.
    #[serde(default, deserialize_with = "optional_duration")]
    pub freshness_sla: Option<Duration>,
    /// Key values in errors, outputs and webhooks as themselves, not as `key#<hash>` ([`crate::keys`]);
    /// only for keys that are not personal data.
    #[serde(default)]
    pub show_key_values: bool,
    pub source: SourceConfig,
    /// Where raw extracts are kept (default: a local directory).
    #[serde(default)]
    pub backup: BackupConfig,
    /// How raw records become the destination's columns.
    #[serde(default)]
    pub transform: Option<TransformConfig>,
    /// The gate a batch must pass before anything is replaced.
    #[serde(default)]
    pub validate: Option<ValidateConfig>,
    /// Where batches are loaded.
    #[serde(default)]
    pub destination: Option<DestinationConfig>,
}

fn default_timezone() -> String {
    "UTC".to_string()
}
fn default_true() -> bool {
    true
}
fn default_max_attempts() -> u32 {
    5
}
fn default_step_timeout() -> Duration {
    Duration::from_secs(9 * 60)
}
fn default_retry_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_backoff_max() -> Duration {
    Duration::from_secs(10 * 60)
}
fn default_max_concurrent_runs() -> u32 {
    1
}
fn default_catch_up() -> CatchUp {
    CatchUp::Latest
}

/// Where a pipeline's data comes from; `kind` selects the variant.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Runs only no-op steps: the smoke-test and benchmark pipeline.
    Noop(crate::sources::noop::NoopConfig),
    /// One GET of a JSON answer.
    HttpJson(crate::sources::http::HttpJsonConfig),
    /// The EZ Focus API (a preset of `http_json`).
    Ezfocus(crate::sources::http::EzFocusSourceConfig),
    /// A back office without an API: headless Chromium logs in and downloads an export.
    BrowserExport(crate::sources::browser::BrowserExportConfig),
}

/// `[notifications]`: where run failures and recoveries are announced.
#[derive(Debug, Clone, Default)]
pub struct NotificationsConfig {
    pub webhooks: Vec<WebhookConfig>,
}

/// One `[[notifications.webhooks]]` table: a receiver of failure and recovery messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the webhook in logs and in `crm_sync.webhooks`, where the URL itself never goes.
    pub name: String,
    /// A disabled webhook gets no new messages (the way to retire one: leaving it out of a config
    /// disables nothing, since other processes' configs may still have it).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The URL is a secret (Slack's carries the token in its path), so only a reference is accepted.
    #[serde(deserialize_with = "webhook_url")]
    pub url: SecretRef,
    pub format: WebhookFormat,
    /// Which events are sent (default: both).
    #[serde(default = "default_webhook_events")]
    pub events: Vec<WebhookEvent>,
    /// Only runs of these pipelines are announced (default: every pipeline).
    #[serde(default)]
    pub pipelines: Option<Vec<String>>,
    /// Attempts per message before it is given up (state `failed`).
    #[serde(default = "default_webhook_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt with jitter, capped by `retry_backoff_max`.
    #[serde(default = "default_retry_backoff", deserialize_with = "duration")]
    pub retry_backoff: Duration,
    #[serde(default = "default_retry_backoff_max", deserialize_with = "duration")]
    pub retry_backoff_max: Duration,
    /// Bound on one POST, connection included.
    #[serde(default = "default_webhook_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

/// The body a webhook receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// Slack incoming webhooks (and compatible: Mattermost, Rocket.Chat): `text` plus `blocks`.
    Slack,
    /// A flat JSON object for programs.
    Json,
}

impl WebhookFormat {
    /// The name used in the config and stored in `crm_sync.webhooks.format`.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookFormat::Slack => "slack",
            WebhookFormat::Json => "json",
        }
    }
}

/// What happened to a run, as named in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEvent {
    /// A run failed.
    Failure,
    /// A run succeeded after the pipeline's previous finished run had failed.
    Recovery,
}

impl WebhookEvent {
    /// The event kind stored in `crm_sync.notification_events` and sent in payloads.
    pub fn kind(self) -> &'static str {
        match self {
            WebhookEvent::Failure => "run_failed",
            WebhookEvent::Recovery => "run_recovered",
        }
    }
}

fn default_webhook_events() -> Vec<WebhookEvent> {
    vec![WebhookEvent::Failure, WebhookEvent::Recovery]
}
fn default_webhook_max_attempts() -> u32 {
    8
}
fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A webhook URL must be `{ env = .. }` or `{ file = .. }`. A literal string is refused with a message
/// that does not repeat it: the file may already be in version control, the log need not be too.
fn webhook_url<'de, D: Deserializer<'de>>(d: D) -> Result<SecretRef, D::Error> {
    match toml::Value::deserialize(d)? {
        toml::Value::String(_) => Err(serde::de::Error::custom(
            "a literal URL is not allowed (a webhook URL carries its token); \
             write url = { env = \"NAME\" } or url = { file = \"/run/secrets/name\" }",
        )),
        other => {
            SecretRef::deserialize(other).map_err(|e| serde::de::Error::custom(e.message().trim()))
        }
    }
}

impl PipelineConfig {
    /// The names of this pipeline's steps, in order.
    pub fn step_names(&self) -> Vec<String> {
        crate::pipeline::step_names(self)
    }
}

/// One problem found in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// What it is about: `pipelines[1] "accounts".max_attempts`, `worker`, ...
    pub location: String,
    pub message: String,
}

/// Every problem found in a config file.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub path: PathBuf,
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.issues.len();
        writeln!(
            f,
            "{}: {n} problem{} found",
            self.path.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for issue in &self.issues {
            let at = match issue.line {
                Some(line) => format!("{}:{line}", self.path.display()),
                None => self.path.display().to_string(),
            };
            writeln!(f, "  {at}: {}: {}", issue.location, issue.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    /// One problem without a line.
    fn one(path: &Path, location: &str, message: String) -> Self {
        ConfigErrors {
            path: path.to_path_buf(),
            issues: vec![ConfigIssue {
                line: None,
                location: location.into(),
                message,
            }],
        }
    }
}

impl Config {
    /// Loads the config file at `path`. A missing file is an error only when `explicit` (the user
    /// named it); at the default path it means "no pipelines", which suits `migrate` and friends.
    /// `DATABASE_URL` from the environment overrides the file's `database_url`.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigErrors> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut config = match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Config {
                path: None,
                database_url: None,
                listen_url: None,
                pooler: Pooler::None,
                server: ServerConfig::default(),
                worker: WorkerConfig::default(),
                pipelines: Vec::new(),
                notifications: NotificationsConfig::default(),
                retention: RetentionConfig::default(),
            },
            Err(e) => {
                return Err(ConfigErrors::one(
                    path,
                    "file",
                    format!("cannot read the config file: {e}"),
                ));
            }
        };
        if let Some(url) = env("DATABASE_URL") {
            config.database_url = Some(url);
        }
        if let Some(url) = env("CRM_SYNC_LISTEN_URL") {
            config.listen_url = Some(url);
        }
        if let Some(pooler) = env("CRM_SYNC_POOLER") {
            config.pooler = pooler
                .parse()
                .map_err(|e| ConfigErrors::one(path, "CRM_SYNC_POOLER", e))?;
        }
        Ok(config)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        let mut issues = Vec::new();
        let fail = |issues: Vec<ConfigIssue>| ConfigErrors {
            path: path.to_path_buf(),
            issues,
        };

        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.span().map(|s| LineIndex::new(text).line_of(s.start));
                return Err(fail(vec![ConfigIssue {
                    line,
                    location: "syntax".into(),
                    message: e.message().trim().to_string(),
                }]));
            }
        };

        let lines = LineIndex::new(text);
        let server_line = raw.server.as_ref().map(|s| lines.line_of(s.span().start));
        let server = section::<ServerConfig>(raw.server, &lines, "server", &mut issues);
        if let Some(s) = &server {
            check_server(s, server_line, &mut issues);
        }
        let worker_line = raw.worker.as_ref().map(|w| lines.line_of(w.span().start));
        let worker = section::<WorkerConfig>(raw.worker, &lines, "worker", &mut issues);
        if let Some(w) = &worker {
            check_worker(w, worker_line, &mut issues);
        }
        let retention_line = raw
            .retention
            .as_ref()
            .map(|r| lines.line_of(r.span().start));
        let retention = section::<RetentionConfig>(raw.retention, &lines, "retention", &mut issues);
        if let Some(r) = &retention {
            check_retention(r, retention_line, &mut issues);
        }

        // Every pipeline name in the file, valid or not, so a webhook filter naming a pipeline that has
        // problems of its own is not reported a second time as unknown.
        let pipeline_names: HashSet<String> = raw
            .pipelines
            .iter()
            .filter_map(|t| t.get_ref().get("name").and_then(|v| v.as_str()))
            .map(str::to_string)
            .collect();
        let notifications = webhooks(
            raw.notifications.unwrap_or_default().webhooks,
            &lines,
            &pipeline_names,
            &mut issues,
        );

        let mut pipelines = Vec::new();
        let mut seen = HashSet::new();
        for (index, table) in raw.pipelines.into_iter().enumerate() {
            let line = Some(lines.line_of(table.span().start));
            let table = table.into_inner();
            let label = match table.get("name").and_then(|v| v.as_str()) {
                Some(name) => format!("pipelines[{index}] \"{}\"", shown(name)),
                None => format!("pipelines[{index}]"),
            };
            let fingerprint = fingerprint(&table);
            match deserialize_table::<PipelineConfig>(table) {
                Ok(mut p) => {
                    p.fingerprint = fingerprint;
                    let before = issues.len();
                    check_pipeline(&p, &label, line, &mut issues);
                    if !seen.insert(p.name.clone()) {
                        issues.push(ConfigIssue {
                            line,
                            location: format!("{label}.name"),
                            message: format!(
                                "pipeline name \"{}\" is used more than once",
                                shown(&p.name)
                            ),
                        });
                    }
                    if issues.len() == before {
                        pipelines.push(p);
                    }
                }
                Err((path, message)) => issues.push(ConfigIssue {
                    line,
                    location: format!("{label}{path}"),
                    message,
                }),
            }
        }

        if !issues.is_empty() {
            return Err(fail(issues));
        }
        Ok(Config {
            path: Some(path.to_path_buf()),
            database_url: raw.database_url,
            listen_url: raw.listen_url,
            pooler: raw.pooler.unwrap_or_default(),
            server: server.unwrap_or_default(),
            worker: worker.unwrap_or_default(),
            pipelines,
            notifications,
            retention: retention.unwrap_or_default(),
        })
    }

    /// The pipeline called `name`, if configured.
    pub fn pipeline(&self, name: &str) -> Option<&PipelineConfig> {
        self.pipelines.iter().find(|p| p.name == name)
    }

    /// The database URL, or an error saying where to set it.
    pub fn require_database_url(&self) -> anyhow::Result<&str> {
        self.database_url.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "no database configured: set DATABASE_URL or database_url in {}",
                self.path
                    .as_deref()
                    .unwrap_or(Path::new(DEFAULT_CONFIG_PATH))
                    .display()
            )
        })
    }
}

/// The file's top level, with each section kept raw so that each is checked on its own and every
/// problem is reported, not just the first.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database_url: Option<String>,
    listen_url: Option<String>,
    pooler: Option<Pooler>,
    server: Option<toml::Spanned<toml::Table>>,
    worker: Option<toml::Spanned<toml::Table>>,
    #[serde(default)]
    pipelines: Vec<toml::Spanned<toml::Table>>,
    notifications: Option<RawNotifications>,
    retention: Option<toml::Spanned<toml::Table>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNotifications {
    #[serde(default)]
    webhooks: Vec<toml::Spanned<toml::Table>>,
}

fn section<T: for<'de> Deserialize<'de>>(
    raw: Option<toml::Spanned<toml::Table>>,
    lines: &LineIndex,
    name: &str,
    issues: &mut Vec<ConfigIssue>,
) -> Option<T> {
    let raw = raw?;
    let line = Some(lines.line_of(raw.span().start));
    match deserialize_table::<T>(raw.into_inner()) {
        Ok(v) => Some(v),
        Err((path, message)) => {
            issues.push(ConfigIssue {
                line,
                location: format!("{name}{path}"),
                message,
            });
            None
        }
    }
}

/// Deserializes one table; on failure returns where in it (`.source.key`, empty for the table
/// itself) and what: serde's own message says "invalid type: string, expected a boolean" without
/// naming the field.
fn deserialize_table<T: for<'de> Deserialize<'de>>(
    table: toml::Table,
) -> Result<T, (String, String)> {
    let (mut path, message) = match try_table::<T>(&table) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    // Inside a `kind`-tagged table (source, backup, destination) serde loses the field's name.
    // Find it by leaving the table's fields out one at a time: without the culprit the same error
    // no longer comes first (a missing required field is only reported after every given one).
    let segments: Vec<&str> = path.split('.').filter(|p| !p.is_empty()).collect();
    if let Some(tagged) = sub_table(&table, &segments).filter(|t| t.contains_key("kind")) {
        let culprit = tagged.keys().filter(|k| *k != "kind").find(|key| {
            let mut without = table.clone();
            if let Some(t) = sub_table_mut(&mut without, &segments) {
                t.remove(*key);
            }
            try_table::<T>(&without).err() != Some((path.clone(), message.clone()))
        });
        if let Some(key) = culprit {
            path = format!("{path}.{key}");
        }
    }
    Err((path, message))
}

fn try_table<T: for<'de> Deserialize<'de>>(table: &toml::Table) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            String::new()
        } else {
            format!(".{path}")
        };
        (path, e.into_inner().message().trim().to_string())
    })
}

/// The table at `path` (keys only: tagged tables are not inside arrays here).
fn sub_table<'a>(table: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Table> {
    path.iter()
        .try_fold(table, |t, key| t.get(*key)?.as_table())
}

fn sub_table_mut<'a>(table: &'a mut toml::Table, path: &[&str]) -> Option<&'a mut toml::Table> {
    path.iter()
        .try_fold(table, |t, key| t.get_mut(*key)?.as_table_mut())
}

fn check_worker(w: &WorkerConfig, line: Option<usize>, issues: &mut Vec<ConfigIssue>) {
    let mut bad = |field: &str, message: &str| {
        issues.push(ConfigIssue {
            line,
            location: format!("worker.{field}"),
            message: message.to_string(),
        })
    };
    if w.concurrency == 0 || w.concurrency > 10_000 {
        bad("concurrency", "must be between 1 and 10000");
    }
    if w.claim_batch == 0 || w.claim_batch > 10_000 {
        bad("claim_batch", "must be between 1 and 10000");
    }
    if w.lease < Duration::from_millis(300) || w.lease > Duration::from_secs(24 * 3600) {
        bad(
            "lease",
            "must be between 300ms and 24h (heartbeats renew it every third)",
        );
    }
    if w.poll_interval.is_zero() {
        bad("poll_interval", "must be greater than zero");
    }
    if w.max_connections < 2 {
        bad(
            "max_connections",
            "must be at least 2 (one direct connection for LISTEN and the liveness lock, one for queries)",
        );
    }
}

fn check_retention(r: &RetentionConfig, line: Option<usize>, issues: &mut Vec<ConfigIssue>) {
    let mut bad = |field: &str, message: &str| {
        issues.push(ConfigIssue {
            line,
            location: format!("retention.{field}"),
            message: message.to_string(),
        })
    };
    for (field, age) in [
        ("succeeded", r.succeeded),
        ("failed", r.failed),
        ("cancelled", r.cancelled),
    ] {
        if age.is_some_and(|a| a < Duration::from_secs(3600)) {
            bad(
                field,
                "must be at least 1h, or \"never\" (a shorter age deletes runs people are still looking at)",
            );
        }
    }
    if r.keep_last > 1_000_000 {
        bad("keep_last", "must be between 0 and 1000000");
    }
    if r.batch_size == 0 || r.batch_size > 100_000 {
        bad("batch_size", "must be between 1 and 100000");
    }
    if r.interval < Duration::from_secs(1) {
        bad("interval", "must be at least 1s");
    }
}

fn check_server(s: &ServerConfig, line: Option<usize>, issues: &mut Vec<ConfigIssue>) {
    http_limits::check(s, line, issues);
    if let Some(url) = &s.public_url {
        let ok = reqwest::Url::parse(url).is_ok_and(|u| {
            matches!(u.scheme(), "http" | "https")
                && u.host().is_some()
                && u.query().is_none()
                && u.fragment().is_none()
        });
        if !ok {
            issues.push(ConfigIssue {
                line,
                location: "server.public_url".into(),
                message: format!(
                    "\"{url}\" is not an http(s) base URL such as \"https://crm-sync.example.com\""
                ),
            });
        }
    }
    let mut bad = |field: &str, message: String| {
        issues.push(ConfigIssue {
            line,
            location: format!("server.{field}"),
            message,
        })
    };
    if !(1..=100).contains(&s.db_connections) {
        bad(
            "db_connections",
            format!("must be between 1 and 100, not {}", s.db_connections),
        );
    }
    for (field, value) in [
        ("max_event_streams", s.max_event_streams),
        ("max_event_streams_per_token", s.max_event_streams_per_token),
    ] {
        if !(1..=100_000).contains(&value) {
            bad(field, format!("must be between 1 and 100000, not {value}"));
        }
    }
}

/// Deserializes and checks every `[[notifications.webhooks]]` table; the valid ones are returned.
fn webhooks(
    raw: Vec<toml::Spanned<toml::Table>>,
    lines: &LineIndex,
    pipeline_names: &HashSet<String>,
    issues: &mut Vec<ConfigIssue>,
) -> NotificationsConfig {
    let mut webhooks = Vec::new();
    let mut seen = HashSet::new();
    for (index, table) in raw.into_iter().enumerate() {
        let line = Some(lines.line_of(table.span().start));
        let table = table.into_inner();
        let label = match table.get("name").and_then(|v| v.as_str()) {
            Some(name) => format!("notifications.webhooks[{index}] \"{}\"", shown(name)),
            None => format!("notifications.webhooks[{index}]"),
        };
        let before = issues.len();
        match deserialize_table::<WebhookConfig>(table) {
            Ok(w) => {
                check_webhook(&w, &label, line, pipeline_names, issues);
                if !seen.insert(w.name.clone()) {
                    issues.push(ConfigIssue {
                        line,
                        location: format!("{label}.name"),
                        message: format!(
                            "webhook name \"{}\" is used more than once",
                            shown(&w.name)
                        ),
                    });
                }
                if issues.len() == before {
                    webhooks.push(w);
                }
            }
            Err((path, message)) => issues.push(ConfigIssue {
                line,
                location: format!("{label}{path}"),
                message,
            }),
        }
    }
    NotificationsConfig { webhooks }
}

fn check_webhook(
    w: &WebhookConfig,
    label: &str,
    line: Option<usize>,
    pipeline_names: &HashSet<String>,
    issues: &mut Vec<ConfigIssue>,
) {
    let mut bad = |field: &str, message: String| {
        issues.push(ConfigIssue {
            line,
            location: format!("{label}.{field}"),
            message,
        })
    };
    if !valid_name(&w.name) {
        bad(
            "name",
            format!(
                "\"{}\" is not a valid webhook name (1-64 characters: letters, digits, '_', '-', '.')",
                shown(&w.name)
            ),
        );
    }
    if let Err(message) = w.url.check() {
        bad("url", message);
    }
    if w.events.is_empty() {
        bad(
            "events",
            "must name at least one of \"failure\", \"recovery\" (leave it out for both)".into(),
        );
    }
    match &w.pipelines {
        Some(list) if list.is_empty() => bad(
            "pipelines",
            "must name at least one pipeline (leave it out for every pipeline)".into(),
        ),
        Some(list) => {
            for name in list.iter().filter(|n| !pipeline_names.contains(*n)) {
                let mut known: Vec<&str> = pipeline_names.iter().map(String::as_str).collect();
                known.sort_unstable();
                bad(
                    "pipelines",
                    format!(
                        "unknown pipeline \"{name}\" (configured: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
        }
        None => {}
    }
    if w.max_attempts == 0 || w.max_attempts > 100 {
        bad("max_attempts", "must be between 1 and 100".into());
    }
    if w.timeout.is_zero() {
        bad("timeout", "must be greater than zero".into());
    }
    if w.retry_backoff > w.retry_backoff_max {
        bad(
            "retry_backoff",
            "must not be larger than retry_backoff_max".into(),
        );
    }
}

/// Pipeline and webhook names: 1-64 of letters, digits, `_`, `-`, `.` (the database checks the same).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Pipeline names name backup directories too: on top of [`valid_name`] they start with a letter, a
/// digit or `_`, so `.`, `..` and hidden or option-like names (`.x`, `-x`) are refused.
fn valid_pipeline_name(name: &str) -> bool {
    valid_name(name)
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_pipeline(
    p: &PipelineConfig,
    label: &str,
    line: Option<usize>,
    issues: &mut Vec<ConfigIssue>,
) {
    let mut bad = |field: &str, message: String| {
        issues.push(ConfigIssue {
            line,
            location: format!("{label}.{field}"),
            message,
        })
    };
    if !valid_pipeline_name(&p.name) {
        bad(
            "name",
            format!(
                "\"{}\" is not a valid pipeline name (1-64 characters: letters, digits, '_', '-', '.', \
                 starting with a letter, a digit or '_')",
                shown(&p.name)
            ),
        );
    }
    if p.max_attempts == 0 || p.max_attempts > 100 {
        bad("max_attempts", "must be between 1 and 100".into());
    }
    if p.step_timeout.is_zero() {
        bad("step_timeout", "must be greater than zero".into());
    }
    if p.retry_backoff > p.retry_backoff_max {
        bad(
            "retry_backoff",
            "must not be larger than retry_backoff_max".into(),
        );
    }
    if p.timezone.parse::<chrono_tz::Tz>().is_err() {
        bad(
            "timezone",
            format!(
                "unknown time zone \"{}\" (use an IANA name such as America/Toronto)",
                shown(&p.timezone)
            ),
        );
    }
    if let Some(schedule) = &p.schedule {
        if schedule.trim().is_empty() {
            bad(
                "schedule",
                "must not be empty (leave it out for manual-only pipelines)".into(),
            );
        } else if let Err(e) = crate::scheduler::cron::Schedule::parse(schedule, &p.timezone)
            && !matches!(e, crate::scheduler::cron::ScheduleError::UnknownTimeZone(_))
        {
            bad("schedule", format!("\"{}\": {e}", shown(schedule)));
        }
    }
    let source = match &p.source {
        SourceConfig::Noop(noop) => noop.check(),
        SourceConfig::HttpJson(http) => http.check(),
        SourceConfig::Ezfocus(ez) => ez.to_http().check(),
        SourceConfig::BrowserExport(b) => b
            .validate()
            .and_then(|_| b.username.check())
            .and_then(|_| b.password.check()),
    };
    if let Err(message) = source {
        bad("source", message);
    }
    if let Err(message) = p.backup.check() {
        bad("backup", message);
    }
    let noop = matches!(p.source, SourceConfig::Noop(_));
    for (present, table) in [
        (p.transform.is_some(), "transform"),
        (p.validate.is_some(), "validate"),
        (p.destination.is_some(), "destination"),
    ] {
        if noop && present {
            bad(
                table,
                "a noop pipeline runs only no-op steps; remove this table".into(),
            );
        }
    }
    if let Some(t) = &p.transform
        && let Err(message) = t.check()
    {
        bad("transform", message);
    }
    if !noop && p.transform.is_none() && (p.validate.is_some() || p.destination.is_some()) {
        bad(
            "transform",
            "validate and destination need a [transform] that declares the columns".into(),
        );
    }
    if let (Some(v), Some(t)) = (&p.validate, &p.transform) {
        let columns: Vec<String> = t.columns.iter().map(|c| c.name.clone()).collect();
        if let Err(message) = v.check(&columns) {
            bad("validate", message);
        }
    }
    if let Some(d) = &p.destination
        && let Err(message) = d.check()
    {
        bad("destination", message);
    }
    if let (Some(d), Some(t)) = (&p.destination, &p.transform) {
        let columns: Vec<String> = t.columns.iter().map(|c| c.name.clone()).collect();
        if let Err(message) = d.check_columns(&columns) {
            bad("destination", message);
        }
    }
    if matches!(p.destination, Some(DestinationConfig::Bigquery { .. }))
        && !matches!(p.backup, BackupConfig::Gcs { .. })
    {
        bad(
            "backup",
            "a bigquery destination loads from Cloud Storage: use a backup with kind = \"gcs\""
                .into(),
        );
    }
}

/// Where each line of the file starts, so that finding the line of a byte offset is a binary search:
/// a file with 20,000 pipelines is checked in well under a second, not rescanned per pipeline.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { starts }
    }

    /// 1-based line number of a byte offset.
    fn line_of(&self, offset: usize) -> usize {
        self.starts.partition_point(|&start| start <= offset)
    }
}

/// A name as shown in messages: at most 64 characters, control characters escaped, so that a
/// 10 MB or binary name makes a readable one-line message.
fn shown(name: &str) -> String {
    let mut out: String = name.chars().take(64).flat_map(char::escape_debug).collect();
    if name.chars().nth(64).is_some() {
        out.push_str("...");
    }
    out
}

/// Durations are written the human way: "9m", "30s", "250ms", "1h 30m". Every config table with a
/// duration (sources included) reads it through this one function, so the message is the same.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    let parsed = humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration \"{}\": {e} (write e.g. \"30s\", \"9m\", \"250ms\")",
            shown(&s)
        ))
    })?;
    if parsed > MAX_DURATION {
        return Err(serde::de::Error::custom(format!(
            "duration \"{}\" is longer than 10 years",
            shown(&s)
        )));
    }
    Ok(parsed)
}

/// The longest duration the config accepts. Deadlines are computed as now + duration (by tokio,
/// chrono and PostgreSQL); "500000000y" parses but overflows them and panics a worker.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn minimal_noop_pipeline_gets_defaults() {
        let c = parse("[[pipelines]]\nname = \"noop\"\nsource = { kind = \"noop\" }\n").unwrap();
        let p = &c.pipelines[0];
        assert_eq!(p.max_attempts, 5);
        assert_eq!(p.step_timeout, Duration::from_secs(540));
        assert_eq!(p.max_concurrent_runs, 1);
        assert_eq!(p.step_names(), vec!["noop"]);
        assert_eq!(c.worker.concurrency, 8);
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = r#"
[worker]
concurrency = 0

[[pipelines]]
name = "a"
max_attempts = 0
timezone = "Mars/Olympus"
source = { kind = "noop" }

[[pipelines]]
name = "b"
step_timeout = "soon"
source = { kind = "noop" }

[[pipelines]]
name = "a"
source = { kind = "carrier-pigeon" }
"#;
        let err = parse(text).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains("worker.concurrency"), "{shown}");
        assert!(
            shown.contains("test.toml:5: pipelines[0] \"a\".max_attempts"),
            "{shown}"
        );
        assert!(shown.contains("Mars/Olympus"), "{shown}");
        assert!(
            shown.contains("test.toml:11: pipelines[1] \"b\""),
            "{shown}"
        );
        assert!(shown.contains("invalid duration \"soon\""), "{shown}");
        assert!(shown.contains("carrier-pigeon"), "{shown}");
        assert_eq!(err.issues.len(), 5, "{shown}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = parse("[[pipelines]]\nname = \"x\nsource = 1\n").unwrap_err();
        assert_eq!(err.issues[0].location, "syntax");
        assert_eq!(err.issues[0].line, Some(2), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = parse("databse_url = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("databse_url"), "{err}");
    }

    #[test]
    fn bad_schedules_time_zones_and_catch_up_name_the_pipeline() {
        let text = r#"
[[pipelines]]
name = "nightly"
schedule = "0 25 * * *"
source = { kind = "noop" }

[[pipelines]]
name = "bangkok"
schedule = "0 2 * * *"
timezone = "Asia/Bangkokk"
source = { kind = "noop" }

[[pipelines]]
name = "eager"
schedule = "@daily"
catch_up = "sometimes"
source = { kind = "noop" }
"#;
        let err = parse(text).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains(
                "test.toml:2: pipelines[0] \"nightly\".schedule: \"0 25 * * *\": hour field"
            ),
            "{shown}"
        );
        assert!(
            shown
                .contains("pipelines[1] \"bangkok\".timezone: unknown time zone \"Asia/Bangkokk\""),
            "{shown}"
        );
        assert!(
            shown.contains("pipelines[2] \"eager\"") && shown.contains("sometimes"),
            "{shown}"
        );
        assert_eq!(err.issues.len(), 3, "{shown}");
        let ok = parse("[[pipelines]]\nname = \"a\"\nschedule = \"*/5 * * * MON-FRI\"\ncatch_up = \"all:3\"\nsource = { kind = \"noop\" }\n").unwrap();
        assert_eq!(ok.pipelines[0].catch_up, CatchUp::All { max: 3 });
    }

    #[test]
    fn webhooks_get_defaults_and_console_links_a_base() {
        let text = r#"
[server]
public_url = "https://crm-sync.example.com/"

[[pipelines]]
name = "accounts"
source = { kind = "noop" }

[[notifications.webhooks]]
name = "ops-slack"
url = { env = "SLACK_WEBHOOK_URL" }
format = "slack"

[[notifications.webhooks]]
name = "pager.json"
url = { file = "/run/secrets/pager_url" }
format = "json"
events = ["failure"]
pipelines = ["accounts"]
max_attempts = 3
retry_backoff = "250ms"
timeout = "2s"
"#;
        let c = parse(text).unwrap();
        assert_eq!(c.server.console_base(), "https://crm-sync.example.com");
        let [slack, json] = &c.notifications.webhooks[..] else {
            panic!("two webhooks expected")
        };
        assert_eq!(slack.format, WebhookFormat::Slack);
        assert_eq!(
            slack.events,
            vec![WebhookEvent::Failure, WebhookEvent::Recovery]
        );
        assert_eq!((slack.max_attempts, slack.pipelines.clone()), (8, None));
        assert_eq!(slack.retry_backoff_max, Duration::from_secs(600));
        assert_eq!(slack.timeout, Duration::from_secs(10));
        assert_eq!(json.events, vec![WebhookEvent::Failure]);
        assert_eq!(json.pipelines, Some(vec!["accounts".to_string()]));
        assert_eq!(json.timeout, Duration::from_secs(2));
        let default = parse("").unwrap();
        assert_eq!(default.server.console_base(), "http://127.0.0.1:8080");
        assert!(default.notifications.webhooks.is_empty());
    }

    #[test]
    fn webhook_mistakes_name_their_line_and_never_echo_a_literal_url() {
        let text = r#"[server]
public_url = "crm-sync.example.com"

[[pipelines]]
name = "accounts"
source = { kind = "noop" }

[[notifications.webhooks]]
name = "literal"
url = "https://hooks.slack.com/services/T0/B0/SECRET-IN-FILE"
format = "slack"

[[notifications.webhooks]]
name = "teams"
url = { env = "X" }
format = "teams"

[[notifications.webhooks]]
name = "filtered"
url = { env = "X", file = "/y" }
format = "json"
pipelines = ["accounts", "nope"]
events = []
retry_backoff = "1h"

[[notifications.webhooks]]
name = "filtered"
url = { env = "X" }
format = "json"
"#;
        let err = parse(text).unwrap_err();
        let shown = err.to_string();
        assert!(!shown.contains("SECRET-IN-FILE"), "{shown}");
        for expected in [
            "test.toml:1: server.public_url: \"crm-sync.example.com\" is not an http(s) base URL",
            "test.toml:8: notifications.webhooks[0] \"literal\".url: a literal URL is not allowed",
            "test.toml:13: notifications.webhooks[1] \"teams\".format: unknown variant `teams`",
            "test.toml:18: notifications.webhooks[2] \"filtered\".url: a secret needs exactly one",
            "test.toml:18: notifications.webhooks[2] \"filtered\".pipelines: unknown pipeline \"nope\" (configured: accounts)",
            "test.toml:18: notifications.webhooks[2] \"filtered\".events: must name at least one",
            "test.toml:18: notifications.webhooks[2] \"filtered\".retry_backoff: must not be larger",
            "test.toml:26: notifications.webhooks[3] \"filtered\".name: webhook name \"filtered\" is used more than once",
        ] {
            assert!(
                shown.contains(expected),
                "missing {expected:?} in:\n{shown}"
            );
        }
        assert_eq!(err.issues.len(), 8, "{shown}");
    }

    #[test]
    fn retention_has_defaults_and_takes_never() {
        let default = parse("").unwrap().retention;
        assert!(default.enabled);
        assert_eq!(default.succeeded, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(default.failed, Some(Duration::from_secs(180 * 86_400)));
        assert_eq!(default.cancelled, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!((default.keep_last, default.batch_size), (100, 1000));
        assert_eq!(default.interval, Duration::from_secs(3600));
        let r = parse(
            "[retention]\nenabled = false\nsucceeded = \"2w\"\nfailed = \"never\"\nkeep_last = 0\n",
        )
        .unwrap()
        .retention;
        assert!(!r.enabled);
        assert_eq!(r.succeeded, Some(Duration::from_secs(14 * 86_400)));
        assert_eq!((r.failed, r.keep_last), (None, 0));
        let err = parse("\n[retention]\ncancelled = \"5m\"\nbatch_size = 1000000\n").unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("test.toml:2: retention.cancelled: must be at least 1h"),
            "{shown}"
        );
        assert!(
            shown.contains("test.toml:2: retention.batch_size"),
            "{shown}"
        );
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let one = "[[pipelines]]\nname = \"x\"\nsource = { kind = \"noop\" }\n";
        let err = parse(&format!("{one}{one}")).unwrap_err();
        assert!(err.to_string().contains("used more than once"), "{err}");
    }
}
