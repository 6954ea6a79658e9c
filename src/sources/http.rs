//! HTTP JSON sources (`http_json`, and `ezfocus`, its preset for the EZ Focus API): one GET whose body
//! is streamed straight into the backup store, never held whole in memory.
//!
//! Failures are classified for the retry policy: 401/403 are terminal ("credentials rejected"), other
//! 4xx terminal, 429 retryable after its Retry-After, 5xx, timeouts and cut connections retryable.
//! Error messages name the host and the status, never the URL's query (it may carry an API key).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::backup::BackupStore;
use crate::pipeline::StepError;
use crate::secrets::{Secret, SecretRef};

/// `source = { kind = "http_json", url = "...", ... }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpJsonConfig {
    pub url: String,
    /// Plain query parameters.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Query parameters whose values are secrets (an API key in the query string).
    #[serde(default)]
    pub query_secrets: BTreeMap<String, SecretRef>,
    /// HTTP Basic auth.
    #[serde(default)]
    pub username: Option<SecretRef>,
    #[serde(default)]
    pub password: Option<SecretRef>,
    #[serde(default)]
    pub bearer_token: Option<SecretRef>,
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "crate::config::duration"
    )]
    pub connect_timeout: Duration,
    /// Longest silence while reading the answer.
    #[serde(
        default = "default_read_timeout",
        deserialize_with = "crate::config::duration"
    )]
    pub read_timeout: Duration,
}

/// `source = { kind = "ezfocus", base_url = "...", key = { env = "..." }, ... }`: the EZ Focus API's
/// `GET {base_url}/api` with its dataset key, filters and Basic auth.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EzFocusSourceConfig {
    pub base_url: String,
    /// The dataset key (accounts, inventory and call reports each have one).
    pub key: SecretRef,
    pub username: SecretRef,
    pub password: SecretRef,
    #[serde(default = "default_prov")]
    pub prov: String,
    #[serde(default)]
    pub seg: String,
    /// Account classes, sent as one comma-joined `tpcl` value.
    #[serde(default)]
    pub tpcl: Vec<String>,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "crate::config::duration"
    )]
    pub connect_timeout: Duration,
    #[serde(
        default = "default_read_timeout",
        deserialize_with = "crate::config::duration"
    )]
    pub read_timeout: Duration,
}

fn default_prov() -> String {
    "ON".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(60)
}

impl EzFocusSourceConfig {
    /// The generic request this preset makes.
    pub fn to_http(&self) -> HttpJsonConfig {
        let mut query = BTreeMap::from([
            ("prov".to_string(), self.prov.clone()),
            ("seg".to_string(), self.seg.clone()),
            ("tpcl".to_string(), self.tpcl.join(",")),
        ]);
        if let Some(agent) = &self.agent {
            query.insert("agent".into(), agent.clone());
        }
        HttpJsonConfig {
            url: format!("{}/api", self.base_url.trim_end_matches('/')),
            query,
            query_secrets: BTreeMap::from([("key".to_string(), self.key.clone())]),
            username: Some(self.username.clone()),
            password: Some(self.password.clone()),
            bearer_token: None,
            connect_timeout: self.connect_timeout,
            read_timeout: self.read_timeout,
        }
    }
}

impl HttpJsonConfig {
    /// Checks values serde cannot.
    pub fn check(&self) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| format!("url \"{}\" is not a valid URL: {e}", self.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("url \"{}\" must be http or https", self.url));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "url must not carry credentials; use username/password with env or file".into(),
            );
        }
        if self.username.is_some() != self.password.is_some() {
            return Err("username and password go together".into());
        }
        for r in self
            .query_secrets
            .values()
            .chain(&self.username)
            .chain(&self.password)
            .chain(&self.bearer_token)
        {
            r.check()?;
        }
        Ok(())
    }

    fn host(&self) -> String {
        reqwest::Url::parse(&self.url)
            .ok()
            .and_then(|u| {
                u.host_str().map(|h| match u.port() {
                    Some(p) => format!("{h}:{p}"),
                    None => h.to_string(),
                })
            })
            .unwrap_or_else(|| "the source".into())
    }
}

fn secret(r: &SecretRef) -> Result<Secret, StepError> {
    r.resolve()
        .map_err(|e| StepError::terminal(format!("source credentials are not configured: {e}")))
}

/// Fetches the answer and streams it into `store` under `object`; returns the extract checkpoint
/// (object URI, bytes, sha256, HTTP status).
pub async fn extract(
    cfg: &HttpJsonConfig,
    store: &BackupStore,
    object: &str,
) -> Result<Value, StepError> {
    let host = cfg.host();
    let client = reqwest::Client::builder()
        .connect_timeout(cfg.connect_timeout)
        .read_timeout(cfg.read_timeout)
        .build()
        .map_err(|e| {
            StepError::terminal(format!("cannot build the HTTP client: {}", e.without_url()))
        })?;
    let mut query: Vec<(String, String)> = cfg
        .query
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, r) in &cfg.query_secrets {
        query.push((k.clone(), secret(r)?.expose().to_string()));
    }
    let mut request = client.get(&cfg.url).query(&query);
    if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
        request = request.basic_auth(secret(u)?.expose(), Some(secret(p)?.expose()));
    }
    if let Some(t) = &cfg.bearer_token {
        request = request.bearer_auth(secret(t)?.expose());
    }

    let response = request
        .send()
        .await
        .map_err(|e| transport_error(&host, e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(status_error(&host, status, response.headers()));
    }
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut received = 0u64;
    let read_timeout = humantime::format_duration(cfg.read_timeout);
    let body = response.bytes_stream().map(move |chunk| match chunk {
        Ok(bytes) => {
            received += bytes.len() as u64;
            Ok(bytes)
        }
        // reqwest reports a stalled body as "error decoding response body"; say what happened.
        Err(e) if e.is_timeout() => Err(StepError::retryable(format!(
            "the answer from {host} timed out after {received} bytes: nothing arrived for {read_timeout} (read_timeout)"
        ))),
        Err(e) => Err(StepError::retryable(format!(
            "the answer from {host} was cut after {received} bytes: {}",
            e.without_url()
        ))),
    });
    let info = store.put_stream(object, Box::pin(body)).await?;
    Ok(json!({
        "object": info.uri,
        "bytes": info.bytes,
        "sha256": info.sha256,
        "http_status": status.as_u16(),
        "content_type": content_type,
    }))
}

fn transport_error(host: &str, e: reqwest::Error) -> StepError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    StepError::retryable(format!("request to {host} {what}: {}", e.without_url()))
}

fn status_error(
    host: &str,
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
) -> StepError {
    let code = status.as_u16();
    match code {
        401 | 403 => StepError::terminal(format!("credentials rejected by {host} (HTTP {code})")),
        429 => {
            let error = StepError::retryable(format!("rate limited by {host} (HTTP 429)"));
            match retry_after(headers) {
                Some(delay) => error.with_retry_after(delay),
                None => error,
            }
        }
        500..=599 | 408 => StepError::retryable(format!("{host} answered HTTP {code}")),
        _ => StepError::terminal(format!("{host} answered HTTP {code}")),
    }
}

/// Retry-After as seconds or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(24 * 3600)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}
