//! Reassembles a stream of `chat.completion.chunk` objects into the one `chat.completion` the
//! client would have received without streaming: what the traffic log stores and shadows compare.
//! Legacy completions stream `text_completion` objects whose choices carry `text`; those are
//! reassembled into one `text_completion`.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

#[derive(Default)]
struct ToolCallAcc {
    id: Option<String>,
    kind: Option<String>,
    name: String,
    arguments: String,
}

#[derive(Default)]
struct ChoiceAcc {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: BTreeMap<u64, ToolCallAcc>,
    finish_reason: Value,
    logprobs: Vec<Value>,
}

#[derive(Default)]
pub struct ChunkAssembler {
    id: Option<Value>,
    created: Option<Value>,
    model: Option<Value>,
    system_fingerprint: Option<Value>,
    service_tier: Option<Value>,
    choices: BTreeMap<u64, ChoiceAcc>,
    usage: Option<Value>,
    chunks: usize,
    /// The stream is of legacy `text_completion` chunks.
    text_completion: bool,
}

impl ChunkAssembler {
    pub fn push(&mut self, chunk: &Value) {
        self.chunks += 1;
        let take = |slot: &mut Option<Value>, key: &str| {
            if slot.is_none() {
                if let Some(v) = chunk.get(key).filter(|v| !v.is_null()) {
                    *slot = Some(v.clone());
                }
            }
        };
        take(&mut self.id, "id");
        take(&mut self.created, "created");
        take(&mut self.model, "model");
        take(&mut self.system_fingerprint, "system_fingerprint");
        take(&mut self.service_tier, "service_tier");
        if self.chunks == 1 {
            self.text_completion =
                chunk.get("object").and_then(Value::as_str) == Some("text_completion");
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
            return;
        };
        for (pos, c) in choices.iter().enumerate() {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
            let acc = self.choices.entry(index).or_default();
            if let Some(f) = c.get("finish_reason").filter(|f| !f.is_null()) {
                acc.finish_reason = f.clone();
            }
            if let Some(lp) = c.pointer("/logprobs/content").and_then(Value::as_array) {
                acc.logprobs.extend(lp.iter().cloned());
            }
            if let Some(t) = c.get("text").and_then(Value::as_str) {
                acc.content.get_or_insert_with(String::new).push_str(t);
            }
            let Some(delta) = c.get("delta") else {
                continue;
            };
            if let Some(r) = delta.get("role").and_then(Value::as_str) {
                acc.role = Some(r.to_string());
            }
            if let Some(s) = delta.get("content").and_then(Value::as_str) {
                acc.content.get_or_insert_with(String::new).push_str(s);
            }
            if let Some(s) = delta.get("refusal").and_then(Value::as_str) {
                acc.refusal.get_or_insert_with(String::new).push_str(s);
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                for (k, call) in calls.iter().enumerate() {
                    let ci = call
                        .get("index")
                        .and_then(Value::as_u64)
                        .unwrap_or(k as u64);
                    let t = acc.tool_calls.entry(ci).or_default();
                    if let Some(id) = call.get("id").and_then(Value::as_str) {
                        t.id = Some(id.to_string());
                    }
                    if let Some(ty) = call.get("type").and_then(Value::as_str) {
                        t.kind = Some(ty.to_string());
                    }
                    if let Some(n) = call.pointer("/function/name").and_then(Value::as_str) {
                        t.name.push_str(n);
                    }
                    if let Some(a) = call.pointer("/function/arguments").and_then(Value::as_str) {
                        t.arguments.push_str(a);
                    }
                }
            }
        }
    }

    /// True once any chunk has been pushed.
    pub fn is_empty(&self) -> bool {
        self.chunks == 0
    }

    pub fn finish(&self) -> Value {
        if self.text_completion {
            return self.finish_text_completion();
        }
        let choices: Vec<Value> = self
            .choices
            .iter()
            .map(|(index, c)| {
                let mut message = Map::new();
                message.insert(
                    "role".into(),
                    json!(c.role.as_deref().unwrap_or("assistant")),
                );
                message.insert(
                    "content".into(),
                    c.content.clone().map_or(Value::Null, Value::String),
                );
                message.insert(
                    "refusal".into(),
                    c.refusal.clone().map_or(Value::Null, Value::String),
                );
                if !c.tool_calls.is_empty() {
                    let calls: Vec<Value> = c
                        .tool_calls
                        .values()
                        .map(|t| {
                            json!({
                                "id": t.id,
                                "type": t.kind.as_deref().unwrap_or("function"),
                                "function": {"name": t.name, "arguments": t.arguments},
                            })
                        })
                        .collect();
                    message.insert("tool_calls".into(), Value::Array(calls));
                }
                let logprobs = if c.logprobs.is_empty() {
                    Value::Null
                } else {
                    json!({"content": c.logprobs})
                };
                json!({
                    "index": index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                })
            })
            .collect();
        let mut out = Map::new();
        out.insert("id".into(), self.id.clone().unwrap_or(Value::Null));
        out.insert("object".into(), json!("chat.completion"));
        out.insert(
            "created".into(),
            self.created.clone().unwrap_or(Value::Null),
        );
        out.insert("model".into(), self.model.clone().unwrap_or(Value::Null));
        out.insert("choices".into(), Value::Array(choices));
        out.insert("usage".into(), self.usage.clone().unwrap_or(Value::Null));
        if let Some(fp) = &self.system_fingerprint {
            out.insert("system_fingerprint".into(), fp.clone());
        }
        if let Some(st) = &self.service_tier {
            out.insert("service_tier".into(), st.clone());
        }
        Value::Object(out)
    }
}

impl ChunkAssembler {
    fn finish_text_completion(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .map(|(index, c)| {
                json!({"index": index, "text": c.content.as_deref().unwrap_or(""),
                    "logprobs": null, "finish_reason": c.finish_reason})
            })
            .collect();
        json!({
            "id": self.id.clone().unwrap_or(Value::Null),
            "object": "text_completion",
            "created": self.created.clone().unwrap_or(Value::Null),
            "model": self.model.clone().unwrap_or(Value::Null),
            "choices": choices,
            "usage": self.usage.clone().unwrap_or(Value::Null),
        })
    }
}

/// Rebuilds a streamed answer for the log: from chat (or completion) chunks, or from a native
/// Responses or Messages stream's events.
pub enum Assembler {
    Chunks(Box<ChunkAssembler>),
    Native(crate::wire::native::NativeAssembler),
}

impl Assembler {
    /// The assembler for a stream whose items have this shape.
    pub fn for_shape(shape: crate::wire::Api) -> Self {
        use crate::wire::Api;
        match shape {
            Api::Responses | Api::Messages => {
                Assembler::Native(crate::wire::native::NativeAssembler::new(shape))
            }
            _ => Assembler::Chunks(Box::default()),
        }
    }

    pub fn push(&mut self, item: &Value) {
        match self {
            Assembler::Chunks(a) => a.push(item),
            Assembler::Native(a) => a.push(item),
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            Assembler::Chunks(a) => a.is_empty(),
            Assembler::Native(a) => a.is_empty(),
        }
    }

    /// Whether an item carries generated output (for time to first token).
    pub fn carries_output(&self, item: &Value) -> bool {
        match self {
            Assembler::Chunks(_) => carries_output(item),
            Assembler::Native(_) => crate::wire::native::carries_output(item),
        }
    }

    /// The whole answer as the log keeps it (a chat completion, or a `text_completion`).
    pub fn finish(&self) -> Option<Value> {
        match self {
            Assembler::Chunks(a) => Some(a.finish()),
            Assembler::Native(a) => a.finish(),
        }
    }
}

/// A chunk that carries only usage (`choices: []`), sent last when `include_usage` is on.
pub fn is_usage_only(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && chunk.get("usage").is_some_and(Value::is_object)
}

/// Whether a chunk carries generated output (content, refusal or a tool-call delta).
pub fn carries_output(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                if c.get("text")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
                {
                    return true;
                }
                let d = c.get("delta");
                d.and_then(|d| d.get("content"))
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
                    || d.and_then(|d| d.get("refusal"))
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
                    || d.and_then(|d| d.get("tool_calls"))
                        .is_some_and(Value::is_array)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_tool_call_deltas_are_joined_per_index() {
        let mut a = ChunkAssembler::default();
        let chunks = [
            json!({"id": "c", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": null}, "finish_reason": null}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"id": "c", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}),
        ];
        for c in &chunks {
            a.push(c);
        }
        assert!(is_usage_only(&chunks[6]));
        assert!(carries_output(&chunks[1]));
        assert!(!carries_output(&chunks[0]));
        let v = a.finish();
        assert_eq!(v["object"], "chat.completion");
        let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(calls[1]["function"]["name"], "get_time");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(v["usage"]["total_tokens"], 3);
    }

    #[test]
    fn text_deltas_concatenate() {
        let mut a = ChunkAssembler::default();
        a.push(
            &json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]}),
        );
        a.push(&json!({"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}));
        let v = a.finish();
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    }
}
