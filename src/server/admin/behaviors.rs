//! `/admin/behaviors`: the handbook's behaviors, as JSON objects with
//! `name`, `instruction`, `tags`, `source_traces`, `created_ms`,
//! `times_retrieved` and `effect`. Every change rebuilds the retrieval
//! index, so the next request retrieves from the changed handbook.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use serde_json::{json, Map, Value};

use super::{blocking, json_object, service};
use crate::{
    api::ApiError,
    handbook::{check_instruction, check_name},
    server::AppState,
    traces::{now_ms, BehaviorPatch, StoreError, StoredBehavior},
};

/// Fields a new behavior may have; the counters are the store's own.
const NEW_FIELDS: &[&str] = &["name", "instruction", "tags", "source_traces", "effect"];
const EDIT_FIELDS: &[&str] = &["name", "instruction", "tags", "effect"];
/// Largest import body, in bytes.
const MAX_IMPORT_BYTES: usize = 16 << 20;

fn reload(state: &AppState) -> Result<(), StoreError> {
    service(state).handbook.reload()
}

pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let behaviors = blocking(&state, |store| store.behaviors()).await?;
    Ok(Json(json!({"object": "list", "data": behaviors})))
}

/// Returns every behavior as a JSON array, the format `import` reads.
pub async fn export(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Vec<StoredBehavior>>, ApiError> {
    Ok(Json(blocking(&state, |store| store.behaviors()).await?))
}

pub async fn fetch(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<StoredBehavior>, ApiError> {
    let lookup = name.clone();
    blocking(&state, move |store| store.behavior(&lookup))
        .await?
        .map(Json)
        .ok_or_else(|| not_found(&name))
}

fn not_found(name: &str) -> ApiError {
    ApiError::no_such("name", format!("no behavior named `{name}`"))
}

pub async fn add(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<(StatusCode, Json<StoredBehavior>), ApiError> {
    let object = json_object(body, NEW_FIELDS).await?;
    let behavior = new_behavior(&object, "")?;
    let added = behavior.clone();
    let shared = state.clone();
    blocking(&state, move |store| {
        store.add_behavior(&added)?;
        reload(&shared)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(behavior)))
}

/// Adds each behavior of a JSON array whose name is new; behaviors whose
/// name is taken are skipped and listed, never overwritten.
pub async fn import(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_IMPORT_BYTES)
        .await
        .map_err(|e| ApiError::bad_request(format!("failed to read the request body: {e}")))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    let Value::Array(items) = value else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON array of behaviors",
        ));
    };
    let mut behaviors = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(object) = item else {
            return Err(ApiError::invalid(
                format!("[{i}]"),
                format!("`[{i}]` must be an object"),
            ));
        };
        let prefix = format!("[{i}].");
        // Exports carry the store's counters; an import keeps them.
        let known = [NEW_FIELDS, &["created_ms", "times_retrieved"][..]].concat();
        if let Some(key) = object.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ApiError::invalid(
                format!("{prefix}{key}"),
                format!(
                    "unknown behavior field `{key}`; allowed: {}",
                    known.join(", ")
                ),
            ));
        }
        let mut behavior = new_behavior(object, &prefix)?;
        if let Some(created) = object.get("created_ms").and_then(Value::as_i64) {
            behavior.created_ms = created;
        }
        if let Some(count) = object.get("times_retrieved").and_then(Value::as_u64) {
            behavior.times_retrieved = count;
        }
        behaviors.push(behavior);
    }
    let shared = state.clone();
    let (added, skipped) = blocking(&state, move |store| {
        let mut added = Vec::new();
        let mut skipped = Vec::new();
        for behavior in behaviors {
            match store.add_behavior(&behavior) {
                Ok(()) => added.push(behavior.name),
                Err(StoreError::DuplicateBehavior(name)) => skipped.push(name),
                Err(e) => return Err(e),
            }
        }
        reload(&shared)?;
        Ok((added, skipped))
    })
    .await?;
    Ok(Json(json!({"added": added, "skipped": skipped})))
}

pub async fn edit(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<StoredBehavior>, ApiError> {
    let object = json_object(body, EDIT_FIELDS).await?;
    let patch = BehaviorPatch {
        name: optional_text(&object, "", "name", check_name)?,
        instruction: optional_text(&object, "", "instruction", check_instruction)?,
        tags: object.get("tags").map(|v| tags(v, "tags")).transpose()?,
        effect: object.get("effect").map(effect),
    };
    let lookup = name.clone();
    let shared = state.clone();
    blocking(&state, move |store| {
        let edited = store.update_behavior(&lookup, &patch)?;
        reload(&shared)?;
        Ok(edited)
    })
    .await?
    .map(Json)
    .ok_or_else(|| not_found(&name))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let lookup = name.clone();
    let shared = state.clone();
    let deleted = blocking(&state, move |store| {
        let deleted = store.delete_behavior(&lookup)?;
        reload(&shared)?;
        Ok(deleted)
    })
    .await?;
    if !deleted {
        return Err(not_found(&name));
    }
    Ok(Json(
        json!({"name": name, "object": "behavior", "deleted": true}),
    ))
}

/// Reads a new behavior; `prefix` places its fields in the error messages.
fn new_behavior(object: &Map<String, Value>, prefix: &str) -> Result<StoredBehavior, ApiError> {
    let required = |key: &str, check: fn(&str) -> Result<(), String>| {
        optional_text(object, prefix, key, check)?.ok_or_else(|| {
            ApiError::invalid(
                format!("{prefix}{key}"),
                format!("`{prefix}{key}` is required"),
            )
        })
    };
    let name = required("name", check_name)?;
    let instruction = required("instruction", check_instruction)?;
    let field = |key: &str| format!("{prefix}{key}");
    Ok(StoredBehavior {
        name,
        instruction,
        tags: object
            .get("tags")
            .map(|v| tags(v, &field("tags")))
            .transpose()?
            .unwrap_or_default(),
        source_traces: object
            .get("source_traces")
            .map(|v| tags(v, &field("source_traces")))
            .transpose()?
            .unwrap_or_default(),
        created_ms: now_ms(),
        times_retrieved: 0,
        effect: object.get("effect").and_then(effect),
    })
}

fn optional_text(
    object: &Map<String, Value>,
    prefix: &str,
    key: &str,
    check: fn(&str) -> Result<(), String>,
) -> Result<Option<String>, ApiError> {
    let field = format!("{prefix}{key}");
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => match check(text) {
            Ok(()) => Ok(Some(text.clone())),
            Err(problem) => Err(ApiError::invalid(
                field.clone(),
                format!("`{field}` {problem}"),
            )),
        },
        Some(other) => Err(ApiError::invalid(
            field.clone(),
            format!("`{field}` must be a string, got {other}"),
        )),
    }
}

/// Reads a list of short strings (tags or trace ids).
fn tags(value: &Value, field: &str) -> Result<Vec<String>, ApiError> {
    let invalid = || {
        ApiError::invalid(
            field,
            format!("`{field}` must be a list of non-empty strings of at most 200 characters"),
        )
    };
    let Value::Array(items) = value else {
        return Err(invalid());
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(s) if !s.is_empty() && s.chars().count() <= 200 => Ok(s.clone()),
            _ => Err(invalid()),
        })
        .collect()
}

/// Reads `effect`, where `null` clears it.
fn effect(value: &Value) -> Option<Value> {
    (!value.is_null()).then(|| value.clone())
}
