//! Cautious next-token prediction (Wang et al., 2025): where the model is
//! unsure, sample several clauses and keep the most confident one.
//!
//! At each step the entropy H (nats) of the sampling distribution, after
//! temperature and top-p, decides. At or below `low_entropy` the token is
//! taken as usual. Above it, N = 1 + floor((max_trials - 1) * clamp((H -
//! low) / (high - low), 0, 1)) trials start from this position; each runs
//! until it emits a punctuation token, end-of-sequence, a stop string or
//! its token budget. The trial with the lowest perplexity over all its
//! tokens (first and closing punctuation included) wins, ties to the
//! earlier, and is appended whole.
//!
//! The trials' first tokens are drawn from the distribution the probe step
//! already computed, and every trial and clause extends a prefix that the
//! engine has just processed, which its prefix cache serves.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use async_trait::async_trait;
use futures::future::join_all;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Map, Value};

use super::{Context, DecodeError, Input, Output, Params, Spent, Strategy};
use crate::{
    api::ApiError,
    engine::{sampler::draw, Engine, GenerateRequest, StepEvent, TokenStep},
    generation::{ApiFinishReason, TextDecoder},
};

pub const NAME: &str = "cautious";

/// Texts a punctuation token decodes to.
const PUNCTUATION: [&str; 10] = [".", ",", "\n", "?", "!", ":", ";", ")", "]", "}"];

#[derive(Debug, Clone, PartialEq)]
pub struct Cautious {
    pub low_entropy: f32,
    pub high_entropy: f32,
    pub max_trials: usize,
    /// Token budget of one trial.
    pub max_clause_tokens: usize,
}

impl Default for Cautious {
    fn default() -> Self {
        Self {
            low_entropy: 0.01,
            high_entropy: 1.5,
            max_trials: 10,
            max_clause_tokens: 32,
        }
    }
}

pub fn parse(params: Params) -> Result<Arc<dyn Strategy>, ApiError> {
    params.only(&[
        "low_entropy",
        "high_entropy",
        "max_trials",
        "max_clause_tokens",
    ])?;
    let defaults = Cautious::default();
    let low_entropy = params.number("low_entropy", defaults.low_entropy, 0.0, 20.0)?;
    let high_entropy = params.number("high_entropy", defaults.high_entropy, 0.0, 20.0)?;
    if high_entropy <= low_entropy {
        return Err(ApiError::invalid(
            "decoding.high_entropy",
            format!("`high_entropy` ({high_entropy}) must be greater than `low_entropy` ({low_entropy})"),
        ));
    }
    Ok(Arc::new(Cautious {
        low_entropy,
        high_entropy,
        max_trials: params.integer("max_trials", defaults.max_trials, 1, 32)?,
        max_clause_tokens: params.integer(
            "max_clause_tokens",
            defaults.max_clause_tokens,
            1,
            512,
        )?,
    }))
}

impl Cautious {
    /// Number of trials at entropy `h`; 0 means take the token as usual.
    pub fn trial_count(&self, h: f32) -> usize {
        if h <= self.low_entropy {
            return 0;
        }
        let scaled =
            ((h - self.low_entropy) / (self.high_entropy - self.low_entropy)).clamp(0.0, 1.0);
        1 + ((self.max_trials - 1) as f32 * scaled).floor() as usize
    }
}

/// Perplexity of a sequence from its natural log-probabilities.
pub fn perplexity(logprobs: &[f32]) -> f32 {
    if logprobs.is_empty() {
        return f32::INFINITY;
    }
    (-logprobs.iter().sum::<f32>() / logprobs.len() as f32).exp()
}

/// Index of the trial with the lowest perplexity, the earlier on ties.
pub fn best_trial(trials: &[Vec<TokenStep>]) -> usize {
    let mut best = 0;
    let mut best_ppl = f32::INFINITY;
    for (i, trial) in trials.iter().enumerate() {
        let logprobs: Vec<f32> = trial.iter().map(|s| s.sampling_logprob).collect();
        let ppl = perplexity(&logprobs);
        if ppl < best_ppl {
            best = i;
            best_ppl = ppl;
        }
    }
    best
}

/// Tokens that decode to exactly one punctuation mark.
pub fn punctuation_tokens(engine: &dyn Engine) -> HashSet<u32> {
    (0..engine.info().vocab_size as u32)
        .filter(|&t| {
            std::str::from_utf8(engine.token_bytes(t)).is_ok_and(|s| PUNCTUATION.contains(&s))
        })
        .collect()
}

/// Runs one engine request and gathers its steps.
async fn collect(
    engine: &dyn Engine,
    request: GenerateRequest,
) -> Result<Vec<TokenStep>, DecodeError> {
    let mut continuation = engine.generate(request)?.remove(0);
    let mut steps = Vec::new();
    while let Some(event) = continuation.events.recv().await {
        match event {
            StepEvent::Token(step) => steps.push(step),
            StepEvent::Finished(_) => break,
            StepEvent::Error(e) => return Err(DecodeError::Generation(e)),
        }
    }
    Ok(steps)
}

/// The state of one cautious decode.
struct Run<'a> {
    params: &'a Cautious,
    ctx: &'a Context,
    input: &'a Input,
    rng: StdRng,
    punctuation: HashSet<u32>,
    tokens: Vec<u32>,
    steps: Vec<TokenStep>,
    spent: Spent,
    /// Prompt tokens the engine took from its prefix cache, over every
    /// probe and trial of this run.
    cached: Arc<AtomicUsize>,
    branch_points: usize,
    trials: usize,
    entropies: Vec<f32>,
}

impl Run<'_> {
    fn request(&mut self, prompt: Vec<u32>, max_tokens: usize, keep: bool) -> GenerateRequest {
        self.spent.prompt_tokens += prompt.len();
        GenerateRequest {
            prompt,
            n: 1,
            sampling: self.input.sampling.clone(),
            seed: Some(self.rng.random()),
            max_tokens,
            stop_tokens: self.punctuation.clone(),
            top_logprobs: 0,
            keep_distribution: keep,
            cancel: self.input.cancel.clone(),
            cached_prompt_tokens: self.cached.clone(),
        }
    }

    fn ends_clause(&self, token: u32) -> bool {
        self.punctuation.contains(&token) || self.ctx.engine.info().eos_tokens.contains(&token)
    }

    /// Decodes the next clause: a single token where the model is sure, the
    /// best of several trials where it is not. Empty when the engine
    /// produced nothing (cancelled).
    async fn next_clause(&mut self, remaining: usize) -> Result<Vec<TokenStep>, DecodeError> {
        let request = self.request(self.tokens.clone(), 1, true);
        let probe = collect(self.ctx.engine.as_ref(), request).await?;
        let Some(first) = probe.into_iter().next() else {
            return Ok(Vec::new());
        };
        self.spent.generated_tokens += 1;
        self.entropies.push(first.entropy);
        let count = self.params.trial_count(first.entropy);
        if count == 0 {
            return Ok(vec![first]);
        }
        self.branch_points += 1;
        self.trials += count;
        let distribution = first.distribution.clone().unwrap_or_default();
        let budget = self.params.max_clause_tokens.min(remaining);
        let mut starts = vec![first.clone()];
        for _ in 1..count {
            let token = draw(&distribution, self.rng.random::<f32>());
            let p = distribution
                .iter()
                .find(|(t, _)| *t == token)
                .map_or(0.0, |(_, p)| *p);
            starts.push(TokenStep {
                token,
                logprob: p.ln(),
                sampling_logprob: p.ln(),
                entropy: first.entropy,
                top_logprobs: Vec::new(),
                distribution: None,
            });
        }
        let mut requests = Vec::new();
        for start in &starts {
            if self.ends_clause(start.token) || budget <= 1 {
                requests.push(None);
            } else {
                let mut prompt = self.tokens.clone();
                prompt.push(start.token);
                requests.push(Some(self.request(prompt, budget - 1, false)));
            }
        }
        let engine = self.ctx.engine.as_ref();
        let continuations = join_all(requests.into_iter().map(|request| async move {
            match request {
                Some(request) => collect(engine, request).await,
                None => Ok(Vec::new()),
            }
        }))
        .await;
        let mut trials = Vec::with_capacity(count);
        for (start, rest) in starts.into_iter().zip(continuations) {
            let rest = rest?;
            self.spent.generated_tokens += rest.len();
            let mut trial = vec![start];
            trial.extend(rest);
            trials.push(trial);
        }
        let best = best_trial(&trials);
        Ok(trials.swap_remove(best))
    }
}

#[async_trait]
impl Strategy for Cautious {
    fn name(&self) -> &'static str {
        NAME
    }

    fn params(&self) -> Value {
        // Rounded so the f32 values read back as they were written.
        let round = |x: f32| (f64::from(x) * 1e6).round() / 1e6;
        json!({
            "low_entropy": round(self.low_entropy),
            "high_entropy": round(self.high_entropy),
            "max_trials": self.max_trials,
            "max_clause_tokens": self.max_clause_tokens,
        })
    }

    async fn decode(&self, ctx: &Context, input: Input) -> Result<Output, DecodeError> {
        let hits_before = ctx.engine.prefix_cache_stats().map_or(0, |(hits, _)| hits);
        let mut run = Run {
            params: self,
            ctx,
            input: &input,
            rng: StdRng::seed_from_u64(input.seed.unwrap_or_else(rand::random)),
            punctuation: punctuation_tokens(ctx.engine.as_ref()),
            tokens: input.prompt.clone(),
            steps: Vec::new(),
            spent: Spent::default(),
            cached: Default::default(),
            branch_points: 0,
            trials: 0,
            entropies: Vec::new(),
        };
        let mut decoder = TextDecoder::new(ctx.engine.clone(), input.stops.clone());
        let mut text = String::new();
        let mut kept = Vec::new();
        let eos = ctx.engine.info().eos_tokens.clone();
        let mut finish = ApiFinishReason::Length;
        'decode: while run.steps.len() < input.max_tokens && !input.cancel.is_cancelled() {
            let remaining = input.max_tokens - run.steps.len();
            let mut clause = run.next_clause(remaining).await?;
            if clause.is_empty() {
                break;
            }
            clause.truncate(remaining);
            let mut piece = String::new();
            for step in clause {
                run.tokens.push(step.token);
                run.steps.push(step.clone());
                let done = eos.contains(&step.token);
                let decoded = decoder.push(step);
                piece.push_str(&decoded.text);
                kept.extend(decoded.steps);
                if decoded.stopped || done {
                    finish = ApiFinishReason::Stop;
                    text.push_str(&piece);
                    if let Some(stream) = &ctx.stream {
                        let _ = stream.send(piece);
                    }
                    break 'decode;
                }
            }
            text.push_str(&piece);
            if let Some(stream) = ctx.stream.as_ref().filter(|_| !piece.is_empty()) {
                let _ = stream.send(piece);
            }
        }
        if finish == ApiFinishReason::Length {
            let rest = decoder.flush();
            if let Some(stream) = ctx.stream.as_ref().filter(|_| !rest.text.is_empty()) {
                let _ = stream.send(rest.text.clone());
            }
            text.push_str(&rest.text);
            kept.extend(rest.steps);
        }
        ctx.metrics
            .cautious_branch_points
            .inc_by(run.branch_points as u64);
        ctx.metrics.cautious_trials.inc_by(run.trials as u64);
        let mean_entropy = if run.entropies.is_empty() {
            0.0
        } else {
            run.entropies.iter().sum::<f32>() / run.entropies.len() as f32
        };
        let mut report = Map::new();
        report.insert("branch_points".into(), json!(run.branch_points));
        report.insert("trials".into(), json!(run.trials));
        report.insert("clauses".into(), json!(run.entropies.len()));
        report.insert("mean_entropy".into(), json!(mean_entropy));
        // NOTE: the engine counts cache hits for all traffic, so concurrent
        // requests inflate this difference.
        let hits_after = ctx.engine.prefix_cache_stats().map_or(0, |(hits, _)| hits);
        report.insert(
            "engine_prefix_cache_hits".into(),
            json!(hits_after.saturating_sub(hits_before)),
        );
        Ok(Output {
            text,
            steps: kept,
            finish,
            tokens: run.steps.len(),
            spent: Spent {
                cached_prompt_tokens: run.cached.load(Ordering::Relaxed),
                ..run.spent
            },
            report,
            streamed: ctx.stream.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoding::tests_support::{context, input};
    use crate::engine::scripted::{step, ScriptedEngine, SCRIPTED_EOS};

    #[test]
    fn trial_count_follows_entropy() {
        let c = Cautious::default();
        assert_eq!(c.trial_count(0.0), 0);
        assert_eq!(c.trial_count(0.01), 0);
        assert_eq!(c.trial_count(0.02), 1);
        // (0.755 - 0.01) / 1.49 = 0.5, so 1 + floor(4.5) = 5.
        assert_eq!(c.trial_count(0.755), 5);
        assert_eq!(c.trial_count(1.5), 10);
        assert_eq!(c.trial_count(7.0), 10);
    }

    #[test]
    fn lowest_perplexity_trial_kept_ties_to_earlier() {
        let trial = |lps: &[f32]| lps.iter().map(|&lp| step(1, lp, 1.0)).collect::<Vec<_>>();
        let trials = vec![
            trial(&[-1.0, -1.0]),
            trial(&[-0.2, -0.4]),
            trial(&[-0.3, -0.3]),
        ];
        assert_eq!(best_trial(&trials), 1);
        assert!((perplexity(&[-0.2, -0.4]) - 0.3f32.exp()).abs() < 1e-6);
        let tied = vec![trial(&[-0.5]), trial(&[-0.5])];
        assert_eq!(best_trial(&tied), 0);
    }

    /// A scripted model: the probe step has high entropy and a two-token
    /// distribution over 'a' and 'b'; a trial starting with 'a' is unsure
    /// (low log-probabilities), one starting with 'b' is confident. Every
    /// trial ends with '.' and the text ends after two clauses.
    fn engine() -> ScriptedEngine {
        let distribution = Arc::new(vec![(u32::from(b'a'), 0.5), (u32::from(b'b'), 0.5)]);
        ScriptedEngine::new(
            4096,
            Box::new(move |request, _| {
                let prompt = &request.prompt;
                let generated = prompt.iter().filter(|&&t| t == u32::from(b'.')).count();
                if generated >= 2 {
                    return vec![step(SCRIPTED_EOS, -0.01, 0.0)];
                }
                match prompt.last().copied() {
                    Some(t) if t == u32::from(b'a') => vec![
                        step(u32::from(b'x'), -2.0, 1.0),
                        step(u32::from(b'.'), -2.0, 1.0),
                    ],
                    Some(t) if t == u32::from(b'b') => vec![
                        step(u32::from(b'y'), -0.1, 1.0),
                        step(u32::from(b'.'), -0.1, 1.0),
                    ],
                    _ => {
                        let mut first = step(u32::from(b'a'), 0.5f32.ln(), 0.69);
                        first.distribution = Some(distribution.clone());
                        vec![first]
                    }
                }
            }),
        )
    }

    #[tokio::test]
    async fn confident_clause_wins_and_punctuation_ends_trials() {
        let engine = Arc::new(engine());
        let ctx = context(engine.clone());
        let strategy = Cautious {
            max_trials: 10,
            ..Cautious::default()
        };
        let mut task = input("q");
        task.seed = Some(3);
        let output = strategy.decode(&ctx, task).await.unwrap();
        // Each clause keeps the trial "by." whenever one was drawn; with 5
        // trials per branch point (entropy 0.69) that is near certain for
        // this seed.
        assert_eq!(output.text, "by.by.");
        assert_eq!(output.finish, ApiFinishReason::Stop);
        assert_eq!(output.report["branch_points"], 2);
        let requests = engine.requests.lock().unwrap();
        let trial = requests
            .iter()
            .find(|r| r.max_tokens > 1)
            .expect("a trial ran");
        assert!(trial.stop_tokens.contains(&u32::from(b'.')));
        assert!(trial.stop_tokens.contains(&u32::from(b'\n')));
        assert!(!trial.stop_tokens.contains(&u32::from(b'x')));
    }

    #[tokio::test]
    async fn low_entropy_takes_token_without_trials() {
        let engine = Arc::new(ScriptedEngine::new(
            4096,
            Box::new(|request, _| {
                if request
                    .prompt
                    .iter()
                    .filter(|&&t| t == u32::from(b'z'))
                    .count()
                    >= 3
                {
                    vec![step(SCRIPTED_EOS, 0.0, 0.0)]
                } else {
                    vec![step(u32::from(b'z'), 0.0, 0.001)]
                }
            }),
        ));
        let ctx = context(engine.clone());
        let output = Cautious::default().decode(&ctx, input("")).await.unwrap();
        assert_eq!(output.report["branch_points"], 0);
        assert_eq!(output.report["trials"], 0);
        assert_eq!(output.text, "zzz");
        assert!(engine
            .requests
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.max_tokens == 1));
    }
}
