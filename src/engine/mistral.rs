//! [`Engine`] on the `mistralrs` crates.
//!
//! mistral.rs schedules, batches and caches prefixes; the token choice is
//! ours. Each sequence carries a logits processor that runs this crate's
//! [`Sampler`] on the raw logits and hands mistral.rs a vector in which only
//! the chosen token is finite, so mistral.rs's own argmax agrees with it. The
//! same processor reports each step and, once cancelled, forces the
//! end-of-sequence token so the sequence leaves the batch at the next step.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use either::Either;
use indexmap::IndexMap;
use mistralrs_core::{
    AutoDeviceMapParams, Constraint, CustomLogitsProcessor, DefaultSchedulerMethod,
    DeviceMapSetting, GGUFLoaderBuilder, GGUFSpecificConfig, MistralRs, MistralRsBuilder,
    ModelDType, NormalRequest, Request, RequestMessage, Response, SchedulerConfig, TokenSource,
    TokenizationRequest,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    sampler::Sampler, vocab::GgufVocab, ChatTurn, Continuation, Engine, EngineError, FinishReason,
    GenerateRequest, ModelInfo, StepEvent,
};

/// How to load one GGUF model into mistral.rs.
#[derive(Debug, Clone)]
pub struct MistralConfig {
    pub path: PathBuf,
    /// Activation dtype: "f32", "bf16", "f16" or "auto".
    pub dtype: String,
    /// Run on the first CUDA device instead of the CPU (needs the `cuda`
    /// feature).
    pub cuda: bool,
    /// Sequences mistral.rs decodes in one batch.
    pub max_batch_size: usize,
    /// Prompts kept in mistral.rs's prefix cache.
    pub prefix_cache_entries: usize,
}

pub struct MistralEngine {
    runner: Arc<MistralRs>,
    info: ModelInfo,
    vocab: GgufVocab,
    /// The token a cancelled sequence is forced to emit; mistral.rs ends a
    /// sequence on the GGUF end-of-sequence token whatever the template.
    forced_eos: u32,
    /// Sequences allowed inside mistral.rs at once. On CPU, mistral.rs 0.8.1
    /// mixes up sequences of equal length that it decodes in one batch once
    /// their sampled tokens differ (seen here as garbled text with `n` > 1
    /// and temperature > 0), so with the default of 1 sequences run one
    /// after another. Decoding speed is unchanged by this on CPU, where its
    /// batches were no faster, but a request waits for the sequences ahead.
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl MistralEngine {
    /// Loads the model; blocking work runs off the async threads.
    pub async fn load(config: MistralConfig) -> Result<Self, EngineError> {
        let load_error = |message: String| EngineError::Load {
            path: config.path.display().to_string(),
            message,
        };
        let vocab = GgufVocab::read(&config.path).map_err(load_error)?;
        let device = if config.cuda {
            Device::new_cuda(0).map_err(|e| load_error(e.to_string()))?
        } else {
            Device::Cpu
        };
        let dtype = match config.dtype.as_str() {
            "f32" => ModelDType::F32,
            "bf16" => ModelDType::BF16,
            "f16" => ModelDType::F16,
            _ => ModelDType::Auto,
        };
        let (dir, file) = split_path(&config.path).map_err(load_error)?;
        let pipeline = tokio::task::spawn_blocking(move || {
            let loader = GGUFLoaderBuilder::new(
                None,
                None,
                dir,
                vec![file],
                GGUFSpecificConfig { topology: None },
                false,
                None,
            )
            .build();
            loader.load_model_from_hf(
                None,
                TokenSource::None,
                &dtype,
                &device,
                true,
                DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
                None,
                None,
            )
        })
        .await
        .map_err(|e| load_error(e.to_string()))?
        .map_err(|e| load_error(format!("{e:#}")))?;

        let batch = std::num::NonZeroUsize::new(config.max_batch_size.max(1))
            .expect("max(1) is never zero");
        let scheduler = SchedulerConfig::DefaultScheduler {
            method: DefaultSchedulerMethod::Fixed(batch),
        };
        let runner = MistralRsBuilder::new(pipeline, scheduler, false, None)
            .with_prefix_cache_n(config.prefix_cache_entries)
            .with_no_prefix_cache(config.prefix_cache_entries == 0)
            .build()
            .await;

        let context_length = runner
            .max_sequence_length(None)
            .ok()
            .flatten()
            .or(vocab.context_length)
            .unwrap_or(2048);
        let eos_tokens = vocab.end_tokens();
        let info = ModelInfo {
            context_length,
            eos_tokens,
            vocab_size: vocab.token_bytes.len(),
        };
        let forced_eos = vocab
            .eos_token
            .or_else(|| info.eos_tokens.iter().min().copied())
            .ok_or_else(|| load_error("GGUF metadata names no end-of-sequence token".into()))?;
        Ok(Self {
            runner,
            info,
            vocab,
            forced_eos,
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_batch_size.max(1))),
        })
    }

    async fn tokenize_request(
        &self,
        text: Either<Vec<IndexMap<String, mistralrs_core::MessageContent>>, String>,
        chat: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let sender = self
            .runner
            .get_sender(None)
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let (tx, mut rx) = mpsc::channel(1);
        let request = Request::Tokenize(TokenizationRequest {
            text,
            tools: None,
            add_generation_prompt: chat,
            add_special_tokens: true,
            enable_thinking: None,
            reasoning_effort: None,
            response: tx,
        });
        // mistral.rs panics if the reply channel is gone when it replies, so
        // the receiver lives in a task of its own that outlives a cancelled
        // caller.
        let reply = tokio::spawn(async move {
            sender
                .send(request)
                .await
                .map_err(|e| EngineError::Internal(e.to_string()))?;
            rx.recv()
                .await
                .ok_or_else(|| EngineError::Internal("tokenizer reply channel closed".into()))?
                .map_err(|e| EngineError::Tokenize(format!("{e:#}")))
        });
        reply
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
    }

    fn start_sequence(
        &self,
        request: &GenerateRequest,
        seed: u64,
    ) -> Result<Continuation, EngineError> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let cancel = request.cancel.child_token();
        let processor = StepProcessor {
            state: Mutex::new(ProcessorState {
                sampler: Sampler::new(request.sampling.clone(), seed, request.top_logprobs)
                    .keep_distribution(request.keep_distribution),
                prompt_len: request.prompt.len(),
                finished: false,
            }),
            events: events_tx.clone(),
            cancel: cancel.clone(),
            eos_tokens: self.info.eos_tokens.clone(),
            stop_tokens: request.stop_tokens.clone(),
            max_tokens: request.max_tokens,
            forced_eos: self.forced_eos,
        };
        let processor = Arc::new(processor);

        let mut params = mistralrs_core::SamplingParams::deterministic();
        params.max_len = Some(request.max_tokens);
        // Stop tokens are enforced by the processor, which forces the
        // end-of-sequence token at the step after one: mistral.rs 0.8.1
        // rejects stop tokens that are a prefix of other tokens, as "\n" and
        // ")" are. NOTE: that costs one extra forward pass per stop.
        let (response_tx, mut response_rx) = mpsc::channel(4);
        let normal = NormalRequest {
            messages: RequestMessage::CompletionTokens(request.prompt.clone()),
            sampling_params: params,
            response: response_tx,
            return_logprobs: false,
            is_streaming: false,
            id: self.runner.next_request_id(),
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: Some(vec![processor.clone() as Arc<dyn CustomLogitsProcessor>]),
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        };
        let sender = self
            .runner
            .get_sender(None)
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let in_flight = self.in_flight.clone();
        tokio::spawn(async move {
            let _permit = tokio::select! {
                permit = in_flight.acquire_owned() => permit.expect("the semaphore is never closed"),
                () = processor.cancel.cancelled() => {
                    processor.finish_if_open(FinishReason::Cancelled);
                    return;
                }
            };
            if let Err(e) = sender.send(Request::Normal(Box::new(normal))).await {
                processor.fail(format!("engine is not running: {e}"));
                return;
            }
            // Drain every reply: mistral.rs treats a closed reply channel as
            // an error of the whole step.
            while let Some(response) = response_rx.recv().await {
                match response {
                    Response::InternalError(e) | Response::ValidationError(e) => {
                        processor.fail(e.to_string())
                    }
                    Response::CompletionModelError(e, _) | Response::ModelError(e, _) => {
                        processor.fail(e)
                    }
                    Response::CompletionDone(_) | Response::Done(_) => break,
                    _ => {}
                }
            }
            processor.finish_if_open(FinishReason::Length);
        });
        Ok(Continuation { events, cancel })
    }
}

fn split_path(path: &Path) -> Result<(String, String), String> {
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or("model path has no file name")?
        .to_string();
    let dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .ok_or("model path has no parent directory")?;
    Ok((dir.display().to_string(), file))
}

#[async_trait]
impl Engine for MistralEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    async fn tokenize_chat(&self, messages: &[ChatTurn]) -> Result<Vec<u32>, EngineError> {
        let messages = messages
            .iter()
            .map(|turn| {
                let mut message = IndexMap::new();
                message.insert("role".to_string(), Either::Left(turn.role.clone()));
                message.insert("content".to_string(), Either::Left(turn.content.clone()));
                if let Some(name) = &turn.name {
                    message.insert("name".to_string(), Either::Left(name.clone()));
                }
                message
            })
            .collect();
        self.tokenize_request(Either::Left(messages), true).await
    }

    async fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenize_request(Either::Right(text.to_string()), false)
            .await
    }

    fn token_bytes(&self, token: u32) -> &[u8] {
        self.vocab
            .token_bytes
            .get(token as usize)
            .map_or(&[], Vec::as_slice)
    }

    fn control_tokens(&self) -> &[String] {
        &self.vocab.control_tokens
    }

    fn prefix_cache_stats(&self) -> Option<(usize, usize)> {
        let logger = self.runner.get_logger(None).ok()?;
        Some(logger.prefix_cache_stats())
    }

    fn generate(&self, request: GenerateRequest) -> Result<Vec<Continuation>, EngineError> {
        let base_seed = request.seed.unwrap_or_else(rand::random);
        (0..request.n)
            .map(|i| self.start_sequence(&request, base_seed.wrapping_add(i as u64)))
            .collect()
    }
}

struct ProcessorState {
    sampler: Sampler,
    prompt_len: usize,
    finished: bool,
}

/// Samples one sequence's tokens inside mistral.rs's sampling step.
struct StepProcessor {
    state: Mutex<ProcessorState>,
    events: mpsc::UnboundedSender<StepEvent>,
    cancel: CancellationToken,
    eos_tokens: HashSet<u32>,
    stop_tokens: HashSet<u32>,
    max_tokens: usize,
    forced_eos: u32,
}

impl StepProcessor {
    fn fail(&self, message: String) {
        let mut state = self.state.lock().expect("processor lock is never poisoned");
        if !state.finished {
            state.finished = true;
            let _ = self.events.send(StepEvent::Error(message));
        }
    }

    fn finish_if_open(&self, reason: FinishReason) {
        let mut state = self.state.lock().expect("processor lock is never poisoned");
        if !state.finished {
            state.finished = true;
            let _ = self.events.send(StepEvent::Finished(reason));
        }
    }

    fn only(&self, token: u32, logits: &Tensor) -> candle_core::Result<Tensor> {
        let size = logits.dim(0)?;
        let mut forced = vec![f32::NEG_INFINITY; size];
        if let Some(slot) = forced.get_mut(token as usize) {
            *slot = 0.0;
        }
        Tensor::from_vec(forced, size, logits.device())?.to_dtype(logits.dtype())
    }
}

impl CustomLogitsProcessor for StepProcessor {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        let mut state = self.state.lock().expect("processor lock is never poisoned");
        if state.finished || self.cancel.is_cancelled() {
            if !state.finished {
                state.finished = true;
                let _ = self
                    .events
                    .send(StepEvent::Finished(FinishReason::Cancelled));
            }
            return self.only(self.forced_eos, logits);
        }
        let generated = context.len().saturating_sub(state.prompt_len);
        let values: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let step = state.sampler.sample(&values);
        let token = step.token;
        let _ = self.events.send(StepEvent::Token(step));
        let reason = if self.eos_tokens.contains(&token) {
            Some(FinishReason::Eos)
        } else if self.stop_tokens.contains(&token) {
            Some(FinishReason::StopToken)
        } else if generated + 1 >= self.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if let Some(reason) = reason {
            state.finished = true;
            let _ = self.events.send(StepEvent::Finished(reason));
        }
        drop(state);
        self.only(token, logits)
    }
}
