//! Error classification shared by the GCS and BigQuery clients.

use std::error::Error as StdError;
use std::fmt;

/// Whether repeating the same operation later can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Network trouble, timeouts, HTTP 408/429/5xx, rate limits, backend errors: retry with backoff.
    Retryable,
    /// Bad credentials (401), no permission (403), not found (404), invalid data or request (400):
    /// retrying cannot help; the run must fail and say why.
    Terminal,
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Terminal => "terminal",
        })
    }
}

/// Class of an HTTP status, following Google's retry guidance for GCS and BigQuery.
pub(crate) fn class_for_status(status: u16) -> ErrorClass {
    match status {
        408 | 429 | 500..=599 => ErrorClass::Retryable,
        _ => ErrorClass::Terminal,
    }
}

/// Class of an HTTP client error (reqwest 0.12 or 0.13) from what it tells about itself.
///
/// With a status, the status decides. Without one, anything but a malformed request is transport
/// trouble (connect, timeout, body, or decoding an answer that was not the JSON we expected, which
/// is what a proxy's HTML 502/503 page looks like) and is worth retrying a bounded number of times.
pub(crate) fn class_for_transport(status: Option<u16>, is_builder: bool) -> ErrorClass {
    match status {
        Some(status) => class_for_status(status),
        None if is_builder => ErrorClass::Terminal,
        None => ErrorClass::Retryable,
    }
}

/// An error and its sources joined with ": ", because reqwest's own message ("error sending
/// request for url ...") hides the useful part ("Connection refused").
pub(crate) fn error_chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// " (HTTP 404)" or "" for error messages.
pub(crate) fn status_suffix(status: &Option<u16>) -> String {
    status.map(|s| format!(" (HTTP {s})")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_like_google_says() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert_eq!(class_for_status(s), ErrorClass::Retryable, "{s}");
        }
        for s in [400, 401, 403, 404, 409, 412] {
            assert_eq!(class_for_status(s), ErrorClass::Terminal, "{s}");
        }
        assert_eq!(class_for_transport(None, false), ErrorClass::Retryable);
        assert_eq!(class_for_transport(None, true), ErrorClass::Terminal);
        assert_eq!(class_for_transport(Some(401), false), ErrorClass::Terminal);
    }
}
