//! Request fields shared by the chat and completion endpoints.

use std::collections::{BTreeMap, HashSet};

use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{Map, Value};

use super::ApiError;
use crate::engine::SamplingParams;

/// OpenAI fields this server accepts on both endpoints.
pub const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "decoding",
];

/// OpenAI fields that exist but that this server does not implement. They
/// are rejected by name rather than ignored, because ignoring them would
/// change the answer behind the client's back.
pub const UNSUPPORTED_FIELDS: &[&str] = &[
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "service_tier",
    "repetition_penalty",
];

/// Upper bounds that depend on configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_n: usize,
    pub max_stop_strings: usize,
    pub max_top_logprobs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_n: 16,
            max_stop_strings: 4,
            max_top_logprobs: 20,
        }
    }
}

/// A `stop` value: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct RawCommon {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub n: Option<i64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub store: Option<bool>,
    pub decoding: Option<Value>,
}

/// Validated parameters of a generation request.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub model: String,
    /// `None` means "up to the context length".
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub n: usize,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    /// Alternatives per token when log-probabilities were requested.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Whether the request may be recorded in the trace store (OpenAI's
    /// `store`, default true here).
    pub store: bool,
    /// Whether the request set `temperature` (strategies have their own
    /// default otherwise).
    pub temperature_set: bool,
    /// The request's `decoding` object, checked when the model is known.
    pub decoding: Option<Value>,
}

/// Parses the body as a JSON object and rejects fields outside `allowed`.
pub fn parse_object(body: &[u8], allowed: &[&[&str]]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let known: HashSet<&str> = allowed
        .iter()
        .flat_map(|list| list.iter().copied())
        .collect();
    for key in object.keys() {
        if known.contains(key.as_str()) {
            continue;
        }
        if UNSUPPORTED_FIELDS.contains(&key.as_str()) {
            return Err(ApiError::invalid(
                key.clone(),
                format!("`{key}` is not supported by this server; remove it from the request"),
            ));
        }
        return Err(ApiError::invalid(
            key.clone(),
            format!("unrecognized request argument `{key}`"),
        ));
    }
    Ok(object)
}

/// Deserializes `object` into `T`, naming the offending field on failure.
pub fn from_object<T: DeserializeOwned>(object: &Map<String, Value>) -> Result<T, ApiError> {
    // Null means "not set" in the OpenAI API, which the Option fields see as
    // None; only the non-null values need deserializing.
    let value = Value::Object(object.clone());
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let mut inner = e.into_inner().to_string();
        if inner.contains("untagged enum") {
            inner = match path.as_str() {
                "stop" => "expected a string or a list of strings".into(),
                "prompt" => {
                    "expected a string or a list of token ids (non-negative integers)".into()
                }
                _ => "unexpected type or value".into(),
            };
        }
        let param = if path == "." {
            "body".to_string()
        } else {
            path
        };
        ApiError::invalid(
            param.clone(),
            format!("invalid value for `{param}`: {inner}"),
        )
    })
}

fn in_range(name: &str, value: f64, low: f64, high: f64) -> Result<f32, ApiError> {
    if !value.is_finite() || value < low || value > high {
        return Err(ApiError::invalid(
            name,
            format!("`{name}` must be between {low} and {high}, got {value}"),
        ));
    }
    Ok(value as f32)
}

fn positive(name: &str, value: i64, max: i64) -> Result<usize, ApiError> {
    if value < 1 || value > max {
        return Err(ApiError::invalid(
            name,
            format!("`{name}` must be between 1 and {max}, got {value}"),
        ));
    }
    Ok(value as usize)
}

impl RawCommon {
    /// Checks every value; `max_tokens` is the endpoint's resolved field and
    /// `logprobs` its resolved alternative count.
    pub fn validate(
        self,
        max_tokens: Option<i64>,
        logprobs: Option<usize>,
        limits: &Limits,
    ) -> Result<GenerationParams, ApiError> {
        let model = self
            .model
            .filter(|m| !m.is_empty())
            .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
        let max_tokens = max_tokens
            .map(|v| positive("max_tokens", v, i64::from(u32::MAX)))
            .transpose()?;
        let temperature_set = self.temperature.is_some();
        let temperature = in_range("temperature", self.temperature.unwrap_or(1.0), 0.0, 2.0)?;
        let top_p = in_range("top_p", self.top_p.unwrap_or(1.0), 0.0, 1.0)?;
        if top_p == 0.0 {
            return Err(ApiError::invalid(
                "top_p",
                "`top_p` must be greater than 0, got 0",
            ));
        }
        let top_k = match self.top_k.unwrap_or(0) {
            -1 | 0 => 0,
            k if k > 0 => k as usize,
            k => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("`top_k` must be -1 or 0 (disabled) or a positive count, got {k}"),
                ))
            }
        };
        let min_p = in_range("min_p", self.min_p.unwrap_or(0.0), 0.0, 1.0)?;
        let presence_penalty = in_range(
            "presence_penalty",
            self.presence_penalty.unwrap_or(0.0),
            -2.0,
            2.0,
        )?;
        let frequency_penalty = in_range(
            "frequency_penalty",
            self.frequency_penalty.unwrap_or(0.0),
            -2.0,
            2.0,
        )?;
        let n = positive("n", self.n.unwrap_or(1), limits.max_n as i64)?;
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(list)) => list,
        };
        if stop.len() > limits.max_stop_strings {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "`stop` accepts at most {} strings, got {}",
                    limits.max_stop_strings,
                    stop.len()
                ),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "`stop` strings must not be empty",
            ));
        }
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true",
            ));
        }
        let include_usage = self
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let metadata = self.metadata.unwrap_or_default();
        validate_metadata(&metadata)?;
        Ok(GenerationParams {
            model,
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                min_p,
                presence_penalty,
                frequency_penalty,
            },
            n,
            stop,
            // Negative seeds are as valid as positive ones; keep their bits.
            seed: self.seed.map(|s| s as u64),
            logprobs,
            stream,
            include_usage,
            user: self.user,
            metadata,
            store: self.store.unwrap_or(true),
            temperature_set,
            decoding: self.decoding,
        })
    }
}

/// OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
fn validate_metadata(metadata: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if metadata.len() > 16 {
        return Err(ApiError::invalid(
            "metadata",
            format!("`metadata` holds at most 16 pairs, got {}", metadata.len()),
        ));
    }
    for (key, value) in metadata {
        if key.chars().count() > 64 || value.chars().count() > 512 {
            return Err(ApiError::invalid(
                format!("metadata.{key}"),
                "`metadata` keys are limited to 64 characters and values to 512",
            ));
        }
    }
    Ok(())
}

/// Checks a top-logprobs count against the limit.
pub fn top_logprobs(name: &str, value: i64, limits: &Limits) -> Result<usize, ApiError> {
    let max = limits.max_top_logprobs as i64;
    if !(0..=max).contains(&value) {
        return Err(ApiError::invalid(
            name,
            format!("`{name}` must be between 0 and {max}, got {value}"),
        ));
    }
    Ok(value as usize)
}
