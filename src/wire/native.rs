//! Answers from upstreams that speak the Responses or Messages API natively (an upstream's
//! `native_apis`), read back into the chat completion the traffic log and the flywheel keep, so
//! natively forwarded traffic is logged and curated exactly like translated traffic. Streams are
//! reassembled from their events by [`NativeAssembler`].

use serde_json::{json, Value};

use super::Api;

/// A Responses API `response` object as the chat completion it stands for.
pub fn completion_from_response(r: &Value) -> Value {
    let mut text = String::new();
    let mut calls = Vec::new();
    for item in r
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                for part in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(t) = part.get("text").and_then(Value::as_str) {
                        text.push_str(t);
                    }
                }
            }
            Some("function_call") => calls.push(json!({
                "id": item.get("call_id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {"name": item.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": item.get("arguments").cloned().unwrap_or(json!(""))},
            })),
            _ => {}
        }
    }
    let finish = match (
        r.get("status").and_then(Value::as_str),
        r.pointer("/incomplete_details/reason")
            .and_then(Value::as_str),
    ) {
        (Some("incomplete"), Some("content_filter")) => "content_filter",
        (Some("incomplete"), _) => "length",
        _ if !calls.is_empty() => "tool_calls",
        _ => "stop",
    };
    let n = |p: &str| r.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let usage = r.get("usage").filter(|u| u.is_object()).map(|_| {
        json!({"prompt_tokens": n("/usage/input_tokens"), "completion_tokens": n("/usage/output_tokens"),
            "total_tokens": n("/usage/input_tokens") + n("/usage/output_tokens"),
            "prompt_tokens_details": {"cached_tokens": n("/usage/input_tokens_details/cached_tokens")}})
    });
    completion(r, &text, calls, finish, usage, "created_at")
}

/// An Anthropic `message` as the chat completion it stands for.
pub fn completion_from_message(m: &Value) -> Value {
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in m
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => {
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                let arguments = match input {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                calls.push(json!({"id": block.get("id").cloned().unwrap_or(Value::Null), "type": "function",
                    "function": {"name": block.get("name").cloned().unwrap_or(Value::Null), "arguments": arguments}}));
            }
            _ => {}
        }
    }
    let finish = match m.get("stop_reason").and_then(Value::as_str) {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    };
    let n = |p: &str| m.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let cached = n("/usage/cache_read_input_tokens");
    let prompt = n("/usage/input_tokens") + cached + n("/usage/cache_creation_input_tokens");
    let usage = m.get("usage").filter(|u| u.is_object()).map(|_| {
        json!({"prompt_tokens": prompt, "completion_tokens": n("/usage/output_tokens"),
            "total_tokens": prompt + n("/usage/output_tokens"),
            "prompt_tokens_details": {"cached_tokens": cached}})
    });
    completion(m, &text, calls, finish, usage, "created")
}

fn completion(
    native: &Value,
    text: &str,
    calls: Vec<Value>,
    finish: &str,
    usage: Option<Value>,
    created_key: &str,
) -> Value {
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }, "refusal": null});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    json!({
        "id": native.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": native.get(created_key).cloned().unwrap_or(json!(0)),
        "model": native.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": usage.unwrap_or(Value::Null),
    })
}

/// Rebuilds the final object of a native stream from its events: the `response` of a Responses
/// stream's last event, or an Anthropic message from its content block events.
#[derive(Debug)]
pub struct NativeAssembler {
    api: Api,
    events: usize,
    /// The Responses API's final `response`, or the Anthropic message being built.
    object: Option<Value>,
    /// Anthropic tool inputs arrive as JSON text pieces per block.
    partial_json: Vec<String>,
}

impl NativeAssembler {
    pub fn new(api: Api) -> Self {
        Self {
            api,
            events: 0,
            object: None,
            partial_json: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    pub fn push(&mut self, event: &Value) {
        self.events += 1;
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        match self.api {
            Api::Responses => {
                if let Some(r) = event.get("response") {
                    self.object = Some(r.clone());
                }
            }
            _ => self.push_message_event(kind, event),
        }
    }

    fn push_message_event(&mut self, kind: &str, event: &Value) {
        match kind {
            "message_start" => self.object = event.get("message").cloned(),
            "content_block_start" => {
                if let (Some(m), Some(block)) = (self.object.as_mut(), event.get("content_block")) {
                    if let Some(Value::Array(content)) = m.get_mut("content") {
                        content.push(block.clone());
                        self.partial_json.push(String::new());
                    }
                }
            }
            "content_block_delta" => {
                let Some(m) = self.object.as_mut() else {
                    return;
                };
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                let delta = event.get("delta").unwrap_or(&Value::Null);
                if let Some(t) = delta.get("text").and_then(Value::as_str) {
                    if let Some(Value::String(s)) = m.pointer_mut(&format!("/content/{index}/text"))
                    {
                        s.push_str(t);
                    }
                }
                if let Some(j) = delta.get("partial_json").and_then(Value::as_str) {
                    if let Some(buf) = self.partial_json.get_mut(index) {
                        buf.push_str(j);
                    }
                }
            }
            "content_block_stop" => {
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                let json = self.partial_json.get(index).cloned().unwrap_or_default();
                if let Some(m) = self.object.as_mut() {
                    if !json.is_empty() {
                        if let Some(input) = m.pointer_mut(&format!("/content/{index}/input")) {
                            *input = serde_json::from_str(&json).unwrap_or(Value::String(json));
                        }
                    }
                }
            }
            "message_delta" => {
                if let Some(m) = self.object.as_mut() {
                    if let Some(stop) = event.pointer("/delta/stop_reason") {
                        m["stop_reason"] = stop.clone();
                    }
                    if let Some(Value::Object(u)) = event.get("usage") {
                        for (k, v) in u {
                            m["usage"][k] = v.clone();
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// The chat completion the stream stands for.
    pub fn finish(&self) -> Option<Value> {
        let object = self.object.as_ref()?;
        Some(match self.api {
            Api::Responses => completion_from_response(object),
            _ => completion_from_message(object),
        })
    }

    /// The final native object (the Responses API's `response`, or the Anthropic message).
    pub fn object(&self) -> Option<&Value> {
        self.object.as_ref()
    }
}

/// Whether a native stream event carries generated output (for time to first token).
pub fn carries_output(event: &Value) -> bool {
    matches!(
        event.get("type").and_then(Value::as_str),
        Some(
            "response.output_text.delta"
                | "response.function_call_arguments.delta"
                | "content_block_delta"
        )
    )
}

/// Whether a native stream event is its stream's last.
pub fn is_last(event: &Value) -> bool {
    matches!(
        event.get("type").and_then(Value::as_str),
        Some("response.completed" | "response.incomplete" | "message_stop")
    )
}

/// Whether a native stream event reports that the stream failed.
pub fn is_failure(event: &Value) -> bool {
    matches!(
        event.get("type").and_then(Value::as_str),
        Some("response.failed" | "error")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_native_response_and_its_stream_log_the_same_chat_completion() {
        let r = json!({"id": "resp_u", "object": "response", "created_at": 5, "model": "m", "status": "completed",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{\"a\":1}"}],
            "usage": {"input_tokens": 3, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 1}}});
        let c = completion_from_response(&r);
        assert_eq!(c["choices"][0]["message"]["content"], "hi");
        assert_eq!(c["choices"][0]["message"]["tool_calls"][0]["id"], "c1");
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(c["usage"]["total_tokens"], 5);
        let mut a = NativeAssembler::new(Api::Responses);
        a.push(&json!({"type": "response.created", "response": {"status": "in_progress", "output": []}}));
        a.push(&json!({"type": "response.completed", "response": r}));
        assert_eq!(a.finish().unwrap(), c);
    }

    #[test]
    fn an_anthropic_stream_is_reassembled_into_its_message() {
        let events = [
            json!({"type": "message_start", "message": {"id": "msg_u", "type": "message", "role": "assistant", "model": "m", "content": [], "stop_reason": null, "usage": {"input_tokens": 4, "output_tokens": 0}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me "}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "check."}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\""}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ": 1}"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
            json!({"type": "message_stop"}),
        ];
        let mut a = NativeAssembler::new(Api::Messages);
        for e in &events {
            a.push(e);
        }
        let m = a.object().unwrap();
        assert_eq!(m["content"][0]["text"], "Let me check.");
        assert_eq!(m["content"][1]["input"], json!({"a": 1}));
        let c = a.finish().unwrap();
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            c["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(c["usage"]["completion_tokens"], 9);
        assert!(is_last(&events[10]) && carries_output(&events[2]));
    }
}
