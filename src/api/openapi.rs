//! The OpenAPI document: its frame (title, tags, the bearer scheme) and `GET /api/openapi.json`. The
//! paths come from the handlers' `#[utoipa::path]` attributes as they are routed.

use std::sync::Arc;

use axum::{Extension, Json};
use serde::Serialize;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

/// Every 4xx/5xx body: what was wrong, in words.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What was wrong with the request (or "internal error").
    pub error: String,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "crm-sync",
        description = "Scheduled CRM-to-warehouse syncs on a durable PostgreSQL job queue: health, metrics, \
                       pipelines and runs. Everything under /api except this document needs \
                       `Authorization: Bearer TOKEN`; read tokens may read, admin tokens may also start, \
                       retry, rerun and cancel runs and disable or enable pipelines."
    ),
    tags(
        (name = "health", description = "Process, database and pipeline freshness; Prometheus metrics"),
        (name = "pipelines", description = "The registered pipelines: health, who serves them, disable and enable"),
        (name = "runs", description = "Runs of the pipelines: start, list, follow, retry, rerun, cancel"),
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerScheme)
)]
struct Frame;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document before the routes add their paths.
pub fn base() -> OpenApi {
    <Frame as utoipa::OpenApi>::openapi()
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object))
)]
async fn openapi_json(Extension(doc): Extension<Arc<OpenApi>>) -> Json<OpenApi> {
    Json(OpenApi::clone(&doc))
}

/// Adds the lockout's 429 to every operation that may answer 401 (every one that takes a token):
/// an address that sent too many wrong tokens gets it, whatever route it asks for.
pub fn with_lockout(mut doc: OpenApi) -> OpenApi {
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in operations.into_iter().flatten() {
            let responses = &mut op.responses.responses;
            if let Some(utoipa::openapi::RefOr::T(unauthorized)) = responses.get("401") {
                let mut locked = unauthorized.clone();
                locked.description = "Too many wrong tokens from this address: retry after \
                                      `Retry-After` seconds"
                    .into();
                responses.insert("429".into(), utoipa::openapi::RefOr::T(locked));
            }
        }
    }
    doc
}
