//! The admin HTTP API served by `crm-sync serve` (axum): health from the run history, metrics, and
//! runs to trigger, read, follow, retry, rerun and cancel. One state struct, a router per resource,
//! one error enum mapped to status codes with JSON bodies (internal detail is logged, not returned).
//!
//! Routes are registered through `utoipa-axum`, so the OpenAPI document at `/api/openapi.json` is
//! generated from the handlers themselves and cannot miss one.

mod auth;
mod auth_failures;
mod body;
mod console;
mod error;
mod events;
mod feed;
mod health;
mod metrics;
mod openapi;
mod pipelines;
mod runs;
mod server;
mod token_strength;

pub use auth::{Scope, Tokens};
pub use error::ApiError;
pub use feed::StreamLimits;
pub use token_strength::check_all as check_token_strength;

use std::sync::Arc;

use crate::db::Db;
use axum::Router;
use tower_http::timeout::TimeoutLayer;
use utoipa_axum::router::OpenApiRouter;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::metrics::cluster::ClusterMetrics;

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    pub pool: Db,
    pub config: Arc<Config>,
    pub tokens: Arc<Tokens>,
    /// This process's metrics (workers, scheduler in the same process record into it).
    pub metrics: Arc<Metrics>,
    /// The queue and freshness gauges read from PostgreSQL; `None` where only process metrics are
    /// served (a worker's health port).
    pub cluster: Option<Arc<ClusterMetrics>>,
    /// The change feed of the event streams, and their limits.
    feed: Arc<feed::ChangeFeed>,
    /// Wrong tokens by client address (logging and lockout).
    pub auth_failures: Arc<auth_failures::AuthFailures>,
}

impl AppState {
    /// State for the full API: fresh process metrics and the cluster gauges.
    pub fn new(pool: Db, config: Arc<Config>, tokens: Tokens) -> Self {
        let limits = StreamLimits {
            total: config.server.max_event_streams,
            per_token: config.server.max_event_streams_per_token,
        };
        let auth_failures =
            auth_failures::AuthFailures::new(config.server.auth_failures_per_minute);
        Self {
            feed: feed::ChangeFeed::new(pool.clone(), limits),
            pool,
            config,
            tokens: Arc::new(tokens),
            metrics: Metrics::new(),
            cluster: Some(Arc::new(ClusterMetrics::new())),
            auth_failures: Arc::new(auth_failures),
        }
    }

    /// Serves `metrics` (shared with the workers and scheduler of this process).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }
}

/// The whole HTTP surface of `serve`: the API, health, metrics and the console.
pub fn router(state: AppState) -> Router {
    let (router, doc) = documented_routes(Some(request_timeout(&state))).split_for_parts();
    let doc = openapi::with_lockout(doc);
    router
        .merge(console::router().layer(request_timeout(&state)))
        .layer(axum::Extension(Arc::new(doc)))
        .layer(axum::extract::DefaultBodyLimit::max(body::MAX_BODY))
        .layer(axum::middleware::from_fn(error::json_errors))
        .with_state(state)
}

/// The health and metrics routes only: what a worker or scheduler process serves with `--listen`.
pub fn ops_router(state: AppState) -> Router {
    let (router, _) = OpenApiRouter::new()
        .merge(health::router())
        .merge(metrics::router())
        .split_for_parts();
    router.layer(request_timeout(&state)).with_state(state)
}

/// The OpenAPI document of [`router`].
pub fn openapi() -> utoipa::openapi::OpenApi {
    openapi::with_lockout(documented_routes(None).split_for_parts().1)
}

/// The routes of [`router`]; `timeout` applies to all but the event streams (long-lived).
fn documented_routes(timeout: Option<TimeoutLayer>) -> OpenApiRouter<AppState> {
    let with_timeout = |r: OpenApiRouter<AppState>| match &timeout {
        Some(t) => r.layer(*t),
        None => r,
    };
    let api = with_timeout(
        auth::router()
            .merge(pipelines::router())
            .merge(runs::router())
            .merge(openapi::router()),
    );
    OpenApiRouter::with_openapi(openapi::base())
        .merge(with_timeout(health::router().merge(metrics::router())))
        .nest("/api", api.merge(events::router()))
}

/// `[server] request_timeout`: 408 for a request not answered in time.
fn request_timeout(state: &AppState) -> TimeoutLayer {
    TimeoutLayer::with_status_code(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        state.config.server.request_timeout,
    )
}

pub use server::serve_router;

/// Serves the full API on `listener` until `shutdown` is cancelled; open event streams end then.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let feed = state.feed.clone();
    let stop_streams = shutdown.clone();
    tokio::spawn(async move {
        stop_streams.cancelled().await;
        feed.stop();
    });
    let limits = state.config.server.clone();
    serve_router(listener, router(state), limits, shutdown).await
}
