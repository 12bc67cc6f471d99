//! Requests decoded with a strategy: [`Strategy::decode`] produces the text
//! instead of plain sampling, and the response carries a `decoding` object
//! with what the strategy found.

use std::{convert::Infallible, sync::Arc};

use axum::{
    response::{sse::Event, IntoResponse, Response},
    Json,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{error, Instrument, Span};

use super::{record, Endpoint, Job};
use crate::{
    api::{
        params::GenerationParams,
        response::{
            AssistantMessage, ChatChoice, ChatChunk, ChatCompletion, ChunkChoice, Delta,
            TextChoice, TextCompletion, Usage,
        },
        ApiError,
    },
    decoding::{self, Context, DecodeError, Input, Output, Strategy},
    generation::ApiFinishReason,
    traces::EntropySummary,
};

/// Rejects request settings a strategy cannot honour, before admission.
pub(super) fn check(
    strategy: &dyn Strategy,
    params: &GenerationParams,
    endpoint: Endpoint,
    handbook_loaded: bool,
) -> Result<(), ApiError> {
    if strategy.name() == decoding::handbook::NAME && !handbook_loaded {
        return Err(ApiError::invalid(
            "decoding.strategy",
            "the `handbook` strategy needs behaviors, and this server has none; start it with \
             --handbook-path FILE or add behaviors through the admin API",
        ));
    }
    if params.n != 1 {
        return Err(ApiError::invalid(
            "n",
            format!(
                "`n` must be 1 with the `{}` strategy; self_consistency's `samples` sets how many paths are sampled",
                strategy.name()
            ),
        ));
    }
    if params.logprobs.is_some() {
        return Err(ApiError::invalid(
            "logprobs",
            format!(
                "log-probabilities are not returned with the `{}` strategy",
                strategy.name()
            ),
        ));
    }
    if strategy.needs_chat() && endpoint == Endpoint::Completion {
        return Err(ApiError::invalid(
            "decoding.strategy",
            format!(
                "the `{}` strategy needs chat messages; use /v1/chat/completions",
                strategy.name()
            ),
        ));
    }
    Ok(())
}

fn decode_error(error: DecodeError) -> ApiError {
    match error {
        DecodeError::Invalid(message) => ApiError::invalid("decoding", message),
        other => {
            error!(cause = %other, "decoding failed");
            ApiError::internal()
        }
    }
}

impl Job {
    fn context(&self, stream: Option<mpsc::UnboundedSender<String>>) -> Context {
        Context {
            engine: self.engine.clone(),
            behaviors: self.state.behaviors.clone(),
            stream,
            metrics: self.state.metrics.clone(),
        }
    }

    /// Counts a finished strategy request and returns its `decoding` object.
    fn finish_strategy(&self, strategy: &dyn Strategy, output: &Output) -> (Usage, Value) {
        let usage = Usage::new(self.prompt_tokens, output.tokens);
        self.record_finish(usage, &[output.finish]);
        let metrics = &self.state.metrics;
        let name = strategy.name();
        metrics.strategy_requests.with_label_values(&[name]).inc();
        metrics
            .strategy_engine_tokens
            .with_label_values(&[name, "prompt"])
            .inc_by(output.spent.prompt_tokens as u64);
        metrics
            .strategy_engine_tokens
            .with_label_values(&[name, "generated"])
            .inc_by(output.spent.generated_tokens as u64);
        metrics
            .strategy_returned_tokens
            .with_label_values(&[name])
            .inc_by(output.tokens as u64);
        let mut report = decoding::report(strategy, output);
        if let (Some(id), Value::Object(object)) = (self.trace_id(), &mut report) {
            object.insert("trace_id".into(), id.into());
        }
        (usage, report)
    }

    /// Records the strategy's output and report as the request's trace.
    fn save_strategy_trace(&mut self, output: &Output, report: &Value) {
        if self.trace.is_none() {
            return;
        }
        let choice = crate::traces::record::choice(
            0,
            output.text.clone(),
            Some(output.finish.as_str()),
            output.tokens,
            EntropySummary::of(&output.steps),
        );
        self.save_trace(vec![choice], Some(report.clone()), Some(output.spent));
    }

    pub(super) async fn run_strategy(self, strategy: Arc<dyn Strategy>, input: Input) -> Response {
        if self.params.stream {
            return self.stream_strategy(strategy, input);
        }
        let mut job = self;
        match job.whole_strategy(strategy, input).await {
            Ok(response) => response,
            Err(error) => {
                // The middleware logs error responses.
                job.logged.store(true, std::sync::atomic::Ordering::Relaxed);
                error.into_response()
            }
        }
    }

    async fn whole_strategy(
        &mut self,
        strategy: Arc<dyn Strategy>,
        input: Input,
    ) -> Result<Response, ApiError> {
        let ctx = self.context(None);
        let output = tokio::time::timeout_at(self.deadline, strategy.decode(&ctx, input))
            .await
            .map_err(|_| ApiError::timeout(self.state.config.request_timeout.as_secs()))?
            .map_err(decode_error)?;
        self.on_delta(0);
        let (usage, report) = self.finish_strategy(strategy.as_ref(), &output);
        self.save_strategy_trace(&output, &report);
        let response = match self.endpoint {
            Endpoint::Chat => Json(ChatCompletion {
                id: self.id.clone(),
                object: "chat.completion",
                created: self.created,
                model: self.params.model.clone(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant",
                        content: output.text,
                    },
                    logprobs: None,
                    finish_reason: Some(output.finish),
                }],
                usage,
                decoding: Some(report),
            })
            .into_response(),
            Endpoint::Completion => Json(TextCompletion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.params.model.clone(),
                choices: vec![TextChoice {
                    index: 0,
                    text: output.text,
                    logprobs: None,
                    finish_reason: Some(output.finish),
                }],
                usage: Some(Some(usage)),
                decoding: Some(report),
            })
            .into_response(),
        };
        self.log_end("completed");
        let mut response = self.with_trace_header(response);
        response.extensions_mut().insert(super::StreamLogged);
        Ok(response)
    }

    fn stream_strategy(self, strategy: Arc<dyn Strategy>, input: Input) -> Response {
        let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
        let span = Span::current();
        let trace_id = self.trace_id().map(str::to_string);
        tokio::spawn(self.pump_strategy(strategy, input, tx).instrument(span));
        let mut response = super::sse_response(rx);
        record::insert_trace_header(&mut response, trace_id.as_deref());
        response
    }

    async fn pump_strategy(
        mut self,
        strategy: Arc<dyn Strategy>,
        input: Input,
        tx: mpsc::Sender<Result<Event, Infallible>>,
    ) {
        if self.endpoint == Endpoint::Chat {
            let delta = Delta {
                role: Some("assistant"),
                content: Some(String::new()),
            };
            if !self.send(&tx, self.chat_chunk(0, delta, None, None)).await {
                return self.log_end("client disconnected");
            }
        }
        let (text_tx, mut text_rx) = mpsc::unbounded_channel();
        let ctx = self.context(Some(text_tx));
        let decode = strategy.decode(&ctx, input);
        tokio::pin!(decode);
        let deadline = tokio::time::sleep_until(self.deadline);
        tokio::pin!(deadline);
        let result = loop {
            tokio::select! {
                biased;
                Some(text) = text_rx.recv() => {
                    self.on_delta(0);
                    if !self.send(&tx, self.delta_chunk(0, text, &[], 0)).await {
                        return self.log_end("client disconnected");
                    }
                }
                result = &mut decode => break result,
                // Strategies that send nothing until they finish would
                // otherwise notice a departed client only at the end.
                () = tx.closed() => return self.log_end("client disconnected"),
                () = &mut deadline => {
                    let error = ApiError::timeout(self.state.config.request_timeout.as_secs());
                    let _ = tx.send(Ok(Event::default().data(error.to_json()))).await;
                    return self.log_end("timed out");
                }
            }
        };
        let output = match result {
            Ok(output) => output,
            Err(e) => {
                let error = decode_error(e);
                let _ = tx.send(Ok(Event::default().data(error.to_json()))).await;
                return self.log_end("failed");
            }
        };
        while let Ok(text) = text_rx.try_recv() {
            if !self.send(&tx, self.delta_chunk(0, text, &[], 0)).await {
                return self.log_end("client disconnected");
            }
        }
        if !output.streamed && !output.text.is_empty() {
            self.on_delta(0);
            if !self
                .send(&tx, self.delta_chunk(0, output.text.clone(), &[], 0))
                .await
            {
                return self.log_end("client disconnected");
            }
        }
        let (usage, report) = self.finish_strategy(strategy.as_ref(), &output);
        let report_for_trace = report.clone();
        let last = self.strategy_finish_chunk(output.finish, report);
        if !self.send(&tx, last).await {
            return self.log_end("client disconnected");
        }
        if self.params.include_usage && !self.send(&tx, self.usage_chunk(usage)).await {
            return self.log_end("client disconnected");
        }
        self.save_strategy_trace(&output, &report_for_trace);
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        self.log_end("completed");
    }

    /// Builds the choice's last chunk, which carries the `decoding` object.
    fn strategy_finish_chunk(&self, reason: ApiFinishReason, report: Value) -> String {
        let value = match self.endpoint {
            Endpoint::Chat => serde_json::to_value(ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.params.model.clone(),
                choices: vec![ChunkChoice {
                    index: 0,
                    delta: Delta::default(),
                    logprobs: None,
                    finish_reason: Some(reason),
                }],
                usage: self.usage_field(),
                decoding: Some(report),
            }),
            Endpoint::Completion => serde_json::to_value(TextCompletion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.params.model.clone(),
                choices: vec![TextChoice {
                    index: 0,
                    text: String::new(),
                    logprobs: None,
                    finish_reason: Some(reason),
                }],
                usage: self.usage_field(),
                decoding: Some(report),
            }),
        };
        value.expect("response types always serialize").to_string()
    }
}
