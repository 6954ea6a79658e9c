//! Server-sent events, for the console and for scripts that want to follow runs without polling the
//! API themselves.
//!
//! `GET /api/events`: a `run` event (a run summary, as `GET /api/runs` lists it) whenever a run is
//! created or changes status, for live lists.
//!
//! `GET /api/runs/{id}/events`: one run's state changes. The stream opens with a `snapshot` event (the
//! whole run, as `GET /api/runs/{id}`), then sends a `step` event whenever a step's state, attempt
//! count or error changes and a `run` event whenever the run's status changes, and ends after the run
//! reaches a final status.
//!
//! Every stream of a process listens to the process's one [`ChangeFeed`](super::feed::ChangeFeed),
//! which reads only what changed; a followed run is re-read only when it changed. Streams are capped
//! per token and in all (429 beyond), and end when the process shuts down. The queue's hot path stays
//! free of per-change notifications, and a client that reconnects simply gets a fresh snapshot.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde_json::json;
use tokio::sync::broadcast::{self, error::RecvError};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::{Caller, bearer_token};
use super::feed::{StreamSlot, Tick};
use super::openapi::ErrorBody;
use super::runs::run_id;
use super::{ApiError, AppState};
use crate::history::{self, RunDetail, StepRecord};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(run_events))
        .routes(routes!(all_runs_events))
}

/// A slot for one more stream of the caller's token, or 429 saying which limit was reached.
fn open_slot(state: &AppState, headers: &HeaderMap) -> Result<StreamSlot, ApiError> {
    state
        .feed
        .open_stream(bearer_token(headers).unwrap_or_default())
        .map_err(ApiError::TooManyRequests)
}

/// `events` as an SSE response that keeps its slot while open and ends when the process shuts down.
fn respond<S>(
    state: &AppState,
    slot: StreamSlot,
    events: S,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<S>>
where
    S: Stream<Item = Event> + Send + 'static,
{
    let stop = state.feed.stopping();
    let stream = events
        .map(move |event| {
            let _held = &slot;
            Ok(event)
        })
        .take_until(stop);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Every run's status changes: `run` events carrying the run summary, until the client leaves.
#[utoipa::path(get, path = "/events", tag = "runs", security(("bearer" = [])),
    responses(
        (status = 200, content_type = "text/event-stream",
         description = "event: run (a run summary as GET /api/runs lists it) whenever a run is created or changes status"),
        (status = 401, body = ErrorBody),
        (status = 429, description = "Too many event streams open (per token or in all)", body = ErrorBody),
    ))]
async fn all_runs_events(
    State(state): State<AppState>,
    _caller: Caller,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let slot = open_slot(&state, &headers)?;
    let watch = RunWatch {
        ticks: state.feed.subscribe(),
        known: HashMap::new(),
    };
    let events = futures::stream::unfold(watch, |mut watch| async move {
        let events = watch.next().await?;
        Some((events, watch))
    })
    .flat_map(futures::stream::iter);
    Ok(respond(&state, slot, events))
}

/// What an all-runs follower has seen: the status of each run it reported.
struct RunWatch {
    ticks: broadcast::Receiver<Arc<Tick>>,
    known: HashMap<Uuid, String>,
}

impl RunWatch {
    /// Waits for the next status changes and returns their events; `None` when the feed is gone.
    async fn next(&mut self) -> Option<Vec<Event>> {
        loop {
            let tick = match self.ticks.recv().await {
                Ok(tick) => tick,
                Err(RecvError::Lagged(missed)) => {
                    // A client this slow missed changes: say so, so that it reloads its list.
                    return Some(vec![json_event(
                        "lagged",
                        &json!({ "missed_ticks": missed }),
                    )]);
                }
                Err(RecvError::Closed) => return None,
            };
            let mut events = Vec::new();
            for run in &tick.runs {
                if self.known.get(&run.id) != Some(&run.status) {
                    self.known.insert(run.id, run.status.clone());
                    events.push(Event::default().event("run").data(&run.json));
                }
            }
            // Finished runs cannot change again (a retry is a new run): forget them.
            if self.known.len() > 10_000 {
                self.known.retain(|_, status| !is_final(status));
            }
            if !events.is_empty() {
                return Some(events);
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
        (status = 429, description = "Too many event streams open (per token or in all)", body = ErrorBody),
    ))]
async fn run_events(
    State(state): State<AppState>,
    _caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = run_id(&id)?;
    let slot = open_slot(&state, &headers)?;
    // Subscribed before the snapshot is read, so that no change after it is missed.
    let ticks = state.feed.subscribe();
    let first = history::run_detail(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {id} not found")))?;
    let pool = state.pool.clone();
    let events =
        futures::stream::unfold((Follow::Start(first), ticks), move |(follow, mut ticks)| {
            let pool = pool.clone();
            async move {
                let (events, next) = follow.next(&pool, id, &mut ticks).await?;
                Some((events, (next, ticks)))
            }
        })
        .flat_map(futures::stream::iter);
    Ok(respond(&state, slot, events))
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
        ticks: &mut broadcast::Receiver<Arc<Tick>>,
    ) -> Option<(Vec<Event>, Follow)> {
        match self {
            Follow::Done => None,
            Follow::Start(first) => {
                let event = json_event("snapshot", &first);
                let next = if is_final(&first.run.status) {
                    Follow::Done
                } else {
                    Follow::Watching(first)
                };
                Some((vec![event], next))
            }
            Follow::Watching(before) => loop {
                match ticks.recv().await {
                    Ok(tick) if !tick.changed.contains(&id) => continue,
                    // Changed, or this stream missed ticks: read the run again.
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return None,
                }
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
                return Some((events, next));
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
