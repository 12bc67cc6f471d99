//! Recording a generation request as a trace once its response is whole.
//!
//! Only requests that completed are recorded: failed, timed-out and
//! disconnected ones leave no trace.

use axum::{http::HeaderValue, response::Response};
use serde_json::{json, Value};

use super::{Endpoint, Job};
use crate::{
    api::params::GenerationParams,
    decoding::{self, Spent, Strategy},
    engine::ChatTurn,
    server::AppState,
    traces::{self, now_ms, Choice, Latency, TraceBuilder},
};

/// Response header carrying the id under which the request's trace is
/// recorded (unless the writer's queue was full).
pub const TRACE_ID_HEADER: &str = "x-mull-trace-id";

/// The request fields that a trace records.
pub(super) struct RequestRecord<'a> {
    pub state: &'a AppState,
    pub endpoint: Endpoint,
    pub model: &'a str,
    pub params: &'a GenerationParams,
    pub strategy: Option<&'a dyn Strategy>,
    pub messages: Option<&'a [ChatTurn]>,
    pub prompt: Option<Value>,
    pub id: &'a str,
}

/// Starts the trace of a request, or returns `None` when recording is off
/// or the request set `"store": false`.
pub(super) fn start_trace(request: RequestRecord) -> Option<TraceBuilder> {
    request.state.traces.as_ref()?;
    let params = request.params;
    if !params.store {
        return None;
    }
    let sampling = &params.sampling;
    let applied = json!({
        "max_tokens": params.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "min_p": sampling.min_p,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "n": params.n,
        "stop": params.stop,
        "seed": params.seed,
        "logprobs": params.logprobs,
        "decoding": request.strategy.map(decoding::describe),
    });
    let messages = request.messages.map(|turns| {
        turns
            .iter()
            .map(|t| traces::Message {
                role: t.role.clone(),
                content: t.content.clone(),
                name: t.name.clone(),
            })
            .collect()
    });
    Some(TraceBuilder {
        id: request.id.to_string(),
        created_ms: now_ms(),
        model: request.model.to_string(),
        endpoint: match request.endpoint {
            Endpoint::Chat => "chat",
            Endpoint::Completion => "completion",
        },
        strategy: request
            .strategy
            .map_or(decoding::plain::NAME, |s| s.name())
            .to_string(),
        params: applied,
        messages,
        prompt: request.prompt,
        stream: params.stream,
        user: params.user.clone(),
        metadata: params.metadata.clone(),
    })
}

/// Adds the trace id header when `trace_id` is set.
pub(super) fn insert_trace_header(response: &mut Response, trace_id: Option<&str>) {
    if let Some(id) = trace_id {
        let value = HeaderValue::from_str(id).expect("trace ids are ASCII");
        response.headers_mut().insert(TRACE_ID_HEADER, value);
    }
}

impl Job {
    /// Returns the trace id when this request is being recorded.
    pub(super) fn trace_id(&self) -> Option<&str> {
        self.trace_id.as_deref()
    }

    /// Adds the trace id header to a response of a recorded request.
    pub(super) fn with_trace_header(&self, mut response: Response) -> Response {
        insert_trace_header(&mut response, self.trace_id());
        response
    }

    /// Hands the finished request's trace to the recorder; `spent` is the
    /// engine work, which plain requests leave as `None`.
    pub(super) fn save_trace(
        &mut self,
        choices: Vec<Choice>,
        decoding: Option<Value>,
        spent: Option<Spent>,
    ) {
        let Some(builder) = self.trace.take() else {
            return;
        };
        let Some(traces) = &self.state.traces else {
            return;
        };
        let completion_tokens = choices.iter().map(|c| c.tokens).sum();
        let spent = spent.unwrap_or(Spent {
            prompt_tokens: self.prompt_tokens,
            cached_prompt_tokens: 0,
            generated_tokens: completion_tokens,
        });
        let usage = traces::Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            engine_prompt_tokens: spent.prompt_tokens,
            engine_generated_tokens: spent.generated_tokens,
        };
        let latency = Latency {
            queue_ms: self.queued_for.as_millis() as u64,
            first_token_ms: self
                .tracker
                .first_token
                .map(|t| (t - self.started).as_millis() as u64),
            total_ms: self.started.elapsed().as_millis() as u64,
        };
        traces
            .recorder
            .record(builder.finish(choices, decoding, usage, latency));
    }
}
