//! Behavior-conditioned prompting (after "Metacognitive Reuse", Didolkar et
//! al., 2025): retrieve the behaviors most relevant to the request from the
//! behavior handbook and put them in the system prompt, then decode with
//! the inner strategy.
//!
//! A behavior is a name and a one-line instruction. [`StaticHandbook`]
//! ranks a fixed list, read from a JSON file named in the configuration;
//! the learned handbook in `crate::handbook` keeps its behaviors in the
//! trace store and ranks them with a `StaticHandbook` rebuilt on change.
//! The strategy sees either through [`BehaviorSource`].

use std::{collections::HashMap, path::Path, sync::Arc};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{plain, Context, DecodeError, Input, Output, Params, Strategy};
use crate::{api::ApiError, engine::ChatTurn};

pub const NAME: &str = "handbook";

/// A reusable piece of problem-solving advice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Behavior {
    pub name: String,
    pub instruction: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Source of behaviors for the handbook strategy.
pub trait BehaviorSource: Send + Sync {
    /// Returns at most `k` behaviors most relevant to `query`, best first.
    fn retrieve(&self, query: &str, k: usize) -> Vec<Behavior>;

    /// Returns how many behaviors the source holds.
    fn count(&self) -> usize;
}

/// A fixed handbook held in memory, ranked with BM25 (k1 = 1.2, b = 0.75)
/// over each behavior's name, instruction and tags.
#[derive(Debug, Default)]
pub struct StaticHandbook {
    behaviors: Vec<Behavior>,
    documents: Vec<Vec<String>>,
    document_frequency: HashMap<String, usize>,
    average_length: f32,
}

/// Reads a JSON array of behaviors.
pub fn read_behaviors(path: &Path) -> Result<Vec<Behavior>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a JSON array of behaviors: {e}", path.display()))
}

fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 1)
        .map(str::to_string)
        .collect()
}

impl StaticHandbook {
    pub fn new(behaviors: Vec<Behavior>) -> Self {
        let documents: Vec<Vec<String>> = behaviors
            .iter()
            .map(|b| {
                words(&format!(
                    "{} {} {}",
                    b.name.replace('_', " "),
                    b.instruction,
                    b.tags.join(" ")
                ))
            })
            .collect();
        let mut document_frequency = HashMap::new();
        for document in &documents {
            let mut unique = document.clone();
            unique.sort();
            unique.dedup();
            for word in unique {
                *document_frequency.entry(word).or_default() += 1;
            }
        }
        let average_length = if documents.is_empty() {
            0.0
        } else {
            documents.iter().map(Vec::len).sum::<usize>() as f32 / documents.len() as f32
        };
        Self {
            behaviors,
            documents,
            document_frequency,
            average_length,
        }
    }

    fn score(&self, query: &[String], document: &[String]) -> f32 {
        const K1: f32 = 1.2;
        const B: f32 = 0.75;
        let n = self.documents.len() as f32;
        query
            .iter()
            .map(|word| {
                let tf = document.iter().filter(|w| *w == word).count() as f32;
                if tf == 0.0 {
                    return 0.0;
                }
                let df = *self.document_frequency.get(word).unwrap_or(&0) as f32;
                let idf = ((n - df + 0.5) / (df + 0.5) + 1.0).ln();
                let norm = 1.0 - B + B * document.len() as f32 / self.average_length.max(1.0);
                idf * tf * (K1 + 1.0) / (tf + K1 * norm)
            })
            .sum()
    }
}

impl BehaviorSource for StaticHandbook {
    fn retrieve(&self, query: &str, k: usize) -> Vec<Behavior> {
        let query = words(query);
        let mut scored: Vec<(f32, usize)> = self
            .documents
            .iter()
            .enumerate()
            .map(|(i, d)| (self.score(&query, d), i))
            .filter(|(score, _)| *score > 0.0)
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored
            .into_iter()
            .take(k)
            .map(|(_, i)| self.behaviors[i].clone())
            .collect()
    }

    fn count(&self) -> usize {
        self.behaviors.len()
    }
}

#[derive(Debug)]
pub struct Handbook {
    pub behaviors: usize,
    pub inner: Arc<dyn Strategy>,
}

pub fn parse(params: Params) -> Result<Arc<dyn Strategy>, ApiError> {
    params.only(&["behaviors", "inner"])?;
    Ok(Arc::new(Handbook {
        behaviors: params.integer("behaviors", 3, 1, 16)?,
        inner: params
            .inner(&[
                plain::NAME,
                super::cautious::NAME,
                super::self_consistency::NAME,
                super::introspection::NAME,
            ])?
            .unwrap_or_else(|| Arc::new(plain::Plain)),
    }))
}

/// Formats the system prompt text that introduces retrieved behaviors.
pub fn behaviors_prompt(behaviors: &[Behavior]) -> String {
    let mut text = String::from("Behaviors that help with problems like this one:\n");
    for b in behaviors {
        text.push_str(&format!("- {}: {}\n", b.name, b.instruction));
    }
    text
}

/// `messages` with the behaviors added to the system message, which is
/// created when there is none.
pub fn with_behaviors(messages: &[ChatTurn], behaviors: &[Behavior]) -> Vec<ChatTurn> {
    let mut messages = messages.to_vec();
    let block = behaviors_prompt(behaviors);
    match messages.first_mut().filter(|m| m.role == "system") {
        Some(system) => system.content = format!("{}\n\n{block}", system.content),
        None => messages.insert(
            0,
            ChatTurn {
                role: "system".into(),
                content: block,
                name: None,
            },
        ),
    }
    messages
}

#[async_trait]
impl Strategy for Handbook {
    fn name(&self) -> &'static str {
        NAME
    }

    fn needs_chat(&self) -> bool {
        true
    }

    fn params(&self) -> Value {
        json!({"behaviors": self.behaviors, "inner": super::describe(self.inner.as_ref())})
    }

    async fn decode(&self, ctx: &Context, mut input: Input) -> Result<Output, DecodeError> {
        let messages = input.messages.clone().ok_or_else(|| {
            DecodeError::Invalid("the handbook strategy needs chat messages".into())
        })?;
        let query: String = messages
            .iter()
            .filter(|m| m.role == "user")
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let retrieved = ctx.behaviors.retrieve(&query, self.behaviors);
        ctx.metrics
            .handbook_behaviors_retrieved
            .inc_by(retrieved.len() as u64);
        if !retrieved.is_empty() {
            let messages = with_behaviors(&messages, &retrieved);
            input.prompt = ctx.engine.tokenize_chat(&messages).await?;
            input.messages = Some(messages);
        }
        let mut output = self.inner.decode(ctx, input).await?;
        output.report.insert(
            "behaviors".into(),
            retrieved.iter().map(|b| json!(b.name)).collect(),
        );
        output
            .report
            .insert("inner".into(), json!(self.inner.name()));
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoding::tests_support::{context_with, input, scripted};

    fn handbook() -> StaticHandbook {
        StaticHandbook::new(vec![
            Behavior {
                name: "unit_check".into(),
                instruction: "Check that the units of the final answer match the question.".into(),
                tags: vec![],
            },
            Behavior {
                name: "percent_of".into(),
                instruction: "Turn a percentage into a fraction before multiplying.".into(),
                tags: vec!["percent".into()],
            },
            Behavior {
                name: "rate_times_time".into(),
                instruction: "Distance equals speed multiplied by time.".into(),
                tags: vec!["speed".into()],
            },
        ])
    }

    #[test]
    fn bm25_ranks_relevant_first() {
        let found = handbook().retrieve("A car drives at a speed of 60 km per hour for 2 hours", 2);
        assert_eq!(found[0].name, "rate_times_time");
        assert!(handbook().retrieve("zebra xylophone", 3).is_empty());
    }

    #[tokio::test]
    async fn behaviors_reach_the_prompt() {
        let ctx = context_with(
            scripted(|prompt: &str, _| {
                if prompt.contains("percentage into a fraction") {
                    "used".into()
                } else {
                    "missing".into()
                }
            }),
            Arc::new(handbook()),
        );
        let strategy = Handbook {
            behaviors: 1,
            inner: Arc::new(plain::Plain),
        };
        let output = strategy
            .decode(&ctx, input("What is 20 percent of 50?"))
            .await
            .unwrap();
        assert_eq!(output.text, "used");
        assert_eq!(output.report["behaviors"], json!(["percent_of"]));
    }

    #[test]
    fn existing_system_prompt_is_extended() {
        let messages = vec![ChatTurn {
            role: "system".into(),
            content: "Be brief.".into(),
            name: None,
        }];
        let out = with_behaviors(&messages, &handbook().behaviors[..1]);
        assert_eq!(out.len(), 1);
        assert!(out[0].content.starts_with("Be brief."));
        assert!(out[0].content.contains("unit_check"));
    }
}
