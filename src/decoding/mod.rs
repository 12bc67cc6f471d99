//! Decoding strategies chosen per request.
//!
//! A request names its strategy in a `decoding` object, for example
//! `{"strategy": "self_consistency", "samples": 8}`. Each strategy is one
//! module implementing [`Strategy`]; [`parse`] is the only place that lists
//! them, so adding a strategy adds a module and one line there.
//!
//! Strategies that wrap another (self-consistency, introspection, handbook)
//! take it as `inner`, for example cautious decoding inside each
//! self-consistency sample:
//! `{"strategy": "self_consistency", "inner": {"strategy": "cautious"}}`.

pub mod answer;
pub mod cautious;
pub mod handbook;
pub mod introspection;
pub mod plain;
pub mod self_consistency;

use std::{fmt::Debug, sync::Arc};

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    api::ApiError,
    engine::{ChatTurn, Engine, EngineError, SamplingParams, TokenStep},
    generation::ApiFinishReason,
};

pub use handbook::{Behavior, BehaviorSource};

/// The input of a strategy: the conversation (when the request is a chat),
/// its tokenized prompt, and the request's sampling settings.
#[derive(Debug, Clone)]
pub struct Input {
    /// The chat messages; `None` for `/v1/completions`.
    pub messages: Option<Vec<ChatTurn>>,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Whether the request set `temperature` itself.
    pub temperature_set: bool,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub stops: Vec<String>,
    pub cancel: CancellationToken,
}

/// Engine work, counted in tokens: prompts processed and tokens generated,
/// including work that a strategy discarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Spent {
    pub prompt_tokens: usize,
    /// Of `prompt_tokens`, those the engine took from its prefix cache.
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
}

impl std::ops::AddAssign for Spent {
    fn add_assign(&mut self, other: Self) {
        self.prompt_tokens += other.prompt_tokens;
        self.cached_prompt_tokens += other.cached_prompt_tokens;
        self.generated_tokens += other.generated_tokens;
    }
}

/// A strategy's answer.
#[derive(Debug, Clone)]
pub struct Output {
    pub text: String,
    /// The returned tokens' steps.
    pub steps: Vec<TokenStep>,
    pub finish: ApiFinishReason,
    /// Tokens in the returned text (what `usage.completion_tokens` reports).
    pub tokens: usize,
    pub spent: Spent,
    /// Strategy-specific findings: samples and votes, branch points and
    /// trials, turns.
    pub report: Map<String, Value>,
    /// Whether the text already went out through [`Context::stream`].
    pub streamed: bool,
}

/// Resources a strategy may use besides its input.
#[derive(Clone)]
pub struct Context {
    pub engine: Arc<dyn Engine>,
    pub behaviors: Arc<dyn BehaviorSource>,
    /// Channel for text that a strategy produces incrementally; `None`
    /// when the caller is not streaming or the strategy runs inside another.
    pub stream: Option<mpsc::UnboundedSender<String>>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Context {
    /// Returns the same context without streaming, for inner strategies.
    pub fn quiet(&self) -> Self {
        Self {
            stream: None,
            ..self.clone()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("{0}")]
    Invalid(String),
}

/// A decoding strategy.
///
/// Contract:
/// - `decode` returns one answer for `input`, never more than
///   `input.max_tokens` tokens long, never containing a stop string.
/// - `spent` counts every prompt token the engine processed and every token
///   it generated for this call, including discarded samples and trials;
///   prompt tokens served from the engine's prefix cache are counted too.
/// - A strategy honours `input.cancel` and stops engine work when it fires.
/// - A strategy streams through `ctx.stream` only text that is final, and
///   sets `streamed` when it did.
/// - Inner strategies get `ctx.quiet()`; only the outermost streams.
#[async_trait]
pub trait Strategy: Debug + Send + Sync {
    fn name(&self) -> &'static str;

    /// Returns whether the strategy works on chat messages rather than a
    /// bare prompt, so that `/v1/completions` rejects it.
    fn needs_chat(&self) -> bool {
        false
    }

    /// Returns the parameters as applied, for the response's `decoding`
    /// object.
    fn params(&self) -> Value;

    async fn decode(&self, ctx: &Context, input: Input) -> Result<Output, DecodeError>;
}

/// Builds the strategy a `decoding` object names, rejecting any unknown
/// strategy, parameter or out-of-range value with a 400 naming it.
/// `path` is the field's name in the request, for the error messages.
pub fn parse(value: &Value, path: &str) -> Result<Arc<dyn Strategy>, ApiError> {
    let Value::Object(object) = value else {
        return Err(ApiError::invalid(
            path,
            format!("`{path}` must be an object"),
        ));
    };
    let name = match object.get("strategy") {
        Some(Value::String(name)) => name.as_str(),
        Some(_) => {
            return Err(ApiError::invalid(
                format!("{path}.strategy"),
                "`strategy` must be a string",
            ))
        }
        None => {
            return Err(ApiError::invalid(
                format!("{path}.strategy"),
                "`strategy` is required",
            ))
        }
    };
    let params = Params { object, path };
    match name {
        plain::NAME => plain::parse(params),
        cautious::NAME => cautious::parse(params),
        self_consistency::NAME => self_consistency::parse(params),
        introspection::NAME => introspection::parse(params),
        handbook::NAME => handbook::parse(params),
        other => Err(ApiError::invalid(
            format!("{path}.strategy"),
            format!(
                "unknown strategy `{other}`; use one of {}, {}, {}, {}, {}",
                plain::NAME,
                cautious::NAME,
                self_consistency::NAME,
                introspection::NAME,
                handbook::NAME
            ),
        )),
    }
}

/// A strategy's parameters, read with strict checks.
pub struct Params<'a> {
    object: &'a Map<String, Value>,
    path: &'a str,
}

impl Params<'_> {
    fn field(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    /// Rejects any key outside `known` (and `strategy`).
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        for key in self.object.keys() {
            if key != "strategy" && !known.contains(&key.as_str()) {
                let strategy = self.object["strategy"].as_str().unwrap_or_default();
                return Err(ApiError::invalid(
                    self.field(key),
                    format!(
                        "unknown parameter `{key}` for strategy `{strategy}`; it accepts: {}",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn integer(
        &self,
        key: &str,
        default: usize,
        min: usize,
        max: usize,
    ) -> Result<usize, ApiError> {
        match self.object.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => match value.as_u64() {
                Some(v) if (min as u64..=max as u64).contains(&v) => Ok(v as usize),
                _ => Err(ApiError::invalid(
                    self.field(key),
                    format!(
                        "`{}` must be an integer from {min} to {max}, got {value}",
                        self.field(key)
                    ),
                )),
            },
        }
    }

    pub fn number(&self, key: &str, default: f32, min: f32, max: f32) -> Result<f32, ApiError> {
        match self.object.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => match value.as_f64() {
                Some(v) if v.is_finite() && (min as f64..=max as f64).contains(&v) => Ok(v as f32),
                _ => Err(ApiError::invalid(
                    self.field(key),
                    format!(
                        "`{}` must be a number from {min} to {max}, got {value}",
                        self.field(key)
                    ),
                )),
            },
        }
    }

    pub fn boolean(&self, key: &str, default: bool) -> Result<bool, ApiError> {
        match self.object.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(value) => Err(ApiError::invalid(
                self.field(key),
                format!("`{}` must be true or false, got {value}", self.field(key)),
            )),
        }
    }

    /// The `inner` strategy, if given, which must be one of `allowed`.
    pub fn inner(&self, allowed: &[&str]) -> Result<Option<Arc<dyn Strategy>>, ApiError> {
        let Some(value) = self.object.get("inner").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let path = self.field("inner");
        let inner = parse(value, &path)?;
        if !allowed.contains(&inner.name()) {
            return Err(ApiError::invalid(
                format!("{path}.strategy"),
                format!(
                    "`{}` cannot run inside `{}`; allowed: {}",
                    inner.name(),
                    self.object["strategy"].as_str().unwrap_or_default(),
                    allowed.join(", ")
                ),
            ));
        }
        Ok(Some(inner))
    }
}

/// Describes a strategy as a `decoding` object that parses back to the
/// same strategy.
pub fn describe(strategy: &dyn Strategy) -> Value {
    let mut object = match strategy.params() {
        Value::Object(object) => object,
        _ => Map::new(),
    };
    object.insert("strategy".into(), strategy.name().into());
    Value::Object(object)
}

/// Builds the `decoding` object of a response.
pub fn report(strategy: &dyn Strategy, output: &Output) -> Value {
    let mut object = Map::new();
    object.insert("strategy".into(), strategy.name().into());
    object.insert("params".into(), describe(strategy));
    object.insert(
        "engine_tokens".into(),
        serde_json::json!({
            "prompt": output.spent.prompt_tokens,
            "prompt_cached": output.spent.cached_prompt_tokens,
            "generated": output.spent.generated_tokens,
            "returned": output.tokens,
        }),
    );
    for (key, value) in &output.report {
        object.insert(key.clone(), value.clone());
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_strategy_named() {
        let error = parse(&json!({"strategy": "beam"}), "decoding").unwrap_err();
        assert_eq!(error.param.as_deref(), Some("decoding.strategy"));
        assert!(error.message.contains("beam"));
    }

    #[test]
    fn unknown_parameter_named() {
        let error = parse(
            &json!({"strategy": "self_consistency", "sample": 3}),
            "decoding",
        )
        .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("decoding.sample"));
    }

    #[test]
    fn out_of_range_named() {
        let error = parse(
            &json!({"strategy": "self_consistency", "samples": 0}),
            "decoding",
        )
        .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("decoding.samples"));
        let error = parse(
            &json!({"strategy": "cautious", "low_entropy": -1}),
            "decoding",
        )
        .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("decoding.low_entropy"));
    }

    #[test]
    fn description_parses_back() {
        let value = json!({
            "strategy": "self_consistency",
            "samples": 4,
            "inner": {"strategy": "cautious", "max_trials": 3},
        });
        let strategy = parse(&value, "decoding").unwrap();
        let described = describe(strategy.as_ref());
        let again = parse(&described, "decoding").unwrap();
        assert_eq!(describe(again.as_ref()), described);
        assert_eq!(described["inner"]["max_trials"], 3);
    }

    #[test]
    fn inner_checked() {
        let ok = parse(
            &json!({"strategy": "self_consistency", "inner": {"strategy": "cautious"}}),
            "decoding",
        );
        assert!(ok.is_ok());
        let error = parse(
            &json!({"strategy": "self_consistency", "inner": {"strategy": "handbook"}}),
            "decoding",
        )
        .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("decoding.inner.strategy"));
        let error = parse(
            &json!({"strategy": "self_consistency", "inner": {"strategy": "cautious", "x": 1}}),
            "decoding",
        )
        .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("decoding.inner.x"));
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use crate::engine::scripted::{step, text_steps, ScriptedEngine, SCRIPTED_EOS};

    /// Creates an engine whose every continuation spells
    /// `reply(prompt, index)`.
    pub fn scripted(
        reply: impl Fn(&str, usize) -> String + Send + Sync + 'static,
    ) -> Arc<dyn Engine> {
        Arc::new(ScriptedEngine::new(
            8192,
            Box::new(move |request, index| {
                let prompt: Vec<u8> = request.prompt.iter().map(|&t| t as u8).collect();
                let mut steps =
                    text_steps(&reply(&String::from_utf8_lossy(&prompt), index), -0.5, 0.8);
                steps.push(step(SCRIPTED_EOS, -0.1, 0.1));
                steps
            }),
        ))
    }

    pub fn context_with(engine: Arc<dyn Engine>, behaviors: Arc<dyn BehaviorSource>) -> Context {
        Context {
            engine,
            behaviors,
            stream: None,
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }

    pub fn context(engine: Arc<dyn Engine>) -> Context {
        context_with(engine, Arc::new(handbook::StaticHandbook::default()))
    }

    /// Creates a chat input asking `question`, tokenized the scripted way.
    pub fn input(question: &str) -> Input {
        let text = format!("<user>{question}\n<assistant>");
        Input {
            messages: Some(vec![ChatTurn {
                role: "user".into(),
                content: question.into(),
                name: None,
            }]),
            prompt: text.bytes().map(u32::from).collect(),
            sampling: SamplingParams::default(),
            temperature_set: false,
            seed: Some(1),
            max_tokens: 256,
            stops: Vec::new(),
            cancel: CancellationToken::new(),
        }
    }
}
