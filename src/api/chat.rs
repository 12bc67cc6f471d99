//! `POST /v1/chat/completions` request parsing.

use serde::Deserialize;
use serde_json::Value;

use super::{
    params::{self, from_object, parse_object, GenerationParams, Limits, RawCommon},
    ApiError,
};
use crate::engine::ChatTurn;

const CHAT_FIELDS: &[&str] = &["messages", "max_completion_tokens", "top_logprobs"];

/// Message fields this server reads; `tool_calls`, `audio` and the like are
/// rejected by name.
const MESSAGE_FIELDS: &[&str] = &["role", "content", "name", "refusal"];

#[derive(Debug, Deserialize)]
struct RawChat {
    messages: Option<Vec<Value>>,
    max_completion_tokens: Option<i64>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawMessage {
    role: String,
    content: Option<Content>,
    name: Option<String>,
}

/// A validated chat completion request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<ChatTurn>,
    pub params: GenerationParams,
}

impl ChatRequest {
    pub fn parse(body: &[u8], limits: &Limits) -> Result<Self, ApiError> {
        Self::parse_with(body, limits, &[])
    }

    /// Parses a request that may also carry the fields in `extra`, which the
    /// caller reads from the returned object.
    pub fn parse_with(body: &[u8], limits: &Limits, extra: &[&str]) -> Result<Self, ApiError> {
        let object = parse_object(body, &[params::COMMON_FIELDS, CHAT_FIELDS, extra])?;
        let common: RawCommon = from_object(&object)?;
        let chat: RawChat = from_object(&object)?;
        if chat.max_completion_tokens.is_some() && common.max_tokens.is_some() {
            return Err(ApiError::invalid(
                "max_completion_tokens",
                "set either `max_tokens` or `max_completion_tokens`, not both",
            ));
        }
        let top = match (chat.logprobs.unwrap_or(false), chat.top_logprobs) {
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "`top_logprobs` requires `logprobs` to be true",
                ))
            }
            (false, None) => None,
            (true, k) => Some(params::top_logprobs(
                "top_logprobs",
                k.unwrap_or(0),
                limits,
            )?),
        };
        let max_tokens = chat.max_completion_tokens.or(common.max_tokens);
        let params = common.validate(max_tokens, top, limits)?;
        let messages = chat
            .messages
            .ok_or_else(|| ApiError::invalid("messages", "`messages` is required"))?;
        if messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must not be empty",
            ));
        }
        let messages = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| parse_message(i, m))
            .collect::<Result<_, _>>()?;
        Ok(Self { messages, params })
    }
}

fn parse_message(index: usize, value: Value) -> Result<ChatTurn, ApiError> {
    let at = |field: &str| format!("messages[{index}].{field}");
    let Value::Object(object) = &value else {
        return Err(ApiError::invalid(
            format!("messages[{index}]"),
            format!("`messages[{index}]` must be an object"),
        ));
    };
    if let Some(key) = object
        .keys()
        .find(|k| !MESSAGE_FIELDS.contains(&k.as_str()))
    {
        return Err(ApiError::invalid(
            at(key),
            format!("`{}` is not supported by this server", at(key)),
        ));
    }
    let message: RawMessage = serde_json::from_value(value).map_err(|e| {
        ApiError::invalid(
            format!("messages[{index}]"),
            format!("invalid message {index}: {e}"),
        )
    })?;
    let role = match message.role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        "tool" | "function" => {
            return Err(ApiError::invalid(
                at("role"),
                format!(
                    "`{}`: the role `{}` needs tool calling, which this server does not support",
                    at("role"),
                    message.role
                ),
            ))
        }
        other => {
            return Err(ApiError::invalid(
                at("role"),
                format!(
                    "`{}` must be one of system, developer, user, assistant; got `{other}`",
                    at("role")
                ),
            ))
        }
    };
    let content = match message.content {
        Some(Content::Text(text)) => text,
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for (p, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    ("text", None) => {
                        return Err(ApiError::invalid(
                            at(&format!("content[{p}].text")),
                            "a text part needs a `text` string",
                        ))
                    }
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            at(&format!("content[{p}].type")),
                            format!("content parts of type `{kind}` are not supported; this server serves text models"),
                        ))
                    }
                }
            }
            text
        }
        None if role == "assistant" => String::new(),
        None => {
            return Err(ApiError::invalid(
                at("content"),
                format!("`{}` is required for the role `{role}`", at("content")),
            ))
        }
    };
    Ok(ChatTurn {
        role: role.to_string(),
        content,
        name: message.name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(body.as_bytes(), &Limits::default())
    }

    #[test]
    fn minimal_request_gets_defaults() {
        let request =
            parse(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(request.params.n, 1);
        assert_eq!(request.params.sampling.temperature, 1.0);
        assert_eq!(request.params.max_tokens, None);
        assert_eq!(request.messages[0].content, "hi");
    }

    #[test]
    fn unsupported_field_is_named() {
        let error = parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[]}"#)
            .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("tools"));
        assert_eq!(error.status, 400);
    }

    #[test]
    fn wrong_type_names_field() {
        let error = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
        )
        .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("temperature"));
    }

    #[test]
    fn n_zero_rejected() {
        let error =
            parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":0}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("n"));
    }

    #[test]
    fn text_parts_are_joined() {
        let request = parse(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).unwrap();
        assert_eq!(request.messages[0].content, "ab");
    }

    #[test]
    fn image_part_rejected_with_path() {
        let error = parse(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("messages[0].content[0].type"));
    }

    #[test]
    fn top_logprobs_needs_logprobs() {
        let error =
            parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#)
                .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("top_logprobs"));
    }
}
