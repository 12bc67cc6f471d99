//! Routes that do not generate: health, readiness, metrics, models.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{header, StatusCode, Uri},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use super::{AppState, ModelSlot};
use crate::api::{
    response::{ModelCard, ModelList},
    ApiError,
};

/// Liveness: the process serves HTTP.
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: every configured model is loaded and has generated a token.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let loading: Vec<&str> = state
        .models
        .iter()
        .filter(|m| !m.is_ready())
        .map(|m| m.name.as_str())
        .collect();
    if loading.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response()
    } else {
        let mut error = ApiError::not_ready();
        error.message = format!("models still loading: {}", loading.join(", "));
        error.into_response()
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // The engine keeps its own counts; bring the exported counters up to them.
    for slot in &state.models {
        let stats = slot.engine().and_then(|e| e.prefix_cache_stats());
        if let Some((hits, sequences)) = stats {
            let sync = |counter: &prometheus::IntCounterVec, value: usize| {
                let counter = counter.with_label_values(&[&slot.name]);
                counter.inc_by((value as u64).saturating_sub(counter.get()));
            };
            sync(&state.metrics.prefix_cache_hits, hits);
            sync(&state.metrics.engine_sequences, sequences);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let card = |id: String, slot: &ModelSlot| ModelCard {
        id,
        object: "model",
        created: slot.created,
        owned_by: "mull",
        max_model_len: slot.engine().map(|e| e.info().context_length),
    };
    let mut data = Vec::new();
    for slot in &state.models {
        data.push(card(slot.name.clone(), slot));
        for preset in state.presets.keys() {
            data.push(card(format!("{}:{preset}", slot.name), slot));
        }
    }
    Json(ModelList {
        object: "list",
        data,
    })
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
