//! `POST /v1/completions` request parsing.

use serde::Deserialize;

use super::{
    params::{self, from_object, parse_object, GenerationParams, Limits, RawCommon},
    ApiError,
};

const COMPLETION_FIELDS: &[&str] = &["prompt", "echo", "suffix", "best_of"];

/// OpenAI's default for `/v1/completions`.
pub const DEFAULT_MAX_TOKENS: usize = 16;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPrompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
struct RawCompletion {
    prompt: Option<RawPrompt>,
    logprobs: Option<i64>,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<i64>,
}

/// What to complete: text for the tokenizer, or token ids as given.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub params: GenerationParams,
}

impl CompletionRequest {
    pub fn parse(body: &[u8], limits: &Limits) -> Result<Self, ApiError> {
        Self::parse_with(body, limits, &[])
    }

    pub fn parse_with(body: &[u8], limits: &Limits, extra: &[&str]) -> Result<Self, ApiError> {
        let object = parse_object(body, &[params::COMMON_FIELDS, COMPLETION_FIELDS, extra])?;
        let common: RawCommon = from_object(&object)?;
        let raw: RawCompletion = from_object(&object)?;
        if raw.echo == Some(true) {
            return Err(ApiError::invalid(
                "echo",
                "`echo` is not supported by this server",
            ));
        }
        if raw.suffix.is_some() {
            return Err(ApiError::invalid(
                "suffix",
                "`suffix` is not supported by this server",
            ));
        }
        if let Some(best_of) = raw.best_of {
            if best_of != common.n.unwrap_or(1) {
                return Err(ApiError::invalid(
                    "best_of",
                    "`best_of` different from `n` is not supported; use a decoding strategy instead",
                ));
            }
        }
        let logprobs = raw
            .logprobs
            .map(|k| params::top_logprobs("logprobs", k, limits))
            .transpose()?;
        let max_tokens = Some(common.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS as i64));
        let params = common.validate(max_tokens, logprobs, limits)?;
        let prompt = match raw.prompt {
            None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
            Some(RawPrompt::Text(text)) => Prompt::Text(text),
            Some(RawPrompt::Tokens(tokens)) => Prompt::Tokens(tokens),
            Some(RawPrompt::Texts(mut texts)) if texts.len() == 1 => Prompt::Text(texts.remove(0)),
            Some(RawPrompt::TokenLists(mut lists)) if lists.len() == 1 => {
                Prompt::Tokens(lists.remove(0))
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "`prompt` must be one string or one token list; send one request per prompt",
                ))
            }
        };
        if matches!(&prompt, Prompt::Text(t) if t.is_empty())
            || matches!(&prompt, Prompt::Tokens(t) if t.is_empty())
        {
            return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
        }
        Ok(Self { prompt, params })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<CompletionRequest, ApiError> {
        CompletionRequest::parse(body.as_bytes(), &Limits::default())
    }

    #[test]
    fn default_max_tokens_is_16() {
        let request = parse(r#"{"model":"m","prompt":"a"}"#).unwrap();
        assert_eq!(request.params.max_tokens, Some(16));
    }

    #[test]
    fn token_prompt_accepted() {
        let request = parse(r#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(request.prompt, Prompt::Tokens(vec![1, 2, 3]));
    }

    #[test]
    fn several_prompts_rejected() {
        let error = parse(r#"{"model":"m","prompt":["a","b"]}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn echo_rejected() {
        let error = parse(r#"{"model":"m","prompt":"a","echo":true}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("echo"));
    }
}
