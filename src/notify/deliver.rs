//! One POST to one webhook, and its outcome in words that are safe to store and log.
//!
//! The webhook URL is a secret (Slack's carries the token in its path), and reqwest puts the URL into
//! its errors' `Display`. So every reqwest error goes through `without_url()`, and every text that
//! leaves this module (transport errors, an excerpt of the receiver's answer, which may echo the path)
//! is scrubbed of the URL and its parts by [`redact`]. Redirects are not followed: a payload is never
//! sent anywhere but the configured URL.

use std::time::Duration;

use serde_json::Value;

use crate::secrets::SecretRef;

/// How much of a failed answer's body is quoted in `last_error` (Slack explains itself there:
/// `invalid_token`, `channel_not_found`).
const BODY_EXCERPT_CHARS: usize = 200;

/// The shared HTTP client of a notifier.
pub fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("crm-sync/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the webhook HTTP client: {}", e.without_url()))
}

/// What one attempt achieved. `error` never contains the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The receiver answered 2xx.
    pub delivered: bool,
    pub status: Option<u16>,
    pub error: Option<String>,
    /// The receiver's `Retry-After` (429, 503), honoured when longer than the backoff.
    pub retry_after: Option<Duration>,
}

impl Sent {
    fn error(message: String) -> Sent {
        Sent {
            delivered: false,
            status: None,
            error: Some(message),
            retry_after: None,
        }
    }
}

/// Identifies a message to the receiver: the event id is the same on every attempt, so a receiver can
/// drop a repeat (a notifier that died after sending is retried after its lease).
#[derive(Debug, Clone, Copy)]
pub struct MessageId {
    pub event_id: i64,
    pub attempt: i32,
}

/// Resolves the URL and POSTs `body` as JSON, bounded by `timeout` (connection and body included).
pub async fn post(
    client: &reqwest::Client,
    url: &SecretRef,
    timeout: Duration,
    body: &Value,
    id: MessageId,
) -> Sent {
    let secret = match url.resolve() {
        Ok(s) => s,
        Err(e) => return Sent::error(format!("webhook URL: {e}")),
    };
    let raw = secret.expose();
    let parsed = match reqwest::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => u,
        // url's parse errors describe the problem, never the input.
        Ok(_) => return Sent::error("webhook URL: not an http(s) URL".into()),
        Err(e) => return Sent::error(format!("webhook URL: not a valid URL ({e})")),
    };
    let request = client
        .post(parsed)
        .timeout(timeout)
        .header("X-Crm-Sync-Event-Id", id.event_id.to_string())
        .header("X-Crm-Sync-Attempt", id.attempt.to_string())
        .json(body);
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Sent::error(describe(e, raw)),
    };
    let status = response.status();
    if status.is_success() {
        return Sent {
            delivered: true,
            status: Some(status.as_u16()),
            error: None,
            retry_after: None,
        };
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut bytes = Vec::new();
    while bytes.len() < BODY_EXCERPT_CHARS * 4 {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let excerpt: String = String::from_utf8_lossy(&bytes)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(BODY_EXCERPT_CHARS)
        .collect();
    let message = if excerpt.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {excerpt}")
    };
    Sent {
        delivered: false,
        status: Some(status.as_u16()),
        error: Some(redact(&message, raw)),
        retry_after,
    }
}

/// A transport error (connect, timeout, TLS) with its causes, without the URL.
fn describe(e: reqwest::Error, url: &str) -> String {
    let timed_out = e.is_timeout();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    if timed_out && !text.contains("timed out") {
        text.push_str(" (timed out)");
    }
    redact(&text, url)
}

/// Replaces the URL and any part of it that could identify it (path, query, long path segments and
/// query values, the password) by `***`: the belt to `without_url()`'s braces.
pub fn redact(text: &str, url: &str) -> String {
    let mut secrets: Vec<String> = vec![url.to_string()];
    if let Ok(u) = reqwest::Url::parse(url) {
        secrets.push(u.as_str().to_string());
        let mut path_query = u.path().to_string();
        if let Some(q) = u.query() {
            path_query.push('?');
            path_query.push_str(q);
        }
        if path_query.len() > 1 {
            secrets.push(path_query);
        }
        secrets.extend(
            u.path_segments()
                .into_iter()
                .flatten()
                .filter(|s| s.len() >= 6)
                .map(str::to_string),
        );
        secrets.extend(
            u.query_pairs()
                .map(|(_, v)| v.into_owned())
                .filter(|v| v.len() >= 6),
        );
        secrets.extend(u.password().map(str::to_string));
    }
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_removes_the_url_and_its_parts() {
        let url = "https://hooks.slack.com/services/T000/B000/XXXXSECRETXXXX?token=querysecret";
        let text = format!(
            "error for {url}; Cannot POST /services/T000/B000/XXXXSECRETXXXX?token=querysecret; \
             segment XXXXSECRETXXXX and querysecret"
        );
        let r = redact(&text, url);
        assert!(
            !r.contains("XXXXSECRETXXXX") && !r.contains("querysecret"),
            "{r}"
        );
        assert!(r.starts_with("error for ***;"), "{r}");
        assert_eq!(redact("connection refused", url), "connection refused");
    }

    #[tokio::test]
    async fn unreachable_and_unresolvable_urls_fail_without_the_url() {
        // A port nothing listens on: bind, read the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        let url = format!("http://127.0.0.1:{port}/hooks/T0/SECRET-UNIT-TOKEN");
        crate::private_fs::write_new(&file, format!("{url}\n").as_bytes()).unwrap();
        let id = MessageId {
            event_id: 1,
            attempt: 1,
        };
        let sent = post(
            &client().unwrap(),
            &SecretRef::file(&file),
            Duration::from_secs(2),
            &serde_json::json!({}),
            id,
        )
        .await;
        let error = sent.error.unwrap();
        assert!(!sent.delivered && sent.status.is_none());
        assert!(!error.contains("SECRET-UNIT-TOKEN"), "{error}");
        assert!(error.to_lowercase().contains("connect"), "{error}");

        let sent = post(
            &client().unwrap(),
            &SecretRef::env("CRM_SYNC_TEST_NO_SUCH_WEBHOOK_VAR"),
            Duration::from_secs(2),
            &serde_json::json!({}),
            id,
        )
        .await;
        assert_eq!(
            sent.error.as_deref(),
            Some("webhook URL: environment variable CRM_SYNC_TEST_NO_SUCH_WEBHOOK_VAR is not set")
        );
    }
}
