//! OpenAI response and streaming chunk bodies.

use serde::Serialize;

use crate::{
    engine::{Engine, TokenStep},
    generation::ApiFinishReason,
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// Report of the decoding strategy, absent when none ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoding: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<ApiFinishReason>,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<TopLogprob>>,
}

#[derive(Debug, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl ChatLogprobs {
    pub fn from_steps(engine: &dyn Engine, steps: &[TokenStep]) -> Self {
        let entry = |token: u32, logprob: f32| {
            let bytes = engine.token_bytes(token).to_vec();
            (String::from_utf8_lossy(&bytes).into_owned(), logprob, bytes)
        };
        let content = steps
            .iter()
            .map(|step| {
                let (token, logprob, bytes) = entry(step.token, step.logprob);
                let top = step
                    .top_logprobs
                    .iter()
                    .map(|&(t, lp)| {
                        let (token, logprob, bytes) = entry(t, lp);
                        TopLogprob {
                            token,
                            logprob,
                            bytes,
                        }
                    })
                    .collect();
                TokenLogprob {
                    token,
                    logprob,
                    bytes,
                    top_logprobs: Some(top),
                }
            })
            .collect();
        Self { content }
    }
}

#[derive(Debug, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// Absent unless usage was requested; then `null` on every chunk but the
    /// last, which carries the totals and no choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// Sent on a choice's last chunk when a decoding strategy ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoding: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<ApiFinishReason>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TextCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<TextChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoding: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<TextLogprobs>,
    pub finish_reason: Option<ApiFinishReason>,
}

/// The legacy completions log-probability layout.
#[derive(Debug, Default, Serialize)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<indexmap::IndexMap<String, f32>>,
    /// Byte offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// Appends `steps`, whose text starts at byte `offset` of the choice.
    pub fn extend(&mut self, engine: &dyn Engine, steps: &[TokenStep], mut offset: usize) {
        let text = |t: u32| String::from_utf8_lossy(engine.token_bytes(t)).into_owned();
        for step in steps {
            let token = text(step.token);
            self.text_offset.push(offset);
            // Offsets count UTF-8 bytes of the text; a token that contains part
            // of a character spells it as U+FFFD, so its string length would
            // drift from the text.
            offset += engine.token_bytes(step.token).len();
            self.tokens.push(token);
            self.token_logprobs.push(step.logprob);
            self.top_logprobs.push(
                step.top_logprobs
                    .iter()
                    .map(|&(t, lp)| (text(t), lp))
                    .collect(),
            );
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Maximum tokens per sequence, prompt included; absent while loading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
}
