//! Bearer-token checks: API keys for the `/v1` routes, the admin key for
//! the `/admin` routes.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::AppState;
use crate::{api::ApiError, config::Secret};

pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if state.config.api_keys.is_empty() {
        return next.run(request).await;
    }
    match check_bearer(&request, &state.config.api_keys, "API key") {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

/// Guards the admin routes with the admin key, which API keys do not open.
pub async fn require_admin_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let keys: Vec<Secret> = state.config.admin_key.iter().cloned().collect();
    match check_bearer(&request, &keys, "admin key") {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

/// Checks that the request's bearer token is one of `keys`; `kind` names
/// the key in the error messages.
fn check_bearer(request: &Request, keys: &[Secret], kind: &str) -> Result<(), ApiError> {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(header) = header else {
        return Err(ApiError::unauthorized(format!(
            "missing {kind}; send it as `Authorization: Bearer KEY`"
        )));
    };
    // The scheme name is case-insensitive (RFC 9110, section 11.1).
    let presented = header
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    let Some(presented) = presented else {
        return Err(ApiError::unauthorized(format!(
            "unsupported authorization scheme; send the {kind} as `Authorization: Bearer KEY`"
        )));
    };
    let valid = keys
        .iter()
        .any(|key| constant_time_eq(key.expose().as_bytes(), presented.as_bytes()));
    if !valid {
        return Err(ApiError::unauthorized(format!("invalid {kind}")));
    }
    Ok(())
}

/// Compares without an early exit, so response timing does not reveal how
/// much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
