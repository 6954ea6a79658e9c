//! `GET /api/runs/{id}/events`: a run's state changes as server-sent events, for the console and for
//! scripts that want to follow a run without polling the API themselves.
//!
//! The stream opens with a `snapshot` event (the whole run, as `GET /api/runs/{id}`), then sends a
//! `step` event whenever a step's state, attempt count or error changes and a `run` event whenever
//! the run's status changes, and ends after the run reaches a final status. Changes are read from
//! the history every [`POLL`]: the queue's hot path stays free of per-change notifications, and a
//! client that reconnects simply gets a fresh snapshot.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::Caller;
use super::openapi::ErrorBody;
use super::runs::run_id;
use super::{ApiError, AppState};
use crate::history::{self, RunDetail, StepRecord};

/// How often a followed run is re-read.
const POLL: Duration = Duration::from_millis(250);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(run_events))
}

/// Follows a run: `snapshot`, then `step` and `run` events as they happen, until it finishes.
#[utoipa::path(get, path = "/runs/{id}/events", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The run id (a UUID)")),
    responses(
        (status = 200, content_type = "text/event-stream",
         description = "event: snapshot (the run detail), event: step (one step), event: run (id, status, error, started_at, finished_at); the stream ends after the run finishes"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
    ))]
async fn run_events(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = run_id(&id)?;
    let first = history::run_detail(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {id} not found")))?;
    let stream = futures::stream::unfold(Follow::Start(first), move |follow| {
        let pool = state.pool.clone();
        async move { follow.next(&pool, id).await }
    })
    .flat_map(futures::stream::iter);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Where a follower is: about to send the snapshot, watching from a known state, or done.
enum Follow {
    Start(RunDetail),
    Watching(RunDetail),
    Done,
}

impl Follow {
    /// The events of one step forward, and the state after it; `None` ends the stream.
    async fn next(
        self,
        pool: &sqlx::PgPool,
        id: Uuid,
    ) -> Option<(Vec<Result<Event, Infallible>>, Follow)> {
        match self {
            Follow::Done => None,
            Follow::Start(first) => {
                let event = json_event("snapshot", &first);
                let next = if is_final(&first.run.status) {
                    Follow::Done
                } else {
                    Follow::Watching(first)
                };
                Some((vec![Ok(event)], next))
            }
            Follow::Watching(before) => loop {
                tokio::time::sleep(POLL).await;
                let now = match history::run_detail(pool, id).await {
                    Ok(Some(now)) => now,
                    // Deleted (retention) while followed: nothing more will happen.
                    Ok(None) => return None,
                    Err(e) => {
                        tracing::warn!(run_id = %id, error = %e, "reading a followed run failed");
                        continue;
                    }
                };
                let events = changes(&before, &now);
                if events.is_empty() {
                    continue;
                }
                let next = if is_final(&now.run.status) {
                    Follow::Done
                } else {
                    Follow::Watching(now)
                };
                return Some((events.into_iter().map(Ok).collect(), next));
            },
        }
    }
}

fn is_final(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

/// The events that take a follower from `before` to `now`: changed steps first, then the run.
fn changes(before: &RunDetail, now: &RunDetail) -> Vec<Event> {
    let mut events: Vec<Event> = now
        .steps
        .iter()
        .filter(|step| {
            before
                .steps
                .iter()
                .find(|b| b.id == step.id)
                .is_none_or(|b| step_changed(b, step))
        })
        .map(|step| json_event("step", step))
        .collect();
    let (b, n) = (&before.run, &now.run);
    if b.status != n.status || b.error != n.error || b.finished_at != n.finished_at {
        events.push(json_event(
            "run",
            &json!({
                "id": n.id,
                "status": n.status,
                "error": n.error,
                "started_at": n.started_at,
                "finished_at": n.finished_at,
            }),
        ));
    }
    events
}

fn step_changed(before: &StepRecord, now: &StepRecord) -> bool {
    before.status != now.status
        || before.attempts != now.attempts
        || before.error != now.error
        || before.finished_at != now.finished_at
}

fn json_event(kind: &str, data: &impl serde::Serialize) -> Event {
    Event::default()
        .event(kind)
        .json_data(data)
        .unwrap_or_else(|e| Event::default().event("error").data(e.to_string()))
}
