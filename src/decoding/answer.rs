//! Final-answer extraction for voting.
//!
//! In order of preference: a number after "The answer is", after `####` or
//! inside `\boxed{}`; else a multiple-choice letter ("answer: B", "(C)");
//! else the last number in the text; else the normalized text. A text with
//! neither numbers nor a letter yields its normalized last line, and an
//! empty text yields nothing.

/// An extracted answer, comparable across samples.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Answer {
    Number(String),
    Choice(char),
    Text(String),
}

impl Answer {
    pub fn as_string(&self) -> String {
        match self {
            Self::Number(n) => n.clone(),
            Self::Choice(c) => c.to_string(),
            Self::Text(t) => t.clone(),
        }
    }
}

pub fn extract(text: &str) -> Option<Answer> {
    let lower = text.to_lowercase();
    for marker in ["the answer is", "####", "\\boxed{"] {
        if let Some(at) = lower.rfind(marker) {
            if let Some(number) = first_number(&text[at + marker.len()..]) {
                return Some(Answer::Number(number));
            }
        }
    }
    if let Some(letter) = choice_letter(text) {
        return Some(Answer::Choice(letter));
    }
    if let Some(number) = last_number(text) {
        return Some(Answer::Number(number));
    }
    let last_line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let normalized = normalize(last_line);
    (!normalized.is_empty()).then_some(Answer::Text(normalized))
}

/// Lowercase words without punctuation, single-spaced.
pub fn normalize(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// All numbers in `text`, as canonical strings: commas dropped, trailing
/// zeros of decimals dropped, so "1,000.50" and "1000.5" compare equal.
fn numbers(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let negative = chars[i] == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if chars[i].is_ascii_digit() || negative {
            let start = i;
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_digit()
                    || (matches!(chars[i], ',' | '.')
                        && chars.get(i + 1).is_some_and(char::is_ascii_digit)))
            {
                i += 1;
            }
            let raw: String = chars[start..i].iter().filter(|c| **c != ',').collect();
            found.push(canonical(&raw));
        } else {
            i += 1;
        }
    }
    found
}

fn canonical(raw: &str) -> String {
    match raw.split_once('.') {
        Some((whole, fraction)) => {
            let fraction = fraction.trim_end_matches('0');
            if fraction.is_empty() {
                whole.to_string()
            } else {
                format!("{whole}.{fraction}")
            }
        }
        None => raw.to_string(),
    }
}

fn first_number(text: &str) -> Option<String> {
    // Only the next short stretch counts, so "The answer is below ... 7"
    // does not pick up a distant number.
    let window: String = text.chars().take(40).collect();
    numbers(&window).into_iter().next()
}

fn last_number(text: &str) -> Option<String> {
    numbers(text).pop()
}

/// A letter A–E given as the answer: "answer: B", "answer is (C)", or a
/// text that is only a letter.
fn choice_letter(text: &str) -> Option<char> {
    let trimmed = text.trim().trim_end_matches('.');
    let bare = trimmed.trim_start_matches('(').trim_end_matches(')');
    if bare.len() == 1 {
        let c = bare.chars().next()?.to_ascii_uppercase();
        return ('A'..='E').contains(&c).then_some(c);
    }
    let lower = text.to_lowercase();
    let at = lower.rfind("answer")?;
    let rest = &text[at + "answer".len()..];
    let rest = rest
        .trim_start_matches(|c: char| c == ':' || c.is_whitespace())
        .trim_start_matches("is")
        .trim_start();
    let rest = rest.strip_prefix('(').unwrap_or(rest);
    let mut chars = rest.chars();
    let letter = chars.next()?.to_ascii_uppercase();
    let next = chars.next();
    let standalone = next.is_none_or(|c| !c.is_alphanumeric());
    (('A'..='E').contains(&letter) && standalone).then_some(letter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(n: &str) -> Option<Answer> {
        Some(Answer::Number(n.into()))
    }

    #[test]
    fn answer_is_marker() {
        assert_eq!(
            extract("3 + 4 = 7, then 7 * 2. The answer is 14."),
            number("14")
        );
    }

    #[test]
    fn gsm8k_marker_wins_over_last_number() {
        assert_eq!(extract("#### 1,250\nChecked with 3 steps"), number("1250"));
    }

    #[test]
    fn boxed_answer() {
        assert_eq!(extract("so \\boxed{42} and 7"), number("42"));
    }

    #[test]
    fn last_number_fallback() {
        assert_eq!(
            extract("She has 5 apples, then 8.50 dollars"),
            number("8.5")
        );
    }

    #[test]
    fn negative_number() {
        assert_eq!(extract("The answer is -3"), number("-3"));
    }

    #[test]
    fn choice_letters() {
        assert_eq!(extract("The correct answer: B"), Some(Answer::Choice('B')));
        assert_eq!(extract("(c)"), Some(Answer::Choice('C')));
        assert_eq!(
            extract("answer is Because"),
            Some(Answer::Text("answer is because".into()))
        );
    }

    #[test]
    fn text_fallback_and_empty() {
        assert_eq!(extract("Paris!"), Some(Answer::Text("paris".into())));
        assert_eq!(extract("   "), None);
    }
}
