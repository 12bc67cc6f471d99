//! Token selection from a logits vector, shared by every engine so that all
//! of them sample, score and seed the same way.

use std::{collections::HashMap, sync::Arc};

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::TokenStep;

/// Per-request sampling settings, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 selects greedy decoding.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Number of most likely tokens kept; 0 disables it.
    pub top_k: usize,
    /// Minimum probability relative to the most likely token; 0 disables it.
    pub min_p: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per earlier occurrence in the output.
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Samples one sequence's tokens with its own random state.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Occurrences of each generated token, for the penalties.
    counts: HashMap<u32, u32>,
    top_logprobs: usize,
    keep_distribution: bool,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64, top_logprobs: usize) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            counts: HashMap::new(),
            top_logprobs,
            keep_distribution: false,
        }
    }

    /// Makes every step carry its sampling distribution.
    pub fn keep_distribution(mut self, keep: bool) -> Self {
        self.keep_distribution = keep;
        self
    }

    /// Picks the next token from raw `logits` (modified in place) and records
    /// it for later penalties.
    pub fn sample(&mut self, logits: &mut [f32]) -> TokenStep {
        self.apply_penalties(logits);
        let logprobs = log_softmax(logits);
        let distribution = self.sampling_distribution(logits);
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            draw(&distribution, self.rng.random::<f32>())
        };
        let sampling_prob = distribution
            .iter()
            .find(|(t, _)| *t == token)
            .map_or(0.0, |(_, p)| *p);
        *self.counts.entry(token).or_default() += 1;
        TokenStep {
            token,
            logprob: logprobs[token as usize],
            sampling_logprob: sampling_prob.ln(),
            entropy: entropy(&distribution),
            top_logprobs: top_n(&logprobs, self.top_logprobs),
            distribution: self.keep_distribution.then(|| Arc::new(distribution)),
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let SamplingParams {
            presence_penalty,
            frequency_penalty,
            ..
        } = self.params;
        if presence_penalty == 0.0 && frequency_penalty == 0.0 {
            return;
        }
        for (&token, &count) in &self.counts {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit -= presence_penalty + frequency_penalty * count as f32;
            }
        }
    }

    /// The distribution a token is drawn from, as `(token, probability)`
    /// pairs summing to 1: the tokens above [`SORTED_FLOOR`] sorted by
    /// decreasing probability, then the rest in token order. Greedy requests
    /// use temperature 1 here so that entropy and scores stay meaningful.
    fn sampling_distribution(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let temperature = if self.params.is_greedy() {
            1.0
        } else {
            self.params.temperature
        };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
            .filter(|(_, p)| *p > 0.0)
            .collect();
        let total: f32 = probs.iter().map(|(_, p)| p).sum();
        probs.iter_mut().for_each(|(_, p)| *p /= total);

        // Sorting the whole vocabulary each step cost more than a batched
        // forward pass. Drawing by cumulative mass is exact in any fixed
        // order, so only the head, where the truncations cut, is sorted.
        let best_first = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let (mut head, mut tail): (Vec<_>, Vec<_>) =
            probs.into_iter().partition(|(_, p)| *p >= SORTED_FLOOR);
        head.sort_unstable_by(best_first);
        let head_mass: f32 = head.iter().map(|(_, p)| p).sum();
        let cut_in_tail = (self.params.top_k > head.len() && self.params.top_k > 0)
            || (self.params.top_p < 1.0 && head_mass < self.params.top_p);
        if cut_in_tail || head.is_empty() {
            tail.sort_unstable_by(best_first);
        }
        head.extend(tail);
        let mut probs = head;

        truncate(&mut probs, &self.params);
        let kept: f32 = probs.iter().map(|(_, p)| p).sum();
        probs.iter_mut().for_each(|(_, p)| *p /= kept);
        probs
    }
}

/// Probability below which tokens are left unsorted in a sampling
/// distribution, unless a truncation has to cut among them.
const SORTED_FLOOR: f32 = 1e-6;

/// Applies top-k, min-p and top-p to probabilities sorted best first. The
/// most likely token always survives.
fn truncate(probs: &mut Vec<(u32, f32)>, params: &SamplingParams) {
    if params.top_k > 0 {
        probs.truncate(params.top_k);
    }
    if params.min_p > 0.0 {
        let floor = probs[0].1 * params.min_p;
        probs.retain(|(_, p)| *p >= floor);
    }
    if params.top_p < 1.0 {
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, (_, p)) in probs.iter().enumerate() {
            mass += p;
            if mass >= params.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
}

/// Picks the token at cumulative probability `uniform` (in [0, 1)).
pub fn draw(distribution: &[(u32, f32)], uniform: f32) -> u32 {
    let mut mass = 0.0;
    for &(token, p) in distribution {
        mass += p;
        if uniform < mass {
            return token;
        }
    }
    // Rounding can leave the total just under `uniform`.
    distribution.last().map_or(0, |(t, _)| *t)
}

pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    logits.iter().map(|l| l - max - log_total).collect()
}

/// Shannon entropy in nats.
pub fn entropy(distribution: &[(u32, f32)]) -> f32 {
    distribution
        .iter()
        .filter(|(_, p)| *p > 0.0)
        .map(|(_, p)| -p * p.ln())
        .sum::<f32>()
        .max(0.0)
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut indexed: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let n = n.min(indexed.len());
    indexed.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
    indexed.truncate(n);
    indexed.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    indexed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut sampler = Sampler::new(SamplingParams::greedy(), 0, 2);
        let step = sampler.sample(&mut [0.0, 3.0, 1.0]);
        assert_eq!(step.token, 1);
        assert_eq!(step.top_logprobs.len(), 2);
        assert_eq!(step.top_logprobs[0].0, 1);
        assert_eq!(step.top_logprobs[1].0, 2);
    }

    #[test]
    fn uniform_entropy_is_ln_n() {
        let mut sampler = Sampler::new(params(1.0), 0, 0);
        let step = sampler.sample(&mut [0.0; 4]);
        assert!((step.entropy - 4f32.ln()).abs() < 1e-5, "{}", step.entropy);
        assert!((step.sampling_logprob - 0.25f32.ln()).abs() < 1e-5);
    }

    #[test]
    fn top_k_one_has_zero_entropy() {
        let mut p = params(1.0);
        p.top_k = 1;
        let mut sampler = Sampler::new(p, 7, 0);
        let step = sampler.sample(&mut [0.0, 1.0, 0.5]);
        assert_eq!(step.token, 1);
        assert_eq!(step.entropy, 0.0);
        assert_eq!(step.sampling_logprob, 0.0);
    }

    #[test]
    fn top_p_drops_the_tail() {
        let mut p = params(1.0);
        p.top_p = 0.5;
        let sampler = Sampler::new(p, 0, 0);
        // Probabilities about 0.665, 0.245, 0.090.
        let distribution = sampler.sampling_distribution(&[2.0, 1.0, 0.0]);
        assert_eq!(distribution.len(), 1);
        assert_eq!(distribution[0].0, 0);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let mut p = params(1.0);
        p.min_p = 0.3;
        let sampler = Sampler::new(p, 0, 0);
        let distribution = sampler.sampling_distribution(&[2.0, 1.0, 0.0]);
        let tokens: Vec<u32> = distribution.iter().map(|(t, _)| *t).collect();
        assert_eq!(tokens, vec![0, 1]);
    }

    #[test]
    fn same_seed_same_tokens() {
        let run = |seed| {
            let mut sampler = Sampler::new(params(1.0), seed, 0);
            (0..20)
                .map(|_| sampler.sample(&mut [0.0, 0.1, 0.2, 0.3]).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn frequency_penalty_discourages_repeats() {
        let mut p = SamplingParams::greedy();
        p.frequency_penalty = 2.0;
        let mut sampler = Sampler::new(p, 0, 0);
        assert_eq!(sampler.sample(&mut [1.0, 0.0]).token, 0);
        assert_eq!(sampler.sample(&mut [1.0, 0.0]).token, 1);
    }
}
