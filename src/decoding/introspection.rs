//! Recursive introspection at inference time (after RISE, Qu et al., 2024),
//! without an oracle: the model sees its previous attempt, is asked to look
//! for mistakes and answers again, for up to `turns` attempts. It stops
//! early when two consecutive attempts give the same answer, and returns
//! the latest attempt of the majority answer (ties to the latest turn).

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use serde_json::{json, Map, Value};

use super::{
    answer::{self, Answer},
    plain, Context, DecodeError, Input, Output, Params, Spent, Strategy,
};
use crate::{api::ApiError, engine::ChatTurn};

pub const NAME: &str = "introspection";

/// The follow-up message of every turn after the first.
pub const REVISE_PROMPT: &str = "Review your previous answer step by step and look for \
mistakes. Then solve the problem again and end with \"The answer is\" followed by your \
final answer.";

#[derive(Debug)]
pub struct Introspection {
    pub turns: usize,
    pub inner: Arc<dyn Strategy>,
}

pub fn parse(params: Params) -> Result<Arc<dyn Strategy>, ApiError> {
    params.only(&["turns", "inner"])?;
    Ok(Arc::new(Introspection {
        turns: params.integer("turns", 3, 1, 8)?,
        inner: params
            .inner(&[plain::NAME, super::cautious::NAME])?
            .unwrap_or_else(|| Arc::new(plain::Plain)),
    }))
}

/// Index of the turn to return: the majority answer's latest turn; turns
/// without an answer only win when no turn has one.
pub fn pick_turn(answers: &[Option<Answer>]) -> usize {
    let mut counts: HashMap<&Answer, usize> = HashMap::new();
    for answer in answers.iter().flatten() {
        *counts.entry(answer).or_default() += 1;
    }
    let best = counts.values().copied().max().unwrap_or(0);
    answers
        .iter()
        .rposition(|a| a.as_ref().is_some_and(|a| counts[a] == best))
        .unwrap_or(answers.len() - 1)
}

#[async_trait]
impl Strategy for Introspection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn needs_chat(&self) -> bool {
        true
    }

    fn params(&self) -> Value {
        json!({"turns": self.turns, "inner": super::describe(self.inner.as_ref())})
    }

    async fn decode(&self, ctx: &Context, input: Input) -> Result<Output, DecodeError> {
        let mut history = input
            .messages
            .clone()
            .ok_or_else(|| DecodeError::Invalid("introspection needs chat messages".into()))?;
        let quiet = ctx.quiet();
        let mut outputs: Vec<Output> = Vec::new();
        let mut answers: Vec<Option<Answer>> = Vec::new();
        let mut spent = Spent::default();
        let mut converged = false;
        for turn in 0..self.turns {
            let mut attempt = input.clone();
            if turn > 0 {
                let previous = &outputs[turn - 1];
                history.push(ChatTurn {
                    role: "assistant".into(),
                    content: previous.text.clone(),
                    name: None,
                });
                history.push(ChatTurn {
                    role: "user".into(),
                    content: REVISE_PROMPT.into(),
                    name: None,
                });
                attempt.prompt = ctx.engine.tokenize_chat(&history).await?;
                attempt.messages = Some(history.clone());
                if attempt.prompt.len() + input.max_tokens > ctx.engine.info().context_length {
                    break;
                }
            }
            let output = self.inner.decode(&quiet, attempt).await?;
            spent += output.spent;
            answers.push(answer::extract(&output.text));
            outputs.push(output);
            if turn > 0 && answers[turn].is_some() && answers[turn] == answers[turn - 1] {
                converged = true;
                break;
            }
            if input.cancel.is_cancelled() {
                break;
            }
        }
        ctx.metrics
            .introspection_turns
            .observe(outputs.len() as f64);
        let chosen = pick_turn(&answers);
        let mut report = Map::new();
        report.insert(
            "turns".into(),
            outputs
                .iter()
                .zip(&answers)
                .map(|(o, a)| json!({"answer": a.as_ref().map(Answer::as_string), "tokens": o.tokens}))
                .collect(),
        );
        report.insert("converged".into(), json!(converged));
        report.insert("chosen_turn".into(), json!(chosen + 1));
        let output = outputs.swap_remove(chosen);
        if let Some(stream) = &ctx.stream {
            let _ = stream.send(output.text.clone());
        }
        Ok(Output {
            report,
            spent,
            streamed: ctx.stream.is_some(),
            ..output
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoding::tests_support::{context, input, scripted};

    fn number(n: &str) -> Option<Answer> {
        Some(Answer::Number(n.into()))
    }

    #[test]
    fn majority_wins_ties_to_latest() {
        assert_eq!(pick_turn(&[number("3"), number("4"), number("3")]), 2);
        assert_eq!(pick_turn(&[number("3"), number("4")]), 1);
        assert_eq!(pick_turn(&[number("5"), number("5"), number("4")]), 1);
        assert_eq!(pick_turn(&[None, None]), 1);
    }

    #[tokio::test]
    async fn stops_when_two_turns_agree() {
        // Turn 1 says 3, every revision says 4: turns 2 and 3 agree.
        let ctx = context(scripted(|prompt: &str, _| {
            let revisions = prompt.matches("look for").count();
            if revisions == 0 {
                "The answer is 3".into()
            } else {
                "The answer is 4".into()
            }
        }));
        let strategy = Introspection {
            turns: 5,
            inner: Arc::new(plain::Plain),
        };
        let output = strategy.decode(&ctx, input("2+2?")).await.unwrap();
        assert_eq!(output.report["converged"], true);
        assert_eq!(output.report["turns"].as_array().unwrap().len(), 3);
        assert_eq!(output.text, "The answer is 4");
    }

    #[tokio::test]
    async fn runs_all_turns_without_agreement() {
        let ctx = context(scripted(|prompt: &str, _| {
            format!("The answer is {}", prompt.matches("look for").count())
        }));
        let strategy = Introspection {
            turns: 3,
            inner: Arc::new(plain::Plain),
        };
        let output = strategy.decode(&ctx, input("q")).await.unwrap();
        assert_eq!(output.report["converged"], false);
        assert_eq!(output.report["turns"].as_array().unwrap().len(), 3);
        // Three different answers: the tie goes to the latest turn.
        assert_eq!(output.report["chosen_turn"], 3);
    }
}
