//! Self-consistency (Wang et al., 2023): sample several reasoning paths,
//! extract each final answer, and return the best path of the majority
//! answer.
//!
//! All samples start together in one engine call. Votes are counted as
//! paths finish, and the rest are cancelled as soon as the leading answer
//! can no longer be overtaken. When most samples give no extractable answer,
//! or every answer is free text that no two samples share, the model itself
//! picks the most consistent response (universal self-consistency, Chen et
//! al., 2023).

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
};

use async_trait::async_trait;
use futures::{stream::FuturesUnordered, StreamExt};
use serde_json::{json, Map, Value};

use super::{
    answer::{self, Answer},
    plain::{self, Path},
    Context, DecodeError, Input, Output, Params, Spent, Strategy,
};
use crate::{
    api::ApiError,
    engine::{detokenize, ChatTurn, GenerateRequest, SamplingParams},
    generation::{run_choices, ChoiceEvent},
};

pub const NAME: &str = "self_consistency";

/// Temperature of the samples unless the request sets one.
const DEFAULT_TEMPERATURE: f32 = 0.7;

#[derive(Debug)]
pub struct SelfConsistency {
    pub samples: usize,
    pub early_stop: bool,
    /// Strategy each sample is decoded with, or plain sampling when `None`.
    pub inner: Option<Arc<dyn super::Strategy>>,
}

pub fn parse(params: Params) -> Result<Arc<dyn Strategy>, ApiError> {
    params.only(&["samples", "early_stop", "inner"])?;
    Ok(Arc::new(SelfConsistency {
        samples: params.integer("samples", 5, 1, 32)?,
        early_stop: params.boolean("early_stop", true)?,
        inner: params.inner(&[plain::NAME, super::cautious::NAME])?,
    }))
}

/// One finished sample.
#[derive(Debug, Clone)]
struct Sample {
    index: usize,
    path: Path,
    answer: Option<Answer>,
}

/// Counts votes as samples finish.
#[derive(Debug, Default)]
pub struct Tally {
    votes: HashMap<Answer, usize>,
}

impl Tally {
    pub fn add(&mut self, answer: Option<&Answer>) {
        if let Some(answer) = answer {
            *self.votes.entry(answer.clone()).or_default() += 1;
        }
    }

    /// Returns whether the leader keeps the lead however the `remaining` samples
    /// vote. A tie could still be broken either way, so the lead must be
    /// strict.
    pub fn decided(&self, remaining: usize) -> bool {
        let mut counts: Vec<usize> = self.votes.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        match counts.as_slice() {
            [] => false,
            [leader] => *leader > remaining,
            [leader, second, ..] => *leader > second + remaining,
        }
    }
}

/// Picks the winning answer: most votes, then the higher mean token
/// log-probability over its paths. Returns the index of its best path.
fn choose(samples: &[Sample]) -> Option<usize> {
    let mut groups: HashMap<&Answer, Vec<&Sample>> = HashMap::new();
    for sample in samples {
        if let Some(answer) = &sample.answer {
            groups.entry(answer).or_default().push(sample);
        }
    }
    let mean = |group: &[&Sample]| {
        group.iter().map(|s| s.path.mean_logprob()).sum::<f32>() / group.len() as f32
    };
    let (_, winners) = groups.into_iter().max_by(|(a, x), (b, y)| {
        x.len()
            .cmp(&y.len())
            .then(mean(x).total_cmp(&mean(y)))
            // Fully tied answers fall to a fixed order, so the choice does
            // not depend on hash order.
            .then(b.cmp(a))
    })?;
    winners
        .iter()
        .max_by(|a, b| {
            a.path
                .mean_logprob()
                .total_cmp(&b.path.mean_logprob())
                .then(b.index.cmp(&a.index))
        })
        .map(|s| s.index)
}

/// Returns whether the vote cannot decide: most samples have no answer, or all
/// answers are free text with no two alike.
fn needs_fallback(samples: &[Sample]) -> bool {
    let missing = samples.iter().filter(|s| s.answer.is_none()).count();
    if missing * 2 > samples.len() {
        return true;
    }
    let answers: Vec<&Answer> = samples.iter().filter_map(|s| s.answer.as_ref()).collect();
    let all_text = answers.iter().all(|a| matches!(a, Answer::Text(_)));
    let mut distinct = answers.clone();
    distinct.sort();
    distinct.dedup();
    samples.len() >= 3 && all_text && distinct.len() == answers.len()
}

impl SelfConsistency {
    fn sampling(&self, input: &Input) -> SamplingParams {
        let mut sampling = input.sampling.clone();
        if !input.temperature_set {
            sampling.temperature = DEFAULT_TEMPERATURE;
        }
        sampling
    }

    /// Samples with plain decoding in one engine call, voting as paths
    /// finish. Returns the finished samples, the work spent, and the number
    /// of samples cancelled early.
    async fn sample_batched(
        &self,
        ctx: &Context,
        input: &Input,
    ) -> Result<(Vec<Sample>, Spent, usize), DecodeError> {
        let request = GenerateRequest {
            prompt: input.prompt.clone(),
            n: self.samples,
            sampling: self.sampling(input),
            seed: input.seed,
            max_tokens: input.max_tokens,
            stop_tokens: Default::default(),
            top_logprobs: 0,
            keep_distribution: false,
            cancel: input.cancel.child_token(),
            cached_prompt_tokens: Default::default(),
        };
        let cached = request.cached_prompt_tokens.clone();
        let mut events = run_choices(ctx.engine.clone(), request, input.stops.clone())?;
        let mut paths: Vec<Path> = (0..self.samples).map(|_| Path::empty()).collect();
        let mut finished = Vec::new();
        let mut tally = Tally::default();
        while let Some(event) = events.next().await {
            match event {
                ChoiceEvent::Delta { index, text, steps } => {
                    paths[index].text.push_str(&text);
                    paths[index].steps.extend(steps);
                }
                ChoiceEvent::Finished {
                    index,
                    reason,
                    completion_tokens,
                } => {
                    let path = &mut paths[index];
                    path.finish = reason;
                    path.tokens = completion_tokens;
                    let answer = answer::extract(&path.text);
                    tally.add(answer.as_ref());
                    finished.push(Sample {
                        index,
                        path: path.clone(),
                        answer,
                    });
                    if self.early_stop && tally.decided(self.samples - finished.len()) {
                        break;
                    }
                }
                ChoiceEvent::Failed { message, .. } => {
                    return Err(DecodeError::Generation(message))
                }
            }
        }
        // Dropping the stream cancels the samples still running.
        drop(events);
        let saved = self.samples - finished.len();
        let generated = paths.iter().map(|p| p.tokens.max(p.steps.len())).sum();
        let spent = Spent {
            prompt_tokens: input.prompt.len() * self.samples,
            cached_prompt_tokens: cached.load(Ordering::Relaxed),
            generated_tokens: generated,
        };
        Ok((finished, spent, saved))
    }

    /// Samples with the inner strategy, all at once, voting as they finish.
    async fn sample_inner(
        &self,
        ctx: &Context,
        input: &Input,
        inner: &Arc<dyn Strategy>,
    ) -> Result<(Vec<Sample>, Spent, usize), DecodeError> {
        let quiet = ctx.quiet();
        let cancel = input.cancel.child_token();
        let mut running: FuturesUnordered<_> = (0..self.samples)
            .map(|index| {
                let mut sample_input = input.clone();
                sample_input.sampling = self.sampling(input);
                sample_input.temperature_set = true;
                sample_input.seed = input.seed.map(|s| s.wrapping_add(index as u64 * 7919));
                sample_input.cancel = cancel.child_token();
                let (inner, quiet) = (inner.clone(), quiet.clone());
                async move { (index, inner.decode(&quiet, sample_input).await) }
            })
            .collect();
        let mut finished = Vec::new();
        let mut spent = Spent::default();
        let mut tally = Tally::default();
        while let Some((index, result)) = running.next().await {
            let output = result?;
            spent += output.spent;
            let answer = answer::extract(&output.text);
            tally.add(answer.as_ref());
            finished.push(Sample {
                index,
                answer,
                path: Path {
                    text: output.text,
                    steps: output.steps,
                    finish: output.finish,
                    tokens: output.tokens,
                },
            });
            if self.early_stop && tally.decided(self.samples - finished.len()) {
                break;
            }
        }
        cancel.cancel();
        // NOTE: work the cancelled samples had done is not counted, since
        // an inner strategy reports its spending only when it completes.
        Ok((finished, spent, running.len()))
    }

    /// Asks the model which response agrees most with the others; returns
    /// the chosen sample's position in `samples`.
    async fn universal(
        &self,
        ctx: &Context,
        input: &Input,
        samples: &[Sample],
    ) -> Result<(usize, Spent), DecodeError> {
        let question = match &input.messages {
            Some(messages) => messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            None => detokenize(ctx.engine.as_ref(), &input.prompt),
        };
        let mut prompt =
            format!("I have generated the following responses to the question: {question}\n\n");
        for (i, sample) in samples.iter().enumerate() {
            prompt.push_str(&format!(
                "Response {}: {}\n\n",
                i + 1,
                sample.path.text.trim()
            ));
        }
        prompt.push_str(
            "Evaluate these responses. Select the most consistent response based on majority \
             consensus. Start your answer with \"The most consistent response is Response X\".",
        );
        let turns = [ChatTurn {
            role: "user".into(),
            content: prompt,
            name: None,
        }];
        let tokens = ctx.engine.tokenize_chat(&turns).await?;
        let judge = Input {
            messages: None,
            prompt: tokens,
            sampling: SamplingParams::greedy(),
            temperature_set: true,
            seed: Some(0),
            max_tokens: 64,
            stops: Vec::new(),
            cancel: input.cancel.clone(),
        };
        let (mut paths, spent) =
            plain::sample(&ctx.quiet(), &judge, 1, SamplingParams::greedy(), Some(0)).await?;
        let reply = paths.remove(0).text;
        let picked = reply
            .to_lowercase()
            .split("response")
            .skip(1)
            .find_map(|rest| {
                let digits: String = rest
                    .trim_start()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse::<usize>().ok()
            })
            .filter(|&n| (1..=samples.len()).contains(&n))
            .map_or(0, |n| n - 1);
        Ok((picked, spent))
    }
}

#[async_trait]
impl Strategy for SelfConsistency {
    fn name(&self) -> &'static str {
        NAME
    }

    fn params(&self) -> Value {
        json!({
            "samples": self.samples,
            "early_stop": self.early_stop,
            "inner": self.inner.as_ref().map_or_else(|| json!({"strategy": plain::NAME}), |i| super::describe(i.as_ref())),
        })
    }

    async fn decode(&self, ctx: &Context, input: Input) -> Result<Output, DecodeError> {
        let (samples, mut spent, saved) = match &self.inner {
            Some(inner) if inner.name() != plain::NAME => {
                self.sample_inner(ctx, &input, inner).await?
            }
            _ => self.sample_batched(ctx, &input).await?,
        };
        if samples.is_empty() {
            return Err(DecodeError::Generation("no sample finished".into()));
        }
        let mut fallback = Value::Null;
        let chosen = if needs_fallback(&samples) {
            let (picked, judge_spent) = self.universal(ctx, &input, &samples).await?;
            spent += judge_spent;
            fallback = "universal_self_consistency".into();
            picked
        } else {
            let index = choose(&samples).expect("a vote without fallback has an answer");
            samples
                .iter()
                .position(|s| s.index == index)
                .expect("the chosen index is a finished sample")
        };

        let mut votes: Vec<(String, usize)> = {
            let mut counts: HashMap<String, usize> = HashMap::new();
            for sample in &samples {
                if let Some(answer) = &sample.answer {
                    *counts.entry(answer.as_string()).or_default() += 1;
                }
            }
            counts.into_iter().collect()
        };
        votes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let chosen_answer = samples[chosen].answer.as_ref().map(Answer::as_string);
        let agreement = chosen_answer
            .as_ref()
            .and_then(|a| votes.iter().find(|(v, _)| v == a))
            .map_or(0.0, |(_, n)| *n as f64 / samples.len() as f64);
        ctx.metrics.self_consistency_agreement.observe(agreement);
        if saved > 0 {
            ctx.metrics.self_consistency_early_stops.inc();
        }

        let mut report = Map::new();
        report.insert(
            "samples".into(),
            samples
                .iter()
                .map(|s| {
                    json!({
                        "index": s.index,
                        "answer": s.answer.as_ref().map(Answer::as_string),
                        "tokens": s.path.tokens,
                        "mean_logprob": s.path.mean_logprob(),
                    })
                })
                .collect(),
        );
        report.insert(
            "votes".into(),
            votes
                .iter()
                .map(|(a, n)| json!({"answer": a, "count": n}))
                .collect(),
        );
        report.insert("answer".into(), json!(chosen_answer));
        report.insert("agreement".into(), json!(agreement));
        report.insert("samples_saved".into(), json!(saved));
        report.insert("fallback".into(), fallback);

        let sample = &samples[chosen];
        if let Some(stream) = &ctx.stream {
            let _ = stream.send(sample.path.text.clone());
        }
        Ok(Output {
            text: sample.path.text.clone(),
            steps: sample.path.steps.clone(),
            finish: sample.path.finish,
            tokens: sample.path.tokens,
            spent,
            report,
            streamed: ctx.stream.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoding::tests_support::{context, input, scripted};
    use crate::generation::ApiFinishReason;

    fn texts_engine(texts: &'static [&'static str]) -> Context {
        context(scripted(move |_, index| {
            texts[index % texts.len()].to_string()
        }))
    }

    #[tokio::test]
    async fn three_two_vote_returns_majority() {
        let ctx = texts_engine(&[
            "The answer is 4",
            "The answer is 5",
            "so 4",
            "The answer is 5",
            "#### 4",
        ]);
        let strategy = SelfConsistency {
            samples: 5,
            early_stop: false,
            inner: None,
        };
        let output = strategy.decode(&ctx, input("q")).await.unwrap();
        assert_eq!(output.report["answer"], "4");
        assert!(output.text.contains('4'));
        assert_eq!(output.report["votes"][0]["count"], 3);
        assert_eq!(output.report["votes"][1]["count"], 2);
    }

    #[tokio::test]
    async fn early_stop_saves_samples() {
        let ctx = texts_engine(&["The answer is 4"]);
        let strategy = SelfConsistency {
            samples: 5,
            early_stop: true,
            inner: None,
        };
        let output = strategy.decode(&ctx, input("q")).await.unwrap();
        assert_eq!(output.report["answer"], "4");
        // After 3 agreeing votes the other 2 cannot change the outcome.
        assert_eq!(output.report["samples_saved"], 2);
        assert_eq!(output.report["samples"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn tally_decides_only_on_strict_lead() {
        let mut tally = Tally::default();
        let four = Answer::Number("4".into());
        let five = Answer::Number("5".into());
        tally.add(Some(&four));
        tally.add(Some(&four));
        assert!(!tally.decided(2), "2 votes can be tied by 2 more");
        assert!(tally.decided(1));
        tally.add(Some(&five));
        assert!(!tally.decided(1));
        assert!(tally.decided(0));
    }

    #[test]
    fn tie_goes_to_higher_mean_logprob() {
        let sample = |index, text: &str, logprob: f32| Sample {
            index,
            answer: answer::extract(text),
            path: Path {
                text: text.into(),
                steps: vec![crate::engine::scripted::step(1, logprob, 0.5)],
                finish: ApiFinishReason::Stop,
                tokens: 1,
            },
        };
        let samples = vec![
            sample(0, "The answer is 1", -2.0),
            sample(1, "The answer is 2", -0.5),
            sample(2, "The answer is 1", -1.5),
            sample(3, "The answer is 2", -0.7),
        ];
        assert_eq!(choose(&samples), Some(1));
    }

    #[tokio::test]
    async fn no_answers_fall_back_to_universal() {
        // Free-text answers that never agree; the judge (every sampled
        // continuation of the judge prompt) names response 2.
        let ctx = context(scripted(|prompt: &str, index| {
            if prompt.contains("most consistent") {
                "The most consistent response is Response 2".to_string()
            } else {
                ["Blue sky", "Green grass", "Red rose"][index % 3].to_string()
            }
        }));
        let strategy = SelfConsistency {
            samples: 3,
            early_stop: true,
            inner: None,
        };
        let output = strategy.decode(&ctx, input("colors?")).await.unwrap();
        assert_eq!(output.report["fallback"], "universal_self_consistency");
        let second = output.report["samples"][1]["index"].as_u64().unwrap();
        assert_eq!(
            output.text,
            ["Blue sky", "Green grass", "Red rose"][second as usize]
        );
    }
}
