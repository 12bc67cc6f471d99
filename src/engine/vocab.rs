//! Token-to-bytes table read from a GGUF file's tokenizer metadata.
//!
//! Decoding never needs the merge rules, only what each token id spells, so
//! the server detokenizes every step locally instead of asking the engine.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::BufReader,
    path::Path,
};

use candle_core::quantized::gguf_file::{Content, Value};

/// GGUF `tokenizer.ggml.token_type` value of control tokens such as
/// `<|im_end|>`, which never appear in generated text.
const CONTROL_TOKEN: i32 = 3;

/// Tokenizer and context facts read from a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// Bytes of each token, indexed by token id.
    pub token_bytes: Vec<Vec<u8>>,
    pub eos_token: Option<u32>,
    pub bos_token: Option<u32>,
    /// The Jinja chat template, where the file carries one.
    pub chat_template: Option<String>,
    /// Tokens that decode to exactly one string, for looking up tokens such
    /// as the chat template's end-of-turn marker.
    pub by_text: HashMap<String, u32>,
    pub context_length: Option<usize>,
    /// Texts of the control tokens, which generated text never contains.
    pub control_tokens: Vec<String>,
}

impl GgufVocab {
    pub fn read(path: &Path) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| e.to_string())?;
        let content = Content::read(&mut BufReader::new(file)).map_err(|e| e.to_string())?;
        Self::from_metadata(&content.metadata)
    }

    pub fn from_metadata(metadata: &HashMap<String, Value>) -> Result<Self, String> {
        let get = |key: &str| metadata.get(key);
        let tokens = get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .ok_or("GGUF metadata has no tokenizer.ggml.tokens")?;
        let kinds: Vec<i32> = get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
            .unwrap_or_default();
        let model = get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("llama");
        let byte_level = model == "gpt2";
        let unicode_to_byte = byte_level_decoder();

        let mut token_bytes = Vec::with_capacity(tokens.len());
        let mut by_text = HashMap::new();
        let mut control_tokens = Vec::new();
        for (id, token) in tokens.iter().enumerate() {
            let text = token.to_string().map_err(|e| e.to_string())?;
            by_text.insert(text.clone(), id as u32);
            let bytes = if kinds.get(id) == Some(&CONTROL_TOKEN) {
                control_tokens.push(text.clone());
                Vec::new()
            } else if byte_level {
                text.chars()
                    .map(|c| unicode_to_byte.get(&c).copied().unwrap_or(b'?'))
                    .collect()
            } else {
                sentencepiece_bytes(text)
            };
            token_bytes.push(bytes);
        }

        let arch = get("general.architecture").and_then(|v| v.to_string().ok());
        let context_length = arch
            .and_then(|arch| get(&format!("{arch}.context_length")))
            .and_then(|v| v.to_u64().ok())
            .map(|v| v as usize);
        Ok(Self {
            token_bytes,
            eos_token: get("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()),
            bos_token: get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok()),
            chat_template: get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
            by_text,
            context_length,
            control_tokens,
        })
    }
}

impl GgufVocab {
    /// Tokens that end a sequence: the GGUF end-of-sequence token and the
    /// end-of-turn markers of common chat templates, which models emit
    /// instead of it.
    pub fn end_tokens(&self) -> HashSet<u32> {
        let mut tokens: HashSet<u32> = self.eos_token.into_iter().collect();
        for marker in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(&id) = self.by_text.get(marker) {
                tokens.insert(id);
            }
        }
        tokens
    }

    /// Returns the text of a token as the vocabulary spells it, control
    /// tokens included.
    pub fn token_text(&self, token: Option<u32>) -> String {
        token
            .and_then(|t| self.by_text.iter().find(|(_, &id)| id == t))
            .map(|(text, _)| text.clone())
            .unwrap_or_default()
    }
}

/// SentencePiece pieces spell a space as U+2581 and raw bytes as `<0xAB>`.
fn sentencepiece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
        if let Ok(byte) = u8::from_str_radix(hex, 16) {
            return vec![byte];
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

/// Inverse of GPT-2's byte-to-unicode table: printable bytes stand for
/// themselves and the other 68 bytes are shifted to code points 256 and up.
fn byte_level_decoder() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = HashMap::new();
    let mut shifted = 0u32;
    for byte in 0..=255u8 {
        let c = if printable(byte) {
            char::from(byte)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("code points 256..=323 are valid")
        };
        map.insert(c, byte);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_space_and_newline() {
        let map = byte_level_decoder();
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'a'], b'a');
        assert_eq!(map.len(), 256);
    }

    #[test]
    fn sentencepiece_bytes_and_spaces() {
        assert_eq!(sentencepiece_bytes("<0x0A>"), b"\n");
        assert_eq!(sentencepiece_bytes("\u{2581}the"), b" the");
    }
}
