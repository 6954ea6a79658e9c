//! `[server]` limits against slow clients and connection floods: their defaults and checks.
//!
//! - `header_timeout`: how long a client may take to send a request's headers. hyper runs the same
//!   timer while a kept-alive connection waits for its next request, so it is the idle (keep-alive)
//!   timeout too: a connection that sends nothing for this long is closed.
//! - `request_timeout`: how long a request may take to be answered (408 after it); the event streams
//!   (`/api/events`, `/api/runs/{id}/events`) are long-lived and exempt.
//! - `max_connections`: connections served at once; lowered at start to what the process may open.
//! - `auth_failures_per_minute`: wrong tokens from one address in a minute before it gets 429 for
//!   the rest of the minute; 0 turns the lockout off (behind a proxy every client has its address).

use std::time::Duration;

use super::{ConfigIssue, ServerConfig};

pub(super) fn header_timeout() -> Duration {
    Duration::from_secs(10)
}

pub(super) fn request_timeout() -> Duration {
    Duration::from_secs(30)
}

pub(super) fn max_connections() -> usize {
    1000
}

pub(super) fn auth_failures_per_minute() -> u32 {
    10
}

pub(super) fn check(s: &ServerConfig, line: Option<usize>, issues: &mut Vec<ConfigIssue>) {
    let mut bad = |field: &str, message: String| {
        issues.push(ConfigIssue {
            line,
            location: format!("server.{field}"),
            message,
        })
    };
    for (field, value) in [
        ("header_timeout", s.header_timeout),
        ("request_timeout", s.request_timeout),
    ] {
        if value < Duration::from_millis(100) {
            bad(
                field,
                format!(
                    "must be at least 100ms (found {})",
                    humantime::format_duration(value)
                ),
            );
        }
    }
    if s.max_connections < 2 {
        bad(
            "max_connections",
            format!("must be at least 2 (found {})", s.max_connections),
        );
    }
}
