//! `mull bench`: a load generator for any OpenAI-compatible server.
//!
//! It streams chat completions from a fixed prompt set at each requested
//! concurrency. It reports the measures of vLLM's serving benchmark: output
//! tokens and requests per second, and time to first token, time per output
//! token, inter-token latency and end-to-end latency at p50 and p99.

use std::{
    io::Write,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

/// The fixed prompt set. Each prompt requests a long answer, so that most
/// runs reach `max_tokens`.
const PROMPTS: &[&str] = &[
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a walk through a busy market in the morning, with every sound and smell.",
    "Write a detailed guide to planting a vegetable garden for the first time.",
    "Tell the history of writing, from clay tablets to the printing press.",
    "Explain step by step how bread is made, from flour to the finished loaf.",
    "Write a long letter from a sailor to his family about a storm at sea.",
    "Describe how the water cycle works and why it matters for farming.",
    "Write a story about two friends who build a raft and sail down a river.",
    "Explain how a computer stores numbers and text, for a curious beginner.",
    "Describe a day in the life of a medieval blacksmith in great detail.",
    "Write a detailed travel diary of a week spent hiking in the mountains.",
    "Explain how bees make honey and how a hive is organized.",
    "Write a long fairy tale about a clever fox and a proud king.",
    "Describe how trains changed the way people lived in the nineteenth century.",
    "Explain in detail how to cook a simple soup and why each step matters.",
];

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Base URL of the server, without `/v1`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Model id to request.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Concurrency levels to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub concurrency: Vec<usize>,
    /// Requests per level [default: 4 times the concurrency, at least 8].
    #[arg(long)]
    pub requests: Option<usize>,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// JSON object merged into every request body, for example
    /// '{"decoding": {"strategy": "self_consistency"}}'.
    #[arg(long)]
    pub extra: Option<String>,
    /// Bearer token to send.
    #[arg(long, env = "MULL_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Label written into the results.
    #[arg(long, default_value = "")]
    pub label: String,
    /// File to write the JSON results to (printed to stdout as well).
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
}

/// Timings of one streamed request.
#[derive(Debug, Clone)]
struct Sample {
    ttft: f64,
    e2e: f64,
    output_tokens: usize,
    /// Gaps between consecutive content chunks, in seconds.
    gaps: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
}

#[derive(Debug, Serialize)]
pub struct LevelReport {
    pub concurrency: usize,
    pub requests: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub output_tokens: usize,
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_ms: Percentiles,
    pub tpot_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub label: String,
    pub url: String,
    pub model: String,
    pub max_tokens: usize,
    pub levels: Vec<LevelReport>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    let extra: Option<Value> = match &args.extra {
        Some(text) => {
            let value: Value = serde_json::from_str(text).context("--extra is not JSON")?;
            if !value.is_object() {
                bail!("--extra must be a JSON object");
            }
            Some(value)
        }
        None => None,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1800))
        .build()?;
    let target = Target {
        client,
        url: format!("{}/v1/chat/completions", args.url.trim_end_matches('/')),
        model: args.model.clone(),
        max_tokens: args.max_tokens,
        extra,
        api_key: args.api_key.clone(),
    };
    // One request first, so that neither a cold cache nor a lazy start
    // lands in the first level's numbers.
    target
        .request(PROMPTS[0])
        .await
        .context("the warm-up request failed")?;

    let mut levels = Vec::new();
    for &concurrency in &args.concurrency {
        if concurrency == 0 {
            bail!("--concurrency levels must be at least 1");
        }
        let requests = args.requests.unwrap_or((4 * concurrency).max(8));
        levels.push(run_level(&target, concurrency, requests).await);
    }
    Ok(BenchReport {
        label: args.label,
        url: args.url,
        model: args.model,
        max_tokens: args.max_tokens,
        levels,
    })
}

struct Target {
    client: reqwest::Client,
    url: String,
    model: String,
    max_tokens: usize,
    extra: Option<Value>,
    api_key: Option<String>,
}

impl Target {
    async fn request(&self, prompt: &str) -> anyhow::Result<Sample> {
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let (Some(Value::Object(extra)), Value::Object(body)) = (&self.extra, &mut body) {
            for (key, value) in extra {
                body.insert(key.clone(), value.clone());
            }
        }
        let send = || {
            let mut request = self.client.post(&self.url).json(&body);
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key);
            }
            request.send()
        };
        let mut start = Instant::now();
        let response = match send().await {
            Ok(response) => response,
            // A server may close an idle pooled connection just as the
            // client reuses it (llama-server did, twice in about 100
            // requests), so a request that fails before any response is
            // sent once more, on another connection.
            Err(e) if e.is_request() || e.is_connect() => {
                eprintln!("bench: a request failed before a response ({e}), sending it again");
                start = Instant::now();
                send().await?
            }
            Err(e) => return Err(e.into()),
        };
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!(
                "HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            );
        }
        let mut stream = response.bytes_stream();
        let mut buffer = Vec::new();
        let mut first: Option<f64> = None;
        let mut last = 0.0;
        let mut gaps = Vec::new();
        let mut chunks = 0usize;
        let mut usage_tokens = None;
        while let Some(bytes) = stream.next().await {
            buffer.extend_from_slice(&bytes?);
            while let Some(end) = find_event_end(&buffer) {
                let event: Vec<u8> = buffer.drain(..end).collect();
                let now = start.elapsed().as_secs_f64();
                for line in String::from_utf8_lossy(&event).lines() {
                    let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                        continue;
                    };
                    if data == "[DONE]" {
                        continue;
                    }
                    let Ok(value) = serde_json::from_str::<Value>(data) else {
                        continue;
                    };
                    if let Some(tokens) = value
                        .pointer("/usage/completion_tokens")
                        .and_then(Value::as_u64)
                    {
                        usage_tokens = Some(tokens as usize);
                    }
                    let has_content = value
                        .pointer("/choices/0/delta/content")
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty());
                    if has_content {
                        chunks += 1;
                        match first {
                            None => first = Some(now),
                            Some(_) => gaps.push(now - last),
                        }
                        last = now;
                    }
                }
            }
        }
        let e2e = start.elapsed().as_secs_f64();
        Ok(Sample {
            ttft: first.unwrap_or(e2e),
            e2e,
            output_tokens: usage_tokens.unwrap_or(chunks),
            gaps,
        })
    }
}

/// End of the first complete SSE event in `buffer` (after its blank line).
fn find_event_end(buffer: &[u8]) -> Option<usize> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn run_level(target: &Target, concurrency: usize, requests: usize) -> LevelReport {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::new());
    let failures = Mutex::new(Vec::new());
    let start = Instant::now();
    let worker = || async {
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= requests {
                return;
            }
            match target.request(PROMPTS[index % PROMPTS.len()]).await {
                Ok(sample) => samples.lock().expect("not poisoned").push(sample),
                Err(e) => failures.lock().expect("not poisoned").push(e.to_string()),
            }
            let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
            eprint!(
                "\rbench: concurrency {concurrency}: {finished}/{requests} requests, {:.0} s",
                start.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
    };
    futures::future::join_all((0..concurrency).map(|_| worker())).await;
    let duration = start.elapsed().as_secs_f64();
    eprintln!();
    let samples = samples.into_inner().expect("not poisoned");
    let failures = failures.into_inner().expect("not poisoned");
    if let Some(first) = failures.first() {
        eprintln!("bench: {} requests failed, first: {first}", failures.len());
    }
    summarize(concurrency, duration, &samples, failures.len())
}

fn summarize(concurrency: usize, duration: f64, samples: &[Sample], failed: usize) -> LevelReport {
    let ms = |values: Vec<f64>| percentiles(values.into_iter().map(|v| v * 1000.0).collect());
    let output_tokens: usize = samples.iter().map(|s| s.output_tokens).sum();
    LevelReport {
        concurrency,
        requests: samples.len(),
        failed,
        duration_s: duration,
        output_tokens,
        output_tokens_per_s: output_tokens as f64 / duration,
        requests_per_s: samples.len() as f64 / duration,
        ttft_ms: ms(samples.iter().map(|s| s.ttft).collect()),
        tpot_ms: ms(samples
            .iter()
            .filter(|s| s.output_tokens > 1)
            .map(|s| (s.e2e - s.ttft) / (s.output_tokens - 1) as f64)
            .collect()),
        itl_ms: ms(samples
            .iter()
            .flat_map(|s| s.gaps.iter().copied())
            .collect()),
        e2e_ms: ms(samples.iter().map(|s| s.e2e).collect()),
    }
}

/// Nearest-rank percentiles; zeros for an empty set.
fn percentiles(mut values: Vec<f64>) -> Percentiles {
    if values.is_empty() {
        return Percentiles {
            p50: 0.0,
            p99: 0.0,
            mean: 0.0,
        };
    }
    values.sort_by(f64::total_cmp);
    let rank =
        |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    Percentiles {
        p50: rank(0.50),
        p99: rank(0.99),
        mean: values.iter().sum::<f64>() / values.len() as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = percentiles((1..=100).map(f64::from).collect());
        assert_eq!(p.p50, 50.0);
        assert_eq!(p.p99, 99.0);
        assert_eq!(p.mean, 50.5);
        let one = percentiles(vec![7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
    }

    #[test]
    fn sse_events_split_on_blank_lines() {
        assert_eq!(find_event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(find_event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(find_event_end(b"data: a\n"), None);
    }

    #[test]
    fn time_per_output_token_leaves_out_the_first() {
        let sample = Sample {
            ttft: 1.0,
            e2e: 3.0,
            output_tokens: 5,
            gaps: vec![0.5; 4],
        };
        let report = summarize(1, 3.0, &[sample], 0);
        assert_eq!(report.tpot_ms.p50, 500.0);
        assert_eq!(report.output_tokens_per_s, 5.0 / 3.0);
    }
}
