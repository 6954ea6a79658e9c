//! The web console at `/`: one HTML page, a script and a stylesheet, compiled into the binary (no
//! separate web server, no external fetches). The page talks to `/api` with the token its user
//! signs in with; what it may show and press follows that token's scope.

use axum::Router;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use axum::response::IntoResponse;
use axum::routing::get;

use super::AppState;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
/// The event streams, one per browser (loaded before the script that uses them).
const FEED: &str = include_str!("console/feed.js");
/// A run's page.
const RUN: &str = include_str!("console/run.js");
const STYLE: &str = include_str!("console/console.css");

/// Everything from our own origin; nothing inline but the data: favicon; no framing.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub fn router() -> Router<AppState> {
    // The page's own paths (client-side routing) all serve the same document.
    Router::new()
        .route("/", get(index))
        .route("/signin", get(index))
        .route("/runs", get(index))
        .route("/runs/{id}", get(index))
        .route("/assets/console.js", get(script))
        .route("/assets/feed.js", get(feed))
        .route("/assets/run.js", get(run))
        .route("/assets/console.css", get(style))
}

async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX)
}

async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn feed() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", FEED)
}

async fn run() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", RUN)
}

async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}

/// A console file with its type and the security headers.
fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, content_type),
            (CACHE_CONTROL, "no-cache"),
            (CONTENT_SECURITY_POLICY, CSP),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
}
