//! The trace store: a record of every completed request, kept for review,
//! feedback, fine-tuning exports and the behavior handbook.
//!
//! Handlers build a [`Trace`] when a response is complete and hand it to the
//! [`Recorder`], which queues it for a writer thread; nothing on the request
//! path waits for the database. [`TraceStore`] is the storage interface, and
//! [`sqlite::SqliteStore`] the embedded implementation.

#[cfg(test)]
pub(crate) mod contract;
pub mod postgres;
pub mod record;
pub mod sqlite;
pub mod writer;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use record::{EntropySummary, TraceBuilder};
pub use writer::Recorder;

/// One completed request as it is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// The response's `id`, which is also the trace id.
    pub id: String,
    /// Unix time in milliseconds when the request arrived.
    pub created_ms: i64,
    /// The configured model that served the request.
    pub model: String,
    /// The fine-tuned adapter applied on top of the model; always `None`
    /// until adapters are served.
    pub adapter: Option<String>,
    /// `chat` or `completion`.
    pub endpoint: String,
    /// The outermost decoding strategy, `plain` when none ran.
    pub strategy: String,
    /// Sampling settings and the strategy's parameters as applied.
    pub params: Value,
    /// The chat messages as the client sent them; `None` for completions.
    pub messages: Option<Vec<Message>>,
    /// The completion prompt, a string or a list of token ids; `None` for
    /// chat.
    pub prompt: Option<Value>,
    pub choices: Vec<Choice>,
    /// The strategy's report (samples, votes, agreement, turns, trials,
    /// retrieved behaviors), as in the response's `decoding` object.
    pub decoding: Option<Value>,
    pub usage: Usage,
    pub latency: Latency,
    pub stream: bool,
    pub user: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Set by the admin API; never part of the recorded request.
    #[serde(default)]
    pub feedback: Option<Feedback>,
}

/// A chat message of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One returned choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub index: usize,
    pub text: String,
    pub finish_reason: Option<String>,
    /// Tokens in `text`.
    pub tokens: usize,
    /// The final answer extracted from `text` (a number, a choice letter or
    /// the normalized last line), as self-consistency votes with it.
    pub answer: Option<String>,
    /// Entropy of the distributions the returned tokens were sampled from;
    /// `None` when the strategy returned no per-token steps.
    pub entropy: Option<EntropySummary>,
}

/// Token counts: what `usage` reported, and the engine work behind it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens the engine processed, every sample and turn included.
    pub engine_prompt_tokens: usize,
    /// Tokens the engine generated, discarded samples and trials included.
    pub engine_generated_tokens: usize,
}

/// Latencies in milliseconds from the request's arrival.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Time waiting for an admission slot.
    pub queue_ms: u64,
    /// Time to the first returned text; `None` when no text was returned.
    pub first_token_ms: Option<u64>,
    /// Time to the complete response.
    pub total_ms: u64,
}

/// A client's judgement of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    /// A score from -1 (bad) to 1 (good).
    pub score: Option<f64>,
    /// A short label such as `correct` or `off_topic`.
    pub label: Option<String>,
    /// Unix time in milliseconds when the feedback was posted.
    pub created_ms: i64,
}

/// Which feedback a listed trace must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackFilter {
    /// A score above 0.
    Positive,
    /// A score below 0.
    Negative,
    /// Any feedback at all.
    Any,
    /// No feedback.
    None,
}

/// Conditions on listed and exported traces; unset fields match any trace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TraceFilter {
    pub model: Option<String>,
    pub strategy: Option<String>,
    pub endpoint: Option<String>,
    /// Unix time in milliseconds; traces created at or after it.
    pub since_ms: Option<i64>,
    /// Unix time in milliseconds; traces created before it.
    pub until_ms: Option<i64>,
    pub feedback: Option<FeedbackFilter>,
    /// Traces older than this cursor, as returned by the previous page.
    pub cursor: Option<i64>,
    pub limit: usize,
}

/// One page of traces, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct TracePage {
    pub traces: Vec<Trace>,
    /// Pass as `cursor` to get the next page; `None` on the last one.
    pub next_cursor: Option<i64>,
}

/// A behavior in the handbook store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredBehavior {
    /// Unique, in snake_case.
    pub name: String,
    /// One line of advice, put into prompts as is.
    pub instruction: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Traces the behavior was extracted from.
    #[serde(default)]
    pub source_traces: Vec<String>,
    /// Unix time in milliseconds.
    #[serde(default)]
    pub created_ms: i64,
    /// How often the handbook strategy put it into a prompt.
    #[serde(default)]
    pub times_retrieved: u64,
    /// What a measurement found the behavior changes, in free form (for
    /// example `{"gsm8k_accuracy_delta": 0.02}`); set through the admin API.
    #[serde(default)]
    pub effect: Option<Value>,
}

/// Changes to a stored behavior; unset fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BehaviorPatch {
    pub name: Option<String>,
    pub instruction: Option<String>,
    pub tags: Option<Vec<String>>,
    pub effect: Option<Option<Value>>,
}

/// When traces are deleted to bound the store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// Traces older than this are deleted; `None` keeps them.
    pub max_age: Option<Duration>,
    /// The oldest traces are deleted while the live data exceeds this many
    /// bytes; `None` sets no bound.
    pub max_bytes: Option<u64>,
}

/// Validated trace settings from the configuration.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// The SQLite file, used unless `postgres_url` is set.
    pub path: PathBuf,
    /// A PostgreSQL connection string; when set, traces go there.
    pub postgres_url: Option<crate::config::Secret>,
    /// Traces that may wait for the writer; more are dropped and counted.
    pub queue_capacity: usize,
    pub retention: Retention,
    /// How often the writer enforces `retention`.
    pub retention_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the trace store {path} cannot be used: {cause}. It was left untouched; move it away \
         or point traces_path (or traces_postgres_url) at another store"
    )]
    Unusable { path: String, cause: String },
    #[error("trace store query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("trace store query failed: {0}")]
    Postgres(#[from] ::postgres::Error),
    #[error("trace store holds an unreadable record: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("a behavior named `{0}` already exists")]
    DuplicateBehavior(String),
}

/// Storage of traces and behaviors. Every method blocks, so async callers
/// run them on `spawn_blocking` or on the writer thread.
pub trait TraceStore: Send + Sync {
    fn insert(&self, trace: &Trace) -> Result<(), StoreError>;
    fn get(&self, id: &str) -> Result<Option<Trace>, StoreError>;
    fn list(&self, filter: &TraceFilter) -> Result<TracePage, StoreError>;
    /// Returns whether a trace with this id existed.
    fn delete(&self, id: &str) -> Result<bool, StoreError>;
    /// Returns whether a trace with this id exists.
    fn set_feedback(&self, id: &str, feedback: &Feedback) -> Result<bool, StoreError>;
    /// Deletes what `retention` no longer keeps; returns how many traces.
    fn prune(&self, retention: &Retention, now_ms: i64) -> Result<usize, StoreError>;

    /// Returns chat traces not yet shown to extraction that look solved:
    /// self-consistency agreement of at least `min_agreement`, converged
    /// introspection, or a positive feedback score. Oldest first.
    fn solved_unextracted(
        &self,
        min_agreement: f64,
        limit: usize,
    ) -> Result<Vec<Trace>, StoreError>;
    fn mark_extracted(&self, ids: &[String]) -> Result<(), StoreError>;

    fn behaviors(&self) -> Result<Vec<StoredBehavior>, StoreError>;
    fn behavior(&self, name: &str) -> Result<Option<StoredBehavior>, StoreError>;
    /// Adds a behavior; fails with [`StoreError::DuplicateBehavior`] when
    /// the name is taken.
    fn add_behavior(&self, behavior: &StoredBehavior) -> Result<(), StoreError>;
    /// Returns the changed behavior, or `None` when none has that name.
    fn update_behavior(
        &self,
        name: &str,
        patch: &BehaviorPatch,
    ) -> Result<Option<StoredBehavior>, StoreError>;
    fn delete_behavior(&self, name: &str) -> Result<bool, StoreError>;
    /// Adds trace ids to a behavior's sources, skipping those it has.
    fn add_behavior_sources(&self, name: &str, traces: &[String]) -> Result<(), StoreError>;
    /// Adds one to the retrieval count of each named behavior.
    fn count_retrievals(&self, names: &[String]) -> Result<(), StoreError>;
}

/// Estimates how many of `count` traces, taking `live` bytes together,
/// must go to bring them under `max_bytes`, assuming traces of equal size.
/// Returns at least 1, so that a pruning loop always progresses.
fn excess_traces(count: i64, live: u64, max_bytes: u64) -> i64 {
    let share = live.saturating_sub(max_bytes) as f64 / live.max(1) as f64;
    ((count as f64 * share).ceil() as i64).max(1)
}

/// Returns the current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Builds one line of OpenAI's chat fine-tuning format for each choice of
/// a chat trace: the request's messages, then the returned text as the
/// assistant's message. Completion traces have no messages and give none.
pub fn fine_tuning_lines(trace: &Trace) -> Vec<String> {
    let Some(messages) = &trace.messages else {
        return Vec::new();
    };
    trace
        .choices
        .iter()
        .map(|choice| {
            let mut conversation: Vec<Value> = messages
                .iter()
                .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                .collect();
            conversation.push(serde_json::json!({"role": "assistant", "content": choice.text}));
            serde_json::json!({ "messages": conversation }).to_string()
        })
        .collect()
}
