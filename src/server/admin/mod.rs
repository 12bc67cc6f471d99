//! The admin API under `/admin`, behind the admin key: traces (list, fetch,
//! delete, feedback, fine-tuning export), behaviors (list, add, edit,
//! delete, import, export) and extraction on demand.
//!
//! Errors use the same OpenAI envelope as `/v1`, with the offending field
//! or query parameter in `param`.

mod behaviors;
mod traces;

use std::sync::Arc;

use axum::{
    body::Body,
    middleware,
    routing::{get, post},
    Json, Router,
};
use serde_json::{Map, Value};
use tracing::error;

use super::{auth, extraction, AppState, Traces};
use crate::{
    api::ApiError,
    traces::{StoreError, TraceStore},
};

/// Builds the admin routes; the caller mounts them only when an admin key
/// and a trace store are configured.
pub fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/traces", get(traces::list))
        .route("/admin/traces/export", get(traces::export))
        .route(
            "/admin/traces/{id}",
            get(traces::fetch).delete(traces::delete),
        )
        .route("/admin/traces/{id}/feedback", post(traces::feedback))
        .route(
            "/admin/behaviors",
            get(behaviors::list).post(behaviors::add),
        )
        .route("/admin/behaviors/export", get(behaviors::export))
        .route("/admin/behaviors/import", post(behaviors::import))
        .route(
            "/admin/behaviors/{name}",
            get(behaviors::fetch)
                .patch(behaviors::edit)
                .delete(behaviors::delete),
        )
        .route("/admin/extraction", post(run_extraction))
        .route_layer(middleware::from_fn_with_state(
            state,
            auth::require_admin_key,
        ))
}

/// Returns the trace store; the admin routes exist only with one.
fn service(state: &AppState) -> &Traces {
    state
        .traces
        .as_ref()
        .expect("admin routes are mounted only with a trace store")
}

/// Runs blocking store work off the async threads, turning store faults
/// into a logged 500.
async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&dyn TraceStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = service(state).store.clone();
    tokio::task::spawn_blocking(move || work(store.as_ref()))
        .await
        .map_err(|e| {
            error!(cause = %e, "trace store task failed");
            ApiError::internal()
        })?
        .map_err(|e| match e {
            StoreError::DuplicateBehavior(name) => ApiError::conflict(
                "name",
                format!("a behavior named `{name}` already exists; edit it or pick another name"),
            ),
            other => {
                error!(cause = %other, "trace store request failed");
                ApiError::internal()
            }
        })
}

/// Reads a JSON body, which must be an object with only `allowed` keys.
async fn json_object(body: Body, allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    let bytes = axum::body::to_bytes(body, 16 << 20)
        .await
        .map_err(|e| ApiError::bad_request(format!("failed to read the request body: {e}")))?;
    crate::api::params::parse_object(&bytes, &[allowed])
}

async fn run_extraction(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
) -> Result<Json<extraction::Report>, ApiError> {
    let report = extraction::run_once(&state).await.map_err(|e| {
        error!(cause = %e, "extraction run failed");
        ApiError::internal()
    })?;
    Ok(Json(report))
}
