//! The admin HTTP API served by `crm-sync serve` (axum): health from the run history, and runs to
//! trigger, read, retry, rerun and cancel. One state struct, a router per resource, one error enum
//! mapped to status codes with JSON bodies (internal detail is logged, not returned).

mod auth;
mod error;
mod health;
mod runs;

pub use auth::{Scope, Tokens};
pub use error::ApiError;

use std::sync::Arc;

use axum::Router;
use sqlx::PgPool;

use crate::config::Config;

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub tokens: Arc<Tokens>,
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(health::router())
        .nest("/api", runs::router(state.clone()))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
