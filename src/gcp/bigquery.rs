//! BigQuery full refresh through load jobs, with gcp-bigquery-client 0.28.
//!
//! The only write path is a load job of NEWLINE_DELIMITED_JSON from a `gs://` URI with
//! `WRITE_TRUNCATE` and an explicit schema. BigQuery applies such a job atomically: the table shows
//! either the previous data or the whole new batch, never a mix, and a failed job changes nothing.
//! Staging the file in GCS first is also Google's recommended way to do it (the crate has no media
//! upload). Streaming inserts (`insertAll`) are never used: streamed rows sit in a buffer that
//! cannot be truncated for up to 90 minutes, so the next day's refresh would fail or duplicate.
//!
//! Jobs get a client-chosen job id, so a caller that lost the answer to `jobs.insert` (timeout,
//! crash) can call [`BigQueryLoader::load_truncate_with_job_id`] again with the same id: BigQuery
//! answers 409 and we attach to the existing job instead of loading twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gcp_bigquery_client::Client;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::client_builder::ClientBuilder;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::model::data_format_options::DataFormatOptions;
use gcp_bigquery_client::model::dataset::Dataset;
use gcp_bigquery_client::model::error_proto::ErrorProto;
use gcp_bigquery_client::model::field_type::FieldType;
use gcp_bigquery_client::model::get_query_results_parameters::GetQueryResultsParameters;
use gcp_bigquery_client::model::job::Job;
use gcp_bigquery_client::model::job_configuration::JobConfiguration;
use gcp_bigquery_client::model::job_configuration_load::JobConfigurationLoad;
use gcp_bigquery_client::model::job_configuration_query::JobConfigurationQuery;
use gcp_bigquery_client::model::job_reference::JobReference;
use gcp_bigquery_client::model::query_request::QueryRequest;
use gcp_bigquery_client::model::table::Table;
use gcp_bigquery_client::model::table_field_schema::TableFieldSchema;
use gcp_bigquery_client::model::table_reference::TableReference;
use gcp_bigquery_client::model::table_row::TableRow;
use gcp_bigquery_client::model::table_schema::TableSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{ErrorClass, class_for_status, class_for_transport, error_chain, status_suffix};
use super::{GcpAuth, install_crypto_provider};

/// Connect timeout for every API call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Total timeout of one API call. Calls are small JSON exchanges; long work is polled.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Server-side wait asked of `jobs.query` / `getQueryResults` before they answer "not done yet".
const QUERY_WAIT_MS: i32 = 10_000;

/// BigQuery column types crm-sync writes. Serialized with BigQuery's standard SQL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ColumnType {
    String,
    Int64,
    Float64,
    Bool,
    Date,
    Timestamp,
    Numeric,
}

impl ColumnType {
    /// The type's name in GoogleSQL (`ALTER TABLE ... ADD COLUMN x STRING`).
    pub fn sql(self) -> &'static str {
        match self {
            ColumnType::String => "STRING",
            ColumnType::Int64 => "INT64",
            ColumnType::Float64 => "FLOAT64",
            ColumnType::Bool => "BOOL",
            ColumnType::Date => "DATE",
            ColumnType::Timestamp => "TIMESTAMP",
            ColumnType::Numeric => "NUMERIC",
        }
    }

    fn field_type(self) -> FieldType {
        match self {
            ColumnType::String => FieldType::String,
            ColumnType::Int64 => FieldType::Int64,
            ColumnType::Float64 => FieldType::Float64,
            ColumnType::Bool => FieldType::Bool,
            ColumnType::Date => FieldType::Date,
            ColumnType::Timestamp => FieldType::Timestamp,
            ColumnType::Numeric => FieldType::Numeric,
        }
    }

    /// Whether a type name reported by BigQuery means this type (it answers with legacy aliases:
    /// FLOAT for FLOAT64, INTEGER for INT64, BOOLEAN for BOOL).
    fn matches(self, reported: &FieldType) -> bool {
        matches!(
            (self, reported),
            (ColumnType::String, FieldType::String)
                | (ColumnType::Int64, FieldType::Int64 | FieldType::Integer)
                | (ColumnType::Float64, FieldType::Float64 | FieldType::Float)
                | (ColumnType::Bool, FieldType::Bool | FieldType::Boolean)
                | (ColumnType::Date, FieldType::Date)
                | (ColumnType::Timestamp, FieldType::Timestamp)
                | (ColumnType::Numeric, FieldType::Numeric)
        )
    }
}

/// NULLABLE or REQUIRED (REPEATED is not used by crm-sync).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ColumnMode {
    #[default]
    Nullable,
    Required,
}

impl ColumnMode {
    fn as_str(self) -> &'static str {
        match self {
            ColumnMode::Nullable => "NULLABLE",
            ColumnMode::Required => "REQUIRED",
        }
    }
}

/// One column of an explicit schema; deserializes from config as `{ name, type, mode }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub column_type: ColumnType,
    #[serde(default)]
    pub mode: ColumnMode,
}

impl ColumnSpec {
    /// A NULLABLE column.
    pub fn nullable(name: impl Into<String>, column_type: ColumnType) -> Self {
        Self {
            name: name.into(),
            column_type,
            mode: ColumnMode::Nullable,
        }
    }

    /// A REQUIRED column: a load with a null or missing value fails as a whole.
    pub fn required(name: impl Into<String>, column_type: ColumnType) -> Self {
        Self {
            name: name.into(),
            column_type,
            mode: ColumnMode::Required,
        }
    }
}

fn table_schema(schema: &[ColumnSpec]) -> TableSchema {
    TableSchema::new(
        schema
            .iter()
            .map(|c| {
                let mut field = TableFieldSchema::new(&c.name, c.column_type.field_type());
                field.mode = Some(c.mode.as_str().to_string());
                field
            })
            .collect(),
    )
}

/// Names the differences between the wanted schema and a table's, empty when they agree.
fn schema_differences(wanted: &[ColumnSpec], actual: &TableSchema) -> Vec<String> {
    let actual = actual.fields.as_deref().unwrap_or_default();
    let mut diffs = Vec::new();
    for col in wanted {
        match actual
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(&col.name))
        {
            None => diffs.push(format!("missing column {}", col.name)),
            Some(f) if !col.column_type.matches(&f.r#type) => diffs.push(format!(
                "column {} is {:?}, wanted {:?}",
                col.name, f.r#type, col.column_type
            )),
            Some(_) => {}
        }
    }
    for f in actual {
        if !wanted.iter().any(|c| c.name.eq_ignore_ascii_case(&f.name)) {
            diffs.push(format!("extra column {}", f.name));
        }
    }
    diffs
}

/// Result of a successful load job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOutcome {
    pub job_id: String,
    /// Rows written, as BigQuery counted them (compare with the rows staged).
    pub output_rows: u64,
}

/// Rows a DONE load job wrote.
fn output_rows(job: &Job) -> u64 {
    job.statistics
        .as_ref()
        .and_then(|s| s.load.as_ref())
        .and_then(|l| l.output_rows.as_ref())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Whether `ensure_*` found the resource or created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    Existed,
    Created,
}

/// A failed BigQuery operation, classified for the retry policy.
#[derive(Debug, thiserror::Error)]
pub enum BigQueryError {
    /// Connection refused/reset, timeouts, 429/5xx, rate limits: try again later.
    #[error("BigQuery {op} failed{}, retryable: {message}", status_suffix(.status))]
    Retryable {
        op: &'static str,
        status: Option<u16>,
        message: String,
    },
    /// Bad credentials, no permission, not found, invalid request: retrying cannot help.
    #[error("BigQuery {op} failed{}: {message}", status_suffix(.status))]
    Terminal {
        op: &'static str,
        status: Option<u16>,
        message: String,
    },
    /// The job ran and BigQuery reported an `errorResult` (bad data, schema mismatch, missing
    /// source file...). Terminal unless the reason is one BigQuery says to retry (backendError,
    /// internalError, rateLimitExceeded). `message` names the problem; `details` lists the
    /// individual errors BigQuery gave (first few).
    #[error("BigQuery job {job_id} failed ({reason}): {message}{}", details_suffix(.details))]
    JobFailed {
        job_id: String,
        class: ErrorClass,
        reason: String,
        message: String,
        details: Vec<String>,
    },
    /// The job did not finish within the configured wait. It may still complete: retrying with
    /// the same job id attaches to it.
    #[error("BigQuery job {job_id} still running after {waited:?}")]
    JobTimeout { job_id: String, waited: Duration },
}

fn details_suffix(details: &[String]) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(" [{}]", details.join("; "))
    }
}

/// BigQuery error reasons that Google documents as transient.
const RETRYABLE_REASONS: [&str; 5] = [
    "backendError",
    "internalError",
    "rateLimitExceeded",
    "jobBackendError",
    "jobInternalError",
];

impl BigQueryError {
    /// Retryable or terminal.
    pub fn class(&self) -> ErrorClass {
        match self {
            BigQueryError::Retryable { .. } | BigQueryError::JobTimeout { .. } => {
                ErrorClass::Retryable
            }
            BigQueryError::Terminal { .. } => ErrorClass::Terminal,
            BigQueryError::JobFailed { class, .. } => *class,
        }
    }

    /// Shorthand for `class() == ErrorClass::Retryable`.
    pub fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Retryable
    }

    /// The HTTP status behind the error, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            BigQueryError::Retryable { status, .. } | BigQueryError::Terminal { status, .. } => {
                *status
            }
            _ => None,
        }
    }

    fn new(op: &'static str, class: ErrorClass, status: Option<u16>, message: String) -> Self {
        match class {
            ErrorClass::Retryable => BigQueryError::Retryable {
                op,
                status,
                message,
            },
            ErrorClass::Terminal => BigQueryError::Terminal {
                op,
                status,
                message,
            },
        }
    }

    /// Classifies an error of gcp-bigquery-client.
    fn from_bq(op: &'static str, err: BQError) -> Self {
        match err {
            BQError::ResponseError { error } => {
                let status = u16::try_from(error.error.code).ok();
                let reason = error
                    .error
                    .errors
                    .first()
                    .and_then(|e| e.get("reason"))
                    .cloned()
                    .unwrap_or_default();
                // BigQuery signals rate limits as 403 rateLimitExceeded, not only as 429.
                let class = if RETRYABLE_REASONS.contains(&reason.as_str()) {
                    ErrorClass::Retryable
                } else {
                    status.map_or(ErrorClass::Terminal, class_for_status)
                };
                let message = if reason.is_empty() {
                    error.error.message
                } else {
                    format!("{} ({reason})", error.error.message)
                };
                Self::new(op, class, status, message)
            }
            BQError::RequestError(e) => {
                let status = e.status().map(|s| s.as_u16());
                let class = class_for_transport(status, e.is_builder());
                Self::new(op, class, status, error_chain(&e))
            }
            // Everything else is set-up trouble (key file, token, pool) or a response that does
            // not parse: nothing a retry fixes without a person looking.
            other => Self::new(op, ErrorClass::Terminal, None, error_chain(&other)),
        }
    }

    fn from_error_result(job_id: &str, result: &ErrorProto, errors: &[ErrorProto]) -> Self {
        let reason = result.reason.clone().unwrap_or_else(|| "unknown".into());
        let class = if RETRYABLE_REASONS.contains(&reason.as_str()) {
            ErrorClass::Retryable
        } else {
            ErrorClass::Terminal
        };
        let mut message = result.message.clone().unwrap_or_default();
        if let Some(location) = &result.location {
            message = format!("{message} (at {location})");
        }
        let details = errors
            .iter()
            .filter(|e| e.message != result.message)
            .take(5)
            .map(|e| {
                let text = e.message.clone().unwrap_or_default();
                match &e.location {
                    Some(loc) => format!("{text} (at {loc})"),
                    None => text,
                }
            })
            .collect();
        BigQueryError::JobFailed {
            job_id: job_id.to_string(),
            class,
            reason,
            message,
            details,
        }
    }
}

/// How long and how often load jobs are polled.
#[derive(Debug, Clone)]
pub struct PollConfig {
    /// First wait between `jobs.get` calls; doubles up to `max_interval`.
    pub initial_interval: Duration,
    pub max_interval: Duration,
    /// Give up (with [`BigQueryError::JobTimeout`]) after this long.
    pub timeout: Duration,
    /// Transient `jobs.get` failures tolerated in a row before giving up on polling.
    pub max_poll_errors: u32,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_millis(250),
            max_interval: Duration::from_secs(5),
            timeout: Duration::from_secs(15 * 60),
            max_poll_errors: 5,
        }
    }
}

/// Authenticator for the emulator: it checks no token, but the crate always sends one.
#[derive(Clone)]
struct NoAuth;

#[async_trait::async_trait]
impl Authenticator for NoAuth {
    async fn access_token(&self) -> Result<String, BQError> {
        Ok("emulator-no-auth".to_string())
    }
}

/// A unique job id: `crm_sync_load_<table>_<millis>_<pid>_<n>`, safe characters only.
fn new_job_id(table: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let table: String = table
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(200)
        .collect();
    format!(
        "crm_sync_load_{table}_{millis}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Loads NDJSON files from GCS into BigQuery tables.
#[derive(Clone)]
pub struct BigQueryLoader {
    client: Client,
    location: Option<String>,
    poll: PollConfig,
}

impl std::fmt::Debug for BigQueryLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BigQueryLoader")
            .field("location", &self.location)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl BigQueryLoader {
    /// Builds a client.
    ///
    /// * `base_url`: `None` for production, or the emulator's root such as
    ///   `http://127.0.0.1:9050` (the `/bigquery/v2` path is appended).
    /// * `auth`: [`GcpAuth::Anonymous`] for the emulator (a dummy bearer token is sent).
    pub async fn new(base_url: Option<String>, auth: GcpAuth) -> Result<Self, BigQueryError> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| BigQueryError::from_bq("client setup", BQError::RequestError(e)))?;
        let mut builder = ClientBuilder::new();
        builder.with_client(http);
        if let Some(base) = base_url {
            builder.with_v2_base_url(format!("{}/bigquery/v2", base.trim_end_matches('/')));
        }
        let client = match auth {
            GcpAuth::Anonymous => builder.build_from_authenticator(Arc::new(NoAuth)).await,
            GcpAuth::ApplicationDefault => {
                builder.build_from_application_default_credentials().await
            }
            GcpAuth::ServiceAccountKeyFile(path) => {
                builder
                    .build_from_service_account_key_file(&path.to_string_lossy())
                    .await
            }
        }
        .map_err(|e| BigQueryError::from_bq("client setup", e))?;
        Ok(Self {
            client,
            location: None,
            poll: PollConfig::default(),
        })
    }

    /// Location for new datasets and for jobs (e.g. `northamerica-northeast2`). Without it
    /// datasets are created in `US` and jobs run where their tables are.
    pub fn with_location(mut self, location: impl Into<String>) -> Self {
        self.location = Some(location.into());
        self
    }

    /// Replaces the polling policy of load jobs.
    pub fn with_poll_config(mut self, poll: PollConfig) -> Self {
        self.poll = poll;
        self
    }

    /// Creates the dataset unless it exists.
    pub async fn ensure_dataset(
        &self,
        project: &str,
        dataset: &str,
    ) -> Result<Ensured, BigQueryError> {
        match self.client.dataset().get(project, dataset).await {
            Ok(_) => return Ok(Ensured::Existed),
            Err(e) => match BigQueryError::from_bq("datasets.get", e) {
                e if e.status() == Some(404) => {}
                e => return Err(e),
            },
        }
        let mut ds = Dataset::new(project, dataset);
        if let Some(location) = &self.location {
            ds = ds.location(location);
        }
        match self.client.dataset().create(ds).await {
            Ok(_) => Ok(Ensured::Created),
            Err(e) => match BigQueryError::from_bq("datasets.insert", e) {
                e if e.status() == Some(409) => Ok(Ensured::Existed),
                e => Err(e),
            },
        }
    }

    /// Creates the table with `schema` unless it exists. An existing table with another schema
    /// is left alone (with a warning): the next `WRITE_TRUNCATE` load replaces its schema anyway.
    pub async fn ensure_table(
        &self,
        project: &str,
        dataset: &str,
        table: &str,
        schema: &[ColumnSpec],
    ) -> Result<Ensured, BigQueryError> {
        match self.client.table().get(project, dataset, table, None).await {
            Ok(existing) => {
                let diffs = schema_differences(schema, &existing.schema);
                if !diffs.is_empty() {
                    tracing::warn!(
                        table = %format!("{project}.{dataset}.{table}"),
                        differences = %diffs.join("; "),
                        "table schema differs from the configured one; the next load replaces it"
                    );
                }
                return Ok(Ensured::Existed);
            }
            Err(e) => match BigQueryError::from_bq("tables.get", e) {
                e if e.status() == Some(404) => {}
                e => return Err(e),
            },
        }
        let new_table = Table::new(project, dataset, table, table_schema(schema));
        match self.client.table().create(new_table).await {
            Ok(_) => Ok(Ensured::Created),
            Err(e) => match BigQueryError::from_bq("tables.insert", e) {
                e if e.status() == Some(409) => Ok(Ensured::Existed),
                e => Err(e),
            },
        }
    }

    /// Replaces the table's content with the NDJSON at `gs_uri` in one load job
    /// (`WRITE_TRUNCATE`, explicit `schema`, no bad records allowed, unknown fields rejected),
    /// and waits for it. The table is created if missing.
    pub async fn load_truncate(
        &self,
        project: &str,
        dataset: &str,
        table: &str,
        gs_uri: &str,
        schema: &[ColumnSpec],
    ) -> Result<LoadOutcome, BigQueryError> {
        let job_id = new_job_id(table);
        self.load_truncate_with_job_id(project, dataset, table, gs_uri, schema, &job_id)
            .await
    }

    /// [`load_truncate`](Self::load_truncate) with the caller's job id, for retries that must
    /// not load twice: if a job with this id exists, its outcome is returned instead.
    pub async fn load_truncate_with_job_id(
        &self,
        project: &str,
        dataset: &str,
        table: &str,
        gs_uri: &str,
        schema: &[ColumnSpec],
        job_id: &str,
    ) -> Result<LoadOutcome, BigQueryError> {
        let load = JobConfigurationLoad {
            source_uris: Some(vec![gs_uri.to_string()]),
            source_format: Some("NEWLINE_DELIMITED_JSON".into()),
            destination_table: Some(TableReference::new(project, dataset, table)),
            schema: Some(table_schema(schema)),
            autodetect: Some(false),
            write_disposition: Some("WRITE_TRUNCATE".into()),
            create_disposition: Some("CREATE_IF_NEEDED".into()),
            max_bad_records: Some(0),
            ignore_unknown_values: Some(false),
            encoding: Some("UTF-8".into()),
            ..Default::default()
        };
        let job = Job {
            job_reference: Some(self.job_reference(project, job_id)),
            configuration: Some(JobConfiguration {
                load: Some(load),
                ..Default::default()
            }),
            ..Default::default()
        };
        let started = self.insert_or_attach(project, job_id, job).await?;
        let done = self.wait_for_job(project, job_id, started).await?;
        Ok(LoadOutcome {
            job_id: job_id.to_string(),
            output_rows: output_rows(&done),
        })
    }

    /// The reference of a job with the caller's id, in this client's location.
    fn job_reference(&self, project: &str, job_id: &str) -> JobReference {
        JobReference {
            job_id: Some(job_id.to_string()),
            project_id: Some(project.to_string()),
            location: self.location.clone(),
        }
    }

    /// Inserts `job`; when a job with its id exists already (an earlier call created it), attaches to
    /// that one instead.
    async fn insert_or_attach(
        &self,
        project: &str,
        job_id: &str,
        job: Job,
    ) -> Result<Job, BigQueryError> {
        match self.client.job().insert(project, job).await {
            Ok(job) => Ok(job),
            Err(e) => match BigQueryError::from_bq("jobs.insert", e) {
                // Duplicate job id: an earlier attempt did create it. Attach to that job.
                e if e.status() == Some(409) => {
                    tracing::info!(job_id, "job already exists, attaching to it");
                    self.client
                        .job()
                        .get_job(project, job_id, self.location.as_deref())
                        .await
                        .map_err(|e| BigQueryError::from_bq("jobs.get", e))
                }
                e => Err(e),
            },
        }
    }

    /// Runs one statement (a MERGE, a DML) as a query job with the caller's job id, to completion.
    /// A repeat with the same id attaches to the job instead of running the statement again.
    pub async fn run_statement_with_job_id(
        &self,
        project: &str,
        sql: &str,
        job_id: &str,
    ) -> Result<(), BigQueryError> {
        let job = Job {
            job_reference: Some(self.job_reference(project, job_id)),
            configuration: Some(JobConfiguration {
                query: Some(JobConfigurationQuery {
                    query: sql.to_string(),
                    use_legacy_sql: Some(false),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let started = self.insert_or_attach(project, job_id, job).await?;
        self.wait_for_job(project, job_id, started).await?;
        Ok(())
    }

    /// An earlier job with this id that succeeded (waited for while it runs); `None` when there is
    /// no such job or it failed.
    pub async fn earlier_job(
        &self,
        project: &str,
        job_id: &str,
    ) -> Result<Option<Job>, BigQueryError> {
        let job = match self
            .client
            .job()
            .get_job(project, job_id, self.location.as_deref())
            .await
        {
            Ok(job) => job,
            Err(e) => {
                let e = BigQueryError::from_bq("jobs.get", e);
                return match e.status() {
                    Some(404) => Ok(None),
                    _ => Err(e),
                };
            }
        };
        match self.wait_for_job(project, job_id, job).await {
            Ok(done) => Ok(Some(done)),
            Err(BigQueryError::JobFailed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The outcome of an earlier load job with this id, when it exists and succeeded.
    pub async fn earlier_load(
        &self,
        project: &str,
        job_id: &str,
    ) -> Result<Option<LoadOutcome>, BigQueryError> {
        Ok(self
            .earlier_job(project, job_id)
            .await?
            .map(|done| LoadOutcome {
                job_id: job_id.to_string(),
                output_rows: output_rows(&done),
            }))
    }

    /// Polls `jobs.get` with doubling waits until the job is DONE, the deadline passes, or
    /// `jobs.get` itself fails too often in a row. Returns the DONE job if it succeeded.
    async fn wait_for_job(
        &self,
        project: &str,
        job_id: &str,
        mut job: Job,
    ) -> Result<Job, BigQueryError> {
        let started = Instant::now();
        let mut interval = self.poll.initial_interval;
        let mut poll_errors = 0;
        // The job runs where BigQuery put it; later calls must name that location.
        let location = job
            .job_reference
            .as_ref()
            .and_then(|r| r.location.clone())
            .or_else(|| self.location.clone());
        loop {
            let status = job.status.clone().unwrap_or_default();
            if status.state.as_deref() == Some("DONE") {
                return match &status.error_result {
                    Some(result) => Err(BigQueryError::from_error_result(
                        job_id,
                        result,
                        status.errors.as_deref().unwrap_or_default(),
                    )),
                    None => Ok(job),
                };
            }
            if started.elapsed() >= self.poll.timeout {
                return Err(BigQueryError::JobTimeout {
                    job_id: job_id.to_string(),
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(self.poll.max_interval);
            match self
                .client
                .job()
                .get_job(project, job_id, location.as_deref())
                .await
            {
                Ok(next) => {
                    job = next;
                    poll_errors = 0;
                }
                Err(e) => {
                    let e = BigQueryError::from_bq("jobs.get", e);
                    poll_errors += 1;
                    if !e.is_retryable() || poll_errors > self.poll.max_poll_errors {
                        return Err(e);
                    }
                    tracing::warn!(job_id, error = %e, "polling load job failed, will retry");
                }
            }
        }
    }

    /// Runs a standard-SQL query and returns every row as a JSON object keyed by column name.
    /// Values are BigQuery's wire strings ("43.5", "true", TIMESTAMP as int64 microseconds since
    /// the epoch because `useInt64Timestamp` is asked). For tests and validation queries.
    pub async fn query_rows(&self, project: &str, sql: &str) -> Result<Vec<Value>, BigQueryError> {
        let format = DataFormatOptions {
            use_int64_timestamp: Some(true),
        };
        let mut request = QueryRequest::new(sql);
        request.use_legacy_sql = false;
        request.timeout_ms = Some(QUERY_WAIT_MS);
        request.location = self.location.clone();
        request.format_options = Some(format.clone());
        let first = self
            .client
            .job()
            .query(project, request)
            .await
            .map_err(|e| BigQueryError::from_bq("jobs.query", e))?;

        let mut complete = first.job_complete.unwrap_or(false);
        let mut schema = first.schema;
        let mut rows = first.rows.unwrap_or_default();
        let mut page_token = first.page_token;
        let reference = first.job_reference.unwrap_or_default();
        let query_job_id = reference.job_id.unwrap_or_default();
        let started = Instant::now();

        // Wait for completion, then follow the pages.
        while !complete || page_token.is_some() {
            if started.elapsed() >= self.poll.timeout {
                return Err(BigQueryError::JobTimeout {
                    job_id: query_job_id,
                    waited: started.elapsed(),
                });
            }
            let params = GetQueryResultsParameters {
                format_options: Some(format.clone()),
                location: reference.location.clone().or_else(|| self.location.clone()),
                page_token: page_token.take(),
                timeout_ms: Some(QUERY_WAIT_MS),
                ..Default::default()
            };
            let page = self
                .client
                .job()
                .get_query_results(project, &query_job_id, params)
                .await
                .map_err(|e| BigQueryError::from_bq("jobs.getQueryResults", e))?;
            if let Some(errors) = page.errors.as_deref().filter(|e| !e.is_empty()) {
                return Err(BigQueryError::from_error_result(
                    &query_job_id,
                    &errors[0],
                    errors,
                ));
            }
            if page.job_complete.unwrap_or(false) {
                if !complete {
                    complete = true;
                    schema = page.schema;
                }
                rows.extend(page.rows.unwrap_or_default());
                page_token = page.page_token;
            }
        }

        let names: Vec<String> = schema
            .and_then(|s| s.fields)
            .unwrap_or_default()
            .into_iter()
            .map(|f| f.name)
            .collect();
        Ok(rows
            .into_iter()
            .map(|row| row_to_json(&names, row))
            .collect())
    }
}

fn row_to_json(names: &[String], row: TableRow) -> Value {
    let cells = row.columns.unwrap_or_default();
    let object = names
        .iter()
        .zip(cells)
        .map(|(name, cell)| (name.clone(), cell.value.unwrap_or(Value::Null)))
        .collect();
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_serializes_with_standard_sql_names() {
        let schema = table_schema(&[
            ColumnSpec::required("store_id", ColumnType::String),
            ColumnSpec::nullable("latitude", ColumnType::Float64),
            ColumnSpec::nullable("client_since", ColumnType::Date),
        ]);
        let json = serde_json::to_value(&schema).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"fields": [
                {"name": "store_id", "type": "STRING", "mode": "REQUIRED"},
                {"name": "latitude", "type": "FLOAT64", "mode": "NULLABLE"},
                {"name": "client_since", "type": "DATE", "mode": "NULLABLE"},
            ]})
        );
    }

    #[test]
    fn column_specs_read_from_config() {
        let spec: ColumnSpec =
            serde_json::from_str(r#"{"name": "load_timestamp", "type": "TIMESTAMP"}"#).unwrap();
        assert_eq!(
            spec,
            ColumnSpec::nullable("load_timestamp", ColumnType::Timestamp)
        );
    }

    #[test]
    fn schema_differences_accept_legacy_aliases() {
        let wanted = [
            ColumnSpec::nullable("a", ColumnType::Float64),
            ColumnSpec::nullable("b", ColumnType::Int64),
        ];
        let actual = TableSchema::new(vec![
            TableFieldSchema::new("a", FieldType::Float),
            TableFieldSchema::new("c", FieldType::String),
        ]);
        assert_eq!(
            schema_differences(&wanted, &actual),
            vec!["missing column b", "extra column c"]
        );
    }

    #[test]
    fn job_ids_are_unique_and_safe() {
        let a = new_job_id("Accounts List");
        let b = new_job_id("Accounts List");
        assert_ne!(a, b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        );
    }

    #[test]
    fn job_errors_name_the_problem_and_class() {
        let result = ErrorProto {
            reason: Some("invalid".into()),
            message: Some("Failed to cast value to numerical: \"north\"".into()),
            location: Some("gs://b/o".into()),
            debug_info: None,
        };
        let err = BigQueryError::from_error_result("j1", &result, std::slice::from_ref(&result));
        assert_eq!(err.class(), ErrorClass::Terminal);
        assert!(err.to_string().contains("north"), "{err}");
        let busy = ErrorProto {
            reason: Some("backendError".into()),
            ..result
        };
        assert!(BigQueryError::from_error_result("j2", &busy, &[]).is_retryable());
    }
}
