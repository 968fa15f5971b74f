//! Hermes-style tool calls, which Qwen2.5/Qwen3, SmolLM and Hermes models write: `<tool_call>{"name":
//! ..., "arguments": {...}}</tool_call>` blocks, anywhere in the answer, as many as it makes. Models
//! whose chat template cannot render tools are taught this syntax by a system prompt
//! (`tools_system_prompt`), with tool history rewritten to match (`messages_with_tools`).

use serde_json::{json, Value};

use super::{call_from_value, Parsed, ParsedCall, ToolSyntax};

/// The tags around a call: the one definition the prompt, the parser and the grammar
/// (`engine::grammar`) share.
pub(crate) const OPEN: &str = "<tool_call>";
pub(crate) const CLOSE: &str = "</tool_call>";

/// Builds the system prompt that teaches the model the tools and the call syntax.
pub fn tools_system_prompt(tools: &[Value], tool_choice: Option<&Value>) -> String {
    let mut s = String::from(
        "You are a function-calling assistant. You may call one or more of the functions described inside <tools></tools> to answer the user.\n<tools>\n",
    );
    for t in tools {
        let f = t.get("function").unwrap_or(t);
        let sig = json!({
            "name": f.get("name"),
            "description": f.get("description").cloned().unwrap_or(Value::String(String::new())),
            "parameters": f.get("parameters").cloned().unwrap_or(json!({"type": "object", "properties": {}})),
        });
        s.push_str(&sig.to_string());
        s.push('\n');
    }
    s.push_str(&format!("</tools>\nFor each function call, answer with a JSON object holding the function's name and arguments inside {OPEN}{CLOSE} tags, like this:\n{OPEN}\n{{\"name\": \"<function-name>\", \"arguments\": {{<arguments as JSON>}}}}\n{CLOSE}\n"));
    match tool_choice {
        Some(Value::String(c)) if c == "required" => {
            s.push_str("You must call at least one function.\n")
        }
        Some(Value::Object(o)) => {
            if let Some(name) = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            {
                s.push_str(&format!("You must call the function \"{name}\".\n"));
            }
        }
        _ => s.push_str("If no function fits, answer the user directly in plain text.\n"),
    }
    s
}

/// Rewrites OpenAI messages for a template without tool support: the tools prompt goes first (merged
/// into an existing system message), assistant tool calls become `<tool_call>` text, and tool results
/// become `<tool_response>` blocks.
pub fn messages_with_tools(messages: &[Value], tools_prompt: &str) -> Vec<Value> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    let mut merged = false;
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let content = crate::wire::chat::content_text(m.get("content"));
        match role {
            "system" | "developer" if i == 0 => {
                out.push(
                    json!({"role": "system", "content": format!("{content}\n\n{tools_prompt}")}),
                );
                merged = true;
            }
            "assistant" => {
                let mut text = content;
                for c in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let name = c.pointer("/function/name").cloned().unwrap_or(Value::Null);
                    let args = c
                        .pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .and_then(|a| serde_json::from_str::<Value>(a).ok())
                        .unwrap_or(json!({}));
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!(
                        "{OPEN}\n{}\n{CLOSE}",
                        json!({"name": name, "arguments": args})
                    ));
                }
                out.push(json!({"role": "assistant", "content": text}));
            }
            "tool" | "function" => {
                out.push(json!({"role": "user", "content": format!("<tool_response>\n{content}\n</tool_response>")}));
            }
            _ => out.push(json!({"role": role, "content": content})),
        }
    }
    if !merged {
        out.insert(0, json!({"role": "system", "content": tools_prompt}));
    }
    out
}

/// Splits model text, as it streams, into plain text and tool calls: text that may still become a
/// call is held back until it is decided.
#[derive(Default)]
struct ToolCallParser {
    buf: String,
    inside: bool,
}

impl ToolCallParser {
    fn push(&mut self, delta: &str) -> Vec<Parsed> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        loop {
            if self.inside {
                let Some(end) = self.buf.find(CLOSE) else {
                    break;
                };
                let body = self.buf[..end].to_string();
                self.buf.drain(..end + CLOSE.len());
                self.inside = false;
                out.push(parse_call(&body));
            } else if let Some(start) = self.buf.find(OPEN) {
                let text = self.buf[..start].to_string();
                if !text.trim().is_empty() {
                    out.push(Parsed::Text(text));
                }
                self.buf.drain(..start + OPEN.len());
                self.inside = true;
            } else {
                // Emit all but a tail that could be the start of "<tool_call>".
                let keep = longest_prefix_suffix(&self.buf, OPEN);
                let cut = self.buf.len() - keep;
                if cut > 0 {
                    let text: String = self.buf.drain(..cut).collect();
                    out.push(Parsed::Text(text));
                }
                break;
            }
        }
        out
    }

    /// The end of the output: an unterminated call is still parsed (models often stop at the
    /// closing tag's end-of-turn), and held-back text is released.
    fn finish(&mut self) -> Vec<Parsed> {
        let rest = std::mem::take(&mut self.buf);
        if self.inside {
            self.inside = false;
            if rest.trim().is_empty() {
                return Vec::new();
            }
            return vec![parse_call(&rest)];
        }
        if rest.is_empty() {
            Vec::new()
        } else {
            vec![Parsed::Text(rest)]
        }
    }
}

/// The Hermes syntax.
pub struct Hermes;

impl ToolSyntax for Hermes {
    /// The first `<tool_call>` not yet closed, or a tail that may grow into one: whole blocks
    /// before it are final.
    fn could_be_tool_call(&self, answer: &str) -> Option<usize> {
        let mut from = 0;
        while let Some(open) = answer[from..].find(OPEN).map(|i| from + i) {
            match answer[open + OPEN.len()..].find(CLOSE) {
                Some(close) => from = open + OPEN.len() + close + CLOSE.len(),
                None => return Some(open),
            }
        }
        match longest_prefix_suffix(&answer[from..], OPEN) {
            0 => None,
            keep => Some(answer.len() - keep),
        }
    }

    fn parse(&self, answer: &str) -> Vec<Parsed> {
        let mut p = ToolCallParser::default();
        let mut out = p.push(answer);
        out.extend(p.finish());
        // Line breaks between and after blocks are layout, not an answer.
        if out.iter().any(|p| matches!(p, Parsed::Call(_))) {
            out.retain(|p| !matches!(p, Parsed::Text(t) if t.trim().is_empty()));
        }
        out
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of `pat`.
pub(super) fn longest_prefix_suffix(s: &str, pat: &str) -> usize {
    (1..pat.len().min(s.len() + 1))
        .rev()
        .find(|&k| s.is_char_boundary(s.len() - k) && s.ends_with(&pat[..k]))
        .unwrap_or(0)
}

pub(super) fn parse_call(body: &str) -> Parsed {
    let trimmed = body.trim();
    let call = serde_json::from_str::<Value>(trimmed)
        .ok()
        .and_then(|v| call_from_value(&v));
    Parsed::Call(call.unwrap_or_else(|| {
        // Not a call object: report it with what can be recovered, never drop it.
        let name = trimmed
            .split("\"name\"")
            .nth(1)
            .and_then(|r| r.split('"').nth(1))
            .unwrap_or("")
            .to_string();
        ParsedCall {
            name,
            arguments: trimmed.to_string(),
            valid: false,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str]) -> Vec<Parsed> {
        super::super::testing::stream(&Hermes, pieces)
    }

    #[test]
    fn parallel_calls_split_across_deltas_are_parsed() {
        let out = run(&[
            "Let me check.\n<tool",
            "_call>\n{\"name\": \"get_weather\", \"argu",
            "ments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>",
        ]);
        assert_eq!(
            out,
            vec![
                Parsed::Text("Let me check.\n".into()),
                Parsed::Call(ParsedCall {
                    name: "get_weather".into(),
                    arguments: "{\"city\":\"Paris\"}".into(),
                    valid: true
                }),
                Parsed::Call(ParsedCall {
                    name: "get_time".into(),
                    arguments: "{}".into(),
                    valid: true
                }),
            ]
        );
    }

    #[test]
    fn text_that_only_looks_like_a_tag_start_is_released() {
        assert_eq!(
            run(&["a < b and <to", "ols are fun"]),
            vec![Parsed::Text("a < b and <tools are fun".into())]
        );
    }

    #[test]
    fn malformed_and_unterminated_calls_are_reported_not_dropped() {
        let out = run(&["<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1,}}</tool_call>"]);
        assert_eq!(
            out,
            vec![Parsed::Call(ParsedCall {
                name: "f".into(),
                arguments: "{\"name\": \"f\", \"arguments\": {\"x\": 1,}}".into(),
                valid: false
            })]
        );
        let out = run(&["<tool_call>{\"name\": \"g\", \"arguments\": {\"y\": 2}}"]);
        assert_eq!(
            out,
            vec![Parsed::Call(ParsedCall {
                name: "g".into(),
                arguments: "{\"y\":2}".into(),
                valid: true
            })]
        );
    }

    #[test]
    fn history_is_rewritten_for_templates_without_tools() {
        let msgs = vec![
            json!({"role": "user", "content": "weather?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "w", "arguments": "{\"c\":\"P\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "c", "content": "sunny"}),
        ];
        let out = messages_with_tools(&msgs, "TOOLS");
        assert_eq!(out[0], json!({"role": "system", "content": "TOOLS"}));
        assert!(out[2]["content"]
            .as_str()
            .unwrap()
            .contains("<tool_call>\n{\"name\":\"w\",\"arguments\":{\"c\":\"P\"}}\n</tool_call>"));
        assert_eq!(
            out[3]["content"],
            "<tool_response>\nsunny\n</tool_response>"
        );
        let p = tools_system_prompt(
            &[
                json!({"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}),
            ],
            Some(&json!("required")),
        );
        assert!(p.contains("\"name\":\"w\"") && p.contains("must call at least one"));
    }
}
