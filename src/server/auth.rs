//! Bearer-token check for the `/v1` routes.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::AppState;
use crate::api::ApiError;

pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if state.config.api_keys.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return ApiError::unauthorized("missing API key; send it as `Authorization: Bearer KEY`")
            .into_response();
    };
    let valid = state
        .config
        .api_keys
        .iter()
        .any(|key| constant_time_eq(key.expose().as_bytes(), presented.as_bytes()));
    if !valid {
        return ApiError::unauthorized("invalid API key").into_response();
    }
    next.run(request).await
}

/// Compares without an early exit, so response timing does not reveal how
/// much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
