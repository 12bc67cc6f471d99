//! `POST /v1/chat/completions` and `POST /v1/completions`: admission, the
//! context check, and the response, whole or as server-sent events.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use axum::{
    body::{to_bytes, Body, Bytes},
    extract::State,
    response::{
        sse::{Event, Sse},
        IntoResponse, Response,
    },
    Json,
};
use futures::{Stream, StreamExt};
use tokio::{sync::mpsc, time::Instant as TokioInstant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, Instrument, Span};

use super::{
    observe::{ModelLabel, StreamLogged},
    AppState, ModelSlot, Permit,
};
mod record;
mod strategy;

pub use record::TRACE_ID_HEADER;

use crate::metrics::DISCONNECTED;

use crate::{
    api::{
        chat::ChatRequest,
        completion::{CompletionRequest, Prompt},
        params::GenerationParams,
        response::{
            AssistantMessage, ChatChoice, ChatChunk, ChatCompletion, ChatLogprobs, ChunkChoice,
            Delta, TextChoice, TextCompletion, TextLogprobs, Usage,
        },
        ApiError,
    },
    decoding::{self, Strategy},
    engine::ChatTurn,
    engine::{Engine, GenerateRequest, TokenStep},
    generation::{run_choices, ApiFinishReason, ChoiceEvent},
    traces::{self, record::EntropyTotals, EntropySummary, TraceBuilder},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completion => "/v1/completions",
        }
    }
}

/// A parsed request with its model resolved and its prompt tokenized.
struct Prepared {
    slot: Arc<ModelSlot>,
    engine: Arc<dyn Engine>,
    prompt: Vec<u32>,
    params: GenerationParams,
    messages: Option<Vec<ChatTurn>>,
    /// The decoding strategy, when the request, a preset alias or the
    /// model's default names one.
    strategy: Option<Arc<dyn Strategy>>,
    /// The completion prompt as the client sent it, for the trace.
    sent_prompt: Option<serde_json::Value>,
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let started = Instant::now();
    let mut label = None;
    let prepared = async {
        let bytes = read_body(body, state.config.max_body_bytes).await?;
        let request = ChatRequest::parse(&bytes, &state.limits)?;
        let (slot, engine, strategy) = resolve_model(&state, &request.params)?;
        label = Some(slot.name.clone());
        reject_control_tokens(engine.as_ref(), &request.messages)?;
        debug!(messages = %truncate(&format!("{:?}", request.messages)), "chat prompt");
        let prompt = engine.tokenize_chat(&request.messages).await.map_err(|e| {
            error!(cause = %e, "chat template failed");
            ApiError::internal()
        })?;
        Ok(Prepared {
            slot,
            engine,
            prompt,
            params: request.params,
            messages: Some(request.messages),
            strategy,
            sent_prompt: None,
        })
    }
    .await;
    respond(state, Endpoint::Chat, prepared, label, started).await
}

pub async fn completions(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let started = Instant::now();
    let mut label = None;
    let prepared = async {
        let bytes = read_body(body, state.config.max_body_bytes).await?;
        let request = CompletionRequest::parse(&bytes, &state.limits)?;
        let (slot, engine, strategy) = resolve_model(&state, &request.params)?;
        label = Some(slot.name.clone());
        let sent_prompt = match &request.prompt {
            Prompt::Text(text) => serde_json::json!(text),
            Prompt::Tokens(tokens) => serde_json::json!(tokens),
        };
        let prompt = match request.prompt {
            Prompt::Tokens(tokens) => {
                let vocab = engine.info().vocab_size;
                if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!("token id {bad} is outside the vocabulary of {vocab} tokens"),
                    ));
                }
                tokens
            }
            Prompt::Text(text) => {
                debug!(prompt = %truncate(&text), "completion prompt");
                engine.tokenize(&text).await.map_err(|e| {
                    error!(cause = %e, "tokenization failed");
                    ApiError::internal()
                })?
            }
        };
        Ok(Prepared {
            slot,
            engine,
            prompt,
            params: request.params,
            messages: None,
            strategy,
            sent_prompt: Some(sent_prompt),
        })
    }
    .await;
    respond(state, Endpoint::Completion, prepared, label, started).await
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::bad_request(format!("failed to read the request body: {e}"))
        }
    })
}

/// Rejects message text that spells one of the chat template's control
/// tokens: the template would turn it into a real one, letting the text
/// end its own message and speak for another role.
fn reject_control_tokens(engine: &dyn Engine, messages: &[ChatTurn]) -> Result<(), ApiError> {
    for (i, message) in messages.iter().enumerate() {
        // A template may render the author's name too, so it gets the same
        // check as the content.
        let fields = [
            ("content", Some(&message.content)),
            ("name", message.name.as_ref()),
        ];
        for (field, text) in fields {
            let Some(text) = text else { continue };
            let found = engine
                .control_tokens()
                .iter()
                .find(|t| !t.is_empty() && text.contains(t.as_str()));
            if let Some(token) = found {
                return Err(ApiError::invalid(
                    format!("messages[{i}].{field}"),
                    format!(
                        "`messages[{i}].{field}` contains the control token `{token}`, which \
                         would change the conversation's structure; remove it"
                    ),
                ));
            }
        }
    }
    Ok(())
}

type Resolved = (Arc<ModelSlot>, Arc<dyn Engine>, Option<Arc<dyn Strategy>>);

/// Finds the model and the decoding strategy: the request's `decoding`
/// object, else the preset of a `MODEL:PRESET` alias, else the model's
/// default.
fn resolve_model(state: &AppState, params: &GenerationParams) -> Result<Resolved, ApiError> {
    let (slot, preset) = state
        .resolve(&params.model)
        .ok_or_else(|| ApiError::model_not_found(&params.model))?;
    let strategy = match &params.decoding {
        Some(value) => Some(decoding::parse(value, "decoding")?),
        None => preset.or_else(|| slot.default_strategy.clone()),
    };
    // `plain` is ordinary sampling, with `n` and `logprobs`; naming it is
    // how a request opts out of a model's default strategy.
    let strategy = strategy.filter(|s| s.name() != decoding::plain::NAME);
    let engine = slot.engine().ok_or_else(ApiError::not_ready)?;
    Ok((slot.clone(), engine, strategy))
}

async fn respond(
    state: Arc<AppState>,
    endpoint: Endpoint,
    prepared: Result<Prepared, ApiError>,
    label: Option<String>,
    started: Instant,
) -> Response {
    let result = match prepared {
        Ok(prepared) => generate(state, endpoint, prepared, started).await,
        Err(error) => Err(error),
    };
    let mut response = match result {
        Ok(response) => response,
        Err(error) => {
            debug!(message = %error.message, status = error.status.as_u16(), "request rejected");
            error.into_response()
        }
    };
    if let Some(model) = label {
        response.extensions_mut().insert(ModelLabel(model));
    }
    response
}

/// Resolves `max_tokens` against the context length.
fn budget(prompt: usize, requested: Option<usize>, context: usize) -> Result<usize, ApiError> {
    let exceeded = |wanted: usize| {
        // Name the prompt when it alone fills the context.
        let param = if prompt >= context {
            "messages"
        } else {
            "max_tokens"
        };
        ApiError::invalid(
            param,
            format!(
                "this model's maximum context length is {context} tokens, but {wanted} were \
                 requested ({prompt} in the prompt, {} for the completion); shorten the prompt \
                 or lower max_tokens",
                wanted - prompt
            ),
        )
        .with_code("context_length_exceeded")
    };
    match requested {
        Some(max) if prompt + max > context => Err(exceeded(prompt + max)),
        Some(max) => Ok(max),
        None if prompt >= context => Err(exceeded(prompt + 1)),
        None => Ok(context - prompt),
    }
}

async fn generate(
    state: Arc<AppState>,
    endpoint: Endpoint,
    prepared: Prepared,
    started: Instant,
) -> Result<Response, ApiError> {
    let Prepared {
        slot,
        engine,
        prompt,
        params,
        messages,
        strategy,
        sent_prompt,
    } = prepared;
    let span = Span::current();
    span.record("model", slot.name.as_str());
    span.record("stream", params.stream);
    let max_tokens = budget(
        prompt.len(),
        params.max_tokens,
        engine.info().context_length,
    )?;
    if let Some(strategy) = &strategy {
        let handbook_loaded = state.behaviors.count() > 0;
        strategy::check(strategy.as_ref(), &params, endpoint, handbook_loaded)?;
    }
    let deadline = TokioInstant::from_std(started) + state.config.request_timeout;
    let permit = tokio::time::timeout_at(deadline, slot.admission.admit())
        .await
        .map_err(|_| ApiError::timeout(state.config.request_timeout.as_secs()))??;
    state
        .metrics
        .queue_time
        .with_label_values(&[&slot.name])
        .observe(permit.queued_for.as_secs_f64());
    span.record("queue_ms", permit.queued_for.as_millis() as u64);

    let id = response_id(endpoint);
    let trace = record::start_trace(record::RequestRecord {
        state: &state,
        endpoint,
        model: &slot.name,
        params: &params,
        strategy: strategy.as_deref(),
        messages: messages.as_deref(),
        prompt: sent_prompt,
        id: &id,
    });
    let cancel = CancellationToken::new();
    let job = Job {
        state,
        endpoint,
        slot,
        engine,
        params,
        prompt_tokens: prompt.len(),
        started,
        deadline,
        id,
        created: unix_now(),
        tracker: Tracker::default(),
        queued_for: permit.queued_for,
        trace_id: trace.as_ref().map(|t| t.id.clone()),
        trace,
        _permit: permit,
        _cancel: cancel.clone().drop_guard(),
        span: Span::current(),
        logged: AtomicBool::new(false),
    };
    let params = &job.params;
    if let Some(strategy) = strategy {
        let input = decoding::Input {
            messages,
            prompt,
            sampling: params.sampling.clone(),
            temperature_set: params.temperature_set,
            seed: params.seed,
            max_tokens,
            stops: params.stop.clone(),
            cancel,
        };
        return Ok(job.run_strategy(strategy, input).await);
    }
    let request = GenerateRequest {
        prompt,
        n: params.n,
        sampling: params.sampling.clone(),
        seed: params.seed,
        max_tokens,
        stop_tokens: Default::default(),
        top_logprobs: params.logprobs.unwrap_or(0),
        keep_distribution: false,
        cancel,
        cached_prompt_tokens: Default::default(),
    };
    let events = match run_choices(job.engine.clone(), request, params.stop.clone()) {
        Ok(events) => events,
        Err(e) => {
            error!(cause = %e, "generation failed to start");
            // The middleware logs the error response.
            job.logged.store(true, Ordering::Relaxed);
            return Err(ApiError::internal());
        }
    };
    if job.params.stream {
        Ok(job.stream(events))
    } else {
        job.collect(events).await
    }
}

fn response_id(endpoint: Endpoint) -> String {
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn truncate(text: &str) -> String {
    const LIMIT: usize = 200;
    match text.char_indices().nth(LIMIT) {
        Some((at, _)) => format!("{}… ({} bytes)", &text[..at], text.len()),
        None => text.to_string(),
    }
}

/// Timing of one request's tokens, for the latency histograms.
#[derive(Default)]
struct Tracker {
    first_token: Option<Instant>,
    last_token: Vec<Option<Instant>>,
}

/// One admitted generation; dropping it frees the slot and cancels whatever
/// is still running.
struct Job {
    state: Arc<AppState>,
    endpoint: Endpoint,
    slot: Arc<ModelSlot>,
    engine: Arc<dyn Engine>,
    params: GenerationParams,
    prompt_tokens: usize,
    started: Instant,
    deadline: TokioInstant,
    id: String,
    created: u64,
    tracker: Tracker,
    queued_for: std::time::Duration,
    /// The request's trace until it is handed to the recorder; `None` when
    /// the request is not recorded.
    trace: Option<TraceBuilder>,
    /// Set when the request is recorded, and kept after the trace is handed
    /// over.
    trace_id: Option<String>,
    _permit: Permit,
    _cancel: tokio_util::sync::DropGuard,
    span: Span,
    /// Set once the request's final log line is written.
    logged: AtomicBool,
}

impl Drop for Job {
    /// Writes the final line, and counts the request, when its client went
    /// away before a whole response was sent: the handler future is dropped
    /// then, so neither the handler nor the middleware sees the end.
    fn drop(&mut self) {
        if !self.logged.load(Ordering::Relaxed) {
            let _entered = self.span.enter();
            info!(
                outcome = "client disconnected",
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                "request finished"
            );
            self.state
                .metrics
                .requests
                .with_label_values(&[&self.slot.name, self.endpoint.path(), DISCONNECTED])
                .inc();
        }
    }
}

/// One choice's result, gathered for a whole response.
#[derive(Default)]
struct Collected {
    text: String,
    steps: Vec<TokenStep>,
    finish: Option<ApiFinishReason>,
    tokens: usize,
}

impl Job {
    fn model(&self) -> &str {
        &self.slot.name
    }

    fn on_delta(&mut self, index: usize) {
        let now = Instant::now();
        let metrics = &self.state.metrics;
        if self.tracker.first_token.is_none() {
            self.tracker.first_token = Some(now);
            let ttft = now - self.started;
            metrics
                .time_to_first_token
                .with_label_values(&[&self.slot.name])
                .observe(ttft.as_secs_f64());
            Span::current().record("ttft_ms", ttft.as_millis() as u64);
        }
        if self.tracker.last_token.len() <= index {
            self.tracker.last_token.resize(index + 1, None);
        }
        if let Some(previous) = self.tracker.last_token[index] {
            metrics
                .inter_token_latency
                .with_label_values(&[&self.slot.name])
                .observe((now - previous).as_secs_f64());
        }
        self.tracker.last_token[index] = Some(now);
    }

    /// Counts a finished request; the token counters match its `usage`.
    fn record_finish(&self, usage: Usage, reasons: &[ApiFinishReason]) {
        let metrics = &self.state.metrics;
        let model = self.model();
        metrics
            .prompt_tokens
            .with_label_values(&[model])
            .inc_by(usage.prompt_tokens as u64);
        metrics
            .generation_tokens
            .with_label_values(&[model])
            .inc_by(usage.completion_tokens as u64);
        for reason in reasons {
            metrics
                .finished_choices
                .with_label_values(&[model, reason.as_str()])
                .inc();
        }
        metrics
            .request_latency
            .with_label_values(&[model, self.endpoint.path()])
            .observe(self.started.elapsed().as_secs_f64());
        let span = Span::current();
        span.record("prompt_tokens", usage.prompt_tokens);
        span.record("completion_tokens", usage.completion_tokens);
    }

    async fn collect(
        mut self,
        events: impl Stream<Item = ChoiceEvent> + Unpin,
    ) -> Result<Response, ApiError> {
        let result = self.collect_inner(events).await;
        if result.is_err() {
            // The middleware logs error responses.
            self.logged.store(true, Ordering::Relaxed);
        }
        result
    }

    async fn collect_inner(
        &mut self,
        mut events: impl Stream<Item = ChoiceEvent> + Unpin,
    ) -> Result<Response, ApiError> {
        let mut choices: Vec<Collected> =
            (0..self.params.n).map(|_| Collected::default()).collect();
        loop {
            let event = tokio::time::timeout_at(self.deadline, events.next())
                .await
                .map_err(|_| ApiError::timeout(self.state.config.request_timeout.as_secs()))?;
            let Some(event) = event else { break };
            match event {
                ChoiceEvent::Delta { index, text, steps } => {
                    self.on_delta(index);
                    choices[index].text.push_str(&text);
                    choices[index].steps.extend(steps);
                }
                ChoiceEvent::Finished {
                    index,
                    reason,
                    completion_tokens,
                } => {
                    choices[index].finish = Some(reason);
                    choices[index].tokens = completion_tokens;
                }
                ChoiceEvent::Failed { index, message } => {
                    error!(choice = index, cause = %message, "generation failed");
                    return Err(ApiError::internal());
                }
            }
        }
        let completion_tokens = choices.iter().map(|c| c.tokens).sum();
        let usage = Usage::new(self.prompt_tokens, completion_tokens);
        let reasons: Vec<ApiFinishReason> = choices.iter().filter_map(|c| c.finish).collect();
        self.record_finish(usage, &reasons);
        for choice in &choices {
            debug!(output = %truncate(&choice.text), "completion output");
        }
        if self.trace.is_some() {
            let recorded = choices
                .iter()
                .enumerate()
                .map(|(index, c)| {
                    traces::record::choice(
                        index,
                        c.text.clone(),
                        c.finish.map(ApiFinishReason::as_str),
                        c.tokens,
                        EntropySummary::of(&c.steps),
                    )
                })
                .collect();
            self.save_trace(recorded, None, None);
        }
        let body = match self.endpoint {
            Endpoint::Chat => Json(ChatCompletion {
                id: self.id.clone(),
                object: "chat.completion",
                created: self.created,
                model: self.params.model.clone(),
                choices: choices
                    .into_iter()
                    .enumerate()
                    .map(|(index, c)| ChatChoice {
                        index,
                        logprobs: self
                            .params
                            .logprobs
                            .map(|_| ChatLogprobs::from_steps(self.engine.as_ref(), &c.steps)),
                        message: AssistantMessage {
                            role: "assistant",
                            content: c.text,
                        },
                        finish_reason: c.finish,
                    })
                    .collect(),
                usage,
                decoding: None,
            })
            .into_response(),
            Endpoint::Completion => Json(TextCompletion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.params.model.clone(),
                choices: choices
                    .into_iter()
                    .enumerate()
                    .map(|(index, c)| TextChoice {
                        index,
                        logprobs: self.params.logprobs.map(|_| {
                            let mut logprobs = TextLogprobs::default();
                            logprobs.extend(self.engine.as_ref(), &c.steps, 0);
                            logprobs
                        }),
                        text: c.text,
                        finish_reason: c.finish,
                    })
                    .collect(),
                usage: Some(Some(usage)),
                decoding: None,
            })
            .into_response(),
        };
        self.log_end("completed");
        let mut response = self.with_trace_header(body);
        response.extensions_mut().insert(StreamLogged);
        Ok(response)
    }

    fn stream(self, events: impl Stream<Item = ChoiceEvent> + Send + Unpin + 'static) -> Response {
        let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
        let span = Span::current();
        let trace_id = self.trace_id().map(str::to_string);
        tokio::spawn(self.pump(events, tx).instrument(span));
        let mut response = sse_response(rx);
        record::insert_trace_header(&mut response, trace_id.as_deref());
        response
    }

    /// Sends the stream's events until it ends, fails, times out or the
    /// client goes away; returning drops the job, which cancels generation.
    async fn pump(
        mut self,
        mut events: impl Stream<Item = ChoiceEvent> + Unpin,
        tx: mpsc::Sender<Result<Event, Infallible>>,
    ) {
        let n = self.params.n;
        let mut offsets = vec![0usize; n];
        let mut tokens = vec![0usize; n];
        let mut reasons = Vec::with_capacity(n);
        let mut finishes = vec![None; n];
        // Kept only for the trace.
        let mut texts = vec![String::new(); n];
        let mut entropies = vec![EntropyTotals::default(); n];
        if self.endpoint == Endpoint::Chat {
            for index in 0..n {
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                };
                if !self
                    .send(&tx, self.chat_chunk(index, delta, None, None))
                    .await
                {
                    return self.log_end("client disconnected");
                }
            }
        }
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout_at(self.deadline, events.next()) => next,
                // A sequence waiting for the engine sends nothing, so watch
                // the client directly.
                () = tx.closed() => return self.log_end("client disconnected"),
            };
            let event = match next {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(_) => {
                    let error = ApiError::timeout(self.state.config.request_timeout.as_secs());
                    let _ = tx.send(Ok(Event::default().data(error.to_json()))).await;
                    return self.log_end("timed out");
                }
            };
            let chunk = match event {
                ChoiceEvent::Delta { index, text, steps } => {
                    self.on_delta(index);
                    let offset = offsets[index];
                    offsets[index] += text.len();
                    if self.trace.is_some() {
                        texts[index].push_str(&text);
                        entropies[index].add(&steps);
                    }
                    self.delta_chunk(index, text, &steps, offset)
                }
                ChoiceEvent::Finished {
                    index,
                    reason,
                    completion_tokens,
                } => {
                    tokens[index] = completion_tokens;
                    reasons.push(reason);
                    finishes[index] = Some(reason);
                    self.finish_chunk(index, reason)
                }
                ChoiceEvent::Failed { index, message } => {
                    error!(choice = index, cause = %message, "generation failed mid-stream");
                    let _ = tx
                        .send(Ok(Event::default().data(ApiError::internal().to_json())))
                        .await;
                    return self.log_end("failed");
                }
            };
            if !self.send(&tx, chunk).await {
                return self.log_end("client disconnected");
            }
        }
        let usage = Usage::new(self.prompt_tokens, tokens.iter().sum());
        self.record_finish(usage, &reasons);
        if self.params.include_usage {
            let last = self.usage_chunk(usage);
            if !self.send(&tx, last).await {
                return self.log_end("client disconnected");
            }
        }
        if self.trace.is_some() {
            let recorded = texts
                .into_iter()
                .enumerate()
                .map(|(index, text)| {
                    traces::record::choice(
                        index,
                        text,
                        finishes[index].map(ApiFinishReason::as_str),
                        tokens[index],
                        entropies[index].summary(),
                    )
                })
                .collect();
            self.save_trace(recorded, None, None);
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        self.log_end("completed");
    }

    fn log_end(&self, outcome: &str) {
        self.logged.store(true, Ordering::Relaxed);
        info!(
            status = 200,
            outcome,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "request finished"
        );
    }

    async fn send(&self, tx: &mpsc::Sender<Result<Event, Infallible>>, chunk: String) -> bool {
        tx.send(Ok(Event::default().data(chunk))).await.is_ok()
    }

    fn usage_field(&self) -> Option<Option<Usage>> {
        self.params.include_usage.then_some(None)
    }

    fn chat_chunk(
        &self,
        index: usize,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<ApiFinishReason>,
    ) -> String {
        to_json(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.params.model.clone(),
            choices: vec![ChunkChoice {
                index,
                delta,
                logprobs,
                finish_reason,
            }],
            usage: self.usage_field(),
            decoding: None,
        })
    }

    fn text_chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<TextLogprobs>,
        finish_reason: Option<ApiFinishReason>,
    ) -> String {
        to_json(&TextCompletion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.params.model.clone(),
            choices: vec![TextChoice {
                index,
                text,
                logprobs,
                finish_reason,
            }],
            usage: self.usage_field(),
            decoding: None,
        })
    }

    fn delta_chunk(
        &self,
        index: usize,
        text: String,
        steps: &[TokenStep],
        offset: usize,
    ) -> String {
        let engine = self.engine.as_ref();
        match self.endpoint {
            Endpoint::Chat => {
                let logprobs = self
                    .params
                    .logprobs
                    .map(|_| ChatLogprobs::from_steps(engine, steps));
                let delta = Delta {
                    role: None,
                    content: Some(text),
                };
                self.chat_chunk(index, delta, logprobs, None)
            }
            Endpoint::Completion => {
                let logprobs = self.params.logprobs.map(|_| {
                    let mut logprobs = TextLogprobs::default();
                    logprobs.extend(engine, steps, offset);
                    logprobs
                });
                self.text_chunk(index, text, logprobs, None)
            }
        }
    }

    fn finish_chunk(&self, index: usize, reason: ApiFinishReason) -> String {
        match self.endpoint {
            Endpoint::Chat => self.chat_chunk(index, Delta::default(), None, Some(reason)),
            Endpoint::Completion => self.text_chunk(index, String::new(), None, Some(reason)),
        }
    }

    fn usage_chunk(&self, usage: Usage) -> String {
        match self.endpoint {
            Endpoint::Chat => to_json(&ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.params.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
                decoding: None,
            }),
            Endpoint::Completion => to_json(&TextCompletion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.params.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
                decoding: None,
            }),
        }
    }
}

/// Wraps the events a pump task sends in an SSE response.
fn sse_response(rx: mpsc::Receiver<Result<Event, Infallible>>) -> Response {
    let mut response = Sse::new(ReceiverStream::new(rx)).into_response();
    response.extensions_mut().insert(StreamLogged);
    response
}

fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("response types always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_fills_the_context_by_default() {
        assert_eq!(budget(10, None, 100).unwrap(), 90);
        assert_eq!(budget(10, Some(5), 100).unwrap(), 5);
    }

    #[test]
    fn budget_over_context_names_both_numbers() {
        let error = budget(90, Some(20), 100).unwrap_err();
        assert_eq!(error.code, Some("context_length_exceeded"));
        assert!(error.message.contains("100"), "{}", error.message);
        assert!(error.message.contains("110"), "{}", error.message);
    }
}
