//! Chat templates: the model's own Jinja template rendered with minijinja (plus Python-compat
//! string methods), so prompts match what the model was trained on.

use minijinja::{context, Environment, Error, ErrorKind};
use serde_json::Value;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("the model's chat template does not parse: {e}"))?;
        Ok(Self {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// Renders OpenAI-shaped `messages` (content parts are joined to text) and optional `tools`.
    pub fn render(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let messages: Vec<Value> = messages.iter().map(flatten_content).collect();
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        tmpl.render(context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| format!("rendering the chat template failed: {e}"))
    }
}

/// Joins a message's text content parts into one string; non-text parts are dropped (the local
/// models are text-only).
fn flatten_content(m: &Value) -> Value {
    let mut m = m.clone();
    if let Some(Value::Array(parts)) = m.get("content") {
        let text: Vec<&str> = parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect();
        m["content"] = Value::String(text.join("\n"));
    }
    if m.get("content").is_none_or(Value::is_null) {
        m["content"] = Value::String(String::new());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_with_generation_prompt_and_content_parts() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let out = t
            .render(
                &[
                    json!({"role": "system", "content": "s"}),
                    json!({"role": "user", "content": [{"type": "text", "text": "hi"}]}),
                ],
                None,
                true,
            )
            .unwrap();
        assert_eq!(out, "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = ChatTemplate::new("{{ messages[0]['content'].strip().upper() }}{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}", "", "").unwrap();
        assert_eq!(
            t.render(&[json!({"role": "user", "content": "  x "})], None, false)
                .unwrap(),
            "X"
        );
        let err = t
            .render(
                &[
                    json!({"role": "user", "content": "a"}),
                    json!({"role": "user", "content": "b"}),
                ],
                None,
                false,
            )
            .unwrap_err();
        assert!(err.contains("one only"), "{err}");
    }
}
