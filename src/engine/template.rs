//! Chat templates: the model's own Jinja template rendered with minijinja (plus Python-compat
//! string methods), so prompts match what the model was trained on.

use minijinja::value::Kwargs;
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
        env.add_filter("tojson", tojson);
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

/// `tojson` as transformers defines it for chat templates, which is Python's `json.dumps`: `", "`
/// and `": "` between items (`","` at line ends when indented) unless `separators` says otherwise,
/// keys in their given order unless `sort_keys`, no HTML escaping, non-ASCII text as is. Templates write tool schemas and call arguments through it, so
/// a byte of difference is a prompt the model was not trained on.
fn tojson(value: minijinja::Value, kwargs: Kwargs) -> Result<minijinja::Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let v = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let seps = match separators.as_deref() {
        Some([item, key]) => (item.as_str(), key.as_str()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators is a pair (item separator, key separator)",
            ))
        }
        None if indent.is_some() => (",", ": "),
        None => (", ", ": "),
    };
    let mut out = String::new();
    write_py_json(&v, indent, seps, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

fn write_py_json(
    v: &Value,
    indent: Option<usize>,
    (item_sep, key_sep): (&str, &str),
    sort: bool,
    level: usize,
    out: &mut String,
) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    };
    let seps = (item_sep, key_sep);
    match v {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_py_json(x, indent, seps, sort, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(key_sep);
                write_py_json(x, indent, seps, sort, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        // Scalars and empty containers print the same in both languages.
        other => out.push_str(&other.to_string()),
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
    fn tojson_writes_what_pythons_json_dumps_writes() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ messages[1] | tojson(separators=(',', ':'), sort_keys=true) }}",
            "",
            "",
        )
        .unwrap();
        let out = t
            .render(
                &[
                    json!({"role": "user", "content": "<b>é & 'x'</b>\n", "z": [1, 2.5], "a": {}}),
                    json!({"role": "user", "content": "", "e": []}),
                ],
                None,
                false,
            )
            .unwrap();
        // As json.dumps(..., ensure_ascii=False) and json.dumps(..., indent=2) print them.
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"<b>é & 'x'</b>\\n\", \"z\": [1, 2.5], \"a\": {}}|{\n  \"role\": \"user\",\n  \"content\": \"<b>é & 'x'</b>\\n\",\n  \"z\": [\n    1,\n    2.5\n  ],\n  \"a\": {}\n}|{\"content\":\"\",\"e\":[],\"role\":\"user\"}"
        );
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
