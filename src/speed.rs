//! `mull speed`: prefill and decode speed of one model in-process, without
//! HTTP, for comparing builds, quantization formats and dtypes.

use std::{path::PathBuf, sync::Arc, time::Instant};

use clap::Args;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::{
    llama::{LlamaConfig, LlamaEngine},
    mistral::{MistralConfig, MistralEngine},
    Continuation, Engine, GenerateRequest, SamplingParams, StepEvent,
};

/// Text the prompts are cut from; its content does not matter for speed.
const FILLER: &str = "The history of the city begins with a small settlement on the river. \
Merchants came to trade grain, salt and cloth, and the market grew into a town with walls, \
gates and a cathedral. Over the centuries the town became a center of learning, with a \
university, printing houses and libraries that drew scholars from across the continent. ";

#[derive(Debug, Args)]
pub struct SpeedArgs {
    /// GGUF file to measure.
    #[arg(long)]
    pub model_path: PathBuf,
    /// Engine: llama or mistralrs.
    #[arg(long, default_value = "llama")]
    pub engine: String,
    /// CPU threads (llama engine).
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(2, |n| n.get()))]
    pub threads: usize,
    /// Activation dtype of the mistralrs engine: f32, bf16, f16 or auto.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Prompt length for the prefill measurement, in tokens.
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Tokens to generate for the decode measurement.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Repetitions of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Label for this configuration in the output.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Numbers of sequences to decode together, comma-separated. Each gets
    /// a decode measurement of one prompt sampled that many times. Only the
    /// llama engine measures sizes above 1.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch_sizes: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct SpeedReport {
    pub label: String,
    pub model: String,
    pub dtype: String,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub prefill_runs: Vec<f64>,
    pub decode_runs: Vec<f64>,
    /// Decode speed with several sequences per step, one entry per batch
    /// size other than 1.
    pub batches: Vec<BatchReport>,
}

#[derive(Debug, Serialize)]
pub struct BatchReport {
    pub batch_size: usize,
    /// Output tokens per second, all sequences together (median of runs).
    pub decode_tokens_per_s: f64,
    /// Time of one decode step against a one-sequence step:
    /// `batch_size * single speed / batched speed`.
    pub step_cost: f64,
    pub decode_runs: Vec<f64>,
}

/// Builds a request for `n` continuations of `prompt`, seeded so that runs
/// repeat.
fn request(
    prompt: Vec<u32>,
    n: usize,
    sampling: SamplingParams,
    max_tokens: usize,
) -> GenerateRequest {
    GenerateRequest {
        prompt,
        n,
        sampling,
        seed: Some(0),
        max_tokens,
        stop_tokens: Default::default(),
        top_logprobs: 0,
        keep_distribution: false,
        cancel: CancellationToken::new(),
        cached_prompt_tokens: Default::default(),
    }
}

/// Reads a continuation to its end and returns when its first token came,
/// when it ended, and how many tokens it had.
async fn drain(
    mut continuation: Continuation,
) -> anyhow::Result<(Option<Instant>, Instant, usize)> {
    let mut first = None;
    let mut tokens = 0;
    while let Some(event) = continuation.events.recv().await {
        match event {
            StepEvent::Token(_) => {
                tokens += 1;
                first.get_or_insert_with(Instant::now);
            }
            StepEvent::Finished(_) => break,
            StepEvent::Error(e) => anyhow::bail!("generation failed: {e}"),
        }
    }
    Ok((first, Instant::now(), tokens))
}

/// Times one generation: seconds to the first token, seconds from the first
/// to the last token, and the number of tokens.
async fn time_generation(
    engine: &dyn Engine,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> anyhow::Result<(f64, f64, usize)> {
    let start = Instant::now();
    let continuation = engine
        .generate(request(prompt, 1, SamplingParams::greedy(), max_tokens))?
        .remove(0);
    let (first, last, tokens) = drain(continuation).await?;
    let first = first.ok_or_else(|| anyhow::anyhow!("no token was generated"))?;
    Ok((
        (first - start).as_secs_f64(),
        (last - first).as_secs_f64(),
        tokens,
    ))
}

/// Times `n` continuations of one prompt decoded together and returns their
/// output tokens per second, from the first token to the last.
async fn time_batch(
    engine: &dyn Engine,
    prompt: Vec<u32>,
    n: usize,
    max_tokens: usize,
) -> anyhow::Result<f64> {
    let continuations =
        engine.generate(request(prompt, n, SamplingParams::default(), max_tokens))?;
    let runs = continuations.into_iter().map(drain);
    let mut first_token = None::<Instant>;
    let mut last_token = None::<Instant>;
    let mut tokens = 0;
    for run in futures::future::join_all(runs).await {
        let (first, last, count) = run?;
        let first = first.ok_or_else(|| anyhow::anyhow!("no token was generated"))?;
        first_token = Some(first_token.map_or(first, |t| t.min(first)));
        last_token = Some(last_token.map_or(last, |t| t.max(last)));
        tokens += count;
    }
    let (Some(first), Some(last)) = (first_token, last_token) else {
        anyhow::bail!("no continuation was started");
    };
    // The first token of each sequence comes with the prompt's step.
    Ok((tokens - n) as f64 / (last - first).as_secs_f64())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub async fn run(args: SpeedArgs) -> anyhow::Result<SpeedReport> {
    let engine: Arc<dyn Engine> = match args.engine.as_str() {
        "llama" => Arc::new(
            LlamaEngine::load(LlamaConfig {
                threads: args.threads,
                slots: args.batch_sizes.iter().copied().max().unwrap_or(1).max(1),
                ..LlamaConfig::cpu(args.model_path.clone())
            })
            .await?,
        ),
        "mistralrs" => Arc::new(
            MistralEngine::load(MistralConfig {
                path: args.model_path.clone(),
                dtype: args.dtype.clone(),
                cuda: false,
                max_batch_size: 1,
                prefix_cache_entries: 0,
            })
            .await?,
        ),
        other => anyhow::bail!("--engine must be llama or mistralrs, got `{other}`"),
    };
    let filler = engine
        .tokenize(&FILLER.repeat(1 + args.prompt_tokens / 40))
        .await?;
    anyhow::ensure!(
        filler.len() >= args.prompt_tokens + args.repeat,
        "filler text too short"
    );

    // One unmeasured run warms caches and allocations.
    time_generation(engine.as_ref(), filler[..16].to_vec(), 4).await?;
    let mut prefill_runs = Vec::new();
    let mut decode_runs = Vec::new();
    for rep in 0..args.repeat {
        // A different prompt each time, so no prefix is reused.
        let prompt = filler[rep..rep + args.prompt_tokens].to_vec();
        let (to_first, _, _) = time_generation(engine.as_ref(), prompt, 1).await?;
        prefill_runs.push(args.prompt_tokens as f64 / to_first);
        eprintln!(
            "speed: {} prefill run {}: {:.1} tokens/s",
            args.label,
            rep + 1,
            prefill_runs[rep]
        );

        let prompt = engine
            .tokenize(&format!("Chapter {rep}. Once upon a time"))
            .await?;
        let (_, decoding, tokens) =
            time_generation(engine.as_ref(), prompt, args.decode_tokens).await?;
        decode_runs.push((tokens - 1) as f64 / decoding);
        eprintln!(
            "speed: {} decode run {}: {:.1} tokens/s",
            args.label,
            rep + 1,
            decode_runs[rep]
        );
    }
    let single = median(&mut decode_runs.clone());
    let mut batches = Vec::new();
    for &batch_size in &args.batch_sizes {
        if batch_size <= 1 || args.engine != "llama" {
            continue;
        }
        let mut runs = Vec::new();
        for rep in 0..args.repeat {
            let prompt = engine
                .tokenize(&format!("Chapter {rep}. Once upon a time"))
                .await?;
            let speed = time_batch(engine.as_ref(), prompt, batch_size, args.decode_tokens).await?;
            eprintln!(
                "speed: {} decode run {} with {batch_size} sequences: {speed:.1} tokens/s",
                args.label,
                rep + 1,
            );
            runs.push(speed);
        }
        let speed = median(&mut runs.clone());
        batches.push(BatchReport {
            batch_size,
            decode_tokens_per_s: speed,
            step_cost: batch_size as f64 * single / speed,
            decode_runs: runs,
        });
    }
    Ok(SpeedReport {
        label: args.label,
        model: args.model_path.display().to_string(),
        dtype: args.dtype,
        prefill_tokens_per_s: median(&mut prefill_runs.clone()),
        decode_tokens_per_s: single,
        prefill_runs,
        decode_runs,
        batches,
    })
}
