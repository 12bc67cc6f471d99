//! Assembling a [`Trace`] from a request while it runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Choice, Latency, Message, Trace, Usage};
use crate::engine::TokenStep;

/// Mean and maximum entropy, in nats, of the distributions a choice's
/// tokens were sampled from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EntropySummary {
    pub mean: f32,
    pub max: f32,
}

/// Running entropy totals of one choice, for streams that see steps a few
/// at a time.
#[derive(Debug, Clone, Copy, Default)]
pub struct EntropyTotals {
    sum: f64,
    max: f32,
    count: usize,
}

impl EntropyTotals {
    pub fn add(&mut self, steps: &[TokenStep]) {
        for step in steps {
            self.sum += f64::from(step.entropy);
            self.max = self.max.max(step.entropy);
            self.count += 1;
        }
    }

    /// Returns the summary, or `None` when no step was added.
    pub fn summary(&self) -> Option<EntropySummary> {
        (self.count > 0).then(|| EntropySummary {
            mean: (self.sum / self.count as f64) as f32,
            max: self.max,
        })
    }
}

impl EntropySummary {
    pub fn of(steps: &[TokenStep]) -> Option<Self> {
        let mut totals = EntropyTotals::default();
        totals.add(steps);
        totals.summary()
    }
}

/// The parts of a trace known when a request is admitted; the rest is
/// added by [`TraceBuilder::finish`].
#[derive(Debug, Clone)]
pub struct TraceBuilder {
    pub id: String,
    pub created_ms: i64,
    pub model: String,
    pub endpoint: &'static str,
    pub strategy: String,
    pub params: Value,
    pub messages: Option<Vec<Message>>,
    pub prompt: Option<Value>,
    pub stream: bool,
    pub user: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

impl TraceBuilder {
    pub fn finish(
        self,
        choices: Vec<Choice>,
        decoding: Option<Value>,
        usage: Usage,
        latency: Latency,
    ) -> Trace {
        Trace {
            id: self.id,
            created_ms: self.created_ms,
            model: self.model,
            adapter: None,
            endpoint: self.endpoint.to_string(),
            strategy: self.strategy,
            params: self.params,
            messages: self.messages,
            prompt: self.prompt,
            choices,
            decoding,
            usage,
            latency,
            stream: self.stream,
            user: self.user,
            metadata: self.metadata,
            feedback: None,
        }
    }
}

/// Builds a returned choice, extracting its answer.
pub fn choice(
    index: usize,
    text: String,
    finish_reason: Option<&str>,
    tokens: usize,
    entropy: Option<EntropySummary>,
) -> Choice {
    let answer = crate::decoding::answer::extract(&text).map(|a| a.as_string());
    Choice {
        index,
        text,
        finish_reason: finish_reason.map(str::to_string),
        tokens,
        answer,
        entropy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(entropy: f32) -> TokenStep {
        TokenStep {
            token: 0,
            logprob: 0.0,
            sampling_logprob: 0.0,
            entropy,
            top_logprobs: Vec::new(),
            distribution: None,
        }
    }

    #[test]
    fn entropy_summary_mean_and_max() {
        let summary = EntropySummary::of(&[step(1.0), step(3.0)]).unwrap();
        assert_eq!(summary.mean, 2.0);
        assert_eq!(summary.max, 3.0);
        assert!(EntropySummary::of(&[]).is_none());
    }

    #[test]
    fn choice_extracts_answer() {
        let choice = choice(0, "So the total is 42.".into(), Some("stop"), 6, None);
        assert_eq!(choice.answer.as_deref(), Some("42"));
    }
}
