//! A deterministic [`Engine`] that plays back scripted steps, for fast tests
//! of everything above the engine. The end-to-end tests use the real model.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{
    ChatTurn, Continuation, Engine, EngineError, FinishReason, GenerateRequest, ModelInfo,
    StepEvent, TokenStep,
};

/// Produces the steps of continuation `index` of a request.
pub type Script = dyn Fn(&GenerateRequest, usize) -> Vec<TokenStep> + Send + Sync;

/// Token ids 0..=255 are the bytes themselves; 256 is end-of-sequence.
pub const SCRIPTED_EOS: u32 = 256;

pub struct ScriptedEngine {
    info: ModelInfo,
    bytes: Vec<Vec<u8>>,
    script: Box<Script>,
    /// Every request received, for tests to inspect.
    pub requests: Arc<Mutex<Vec<GenerateRequest>>>,
}

impl ScriptedEngine {
    pub fn new(context_length: usize, script: Box<Script>) -> Self {
        let mut bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        bytes.push(Vec::new());
        Self {
            info: ModelInfo {
                context_length,
                eos_tokens: HashSet::from([SCRIPTED_EOS]),
                vocab_size: bytes.len(),
            },
            bytes,
            script,
            requests: Arc::default(),
        }
    }

    /// Creates an engine whose every continuation spells `text` and then
    /// ends.
    pub fn echoing(text: &str) -> Self {
        let steps = text_steps(text, -0.5, 0.7);
        Self::new(
            4096,
            Box::new(move |_, _| {
                let mut steps = steps.clone();
                steps.push(step(SCRIPTED_EOS, -0.1, 0.1));
                steps
            }),
        )
    }
}

/// One scripted step with the same log-probability under both distributions.
pub fn step(token: u32, logprob: f32, entropy: f32) -> TokenStep {
    TokenStep {
        token,
        logprob,
        sampling_logprob: logprob,
        entropy,
        top_logprobs: vec![(token, logprob)],
        distribution: None,
    }
}

/// Steps spelling `text` one byte per token.
pub fn text_steps(text: &str, logprob: f32, entropy: f32) -> Vec<TokenStep> {
    text.bytes()
        .map(|b| step(u32::from(b), logprob, entropy))
        .collect()
}

#[async_trait]
impl Engine for ScriptedEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    async fn tokenize_chat(&self, messages: &[ChatTurn]) -> Result<Vec<u32>, EngineError> {
        let mut text = String::new();
        for turn in messages {
            text.push_str(&format!("<{}>{}\n", turn.role, turn.content));
        }
        text.push_str("<assistant>");
        self.tokenize(&text).await
    }

    async fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn token_bytes(&self, token: u32) -> &[u8] {
        self.bytes.get(token as usize).map_or(&[], Vec::as_slice)
    }

    fn generate(&self, request: GenerateRequest) -> Result<Vec<Continuation>, EngineError> {
        self.requests
            .lock()
            .expect("test lock is never poisoned")
            .push(request.clone());
        let mut continuations = Vec::new();
        for index in 0..request.n {
            let steps = (self.script)(&request, index);
            let (tx, events) = mpsc::unbounded_channel();
            let cancel = request.cancel.child_token();
            let budget = request.max_tokens.min(
                self.info
                    .context_length
                    .saturating_sub(request.prompt.len()),
            );
            let (eos, stop) = (self.info.eos_tokens.clone(), request.stop_tokens.clone());
            let token = cancel.clone();
            tokio::spawn(async move {
                let mut reason = FinishReason::Length;
                let mut sent = 0;
                for step in steps {
                    if sent == budget {
                        break;
                    }
                    if token.is_cancelled() {
                        reason = FinishReason::Cancelled;
                        break;
                    }
                    let id = step.token;
                    let _ = tx.send(StepEvent::Token(step));
                    sent += 1;
                    if eos.contains(&id) {
                        reason = FinishReason::Eos;
                        break;
                    }
                    if stop.contains(&id) {
                        reason = FinishReason::StopToken;
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                let _ = tx.send(StepEvent::Finished(reason));
            });
            continuations.push(Continuation { events, cancel });
        }
        Ok(continuations)
    }
}
