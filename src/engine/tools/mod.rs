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
    /// What a thinking model (Qwen3) writes inside `<think>` before its answer.
    Reasoning(String),
}

/// Where a thinking model's reasoning ends (its generation prompt opens it).
pub(crate) const THINK_END: &str = "</think>";

/// One family's tool-call syntax.
pub trait ToolSyntax: Send + Sync {
    /// Where a tool call may begin in `answer` (the answer so far, from its first byte not yet
    /// released as final): the byte offset of the first call not yet finished, or of a tail that
    /// could still grow into one; `None` when no call can begin. What comes before it is final.
    fn could_be_tool_call(&self, answer: &str) -> Option<usize>;

    /// Whether a call may open after text. Syntaxes whose calls are the whole answer (Llama 3,
    /// Mistral) say no: once text is released, the rest of the answer is text too.
    fn opens_anywhere(&self) -> bool {
        true
    }

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

/// An answer's reasoning, text and calls as it streams: reasoning and text are released as soon
/// as no call can begin in them, calls as soon as they are whole.
pub struct ToolCallStream {
    /// `None` when the request offers no tools: everything after the reasoning is text.
    syntax: Option<&'static dyn ToolSyntax>,
    answer: String,
    released: usize,
    /// Still inside the reasoning.
    thinking: bool,
    /// Where the answer proper begins (after the reasoning and the blank lines that follow it);
    /// `None` until it is known.
    start: Option<usize>,
}

impl ToolCallStream {
    pub fn new(syntax: &'static dyn ToolSyntax) -> Self {
        Self::for_answer(Some(syntax), false)
    }

    /// A stream for calls in `syntax` (if any) of an answer that opens inside `<think>` when
    /// `thinking`.
    pub fn for_answer(syntax: Option<&'static dyn ToolSyntax>, thinking: bool) -> Self {
        Self {
            syntax,
            answer: String::new(),
            released: 0,
            thinking,
            start: (!thinking).then_some(0),
        }
    }

    pub fn push(&mut self, delta: &str) -> Vec<Parsed> {
        self.answer.push_str(delta);
        let mut out = Vec::new();
        if self.thinking {
            let rest = &self.answer[self.released..];
            let (cut, done) = match rest.find(THINK_END) {
                Some(i) => (i, true),
                None => (
                    rest.len() - hermes::longest_prefix_suffix(rest, THINK_END),
                    false,
                ),
            };
            if cut > 0 {
                out.push(Parsed::Reasoning(rest[..cut].to_string()));
            }
            self.released += cut;
            if !done {
                return out;
            }
            self.released += THINK_END.len();
            self.thinking = false;
        }
        let start = match self.start {
            Some(s) => s,
            None => {
                let rest = &self.answer[self.released..];
                self.released += rest.len() - rest.trim_start().len();
                if self.released == self.answer.len() {
                    return out;
                }
                self.start = Some(self.released);
                self.released
            }
        };
        // Only the part not yet released is looked at: a long answer is not rescanned per token.
        let end = match self.syntax {
            Some(s) if s.opens_anywhere() || self.released == start => s
                .could_be_tool_call(&self.answer[self.released..])
                .map_or(self.answer.len(), |i| self.released + i),
            _ => self.answer.len(),
        };
        if end > self.released && self.answer.is_char_boundary(end) {
            out.extend(self.parse(self.released, end));
            self.released = end;
        }
        out
    }

    /// The end of the answer: what was held back is parsed as it stands (a call cut off by the
    /// end of the turn is still reported).
    pub fn finish(&mut self) -> Vec<Parsed> {
        let (from, to) = (self.released, self.answer.len());
        self.released = to;
        if from == to {
            return Vec::new();
        }
        if self.thinking {
            return vec![Parsed::Reasoning(self.answer[from..].to_string())];
        }
        self.parse(from, to)
    }

    fn parse(&self, from: usize, to: usize) -> Vec<Parsed> {
        let part = &self.answer[from..to];
        match self.syntax {
            Some(s) => s.parse(part),
            None => vec![Parsed::Text(part.to_string())],
        }
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
    fn reasoning_is_split_from_the_answer_with_or_without_tools() {
        let mut s = ToolCallStream::for_answer(Some(&Llama3Json), true);
        assert_eq!(
            s.push("Let me think.</th"),
            vec![Parsed::Reasoning("Let me think.".into())]
        );
        assert!(s.push("ink>\n\n").is_empty());
        assert!(s.push("{\"name\": \"f\", \"parameters\": {}}").is_empty());
        assert_eq!(s.finish(), vec![call("f", "{}")]);
        let mut s = ToolCallStream::for_answer(None, true);
        let mut out = s.push("\n</think>\n\nHi");
        out.extend(s.finish());
        assert_eq!(
            out,
            vec![Parsed::Reasoning("\n".into()), Parsed::Text("Hi".into())]
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
