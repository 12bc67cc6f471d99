//! Behavior extraction as a background task. Solved traces are shown to the
//! model that served them, which is asked to state reusable behaviors. New
//! ones go into the handbook with the trace as their source.
//!
//! A run takes a generation slot only while no request is waiting for one,
//! and it stops at the first trace it cannot get a slot for, so extraction
//! yields to traffic. It generates one sequence at a time.

use std::{sync::Arc, time::Duration};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::AppState;
use crate::{
    decoding::{plain, Context, DecodeError, Input},
    engine::{Engine, EngineError, SamplingParams},
    handbook::extract::{find_duplicate, parse_reply, reflection_messages, topic_tags, Candidate},
    traces::{now_ms, StoreError, StoredBehavior, Trace, TraceStore},
};

/// Longest reply the model may write for one trace, in tokens.
const MAX_REPLY_TOKENS: usize = 200;

/// The outcome of one extraction run.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Report {
    /// Traces shown to the model.
    pub examined: usize,
    /// Trace ids shown to the model.
    pub traces: Vec<String>,
    /// Behaviors added to the handbook.
    pub added: Vec<String>,
    /// Stored behaviors that a reply repeated; the trace was added to their
    /// sources.
    pub merged: Vec<String>,
    /// Whether the run stopped early because requests were waiting.
    pub yielded: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs [`run_once`] every `interval` until `stop` fires.
pub async fn run_periodically(state: Arc<AppState>, interval: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match run_once(&state).await {
            Ok(report) if report.examined > 0 => info!(
                examined = report.examined,
                added = report.added.len(),
                merged = report.merged.len(),
                yielded = report.yielded,
                "extracted behaviors from solved traces"
            ),
            Ok(report) => debug!(yielded = report.yielded, "no solved traces to extract from"),
            Err(e) => warn!(cause = %e, "behavior extraction failed; retrying next interval"),
        }
    }
}

/// Shows up to the configured batch of solved traces to the model and
/// stores the behaviors it states. Runs never overlap: a second caller
/// waits for the first run to end.
pub async fn run_once(state: &Arc<AppState>) -> Result<Report, ExtractionError> {
    let Some(traces) = &state.traces else {
        return Ok(Report::default());
    };
    let _running = state.extraction.lock().await;
    let settings = state.config.extraction.clone();
    let store = traces.store.clone();
    let candidates = blocking(&store, move |store| {
        store.solved_unextracted(settings.min_agreement, settings.batch)
    })
    .await?;
    let mut report = Report::default();
    for trace in candidates {
        let slot = state.model(&trace.model).cloned();
        let Some((slot, engine)) = slot.and_then(|s| s.engine().map(|e| (s, e))) else {
            // The model is gone or still loading; leave the trace for a
            // later run unless the model is not served at all.
            if state.model(&trace.model).is_none() {
                mark_extracted(&store, &trace.id).await?;
            }
            continue;
        };
        let Some(permit) = slot.admission.try_admit_idle() else {
            report.yielded = true;
            break;
        };
        let reply = reflect(state, engine, &trace).await?;
        drop(permit);
        state.metrics.handbook_traces_examined.inc();
        report.examined += 1;
        report.traces.push(trace.id.clone());
        let candidates = reply.as_deref().map(parse_reply).unwrap_or_default();
        debug!(
            trace_id = %trace.id,
            behaviors = candidates.len(),
            "reflected on a solved trace"
        );
        let id = trace.id.clone();
        let tags = topic_tags(&trace);
        let (added, merged) = blocking(&store, move |store| {
            let stored = store_candidates(store, &id, &tags, candidates)?;
            store.mark_extracted(&[id])?;
            Ok(stored)
        })
        .await?;
        state
            .metrics
            .handbook_behaviors_extracted
            .inc_by(added.len() as u64);
        report.added.extend(added);
        report.merged.extend(merged);
    }
    if !report.added.is_empty() {
        let handbook = traces.handbook.clone();
        tokio::task::spawn_blocking(move || handbook.reload()).await??;
    }
    Ok(report)
}

/// Asks the model to reflect on `trace` and returns its reply. Returns
/// `None` when the trace lacks a problem or a solution, or when they do not
/// fit the context.
async fn reflect(
    state: &AppState,
    engine: Arc<dyn Engine>,
    trace: &Trace,
) -> Result<Option<String>, ExtractionError> {
    let Some(messages) = reflection_messages(trace) else {
        return Ok(None);
    };
    let prompt = engine.tokenize_chat(&messages).await?;
    if prompt.len() + MAX_REPLY_TOKENS > engine.info().context_length {
        return Ok(None);
    }
    let context = Context {
        engine,
        behaviors: state.behaviors.clone(),
        stream: None,
        metrics: state.metrics.clone(),
    };
    let input = Input {
        messages: Some(messages),
        prompt,
        sampling: SamplingParams::greedy(),
        temperature_set: true,
        seed: Some(0),
        max_tokens: MAX_REPLY_TOKENS,
        stops: Vec::new(),
        cancel: CancellationToken::new(),
    };
    let (mut paths, _) =
        plain::sample(&context, &input, 1, SamplingParams::greedy(), Some(0)).await?;
    Ok(paths.pop().map(|path| path.text))
}

/// Stores the new candidates, tagged with `tags`, and adds the trace to the
/// sources of those that repeat a stored behavior. Returns the added and the
/// repeated names.
fn store_candidates(
    store: &dyn TraceStore,
    trace_id: &str,
    tags: &[String],
    candidates: Vec<Candidate>,
) -> Result<(Vec<String>, Vec<String>), StoreError> {
    let mut existing = store.behaviors()?;
    let mut added = Vec::new();
    let mut merged = Vec::new();
    let source = [trace_id.to_string()];
    for candidate in candidates {
        if let Some(duplicate) = find_duplicate(&candidate, &existing) {
            store.add_behavior_sources(&duplicate.name, &source)?;
            merged.push(duplicate.name.clone());
            continue;
        }
        let behavior = StoredBehavior {
            name: candidate.name,
            instruction: candidate.instruction,
            tags: tags.to_vec(),
            source_traces: source.to_vec(),
            created_ms: now_ms(),
            times_retrieved: 0,
            effect: None,
        };
        store.add_behavior(&behavior)?;
        added.push(behavior.name.clone());
        existing.push(behavior);
    }
    Ok((added, merged))
}

async fn mark_extracted(store: &Arc<dyn TraceStore>, id: &str) -> Result<(), ExtractionError> {
    let ids = vec![id.to_string()];
    blocking(store, move |store| store.mark_extracted(&ids)).await
}

async fn blocking<T: Send + 'static>(
    store: &Arc<dyn TraceStore>,
    work: impl FnOnce(&dyn TraceStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ExtractionError> {
    let store = store.clone();
    Ok(tokio::task::spawn_blocking(move || work(store.as_ref())).await??)
}
