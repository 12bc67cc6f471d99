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
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(header) = header else {
        return ApiError::unauthorized("missing API key; send it as `Authorization: Bearer KEY`")
            .into_response();
    };
    // The scheme name is case-insensitive (RFC 9110, section 11.1).
    let presented = header
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    let Some(presented) = presented else {
        return ApiError::unauthorized(
            "unsupported authorization scheme; send the key as `Authorization: Bearer KEY`",
        )
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
