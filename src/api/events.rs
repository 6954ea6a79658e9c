//! Server-sent events, for the console and for scripts that want to follow runs without polling the
//! API themselves.
//!
//! `GET /api/events`: a `run` event (a run summary, as `GET /api/runs` lists it) whenever any run is
//! created or changes status, for live lists.
//!
//! `GET /api/runs/{id}/events`: one run's state changes. The stream opens with a `snapshot` event (the whole run, as `GET /api/runs/{id}`), then sends a
//! `step` event whenever a step's state, attempt count or error changes and a `run` event whenever
//! the run's status changes, and ends after the run reaches a final status. Changes are read from
//! the history every [`POLL`]: the queue's hot path stays free of per-change notifications, and a
//! client that reconnects simply gets a fresh snapshot.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::Caller;
use super::openapi::ErrorBody;
use super::runs::run_id;
use super::{ApiError, AppState};
use crate::history::{self, RunDetail, RunSummary, StepRecord};

/// How often a followed run is re-read.
const POLL: Duration = Duration::from_millis(250);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(run_events))
        .routes(routes!(all_runs_events))
}

/// Every run's status changes: `run` events carrying the run summary, until the client leaves.
#[utoipa::path(get, path = "/events", tag = "runs", security(("bearer" = [])),
    responses(
        (status = 200, content_type = "text/event-stream",
         description = "event: run (a run summary as GET /api/runs lists it) whenever a run is created or changes status"),
        (status = 401, body = ErrorBody),
    ))]
async fn all_runs_events(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let since: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&state.pool)
        .await?;
    let watch = RunWatch {
        since,
        known: HashMap::new(),
    };
    let stream = futures::stream::unfold(watch, move |mut watch| {
        let pool = state.pool.clone();
        async move {
            let events = watch.next(&pool).await;
            Some((events, watch))
        }
    })
    .flat_map(futures::stream::iter);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// What an all-runs follower has seen: the status of each run it reported, and the database time of
/// its last look.
struct RunWatch {
    since: DateTime<Utc>,
    known: HashMap<Uuid, String>,
}

impl RunWatch {
    /// Waits for the next changes and returns their events.
    async fn next(&mut self, pool: &crate::db::Db) -> Vec<Result<Event, Infallible>> {
        loop {
            tokio::time::sleep(POLL).await;
            let rows: Result<(DateTime<Utc>, Vec<RunSummary>), sqlx::Error> = async {
                let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
                Ok((now, history::changed_runs(pool, self.since).await?))
            }
            .await;
            let (now, runs) = match rows {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "reading runs for the events stream failed");
                    continue;
                }
            };
            self.since = now;
            let mut events = Vec::new();
            for run in runs {
                if self.known.get(&run.id) != Some(&run.status) {
                    self.known.insert(run.id, run.status.clone());
                    events.push(Ok(json_event("run", &run)));
                }
            }
            // Finished runs cannot change again (a retry is a new run): forget them once they
            // are out of the look-back window.
            if self.known.len() > 10_000 {
                self.known.retain(|_, status| !is_final(status));
            }
            if !events.is_empty() {
                return events;
            }
        }
    }
}

/// Follows a run: `snapshot`, then `step` and `run` events as they happen, until it finishes.
#[utoipa::path(get, path = "/runs/{id}/events", tag = "runs", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The run id")),
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
        pool: &crate::db::Db,
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
