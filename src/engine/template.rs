//! Chat templates: the Jinja template a GGUF file carries, rendered the way
//! Hugging Face's `apply_chat_template` renders it, so that every engine
//! turns the same messages into the same prompt text.

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use super::ChatTurn;

const TEMPLATE_NAME: &str = "chat";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

impl ChatTemplate {
    /// Compiles `source`; fails on a template that does not parse.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        // Hugging Face renders with both enabled, and templates are written
        // for that whitespace handling.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Templates call Python string methods such as `.strip()`.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<(), Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| format!("chat template does not parse: {e}"))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt` is set.
    pub fn render(
        &self,
        messages: &[ChatTurn],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let messages: Vec<Message> = messages
            .iter()
            .map(|turn| Message {
                role: &turn.role,
                content: &turn.content,
                name: turn.name.as_deref(),
            })
            .collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("the template was added in new()");
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| format!("chat template failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn turn(role: &str, content: &str) -> ChatTurn {
        ChatTurn {
            role: role.into(),
            content: content.into(),
            name: None,
        }
    }

    #[test]
    fn renders_chatml_with_default_system_and_generation_prompt() {
        let template = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let text = template.render(&[turn("user", "Hi")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let source =
            "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}ok";
        let template = ChatTemplate::new(source, "", "").unwrap();
        let error = template.render(&[turn("tool", "x")], true).unwrap_err();
        assert!(error.contains("no tools"), "{error}");
        assert_eq!(template.render(&[turn("user", "x")], true).unwrap(), "ok");
    }

    #[test]
    fn python_string_methods_work() {
        let source = "{{ messages[0]['content'].strip() }}";
        let template = ChatTemplate::new(source, "", "").unwrap();
        assert_eq!(
            template.render(&[turn("user", "  a b ")], false).unwrap(),
            "a b"
        );
    }
}
