//! Chat templates: the `tokenizer.chat_template` Jinja text of an instruct
//! model, rendered with `minijinja` the way Hugging Face's
//! `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`, Python
//! string methods through `minijinja-contrib`'s pycompat, `raise_exception`).
//!
//! A base model (Gemma-3-270M) has no template: [`ChatTemplate::from_tokenizer`]
//! returns [`Error::NoChatTemplate`], and [`ChatTemplate::plain_fallback`]
//! is the documented fallback — the messages' contents, one after another,
//! separated by a blank line, with nothing added for the generation prompt;
//! a base model simply continues that text.

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may know others).
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The fallback template for models without one (see the module docs).
const PLAIN_FALLBACK: &str =
    "{% for m in messages %}{% if not loop.first %}{{ '\n\n' }}{% endif %}{{ m.content }}{% endfor %}";

/// A compiled chat template.
///
/// ```
/// use models::{ChatTemplate, Message};
///
/// let t = ChatTemplate::new(
///     "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
///      {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
///     "", "",
/// )?;
/// let s = t.render(&[Message::new("user", "Hi")], true)?;
/// assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
/// # Ok::<(), models::Error>(())
/// ```
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the texts the
    /// template sees under those names.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        // Parse now (in a throwaway environment that may borrow `source`), so
        // a broken template fails here rather than at the first render.
        Environment::new()
            .template_from_str(source)
            .map_err(|source| Error::ChatTemplate { source })?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template of the tokenizer's model (`tokenizer.chat_template`);
    /// [`Error::NoChatTemplate`] when the model has none (a base model).
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let src = tok.chat_template().ok_or(Error::NoChatTemplate)?;
        let text = |id: Option<u32>| {
            id.and_then(|i| tok.token_text(i).ok())
                .unwrap_or_default()
                .to_string()
        };
        Self::new(src, &text(tok.bos()), &text(tok.eos()))
    }

    /// The fallback for a model without a template: contents joined by a
    /// blank line, nothing added for the generation prompt.
    pub fn plain_fallback() -> Self {
        // A constant that the tests below compile: not input, cannot fail.
        Self::new(PLAIN_FALLBACK, "", "").expect("the fallback template compiles")
    }

    /// The template's Jinja text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt`, ends with the
    /// opening of the assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        self.env
            .render_str(&self.source, ctx)
            .map_err(|source| Error::ChatTemplate { source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_joins_contents() {
        let t = ChatTemplate::plain_fallback();
        assert_eq!(t.source(), PLAIN_FALLBACK);
        let s = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(s, "Be brief.\n\nHi");
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content.strip() }}{% endfor %}\
             {% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  hi  ")], false).unwrap(),
            "hi"
        );
        let e = t
            .render(&[Message::new("assistant", "x")], false)
            .unwrap_err();
        assert!(matches!(e, Error::ChatTemplate { .. }));
        let chain = std::error::Error::source(&e).unwrap().to_string();
        assert!(chain.contains("first must be user"), "{chain}");
    }

    #[test]
    fn broken_template_fails_at_construction() {
        assert!(matches!(
            ChatTemplate::new("{% for m in messages %}", "", ""),
            Err(Error::ChatTemplate { .. })
        ));
    }
}
