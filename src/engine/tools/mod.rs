//! Tool calls as each model family writes them, read back into OpenAI tool calls.
//!
//! A family's syntax is one `ToolSyntax`: Hermes `<tool_call>` blocks (Qwen, SmolLM, Hermes),
//! Llama 3.x's bare JSON (`{"name": ..., "parameters": ...}`, after `<|python_tag|>` or not) and
//! Mistral's `[TOOL_CALLS]` list. The family comes from the model's chat template (or the model's
//! `tool_format` setting); `ToolCallStream` applies it to an answer as it streams, holding text back
//! only while it may still become a call. Adding a family is one file here and one arm in
//! `ToolFormat`.
//!
//! Not here: how tools reach the prompt (the model's own template, or the Hermes system prompt in
//! `hermes` for templates that cannot render tools) and constrained decoding (`engine::grammar`).

mod hermes;
mod llama3;
mod mistral;

use serde_json::Value;

pub use hermes::{messages_with_tools, tools_system_prompt, Hermes};
pub(crate) use hermes::{CLOSE, OPEN};
pub use llama3::Llama3Json;
pub use mistral::Mistral;

/// A tool call parsed from model output. `arguments` is the JSON text OpenAI clients expect; when
/// the model wrote something that is not JSON, it is kept verbatim and `valid` is false.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
    pub valid: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Text(String),
    Call(ParsedCall),
}

/// One family's tool-call syntax.
pub trait ToolSyntax: Send + Sync {
    /// Where a tool call may begin in `answer` (the whole answer so far): the byte offset of the
    /// first call not yet finished, or of a tail that could still grow into one; `None` when no
    /// call can begin. What comes before it is final.
    fn could_be_tool_call(&self, answer: &str) -> Option<usize>;

    /// Splits an answer (or the final part of one) into text and tool calls.
    fn parse(&self, answer: &str) -> Vec<Parsed>;

    /// The id a new call gets.
    fn call_id(&self) -> String {
        format!("call_{}", uuid::Uuid::now_v7().simple())
    }

    /// Special tokens the syntax writes, which must stay in the decoded answer for `parse`.
    fn markers(&self) -> &'static [&'static str] {
        &[]
    }

    /// Adjusts an OpenAI conversation to what the family's template accepts (e.g. call ids of
    /// the form it requires), before the template renders it.
    fn prepare_history(&self, _messages: &mut Vec<Value>) {}
}

/// The tool-call syntaxes the engine reads, by the name the `tool_format` setting uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolFormat {
    Hermes,
    Llama3Json,
    Mistral,
}

impl ToolFormat {
    /// The syntax a chat template teaches: Mistral's when it writes `[TOOL_CALLS]`, Llama 3's
    /// when it writes calls as `"parameters"` in Llama 3 headers, Hermes otherwise (also for
    /// templates that do not render tools: they get the Hermes system prompt).
    pub fn from_template(template: &str) -> Self {
        if template.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if template.contains("<|start_header_id|>")
            && (template.contains("<|python_tag|>") || template.contains("\"parameters\""))
        {
            Self::Llama3Json
        } else {
            Self::Hermes
        }
    }

    pub fn syntax(self) -> &'static dyn ToolSyntax {
        match self {
            Self::Hermes => &Hermes,
            Self::Llama3Json => &Llama3Json,
            Self::Mistral => &Mistral,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3Json => "llama3_json",
            Self::Mistral => "mistral",
        }
    }
}

/// A call from a parsed JSON object with a string `name` and an `arguments` (or Llama's
/// `parameters`) object; `None` when the value is not shaped like a call.
pub(crate) fn call_from_value(v: &Value) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let (arguments, valid) = match v.get("arguments").or_else(|| v.get("parameters")) {
        Some(Value::String(s)) => (s.clone(), serde_json::from_str::<Value>(s).is_ok()),
        Some(a @ Value::Object(_)) => (a.to_string(), true),
        Some(other) => (other.to_string(), false),
        None => ("{}".to_string(), true),
    };
    Some(ParsedCall {
        name,
        arguments,
        valid,
    })
}

/// An answer's text and calls as it streams: text is released as soon as the syntax says no call
/// can begin in it, calls as soon as they are whole.
pub struct ToolCallStream {
    syntax: &'static dyn ToolSyntax,
    answer: String,
    released: usize,
}

impl ToolCallStream {
    pub fn new(syntax: &'static dyn ToolSyntax) -> Self {
        Self {
            syntax,
            answer: String::new(),
            released: 0,
        }
    }

    pub fn push(&mut self, delta: &str) -> Vec<Parsed> {
        self.answer.push_str(delta);
        let end = self
            .syntax
            .could_be_tool_call(&self.answer)
            .unwrap_or(self.answer.len());
        if end <= self.released || !self.answer.is_char_boundary(end) {
            return Vec::new();
        }
        let out = self.syntax.parse(&self.answer[self.released..end]);
        self.released = end;
        out
    }

    /// The end of the answer: what was held back is parsed as it stands (a call cut off by the
    /// end of the turn is still reported).
    pub fn finish(&mut self) -> Vec<Parsed> {
        let rest = &self.answer[self.released..];
        self.released = self.answer.len();
        if rest.is_empty() {
            return Vec::new();
        }
        self.syntax.parse(rest)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Streams `pieces` through `syntax` and merges adjacent text, for comparison.
    pub fn stream(syntax: &'static dyn ToolSyntax, pieces: &[&str]) -> Vec<Parsed> {
        let mut s = ToolCallStream::new(syntax);
        let mut out: Vec<Parsed> = pieces.iter().flat_map(|d| s.push(d)).collect();
        out.extend(s.finish());
        let mut merged: Vec<Parsed> = Vec::new();
        for x in out {
            match (merged.last_mut(), x) {
                (Some(Parsed::Text(a)), Parsed::Text(b)) => a.push_str(&b),
                (_, x) => merged.push(x),
            }
        }
        merged
    }

    pub fn call(name: &str, arguments: &str) -> Parsed {
        Parsed::Call(ParsedCall {
            name: name.into(),
            arguments: arguments.into(),
            valid: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn each_family_template_names_its_syntax() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/families/templates");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(
            ToolFormat::from_template(&read("qwen2.5.jinja")),
            ToolFormat::Hermes
        );
        assert_eq!(
            ToolFormat::from_template(&read("qwen3.jinja")),
            ToolFormat::Hermes
        );
        assert_eq!(
            ToolFormat::from_template(&read("llama3.2.jinja")),
            ToolFormat::Llama3Json
        );
        assert_eq!(
            ToolFormat::from_template(&read("mistral-v0.3.jinja")),
            ToolFormat::Mistral
        );
        assert_eq!(
            ToolFormat::from_template("{{ messages }}"),
            ToolFormat::Hermes
        );
    }

    #[test]
    fn a_stream_releases_text_before_a_hermes_call_and_each_call_when_it_closes() {
        let mut s = ToolCallStream::new(&Hermes);
        assert_eq!(
            s.push("Checking. <tool"),
            vec![Parsed::Text("Checking. ".into())]
        );
        assert!(s.push("_call>{\"name\": \"f\", ").is_empty());
        assert_eq!(
            s.push("\"arguments\": {}}</tool_call>\n<tool_call>{\"name\""),
            vec![call("f", "{}")]
        );
        assert_eq!(s.push(": \"g\"}"), vec![]);
        assert_eq!(s.finish(), vec![call("g", "{}")]);
        assert_eq!(
            stream(&Hermes, &["plain ", "answer"]),
            vec![Parsed::Text("plain answer".into())]
        );
    }
}
