//! Bearer tokens from the environment or secret files, in two scopes: `read` sees everything,
//! `admin` may also trigger, retry, rerun and cancel. Tokens are compared in constant time.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::openapi::ErrorBody;
use super::token_strength;
use super::{ApiError, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(whoami))
}

/// What the presented token may do.
#[derive(Serialize, ToSchema)]
struct WhoAmI {
    /// `read` or `admin`.
    scope: &'static str,
}

/// The scope of the presented token (the console shows action buttons to admin tokens only).
#[utoipa::path(get, path = "/whoami", tag = "runs", security(("bearer" = [])),
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)))]
async fn whoami(caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        scope: match caller.0 {
            Scope::Read => "read",
            Scope::Admin => "admin",
        },
    })
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Admin,
}

/// The accepted tokens.
#[derive(Default)]
pub struct Tokens {
    admin: Vec<String>,
    read: Vec<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tokens({} admin, {} read)",
            self.admin.len(),
            self.read.len()
        )
    }
}

impl Tokens {
    /// Comma-separated lists from `CRM_SYNC_ADMIN_TOKENS` / `CRM_SYNC_READ_TOKENS`, or from the files
    /// named by `CRM_SYNC_ADMIN_TOKENS_FILE` / `CRM_SYNC_READ_TOKENS_FILE` (one token per line).
    /// Placeholders and weak tokens are refused ([`token_strength`]).
    pub fn from_env() -> anyhow::Result<Self> {
        let admin = load("CRM_SYNC_ADMIN_TOKENS")?;
        token_strength::check_all(&source_of("CRM_SYNC_ADMIN_TOKENS"), &admin)?;
        let read = load("CRM_SYNC_READ_TOKENS")?;
        token_strength::check_all(&source_of("CRM_SYNC_READ_TOKENS"), &read)?;
        Ok(Self { admin, read })
    }

    pub fn new(admin: Vec<String>, read: Vec<String>) -> Self {
        Self { admin, read }
    }

    pub fn is_empty(&self) -> bool {
        self.admin.is_empty() && self.read.is_empty()
    }

    /// The scope of a presented token, if any.
    pub fn scope_of(&self, presented: &str) -> Option<Scope> {
        // Check every token (no early exit) so timing does not reveal which list matched.
        let admin = self.admin.iter().fold(false, |hit, t| {
            hit | constant_time_eq(t.as_bytes(), presented.as_bytes())
        });
        let read = self.read.iter().fold(false, |hit, t| {
            hit | constant_time_eq(t.as_bytes(), presented.as_bytes())
        });
        if admin {
            Some(Scope::Admin)
        } else if read {
            Some(Scope::Read)
        } else {
            None
        }
    }
}

fn load(var: &str) -> anyhow::Result<Vec<String>> {
    let text = match (std::env::var(var), std::env::var(format!("{var}_FILE"))) {
        (Ok(v), _) => v.replace(',', "\n"),
        (Err(_), Ok(path)) => crate::secrets::read_file(path.as_ref(), "token file")
            .map_err(|e| anyhow::anyhow!("{var}_FILE: {e}"))?,
        _ => String::new(),
    };
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect();
    if let Some(short) = tokens.iter().find(|t| t.len() < 16) {
        anyhow::bail!(
            "{var}: tokens must be at least 16 characters (one has {})",
            short.len()
        );
    }
    Ok(tokens)
}

/// Where [`load`] takes `var`'s tokens from, for messages: the variable, or the file it names.
fn source_of(var: &str) -> String {
    match (std::env::var_os(var), std::env::var(format!("{var}_FILE"))) {
        (None, Ok(path)) => format!("{var}_FILE ({path})"),
        _ => var.to_string(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
    }
    diff == 0
}

/// The bearer token a request presents, if any.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    Some(header.strip_prefix("Bearer ")?.trim())
}

/// A request authenticated with some scope (extractor).
pub struct Caller(pub Scope);

impl Caller {
    /// Refuses read-only callers for `action`.
    pub fn require_admin(&self, action: &str) -> Result<(), ApiError> {
        if self.0 == Scope::Admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden(action.to_string()))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    /// A request with no `Authorization` header is refused quietly (the console asks before
    /// sign-in); a wrong or malformed one counts as a failed authentication of its address.
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if !parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION)
        {
            return Err(ApiError::Unauthorized);
        }
        // The peer is known when served by `serve_router`; not for a router called directly.
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let failures = &state.metrics.http_auth_failures_total;
        if let Err(retry) = state.auth_failures.check(peer) {
            failures.with_label_values(&["locked_out"]).inc();
            return Err(ApiError::TooManyAuthFailures(retry.as_secs().max(1)));
        }
        let scope = bearer_token(&parts.headers).and_then(|token| state.tokens.scope_of(token));
        scope.map(Caller).ok_or_else(|| {
            failures.with_label_values(&["wrong_token"]).inc();
            state.auth_failures.record(peer, "wrong_token");
            ApiError::Unauthorized
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_constant_time_comparison() {
        let t = Tokens::new(
            vec!["admin-token-0123456789".into()],
            vec!["read-token-0123456789".into()],
        );
        assert_eq!(t.scope_of("admin-token-0123456789"), Some(Scope::Admin));
        assert_eq!(t.scope_of("read-token-0123456789"), Some(Scope::Read));
        assert_eq!(t.scope_of("admin-token-012345678"), None);
        assert_eq!(t.scope_of(""), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
