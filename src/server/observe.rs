//! One tracing span per request, a request id header, the request counter
//! and one `info` line when the request ends.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    http::HeaderValue,
    middleware::Next,
    response::Response,
};
use tracing::{field, info, Instrument};

use super::AppState;
use crate::metrics::{status_class, UNKNOWN_MODEL};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Set on a response by a handler that knows the model it served.
#[derive(Debug, Clone)]
pub struct ModelLabel(pub String);

/// Set on a response whose handler logs the request's final line itself,
/// as streams do when they end.
#[derive(Debug, Clone, Copy)]
pub struct StreamLogged;

pub async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = format!("req-{}", uuid::Uuid::new_v4().simple());
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        endpoint = %endpoint,
        model = field::Empty,
        stream = field::Empty,
        queue_ms = field::Empty,
        ttft_ms = field::Empty,
        prompt_tokens = field::Empty,
        completion_tokens = field::Empty,
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    response.headers_mut().insert(
        REQUEST_ID_HEADER,
        HeaderValue::from_str(&id).expect("request ids are ASCII"),
    );
    let status = response.status().as_u16();
    if endpoint.starts_with("/v1/") {
        let model = response
            .extensions()
            .get::<ModelLabel>()
            .map_or(UNKNOWN_MODEL, |m| m.0.as_str());
        state
            .metrics
            .requests
            .with_label_values(&[model, &endpoint, status_class(status)])
            .inc();
    }
    if response.extensions().get::<StreamLogged>().is_none() {
        let _entered = span.enter();
        info!(
            status,
            elapsed_ms = start.elapsed().as_millis() as u64,
            "request finished"
        );
    }
    response
}
