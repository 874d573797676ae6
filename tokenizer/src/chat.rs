//! Chat-template rendering: the model's Jinja template, compiled once per tokenizer.

use crate::TokenizerError;

/// A chat message as the template sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

const TEMPLATE: &str = "chat";

/// A model's chat template, or the plain transcript used when the model has none.
pub(crate) struct ChatTemplate {
    /// `Err` keeps a template that does not compile: the model still loads and serves plain
    /// prompts; chat requests report the template's error.
    env: Option<Result<minijinja::Environment<'static>, String>>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub(crate) fn new(template: Option<&str>, bos: &str, eos: &str) -> Self {
        let env = template.map(|source| {
            let mut env = minijinja::Environment::new();
            env.add_function(
                "raise_exception",
                |msg: String| -> Result<String, minijinja::Error> {
                    Err(minijinja::Error::new(
                        minijinja::ErrorKind::InvalidOperation,
                        msg,
                    ))
                },
            );
            env.add_template_owned(TEMPLATE, source.to_string())
                .map(|()| env)
                .map_err(|e| e.to_string())
        });
        Self {
            env,
            bos: bos.into(),
            eos: eos.into(),
        }
    }

    /// Renders `messages` ending with the assistant turn's header, or a plain `role: content`
    /// transcript when there is no template.
    pub(crate) fn render(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        let Some(env) = &self.env else {
            let mut out = String::new();
            for m in messages {
                out.push_str(&format!("{}: {}\n", m.role, m.content));
            }
            out.push_str("assistant:");
            return Ok(out);
        };
        let env = env
            .as_ref()
            .map_err(|e| TokenizerError::Template(e.clone()))?;
        let template = env
            .get_template(TEMPLATE)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| TokenizerError::Template(e.to_string()))
    }
}
