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
    /// Each token's unnormalized probability at the sampling temperature,
    /// kept between steps so that a step allocates no vocabulary-sized
    /// buffer.
    weights: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64, top_logprobs: usize) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            counts: HashMap::new(),
            top_logprobs,
            keep_distribution: false,
            weights: Vec::new(),
        }
    }

    /// Makes every step carry its sampling distribution.
    pub fn keep_distribution(mut self, keep: bool) -> Self {
        self.keep_distribution = keep;
        self
    }

    /// Picks the next token from raw `logits` and records it for later
    /// penalties.
    pub fn sample(&mut self, logits: &[f32]) -> TokenStep {
        let penalized;
        let logits = if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0
        {
            penalized = self.penalized(logits);
            &penalized[..]
        } else {
            logits
        };
        let max = maximum(logits);
        let mut weights = std::mem::take(&mut self.weights);
        let distribution = Distribution::new(logits, max, &mut weights, &self.params);
        // The model's own log-probabilities are at temperature 1, which is
        // also the distribution's temperature for greedy requests.
        let log_total = if distribution.temperature == 1.0 {
            distribution.total.ln()
        } else {
            sum_exp(logits, max).ln()
        };
        let token = if self.params.is_greedy() {
            logits.iter().position(|&l| l == max).unwrap_or(0) as u32
        } else {
            distribution.draw(&weights, self.rng.random::<f32>())
        };
        *self.counts.entry(token).or_default() += 1;
        let step = TokenStep {
            token,
            logprob: logits[token as usize] - max - log_total,
            sampling_logprob: distribution.probability(&weights, token).ln(),
            entropy: distribution.entropy(),
            top_logprobs: top_n(logits, max, log_total, self.top_logprobs),
            distribution: self
                .keep_distribution
                .then(|| Arc::new(distribution.pairs(&weights))),
        };
        self.weights = weights;
        step
    }

    /// Copies `logits` and applies the presence and frequency penalties.
    fn penalized(&self, logits: &[f32]) -> Vec<f32> {
        let SamplingParams {
            presence_penalty,
            frequency_penalty,
            ..
        } = self.params;
        let mut logits = logits.to_vec();
        for (&token, &count) in &self.counts {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit -= presence_penalty + frequency_penalty * count as f32;
            }
        }
        logits
    }

    /// The distribution a token is drawn from, as `(token, probability)`
    /// pairs summing to 1, in the order [`draw`] walks them.
    #[cfg(test)]
    fn sampling_distribution(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let mut weights = Vec::new();
        Distribution::new(logits, maximum(logits), &mut weights, &self.params).pairs(&weights)
    }
}

/// One step's sampling distribution: the tokens above [`SORTED_FLOOR`]
/// sorted by decreasing probability, then, unless a truncation removed
/// them, the rest in token order. Greedy requests use temperature 1 here so
/// that entropy and scores stay meaningful.
///
/// Sorting the whole vocabulary each step cost more than a batched forward
/// pass, and so did writing it out as pairs. Drawing by cumulative mass is
/// exact in any fixed order, so only the head, where the truncations cut, is
/// sorted and stored. The tail is read from the weights when needed.
struct Distribution {
    temperature: f32,
    /// Sum of the weights.
    total: f32,
    /// `(token, probability)`, best first, normalized over what was kept.
    head: Vec<(u32, f32)>,
    /// The mass kept after truncation, by which tail weights divide after
    /// `total`. `None` when the tail was truncated away or is in `head`.
    tail_kept: Option<f32>,
    /// Sums over the tail of `w` and of `w * (logit - max) / temperature`,
    /// for its entropy.
    tail_weight: f32,
    tail_weighted: f32,
}

impl Distribution {
    /// Fills `weights` with `exp((logit - max) / temperature)` and builds the
    /// distribution over them.
    fn new(logits: &[f32], max: f32, weights: &mut Vec<f32>, params: &SamplingParams) -> Self {
        let temperature = if params.is_greedy() {
            1.0
        } else {
            params.temperature
        };
        let (total, weighted) = weigh(logits, max, temperature, weights);

        let best_first = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let mut head: Vec<(u32, f32)> = weights
            .iter()
            .enumerate()
            .filter(|&(_, &w)| w / total >= SORTED_FLOOR)
            .map(|(i, &w)| (i as u32, w / total))
            .collect();
        let (head_weight, head_weighted) = head.iter().fold((0.0, 0.0), |(w, ws), &(i, _)| {
            let weight = weights[i as usize];
            (
                w + weight,
                ws + weight * (logits[i as usize] - max) / temperature,
            )
        });
        head.sort_unstable_by(best_first);
        let head_mass: f32 = head.iter().map(|(_, p)| p).sum();
        let cut_in_tail = (params.top_k > head.len() && params.top_k > 0)
            || (params.top_p < 1.0 && head_mass < params.top_p);
        let min_p_in_tail = params.min_p > 0.0
            && head
                .first()
                .is_some_and(|h| h.1 * params.min_p < SORTED_FLOOR);

        let tail_weight = (total - head_weight).max(0.0);
        let (mut probs, tail_kept) = if cut_in_tail || min_p_in_tail || head.is_empty() {
            // A truncation has to look at the tail: write it out.
            let mut tail: Vec<(u32, f32)> = Self::tail(weights, total).collect();
            if cut_in_tail || head.is_empty() {
                tail.sort_unstable_by(best_first);
            }
            head.extend(tail);
            truncate(&mut head, params);
            (head, false)
        } else {
            // Every cut falls inside the head, so the tail survives only
            // when nothing cuts at all.
            truncate(&mut head, params);
            let untruncated = params.top_k == 0 && params.min_p == 0.0 && params.top_p >= 1.0;
            (head, untruncated)
        };
        let mut kept: f32 = probs.iter().map(|(_, p)| p).sum();
        if tail_kept {
            kept += tail_weight / total;
        }
        probs.iter_mut().for_each(|(_, p)| *p /= kept);
        Self {
            temperature,
            total,
            head: probs,
            tail_kept: tail_kept.then_some(kept),
            tail_weight,
            tail_weighted: weighted - head_weighted,
        }
    }

    /// Lists the tokens below [`SORTED_FLOOR`] with a nonzero weight, in
    /// token order, with their probability before truncation.
    fn tail(weights: &[f32], total: f32) -> impl Iterator<Item = (u32, f32)> + '_ {
        weights
            .iter()
            .enumerate()
            .filter(|&(_, &w)| w > 0.0)
            .map(move |(i, &w)| (i as u32, w / total))
            .filter(|&(_, p)| p < SORTED_FLOOR)
    }

    /// Lists the kept tail with final probabilities, in token order.
    fn kept_tail<'a>(&self, weights: &'a [f32]) -> impl Iterator<Item = (u32, f32)> + 'a {
        let total = self.total;
        let kept = self.tail_kept;
        kept.into_iter()
            .flat_map(move |kept| Self::tail(weights, total).map(move |(t, p)| (t, p / kept)))
    }

    fn draw(&self, weights: &[f32], uniform: f32) -> u32 {
        let mut mass = 0.0;
        let mut last = 0;
        for (token, p) in self.head.iter().copied().chain(self.kept_tail(weights)) {
            mass += p;
            if uniform < mass {
                return token;
            }
            last = token;
        }
        // Rounding can leave the total just under `uniform`.
        last
    }

    fn probability(&self, weights: &[f32], token: u32) -> f32 {
        if let Some(&(_, p)) = self.head.iter().find(|(t, _)| *t == token) {
            return p;
        }
        match self.tail_kept {
            Some(kept) => {
                let p = weights[token as usize] / self.total;
                if p > 0.0 && p < SORTED_FLOOR {
                    p / kept
                } else {
                    0.0
                }
            }
            None => 0.0,
        }
    }

    /// Shannon entropy in nats. With `s = (logit - max) / temperature`, a
    /// tail token has `p = w / n` and `ln p = s - ln n`, where
    /// `n = total * kept`, so the tail's share is computed from two sums
    /// instead of a logarithm per vocabulary entry.
    fn entropy(&self) -> f32 {
        let head = entropy(&self.head);
        let Some(kept) = self.tail_kept else {
            return head;
        };
        let norm = self.total * kept;
        let tail = (norm.ln() * self.tail_weight - self.tail_weighted) / norm;
        (head + tail).max(0.0)
    }

    /// Writes out the whole distribution as pairs, in drawing order.
    fn pairs(&self, weights: &[f32]) -> Vec<(u32, f32)> {
        self.head
            .iter()
            .copied()
            .chain(self.kept_tail(weights))
            .collect()
    }
}

/// Partial sums kept side by side in the vocabulary-wide loops, so that the
/// compiler can use whole vector registers for them.
const LANES: usize = 16;

/// Returns the largest logit.
fn maximum(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &l) in lanes.iter_mut().zip(chunk) {
            *lane = if l > *lane { l } else { *lane };
        }
    }
    lanes
        .iter()
        .chain(rest)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Fills `weights` with `exp((logit - max) / temperature)` and returns the
/// sum of the weights and the sum of each weight times its exponent.
fn weigh(logits: &[f32], max: f32, temperature: f32, weights: &mut Vec<f32>) -> (f32, f32) {
    weights.clear();
    weights.resize(logits.len(), 0.0);
    let mut total = [0.0f32; LANES];
    let mut weighted = [0.0f32; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for (chunk, out) in chunks.by_ref().zip(weights.chunks_exact_mut(LANES)) {
        for lane in 0..LANES {
            let s = (chunk[lane] - max) / temperature;
            let w = exp_nonpositive(s);
            out[lane] = w;
            total[lane] += w;
            weighted[lane] += w * s;
        }
    }
    let done = logits.len() - chunks.remainder().len();
    for (i, &l) in chunks.remainder().iter().enumerate() {
        let s = (l - max) / temperature;
        let w = exp_nonpositive(s);
        weights[done + i] = w;
        total[i] += w;
        weighted[i] += w * s;
    }
    (total.iter().sum(), weighted.iter().sum())
}

/// Sums `exp(logit - max)` over the vocabulary.
fn sum_exp(logits: &[f32], max: f32) -> f32 {
    let mut total = [0.0f32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &l) in total.iter_mut().zip(chunk) {
            *lane += exp_nonpositive(l - max);
        }
    }
    total.iter().sum::<f32>() + rest.iter().map(|&l| exp_nonpositive(l - max)).sum::<f32>()
}

/// Computes `e^x` for `x <= 0` within a relative error of 4e-7 (a test
/// checks it), without calls or branches so that the compiler can vectorize
/// the loops above. Below -87 (under 2e-38) it returns 0.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // e^x = 2^n * e^r, with n the nearest integer to x / ln 2 and
    // |r| <= ln(2) / 2. ln 2 is split in two so that n * LN2_HIGH is exact.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let clamped = x.max(-87.0);
    let n = (clamped * std::f32::consts::LOG2_E + 0.5).floor();
    let r = clamped - n * LN2_HIGH - n * LN2_LOW;
    let series = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        series * scale
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

/// Shannon entropy in nats.
pub fn entropy(distribution: &[(u32, f32)]) -> f32 {
    distribution
        .iter()
        .filter(|(_, p)| *p > 0.0)
        .map(|(_, p)| -p * p.ln())
        .sum::<f32>()
        .max(0.0)
}

/// Returns the `n` most likely tokens with their log-probabilities.
fn top_n(logits: &[f32], max: f32, log_total: f32, n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut indexed: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l - max - log_total))
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

    /// Writes out the distribution in full and sorted, as a check on the
    /// head-and-tail form.
    fn reference(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f32)> {
        let temperature = if params.is_greedy() {
            1.0
        } else {
            params.temperature
        };
        let mut weights = Vec::new();
        let (total, _) = weigh(logits, maximum(logits), temperature, &mut weights);
        let mut probs: Vec<(u32, f32)> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| (i as u32, w / total))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        truncate(&mut probs, params);
        let kept: f32 = probs.iter().map(|(_, p)| p).sum();
        probs.iter_mut().for_each(|(_, p)| *p /= kept);
        probs
    }

    #[test]
    fn head_and_tail_match_the_full_distribution() {
        let mut rng = StdRng::seed_from_u64(3);
        // A peaked vocabulary of 5,000 logits, so that most tokens fall
        // below the sorting floor.
        let logits: Vec<f32> = (0..5000)
            .map(|i| if i % 97 == 0 { 8.0 } else { 0.0 } + rng.random::<f32>() * 4.0)
            .collect();
        let cases = [
            SamplingParams::greedy(),
            params(0.7),
            params(1.3),
            SamplingParams {
                top_p: 0.9,
                ..params(0.7)
            },
            SamplingParams {
                top_p: 0.999_99,
                ..params(1.0)
            },
            SamplingParams {
                top_k: 20,
                ..params(1.0)
            },
            SamplingParams {
                top_k: 4000,
                ..params(1.0)
            },
            SamplingParams {
                min_p: 0.05,
                ..params(1.0)
            },
            SamplingParams {
                min_p: 1e-7,
                ..params(1.0)
            },
        ];
        for case in cases {
            let sampler = Sampler::new(case.clone(), 0, 0);
            let got = sampler.sampling_distribution(&logits);
            let want = reference(&logits, &case);
            assert_eq!(got.len(), want.len(), "{case:?}");
            let want: HashMap<u32, f32> = want.into_iter().collect();
            for (token, p) in &got {
                let expected = want[token];
                assert!(
                    (p - expected).abs() <= 1e-6 + expected * 1e-3,
                    "{case:?}: token {token}: {p} against {expected}"
                );
            }
            let mut sampler = Sampler::new(case.clone(), 0, 0);
            let step = sampler.sample(&logits);
            let expected = entropy(&reference(&logits, &case));
            assert!(
                (step.entropy - expected).abs() < 1e-3,
                "{case:?}: entropy {} against {expected}",
                step.entropy
            );
            let p = want.get(&step.token).copied().unwrap_or(0.0);
            assert!((step.sampling_logprob - p.ln()).abs() < 1e-3, "{case:?}");
        }
    }

    #[test]
    fn exp_matches_the_standard_library() {
        for i in 0..=100_000 {
            let x = -90.0 * i as f32 / 100_000.0;
            let want = x.exp();
            let got = exp_nonpositive(x);
            if x < -87.0 {
                assert_eq!(got, 0.0);
            } else {
                assert!(
                    (got - want).abs() <= want * 4e-7,
                    "e^{x}: {got} against {want}"
                );
            }
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }
}
