//! Llama 3.x's JSON tool calls: the whole answer is the call, `{"name": ..., "parameters": {...}}`
//! (as its chat template asks), optionally after `<|python_tag|>`, several separated by `;`. An
//! answer that does not open like that is text, however much JSON it holds later.

use serde_json::Value;

use super::hermes::longest_prefix_suffix;
use super::{call_from_value, Parsed, ParsedCall, ToolSyntax};

const PYTHON_TAG: &str = "<|python_tag|>";

pub struct Llama3Json;

impl ToolSyntax for Llama3Json {
    fn could_be_tool_call(&self, answer: &str) -> Option<usize> {
        let t = answer.trim_start();
        let opens = t.is_empty()
            || t.starts_with('{')
            || t.starts_with(PYTHON_TAG)
            || longest_prefix_suffix(t, PYTHON_TAG) == t.len();
        opens.then_some(0)
    }

    fn parse(&self, answer: &str) -> Vec<Parsed> {
        let t = answer.trim();
        let (tagged, body) = match t.strip_prefix(PYTHON_TAG) {
            Some(rest) => (true, rest.trim()),
            None => (false, t),
        };
        if !body.starts_with('{') {
            return match (tagged, t.is_empty()) {
                (_, true) => Vec::new(),
                (false, false) => vec![Parsed::Text(answer.to_string())],
                // A tagged answer is a call by intent: report it, never drop it.
                (true, false) => vec![invalid(body)],
            };
        }
        match calls(body) {
            Some(calls) => calls.into_iter().map(Parsed::Call).collect(),
            None if tagged => vec![invalid(body)],
            None => vec![Parsed::Text(answer.to_string())],
        }
    }

    fn markers(&self) -> &'static [&'static str] {
        &[PYTHON_TAG]
    }

    fn opens_anywhere(&self) -> bool {
        false
    }

    /// Llama 3's template takes one call per assistant turn: a turn with parallel calls becomes
    /// consecutive turns of one call each.
    fn prepare_history(&self, messages: &mut Vec<Value>) {
        let mut out = Vec::with_capacity(messages.len());
        for m in messages.drain(..) {
            let calls = m.get("tool_calls").and_then(Value::as_array).cloned();
            match calls {
                Some(calls) if calls.len() > 1 => {
                    for c in calls {
                        let mut one = m.clone();
                        one["tool_calls"] = Value::Array(vec![c]);
                        out.push(one);
                    }
                }
                _ => out.push(m),
            }
        }
        *messages = out;
    }
}

/// Every call in `body`: JSON call objects separated by `;` or whitespace, and nothing else.
fn calls(body: &str) -> Option<Vec<ParsedCall>> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = values.next()?.ok()?;
        out.push(call_from_value(&v)?);
        rest = rest[values.byte_offset()..]
            .trim_start_matches(|c: char| c == ';' || c.is_whitespace());
    }
    (!out.is_empty()).then_some(out)
}

fn invalid(body: &str) -> Parsed {
    match super::hermes::parse_call(body) {
        Parsed::Call(c) => Parsed::Call(ParsedCall { valid: false, ..c }),
        text => text,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{call, stream};
    use super::*;
    use serde_json::json;

    #[test]
    fn the_model_cards_json_call_parses_streamed_and_whole() {
        // Meta's prompt-format guide for Llama 3.1/3.2 JSON tool calling.
        let out = r#"{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}"#;
        let want = vec![call(
            "get_current_conditions",
            r#"{"location":"San Francisco, CA","unit":"Fahrenheit"}"#,
        )];
        assert_eq!(stream(&Llama3Json, &[out]), want);
        let pieces: Vec<String> = out.chars().map(String::from).collect();
        let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
        assert_eq!(stream(&Llama3Json, &pieces), want);
    }

    #[test]
    fn python_tag_and_several_calls_parse() {
        let out = "<|python_tag|>{\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \"parameters\": {}}";
        assert_eq!(
            stream(&Llama3Json, &["<|python", "_tag|>", &out[14..]]),
            vec![call("a", r#"{"x":1}"#), call("b", "{}")]
        );
    }

    #[test]
    fn text_and_json_that_is_not_a_call_stay_text() {
        let mut s = super::super::ToolCallStream::new(&Llama3Json);
        // Text is released at once: the answer did not open with a call.
        assert_eq!(s.push("It is "), vec![Parsed::Text("It is ".into())]);
        assert_eq!(
            s.push("{\"sunny\": true}"),
            vec![Parsed::Text("{\"sunny\": true}".into())]
        );
        assert_eq!(
            stream(&Llama3Json, &["{\"answer\": 42}"]),
            vec![Parsed::Text("{\"answer\": 42}".into())]
        );
        let bad = stream(
            &Llama3Json,
            &["<|python_tag|>{\"name\": \"f\", \"parameters\": {"],
        );
        assert!(
            matches!(&bad[..], [Parsed::Call(c)] if c.name == "f" && !c.valid),
            "{bad:?}"
        );
    }

    #[test]
    fn parallel_calls_in_history_become_one_call_per_turn() {
        let mut m = vec![json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
            {"id": "2", "type": "function", "function": {"name": "b", "arguments": "{}"}}]})];
        Llama3Json.prepare_history(&mut m);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1]["tool_calls"][0]["function"]["name"], "b");
    }
}
