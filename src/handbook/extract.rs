//! Extracting behaviors from a solved trace: the reflection prompt, a
//! defensive parser for the model's reply, and de-duplication against the
//! handbook. The server's background task runs these through the engine.

use std::collections::HashSet;

use super::{check_instruction, check_name, MAX_NAME_CHARS};
use crate::{engine::ChatTurn, traces::StoredBehavior, traces::Trace};

/// Behaviors taken from one reply, at most; a small model that rambles
/// would otherwise fill the handbook from a single trace.
pub const MAX_PER_REPLY: usize = 4;

/// Share of shared words from which two instructions count as the same.
const SAME_INSTRUCTION: f64 = 0.8;

/// Words a name may not consist of alone, because models use them as
/// headings rather than as behavior names.
const HEADINGS: &[&str] = &[
    "name",
    "instruction",
    "behavior",
    "behaviors",
    "problem",
    "solution",
    "answer",
    "note",
    "example",
    "question",
    "reflection",
    "final_answer",
    "tip",
    "tips",
    "general_tip",
    "general_tips",
];

/// The example lines of the reflection prompt. Small models repeat them
/// instead of stating what the solution did, so replies that copy one are
/// dropped.
const EXAMPLE_TIPS: &[(&str, &str)] = &[
    ("check_units", "State the unit of the final answer."),
    (
        "list_given_numbers",
        "Write down every number the problem gives before computing.",
    ),
];

/// A behavior as the model stated it, after cleaning.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub instruction: String,
}

/// Builds the reflection prompt for a chat trace: its last user message as
/// the problem and its first returned choice as the solution. Returns
/// `None` for a trace without both.
pub fn reflection_messages(trace: &Trace) -> Option<Vec<ChatTurn>> {
    let problem = trace
        .messages
        .as_ref()?
        .iter()
        .rev()
        .find(|m| m.role == "user")?
        .content
        .trim()
        .to_string();
    let solution = trace.choices.first()?.text.trim().to_string();
    if problem.is_empty() || solution.is_empty() {
        return None;
    }
    // SmolLM2-135M ignored a description of the line format but copied the
    // example lines' shape, as a numbered list.
    let examples: String = EXAMPLE_TIPS
        .iter()
        .map(|(name, instruction)| format!("{name}: {instruction}\n"))
        .collect();
    let content = format!(
        "Problem: {problem}\nSolution, checked and found correct: {solution}\n\n\
         Reflect on how this solution reached its answer. Then list general tips for \
         solving problems like this, one per line. Start each line with a short \
         snake_case name, a colon, then one sentence of advice.\n\n\
         Example tips:\n{examples}\nTips:"
    );
    Some(vec![ChatTurn {
        role: "user".into(),
        content,
        name: None,
    }])
}

/// Maximum number of topic tags a behavior gets from its source trace.
pub const MAX_TAGS: usize = 5;

/// Common English words that carry no information about a problem's topic.
const STOP_WORDS: &[&str] = &[
    "about",
    "after",
    "again",
    "also",
    "another",
    "been",
    "before",
    "being",
    "does",
    "each",
    "every",
    "from",
    "have",
    "having",
    "here",
    "into",
    "just",
    "many",
    "more",
    "most",
    "much",
    "only",
    "other",
    "over",
    "same",
    "some",
    "such",
    "than",
    "that",
    "them",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "what",
    "when",
    "where",
    "which",
    "while",
    "will",
    "with",
    "would",
    "your",
    "their",
    "were",
    "could",
    "should",
    "first",
    "next",
    "total",
    "altogether",
    "left",
    "half",
    "twice",
    "times",
];

/// Picks topic tags for behaviors taken from `trace`: the words of its last
/// user message that occur most often there, of four letters or more and
/// not in a stop list, at most [`MAX_TAGS`], ties in order of appearance.
/// BM25 retrieval matches them against later requests.
pub fn topic_tags(trace: &Trace) -> Vec<String> {
    let Some(problem) = trace
        .messages
        .as_ref()
        .and_then(|messages| messages.iter().rev().find(|m| m.role == "user"))
    else {
        return Vec::new();
    };
    let mut counts: Vec<(String, usize)> = Vec::new();
    for word in problem
        .content
        .to_lowercase()
        .split(|c: char| !c.is_alphabetic())
    {
        if word.chars().count() < 4 || STOP_WORDS.contains(&word) {
            continue;
        }
        match counts.iter_mut().find(|(seen, _)| seen == word) {
            Some((_, count)) => *count += 1,
            None => counts.push((word.to_string(), 1)),
        }
    }
    // A stable sort keeps the order of appearance among equal counts.
    counts.sort_by(|a, b| b.1.cmp(&a.1));
    counts
        .into_iter()
        .take(MAX_TAGS)
        .map(|(word, _)| word)
        .collect()
}

/// Reads `name: instruction` lines from a reply, skipping anything else.
/// List markers, emphasis and quotes are removed, names are turned into
/// snake_case, and lines whose name or instruction is implausible are
/// dropped. A list item without a name gets one made of its first content
/// words, because small models often leave names out. Returns at most
/// [`MAX_PER_REPLY`] candidates, without repeats.
pub fn parse_reply(reply: &str) -> Vec<Candidate> {
    let mut candidates: Vec<Candidate> = Vec::new();
    for line in reply.lines() {
        let Some(candidate) = parse_line(line) else {
            continue;
        };
        if copies_example(&candidate) || find_duplicate_candidate(&candidate, &candidates) {
            continue;
        }
        candidates.push(candidate);
        if candidates.len() == MAX_PER_REPLY {
            break;
        }
    }
    candidates
}

/// Returns whether `candidate` repeats an example line of the prompt: an
/// instruction containing at least 80 % of an example's words. A reused
/// example name with advice of its own is kept.
fn copies_example(candidate: &Candidate) -> bool {
    let stated = words(&candidate.instruction);
    EXAMPLE_TIPS.iter().any(|(_, instruction)| {
        let example = words(instruction);
        let shared = example.intersection(&stated).count() as f64;
        shared >= SAME_INSTRUCTION * example.len() as f64
    })
}

fn find_duplicate_candidate(candidate: &Candidate, seen: &[Candidate]) -> bool {
    seen.iter().any(|c| {
        c.name == candidate.name || same_instruction(&c.instruction, &candidate.instruction)
    })
}

fn parse_line(line: &str) -> Option<Candidate> {
    let trimmed = line.trim();
    let item = strip_list_marker(trimmed);
    if let Some((name, instruction)) = item.split_once(':') {
        let name = snake_case(name)?;
        let instruction = clean_instruction(instruction)?;
        return Some(Candidate { name, instruction });
    }
    if item.len() == trimmed.len() {
        // Prose that is neither a named line nor a list item.
        return None;
    }
    let instruction = clean_instruction(item)?;
    let name = name_from(&instruction)?;
    Some(Candidate { name, instruction })
}

fn strip_list_marker(line: &str) -> &str {
    let line = line.trim_start_matches(['-', '*', '•', '+', '>', ' ']);
    let digits = line.chars().take_while(char::is_ascii_digit).count();
    if digits > 0 {
        if let Some(rest) = line[digits..].strip_prefix(['.', ')']) {
            return rest.trim_start();
        }
    }
    line
}

/// Words left out of names made from an instruction.
const FILLER_WORDS: &[&str] = &[
    "a", "an", "the", "always", "be", "sure", "to", "your", "you", "that", "it", "is", "of", "and",
    "or", "for", "make", "remember", "should", "must", "try",
];

/// Makes a snake_case name of the first four content words of an
/// instruction, such as `check_answer_before_presenting` for "Always check
/// your answer before presenting it."
fn name_from(instruction: &str) -> Option<String> {
    let lower = instruction.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty() && !FILLER_WORDS.contains(w))
        .take(4)
        .collect();
    if words.len() < 2 {
        return None;
    }
    snake_case(&words.join(" "))
}

/// Turns a stated name into snake_case; returns `None` when it is not a
/// plausible name (empty, over four words, a heading or a step number).
fn snake_case(name: &str) -> Option<String> {
    let cleaned: String = name
        .trim()
        .trim_matches(['*', '`', '"', '\'', '_', '[', ']'])
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                ' '
            }
        })
        .collect();
    let words: Vec<&str> = cleaned.split_whitespace().collect();
    if words.is_empty() || words.len() > 4 {
        return None;
    }
    if !words
        .iter()
        .any(|w| w.chars().any(|c| c.is_ascii_alphabetic()))
    {
        return None;
    }
    let name = words.join("_");
    let is_step = words[0] == "step" && words.len() <= 2;
    if is_step || HEADINGS.contains(&name.as_str()) || name.len() > MAX_NAME_CHARS {
        return None;
    }
    check_name(&name).ok()?;
    Some(name)
}

/// Trims an instruction; returns `None` when it is too short to advise
/// anything (under three words) or fails [`check_instruction`].
fn clean_instruction(text: &str) -> Option<String> {
    let text = text
        .trim()
        .trim_matches(['*', '`', '"', '\''])
        .trim()
        .to_string();
    if text.split_whitespace().count() < 3 {
        return None;
    }
    check_instruction(&text).ok()?;
    Some(text)
}

fn words(text: &str) -> HashSet<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Returns whether two instructions share at least 80 % of their words
/// (Jaccard similarity of their word sets).
pub fn same_instruction(a: &str, b: &str) -> bool {
    let (a, b) = (words(a), words(b));
    let union = a.union(&b).count();
    union > 0 && a.intersection(&b).count() as f64 / union as f64 >= SAME_INSTRUCTION
}

/// Returns the stored behavior that `candidate` repeats: the same name or a
/// near-identical instruction.
pub fn find_duplicate<'a>(
    candidate: &Candidate,
    existing: &'a [StoredBehavior],
) -> Option<&'a StoredBehavior> {
    existing
        .iter()
        .find(|b| b.name == candidate.name)
        .or_else(|| {
            existing
                .iter()
                .find(|b| same_instruction(&b.instruction, &candidate.instruction))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_with_noise_parsed() {
        let reply = "Reflection: the solution multiplied the speed by the time.\n\
                     Behaviors:\n\
                     1. **Rate times time**: Multiply the speed by the time to get distance.\n\
                     - `check_units`: Check that the answer is in the units asked for.\n\
                     Step 2: add 3 and 4\n\
                     this line has no colon\n\
                     unit_check: Check that the answer is in the units asked for!\n\
                     x: ok\n";
        let found = parse_reply(reply);
        let names: Vec<&str> = found.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["rate_times_time", "check_units"], "{found:?}");
        assert_eq!(
            found[0].instruction,
            "Multiply the speed by the time to get distance."
        );
    }

    #[test]
    fn unnamed_list_items_named() {
        let reply = "1. Always check your answer before presenting it to the user.\n\
                     2. Always remember that the answer is a number.\n\
                     3. Always remember that the answer is a number.\n\
                     The train goes far.\n";
        let found = parse_reply(reply);
        let names: Vec<&str> = found.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["check_answer_before_presenting", "answer_number"]);
        assert_eq!(
            found[1].instruction,
            "Always remember that the answer is a number."
        );
    }

    #[test]
    fn topic_tags_from_the_problem() {
        let mut trace = crate::traces::contract::trace("t1", 0, None);
        let problem = trace.messages.as_mut().expect("a chat trace");
        problem.insert(
            0,
            crate::traces::Message {
                role: "system".into(),
                content: "Answer with a number.".into(),
                name: None,
            },
        );
        problem[1].content = "A baker sells loaves. Each loaf costs $3, and the baker sells \
            20 loaves a day. What does the baker earn in a week?"
            .into();
        // Counts 3, 2, 2, 1, 1: "each" and "what" are stop words, the system
        // message is not read, and "earn" and "week" come too late.
        assert_eq!(
            topic_tags(&trace),
            vec!["baker", "sells", "loaves", "loaf", "costs"]
        );
    }

    #[test]
    fn copied_examples_dropped() {
        let reply = "1. check_units: State the unit of the final answer.\n\
                     2. tips: check_units: State the unit of the final answer.\n\
                     3. list_numbers: Always write down every number the problem gives before computing.\n\
                     4. split_the_trip: Work out each part of the trip separately.";
        let found = parse_reply(reply);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].name, "split_the_trip");
    }

    #[test]
    fn long_names_and_headings_skipped() {
        assert!(parse_reply("a very long name of many words: do this and that").is_empty());
        assert!(parse_reply("Answer: the answer is 42 apples").is_empty());
        assert!(parse_reply("Final answer: the answer is 42 apples").is_empty());
    }

    #[test]
    fn replies_capped() {
        let reply = (0..10)
            .map(|i| format!("behavior_{i}: do thing number {i} with care"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(parse_reply(&reply).len(), MAX_PER_REPLY);
    }

    #[test]
    fn duplicates_by_name_or_instruction() {
        let stored = StoredBehavior {
            name: "check_units".into(),
            instruction: "Check that the answer is in the units asked for.".into(),
            tags: Vec::new(),
            source_traces: Vec::new(),
            created_ms: 0,
            times_retrieved: 0,
            effect: None,
        };
        let existing = [stored];
        let renamed = Candidate {
            name: "unit_check".into(),
            instruction: "Check that the answer is in the units asked for".into(),
        };
        assert!(find_duplicate(&renamed, &existing).is_some());
        let new = Candidate {
            name: "draw_a_table".into(),
            instruction: "Put the quantities in a table first.".into(),
        };
        assert!(find_duplicate(&new, &existing).is_none());
    }
}
