//! The engine boundary: everything above this module sees token ids,
//! sampled steps and finish reasons, never the types of a backend crate.
//!
//! An engine takes a token prefix and produces one or more sampled
//! continuations of it. Each continuation reports every step as it is
//! sampled, with the token's log-probability and the entropy of the
//! distribution it was drawn from, so that decoding strategies can branch,
//! vote or score without touching the backend.

pub mod llama;
pub mod mistral;
pub mod sampler;
pub mod scripted;
pub mod template;
pub mod vocab;

use std::{
    collections::HashSet,
    sync::{atomic::AtomicUsize, Arc},
};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use sampler::SamplingParams;

/// One chat message as the engine's chat template sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
    pub name: Option<String>,
}

/// Static facts about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Maximum number of tokens (prompt plus generated) per sequence.
    pub context_length: usize,
    /// Tokens that end a sequence: the GGUF end-of-sequence token and the
    /// chat template's end-of-turn token where they differ.
    pub eos_tokens: HashSet<u32>,
    pub vocab_size: usize,
}

/// A request for `n` sampled continuations of one token prefix.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    /// Number of continuations to sample from the prefix.
    pub n: usize,
    pub sampling: SamplingParams,
    /// Seed of the first continuation; continuation `i` uses `seed + i`, so a
    /// seeded request is reproducible however the engine batches it. `None`
    /// draws a fresh seed.
    pub seed: Option<u64>,
    /// Maximum number of generated tokens per continuation.
    pub max_tokens: usize,
    /// Tokens, besides end-of-sequence, that end a continuation right after
    /// they are emitted. The token is part of the continuation.
    pub stop_tokens: HashSet<u32>,
    /// How many alternatives to report per step (0 for none).
    pub top_logprobs: usize,
    /// Report each step's whole sampling distribution, so a caller can
    /// draw more tokens from it without another forward pass.
    pub keep_distribution: bool,
    /// Cancels every continuation of this request.
    pub cancel: CancellationToken,
    /// The engine adds here, for each continuation as it starts, the prompt
    /// tokens it took from its prefix cache instead of computing them.
    /// Engines without such a cache leave it at zero.
    pub cached_prompt_tokens: Arc<AtomicUsize>,
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStep {
    pub token: u32,
    /// Natural log-probability under the model's distribution, after
    /// penalties and before temperature and truncation.
    pub logprob: f32,
    /// Natural log-probability under the distribution actually sampled from
    /// (after temperature, top-k, top-p and min-p; temperature 1 when the
    /// request is greedy).
    pub sampling_logprob: f32,
    /// Entropy in nats of that same sampling distribution.
    pub entropy: f32,
    /// The most likely alternatives as `(token, logprob)` under the model's
    /// distribution, best first.
    pub top_logprobs: Vec<(u32, f32)>,
    /// The sampling distribution as `(token, probability)`, best first, when
    /// the request asked to keep it.
    pub distribution: Option<Arc<Vec<(u32, f32)>>>,
}

/// Reason a continuation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model emitted an end-of-sequence token (reported as the last step).
    Eos,
    /// A token from [`GenerateRequest::stop_tokens`] was emitted.
    StopToken,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The request was cancelled.
    Cancelled,
}

/// Event a continuation reports, in order: steps, then exactly one finish or
/// error.
#[derive(Debug, Clone, PartialEq)]
pub enum StepEvent {
    Token(TokenStep),
    Finished(FinishReason),
    Error(String),
}

/// A running continuation. Dropping it cancels the continuation.
pub struct Continuation {
    pub events: mpsc::UnboundedReceiver<StepEvent>,
    pub cancel: CancellationToken,
}

impl Continuation {
    /// Stops this continuation alone; its siblings keep running.
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Continuation {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("failed to load model from {path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("engine failed: {0}")]
    Internal(String),
}

/// A backend that samples continuations of token prefixes.
///
/// Contract:
/// - `generate` returns at once with `n` continuations; the work runs in the
///   background and the continuations may be batched together.
/// - Each continuation sends its steps in order, then exactly one
///   `Finished` or `Error`, and never more than `max_tokens` steps.
/// - Cancelling the request token, calling [`Continuation::stop`] or dropping
///   a continuation ends it within one decoding step and frees its resources.
/// - A seeded continuation is reproducible for the same prefix and params.
#[async_trait]
pub trait Engine: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Applies the model's chat template and tokenizes the result, ending
    /// with the prompt for the assistant's turn.
    async fn tokenize_chat(&self, messages: &[ChatTurn]) -> Result<Vec<u32>, EngineError>;

    /// Tokenizes plain text, adding the beginning-of-sequence token where the
    /// model expects one.
    async fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError>;

    /// Returns the bytes a token stands for in generated text, which are
    /// empty for control tokens.
    fn token_bytes(&self, token: u32) -> &[u8];

    fn generate(&self, request: GenerateRequest) -> Result<Vec<Continuation>, EngineError>;

    /// Texts of the control tokens (such as `<|im_end|>`) that the chat
    /// template uses, which user text must not contain.
    fn control_tokens(&self) -> &[String] {
        &[]
    }

    /// Cumulative `(hits, sequences)` of the engine's prefix cache: how many
    /// sequences started from a cached prefix, out of all sequences started.
    fn prefix_cache_stats(&self) -> Option<(usize, usize)> {
        None
    }
}

/// Concatenates the bytes of `tokens` and decodes them, replacing invalid
/// UTF-8 (which can only be a character cut at the end) with U+FFFD.
pub fn detokenize(engine: &dyn Engine, tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens
        .iter()
        .flat_map(|&t| engine.token_bytes(t).iter().copied())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
