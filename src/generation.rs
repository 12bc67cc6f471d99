//! Turns engine steps into the text a client sees: incremental UTF-8
//! decoding, stop strings that are never emitted (not even their first
//! characters), and finish reasons in OpenAI's terms.

use std::{collections::VecDeque, sync::Arc};

use futures::{stream, Stream, StreamExt};

use crate::engine::{
    Continuation, Engine, EngineError, FinishReason, GenerateRequest, StepEvent, TokenStep,
};

/// Finish reasons as the OpenAI API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiFinishReason {
    Stop,
    Length,
}

impl ApiFinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// Something that happened to one choice.
#[derive(Debug, Clone, PartialEq)]
pub enum ChoiceEvent {
    /// New text, with the steps whose text it completes.
    Delta {
        index: usize,
        text: String,
        steps: Vec<TokenStep>,
    },
    Finished {
        index: usize,
        reason: ApiFinishReason,
        /// Tokens the engine generated for this choice up to the finish.
        completion_tokens: usize,
    },
    Failed {
        index: usize,
        message: String,
    },
}

/// Decodes one choice's steps into text deltas.
pub struct TextDecoder {
    engine: Arc<dyn Engine>,
    stops: Vec<String>,
    bytes: Vec<u8>,
    /// Length in bytes of the text already sent.
    sent: usize,
    pending: Vec<TokenStep>,
    tokens: usize,
}

/// Result of decoding one step.
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    pub text: String,
    pub steps: Vec<TokenStep>,
    /// Set when a stop string was found; the text before it is in `text`.
    pub stopped: bool,
}

impl TextDecoder {
    pub fn new(engine: Arc<dyn Engine>, stops: Vec<String>) -> Self {
        Self {
            engine,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            bytes: Vec::new(),
            sent: 0,
            pending: Vec::new(),
            tokens: 0,
        }
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub fn push(&mut self, step: TokenStep) -> Decoded {
        self.tokens += 1;
        self.bytes
            .extend_from_slice(self.engine.token_bytes(step.token));
        self.pending.push(step);
        let complete = complete_prefix_len(&self.bytes);
        let text = String::from_utf8_lossy(&self.bytes[..complete]).into_owned();
        let unsent = &text[self.sent.min(text.len())..];

        if let Some(at) = self.find_stop(unsent) {
            let out = unsent[..at].to_string();
            self.sent = text.len();
            return self.emit(out, true);
        }
        let held = self.held_back(unsent);
        let out = unsent[..unsent.len() - held].to_string();
        self.sent += out.len();
        self.emit(out, false)
    }

    /// Sends whatever was held back once the choice has ended for a reason
    /// other than a stop string.
    pub fn flush(&mut self) -> Decoded {
        let text = String::from_utf8_lossy(&self.bytes).into_owned();
        let out = text.get(self.sent..).unwrap_or_default().to_string();
        self.sent = text.len();
        self.emit(out, false)
    }

    fn emit(&mut self, text: String, stopped: bool) -> Decoded {
        let steps = if text.is_empty() && !stopped {
            Vec::new()
        } else if text.is_empty() {
            self.pending.clear();
            Vec::new()
        } else {
            std::mem::take(&mut self.pending)
        };
        Decoded {
            text,
            steps,
            stopped,
        }
    }

    fn find_stop(&self, unsent: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| unsent.find(s.as_str()))
            .min()
    }

    /// Length of the longest tail of `unsent` that could still grow into a
    /// stop string.
    fn held_back(&self, unsent: &str) -> usize {
        unsent
            .char_indices()
            .map(|(i, _)| &unsent[i..])
            .find(|tail| self.stops.iter().any(|s| s.starts_with(tail)))
            .map_or(0, str::len)
    }
}

/// Length of `bytes` without a trailing, still incomplete UTF-8 sequence.
fn complete_prefix_len(bytes: &[u8]) -> usize {
    let len = bytes.len();
    for back in 1..=len.min(3) {
        let byte = bytes[len - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue;
        }
        let needed = match byte {
            0b1111_0000.. => 4,
            0b1110_0000.. => 3,
            0b1100_0000.. => 2,
            _ => 1,
        };
        return if needed > back { len - back } else { len };
    }
    len
}

/// Runs `request` on the engine and merges its choices into one stream of
/// events. Each choice ends with exactly one `Finished` or `Failed`.
pub fn run_choices(
    engine: Arc<dyn Engine>,
    request: GenerateRequest,
    stops: Vec<String>,
) -> Result<impl Stream<Item = ChoiceEvent> + Send + 'static, EngineError> {
    let continuations = engine.generate(request)?;
    let choices = continuations
        .into_iter()
        .enumerate()
        .map(|(index, continuation)| {
            let decoder = TextDecoder::new(engine.clone(), stops.clone());
            choice_stream(index, continuation, decoder).boxed()
        });
    Ok(stream::select_all(choices))
}

struct ChoiceState {
    index: usize,
    continuation: Continuation,
    decoder: TextDecoder,
    queued: VecDeque<ChoiceEvent>,
    done: bool,
}

fn choice_stream(
    index: usize,
    continuation: Continuation,
    decoder: TextDecoder,
) -> impl Stream<Item = ChoiceEvent> + Send {
    let state = ChoiceState {
        index,
        continuation,
        decoder,
        queued: VecDeque::new(),
        done: false,
    };
    stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.queued.pop_front() {
                return Some((event, state));
            }
            if state.done {
                return None;
            }
            let event = state.continuation.events.recv().await;
            state.handle(event);
        }
    })
}

impl ChoiceState {
    fn handle(&mut self, event: Option<StepEvent>) {
        let index = self.index;
        match event {
            Some(StepEvent::Token(step)) => {
                let decoded = self.decoder.push(step);
                let stopped = decoded.stopped;
                self.queue_text(decoded);
                if stopped {
                    self.continuation.stop();
                    self.finish(ApiFinishReason::Stop);
                }
            }
            Some(StepEvent::Finished(reason)) => {
                let decoded = self.decoder.flush();
                self.queue_text(decoded);
                let reason = match reason {
                    FinishReason::Length => ApiFinishReason::Length,
                    _ => ApiFinishReason::Stop,
                };
                self.finish(reason);
            }
            Some(StepEvent::Error(message)) => {
                self.queued
                    .push_back(ChoiceEvent::Failed { index, message });
                self.done = true;
            }
            None => {
                self.queued.push_back(ChoiceEvent::Failed {
                    index,
                    message: "the engine ended the sequence without a finish reason".into(),
                });
                self.done = true;
            }
        }
    }

    fn queue_text(&mut self, decoded: Decoded) {
        if !decoded.text.is_empty() {
            self.queued.push_back(ChoiceEvent::Delta {
                index: self.index,
                text: decoded.text,
                steps: decoded.steps,
            });
        }
    }

    fn finish(&mut self, reason: ApiFinishReason) {
        self.queued.push_back(ChoiceEvent::Finished {
            index: self.index,
            reason,
            completion_tokens: self.decoder.tokens(),
        });
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::scripted::{step, ScriptedEngine};

    fn decoder(stops: &[&str]) -> TextDecoder {
        let engine: Arc<dyn Engine> = Arc::new(ScriptedEngine::echoing(""));
        TextDecoder::new(engine, stops.iter().map(|s| s.to_string()).collect())
    }

    fn push_all(decoder: &mut TextDecoder, text: &[u8]) -> (Vec<String>, bool) {
        let mut out = Vec::new();
        for &b in text {
            let decoded = decoder.push(step(u32::from(b), -1.0, 1.0));
            if !decoded.text.is_empty() {
                out.push(decoded.text);
            }
            if decoded.stopped {
                return (out, true);
            }
        }
        let flushed = decoder.flush();
        if !flushed.text.is_empty() {
            out.push(flushed.text);
        }
        (out, false)
    }

    #[test]
    fn multibyte_character_never_split() {
        let mut d = decoder(&[]);
        let (pieces, _) = push_all(&mut d, "aé€😀".as_bytes());
        assert_eq!(pieces, vec!["a", "é", "€", "😀"]);
    }

    #[test]
    fn stop_string_never_emitted() {
        let mut d = decoder(&["END"]);
        let (pieces, stopped) = push_all(&mut d, b"abEN!cdENDxyz");
        assert!(stopped);
        assert_eq!(pieces.concat(), "abEN!cd");
        assert!(pieces.iter().all(|p| !p.contains('E') || p.contains("EN!")));
    }

    #[test]
    fn held_text_flushed_when_no_stop() {
        let mut d = decoder(&["END"]);
        let (pieces, stopped) = push_all(&mut d, b"abEN");
        assert!(!stopped);
        assert_eq!(pieces, vec!["a", "b", "EN"]);
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut d = decoder(&["yz", "x"]);
        let (pieces, stopped) = push_all(&mut d, b"abcxyz");
        assert!(stopped);
        assert_eq!(pieces.concat(), "abc");
    }

    #[test]
    fn incomplete_utf8_prefix_len() {
        assert_eq!(complete_prefix_len(&[b'a', 0xE2, 0x82]), 1);
        assert_eq!(complete_prefix_len(&[b'a', 0xE2, 0x82, 0xAC]), 4);
        assert_eq!(complete_prefix_len(b"abc"), 3);
    }
}
