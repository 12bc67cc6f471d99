//! Plain sampling: one continuation with the request's settings. Also the
//! building block the other strategies sample with.

use std::sync::{atomic::Ordering, Arc};

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::{Context, DecodeError, Input, Output, Params, Spent, Strategy};
use crate::{
    api::ApiError,
    engine::{GenerateRequest, SamplingParams, TokenStep},
    generation::{run_choices, ApiFinishReason, ChoiceEvent},
};

pub const NAME: &str = "plain";

#[derive(Debug)]
pub struct Plain;

pub fn parse(params: Params) -> Result<Arc<dyn Strategy>, ApiError> {
    params.only(&[])?;
    Ok(Arc::new(Plain))
}

/// One sampled path.
#[derive(Debug, Clone)]
pub struct Path {
    pub text: String,
    pub steps: Vec<TokenStep>,
    pub finish: ApiFinishReason,
    pub tokens: usize,
}

impl Path {
    /// Creates an empty path, to be filled as its steps arrive.
    pub fn empty() -> Self {
        Self {
            text: String::new(),
            steps: Vec::new(),
            finish: ApiFinishReason::Stop,
            tokens: 0,
        }
    }

    /// Mean natural log-probability of the path's tokens under the
    /// distribution they were sampled from.
    pub fn mean_logprob(&self) -> f32 {
        if self.steps.is_empty() {
            return f32::NEG_INFINITY;
        }
        self.steps.iter().map(|s| s.sampling_logprob).sum::<f32>() / self.steps.len() as f32
    }
}

/// Samples `n` paths of `input` in one engine call. Text of path 0 is sent to
/// `ctx.stream` as it is decoded when `n` is 1.
pub async fn sample(
    ctx: &Context,
    input: &Input,
    n: usize,
    sampling: SamplingParams,
    seed: Option<u64>,
) -> Result<(Vec<Path>, Spent), DecodeError> {
    let request = GenerateRequest {
        prompt: input.prompt.clone(),
        n,
        sampling,
        seed,
        max_tokens: input.max_tokens,
        stop_tokens: Default::default(),
        top_logprobs: 0,
        keep_distribution: false,
        cancel: input.cancel.clone(),
        cached_prompt_tokens: Default::default(),
    };
    let cached = request.cached_prompt_tokens.clone();
    let mut events = run_choices(ctx.engine.clone(), request, input.stops.clone())?;
    let mut paths: Vec<Path> = (0..n).map(|_| Path::empty()).collect();
    let stream = ctx.stream.as_ref().filter(|_| n == 1);
    while let Some(event) = events.next().await {
        match event {
            ChoiceEvent::Delta { index, text, steps } => {
                if let Some(stream) = stream {
                    let _ = stream.send(text.clone());
                }
                paths[index].text.push_str(&text);
                paths[index].steps.extend(steps);
            }
            ChoiceEvent::Finished {
                index,
                reason,
                completion_tokens,
            } => {
                paths[index].finish = reason;
                paths[index].tokens = completion_tokens;
            }
            ChoiceEvent::Failed { message, .. } => return Err(DecodeError::Generation(message)),
        }
    }
    let spent = Spent {
        prompt_tokens: input.prompt.len() * n,
        cached_prompt_tokens: cached.load(Ordering::Relaxed),
        generated_tokens: paths.iter().map(|p| p.tokens).sum(),
    };
    Ok((paths, spent))
}

#[async_trait]
impl Strategy for Plain {
    fn name(&self) -> &'static str {
        NAME
    }

    fn params(&self) -> Value {
        json!({})
    }

    async fn decode(&self, ctx: &Context, input: Input) -> Result<Output, DecodeError> {
        let (mut paths, spent) = sample(ctx, &input, 1, input.sampling.clone(), input.seed).await?;
        let path = paths.remove(0);
        Ok(Output {
            text: path.text,
            steps: path.steps,
            finish: path.finish,
            tokens: path.tokens,
            spent,
            report: Map::new(),
            streamed: ctx.stream.is_some(),
        })
    }
}
