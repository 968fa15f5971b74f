//! Mistral's tool calls: `[TOOL_CALLS]` (a special token) then a JSON list of `{"name", "arguments"}`
//! objects (Mistral 7B v0.3, Ministral), or, from the v11 tokenizer on, `[TOOL_CALLS]name[ARGS]{...}`
//! once per call. Mistral's templates require call ids of nine letters and digits: new calls get
//! such ids, and other ids in a conversation's history are mapped to one.

use serde_json::Value;

use super::hermes::longest_prefix_suffix;
use super::{call_from_value, Parsed, ParsedCall, ToolSyntax};

const TOOL_CALLS: &str = "[TOOL_CALLS]";
const ARGS: &str = "[ARGS]";
const ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

pub struct Mistral;

impl ToolSyntax for Mistral {
    fn could_be_tool_call(&self, answer: &str) -> Option<usize> {
        let t = answer.trim_start();
        let opens = t.starts_with(TOOL_CALLS) || longest_prefix_suffix(t, TOOL_CALLS) == t.len();
        opens.then_some(0)
    }

    fn parse(&self, answer: &str) -> Vec<Parsed> {
        let Some(body) = answer.trim_start().strip_prefix(TOOL_CALLS) else {
            return match answer.trim().is_empty() {
                true => Vec::new(),
                false => vec![Parsed::Text(answer.to_string())],
            };
        };
        let body = body.trim();
        if body.starts_with('[') {
            let mut values = serde_json::Deserializer::from_str(body).into_iter::<Value>();
            if let Some(Ok(Value::Array(items))) = values.next() {
                let calls: Option<Vec<ParsedCall>> = items.iter().map(call_from_value).collect();
                if let Some(calls) = calls {
                    return calls.into_iter().map(Parsed::Call).collect();
                }
            }
            return vec![invalid("", body)];
        }
        // v11: `name[ARGS]{...}`, the marker repeated before each further call.
        body.split(TOOL_CALLS)
            .filter(|s| !s.trim().is_empty())
            .map(|one| match one.split_once(ARGS) {
                Some((name, args)) => {
                    let args = args.trim();
                    match serde_json::from_str::<Value>(args) {
                        Ok(v @ Value::Object(_)) => Parsed::Call(ParsedCall {
                            name: name.trim().to_string(),
                            arguments: v.to_string(),
                            valid: true,
                        }),
                        _ => invalid(name.trim(), args),
                    }
                }
                None => invalid("", one.trim()),
            })
            .collect()
    }

    fn call_id(&self) -> String {
        let bytes = uuid::Uuid::now_v7().into_bytes();
        // A v7 id's bytes 7 to 15 are random but for the variant's two bits in byte 8.
        bytes[7..]
            .iter()
            .map(|b| ID_CHARS[*b as usize % ID_CHARS.len()] as char)
            .collect()
    }

    fn markers(&self) -> &'static [&'static str] {
        &[TOOL_CALLS, ARGS]
    }

    fn opens_anywhere(&self) -> bool {
        false
    }

    fn prepare_history(&self, messages: &mut Vec<Value>) {
        for m in messages.iter_mut() {
            if let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) {
                for c in calls {
                    if let Some(id) = c.get_mut("id") {
                        *id = Value::String(nine_char_id(id.as_str().unwrap_or("")));
                    }
                }
            }
            if let Some(id) = m.get_mut("tool_call_id") {
                *id = Value::String(nine_char_id(id.as_str().unwrap_or("")));
            }
        }
    }
}

/// `id` itself when it is already nine letters and digits; otherwise nine drawn from its hash, so
/// a call and its result keep matching.
fn nine_char_id(id: &str) -> String {
    if id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return id.to_string();
    }
    // FNV-1a: stable across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..9)
        .map(|_| {
            let c = ID_CHARS[(h % ID_CHARS.len() as u64) as usize] as char;
            h /= ID_CHARS.len() as u64;
            c
        })
        .collect()
}

fn invalid(name: &str, raw: &str) -> Parsed {
    Parsed::Call(ParsedCall {
        name: name.to_string(),
        arguments: raw.to_string(),
        valid: false,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{call, stream};
    use super::*;
    use serde_json::json;

    #[test]
    fn the_model_cards_call_list_parses_streamed_and_whole() {
        // Mistral-7B-Instruct-v0.3's model card, function-calling example.
        let out = r#"[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}]"#;
        let want = vec![call(
            "get_current_weather",
            r#"{"location":"Paris, France","format":"celsius"}"#,
        )];
        assert_eq!(stream(&Mistral, &[out]), want);
        assert_eq!(
            stream(&Mistral, &["[TOOL", "_CALLS]", &out[12..40], &out[40..]]),
            want
        );
    }

    #[test]
    fn the_v11_form_and_parallel_calls_parse() {
        let out = "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}[TOOL_CALLS]get_time[ARGS]{}";
        assert_eq!(
            stream(&Mistral, &[out]),
            vec![
                call("get_weather", r#"{"city":"Paris"}"#),
                call("get_time", "{}")
            ]
        );
        let two = r#"[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": [1]}}]"#;
        assert_eq!(
            stream(&Mistral, &[two]),
            vec![call("a", "{}"), call("b", r#"{"x":[1]}"#)]
        );
    }

    #[test]
    fn text_is_released_and_broken_lists_are_reported() {
        assert_eq!(
            stream(&Mistral, &["Paris is ", "sunny."]),
            vec![Parsed::Text("Paris is sunny.".into())]
        );
        let bad = stream(
            &Mistral,
            &["[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {"],
        );
        assert!(matches!(&bad[..], [Parsed::Call(c)] if !c.valid), "{bad:?}");
    }

    #[test]
    fn call_ids_are_nine_alphanumerics_and_history_ids_are_mapped_consistently() {
        let id = Mistral.call_id();
        assert!(
            id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
            "{id}"
        );
        assert_ne!(Mistral.call_id(), id);
        let mut m = vec![
            json!({"role": "assistant", "tool_calls": [{"id": "call_0198abc", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]}),
            json!({"role": "tool", "tool_call_id": "call_0198abc", "content": "ok"}),
            json!({"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "ok"}),
        ];
        Mistral.prepare_history(&mut m);
        let mapped = m[0]["tool_calls"][0]["id"].as_str().unwrap();
        assert_eq!(mapped.len(), 9);
        assert_eq!(m[1]["tool_call_id"], mapped);
        assert_eq!(m[2]["tool_call_id"], "a1B2c3D4e");
    }
}
