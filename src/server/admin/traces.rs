//! `/admin/traces`: list, fetch, delete, feedback and fine-tuning export.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{rejection::QueryRejection, Path, Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use super::{blocking, json_object};
use crate::{
    api::ApiError,
    server::AppState,
    traces::{fine_tuning_lines, now_ms, Feedback, FeedbackFilter, Trace, TraceFilter},
};

/// Traces per page when `limit` is not given, and at most.
const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 1000;
/// Traces per export when `limit` is not given, and at most.
const DEFAULT_EXPORT_LIMIT: usize = 10_000;
const MAX_EXPORT_LIMIT: usize = 100_000;
/// Maximum length of a feedback label, in characters.
const MAX_LABEL_CHARS: usize = 64;

type Pairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// Reads the filter query parameters, naming any unknown or invalid one.
fn filter(query: Pairs, default_limit: usize, max_limit: usize) -> Result<TraceFilter, ApiError> {
    let Query(pairs) = query.map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))?;
    let mut filter = TraceFilter {
        limit: default_limit,
        ..TraceFilter::default()
    };
    for (key, value) in pairs {
        let integer = |value: &str| {
            value.parse::<i64>().map_err(|_| {
                ApiError::invalid(
                    key.as_str(),
                    format!("`{key}` must be an integer, got `{value}`"),
                )
            })
        };
        match key.as_str() {
            "model" => filter.model = Some(value),
            "strategy" => filter.strategy = Some(value),
            "endpoint" => match value.as_str() {
                "chat" | "completion" => filter.endpoint = Some(value),
                other => {
                    return Err(ApiError::invalid(
                        "endpoint",
                        format!("`endpoint` must be chat or completion, got `{other}`"),
                    ))
                }
            },
            "since" => filter.since_ms = Some(seconds_to_ms(&key, integer(&value)?)?),
            "until" => filter.until_ms = Some(seconds_to_ms(&key, integer(&value)?)?),
            "cursor" => filter.cursor = Some(integer(&value)?),
            "feedback" => {
                filter.feedback = Some(match value.as_str() {
                    "positive" => FeedbackFilter::Positive,
                    "negative" => FeedbackFilter::Negative,
                    "any" => FeedbackFilter::Any,
                    "none" => FeedbackFilter::None,
                    other => {
                        return Err(ApiError::invalid(
                            "feedback",
                            format!(
                                "`feedback` must be positive, negative, any or none, got `{other}`"
                            ),
                        ))
                    }
                })
            }
            "limit" => {
                filter.limit = match integer(&value)? {
                    n if (1..=max_limit as i64).contains(&n) => n as usize,
                    n => {
                        return Err(ApiError::invalid(
                            "limit",
                            format!("`limit` must be from 1 to {max_limit}, got {n}"),
                        ))
                    }
                }
            }
            _ => {
                return Err(ApiError::invalid(
                    key.as_str(),
                    format!(
                        "unknown query parameter `{key}`; use model, strategy, endpoint, since, \
                         until, feedback, limit or cursor"
                    ),
                ))
            }
        }
    }
    if let (Some(since), Some(until)) = (filter.since_ms, filter.until_ms) {
        if since >= until {
            return Err(ApiError::invalid(
                "until",
                "`until` must be later than `since`",
            ));
        }
    }
    Ok(filter)
}

fn seconds_to_ms(key: &str, seconds: i64) -> Result<i64, ApiError> {
    seconds
        .checked_mul(1000)
        .filter(|_| seconds >= 0)
        .ok_or_else(|| {
            ApiError::invalid(
                key,
                format!("`{key}` must be a Unix time in seconds, got {seconds}"),
            )
        })
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    query: Pairs,
) -> Result<Json<Value>, ApiError> {
    let filter = filter(query, DEFAULT_LIMIT, MAX_LIMIT)?;
    let page = blocking(&state, move |store| store.list(&filter)).await?;
    Ok(Json(json!({
        "object": "list",
        "data": page.traces,
        "next_cursor": page.next_cursor,
    })))
}

/// Returns the filtered chat traces as JSONL in OpenAI's chat fine-tuning
/// format, one line per returned choice, newest trace first.
pub async fn export(
    State(state): State<Arc<AppState>>,
    query: Pairs,
) -> Result<Response, ApiError> {
    let mut filter = filter(query, DEFAULT_EXPORT_LIMIT, MAX_EXPORT_LIMIT)?;
    if filter.endpoint.as_deref() == Some("completion") {
        return Err(ApiError::invalid(
            "endpoint",
            "completion traces have no messages, so they cannot be exported as chat examples",
        ));
    }
    filter.endpoint = Some("chat".into());
    let page = blocking(&state, move |store| store.list(&filter)).await?;
    let mut body = String::new();
    for trace in &page.traces {
        for line in fine_tuning_lines(trace) {
            body.push_str(&line);
            body.push('\n');
        }
    }
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], body).into_response())
}

async fn find(state: &AppState, id: String) -> Result<Trace, ApiError> {
    let lookup = id.clone();
    blocking(state, move |store| store.get(&lookup))
        .await?
        .ok_or_else(|| not_found(&id))
}

fn not_found(id: &str) -> ApiError {
    ApiError::no_such("id", format!("no trace with id `{id}`"))
}

pub async fn fetch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Trace>, ApiError> {
    Ok(Json(find(&state, id).await?))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let lookup = id.clone();
    if !blocking(&state, move |store| store.delete(&lookup)).await? {
        return Err(not_found(&id));
    }
    Ok(Json(json!({"id": id, "object": "trace", "deleted": true})))
}

/// Sets a trace's feedback from `{"score": -1..1, "label": "..."}`, either
/// or both; a later post replaces the earlier feedback.
pub async fn feedback(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Body,
) -> Result<(StatusCode, Json<Trace>), ApiError> {
    let object = json_object(body, &["score", "label"]).await?;
    let score = match object.get("score") {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_f64() {
            Some(score) if (-1.0..=1.0).contains(&score) => Some(score),
            _ => {
                return Err(ApiError::invalid(
                    "score",
                    format!("`score` must be a number from -1 to 1, got {value}"),
                ))
            }
        },
    };
    let label = match object.get("label") {
        None | Some(Value::Null) => None,
        Some(Value::String(label))
            if !label.trim().is_empty() && label.chars().count() <= MAX_LABEL_CHARS =>
        {
            Some(label.clone())
        }
        Some(value) => {
            return Err(ApiError::invalid(
                "label",
                format!(
                    "`label` must be a non-empty string of at most {MAX_LABEL_CHARS} \
                     characters, got {value}"
                ),
            ))
        }
    };
    if score.is_none() && label.is_none() {
        return Err(ApiError::invalid(
            "score",
            "feedback needs a `score`, a `label` or both",
        ));
    }
    let feedback = Feedback {
        score,
        label,
        created_ms: now_ms(),
    };
    let lookup = id.clone();
    if !blocking(&state, move |store| store.set_feedback(&lookup, &feedback)).await? {
        return Err(not_found(&id));
    }
    Ok((StatusCode::OK, Json(find(&state, id).await?)))
}
