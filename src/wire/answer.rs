//! A chat answer read as a sequence of events (text, a tool call's start and argument pieces, the
//! finish reason, usage), whether it arrives whole (`chat.completion`) or as
//! `chat.completion.chunk`s. The Responses and Messages translators are written once against
//! [`AnswerSink`] and serve both cases, so a streamed and a whole answer translate alike.
//! Only the first choice is read: those APIs have no `n`.

use serde_json::Value;

use super::error::ApiError;
use super::tool_calls;

/// Something that turns a chat answer into another API's shape.
pub trait AnswerSink {
    fn text(&mut self, delta: &str);
    /// The tool call at `index` begins (its id and name as far as known).
    fn call_start(&mut self, index: u64, id: &str, name: &str);
    fn call_arguments(&mut self, index: u64, delta: &str);
    fn finish_reason(&mut self, reason: &str);
    fn usage(&mut self, usage: &Value);
}

/// A translator that also writes its API's stream events as it is fed: the door drives one the
/// same way for Responses and Messages (start, chunks, then complete or fail).
pub trait EventBuilder: AnswerSink {
    /// The events that open a stream.
    fn start(&mut self);
    /// The answer ended normally: the closing events, and the whole translated answer.
    fn complete(&mut self) -> Value;
    /// The answer broke off: the API's failure event.
    fn fail(&mut self, error: &ApiError);
    /// The events written since the last call, as `(name, data)`.
    fn take_events(&mut self) -> Vec<(&'static str, Value)>;
}

/// Feeds one `chat.completion.chunk` to `sink`, remembering which calls have begun in `started`.
pub fn feed_chunk(chunk: &Value, started: &mut Vec<u64>, sink: &mut impl AnswerSink) {
    if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
        sink.usage(u);
    }
    let Some(choice) = chunk
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| {
            c.iter()
                .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
        })
    else {
        return;
    };
    if let Some(delta) = choice.get("delta") {
        if let Some(t) = delta.get("content").and_then(Value::as_str) {
            if !t.is_empty() {
                sink.text(t);
            }
        }
        for (k, call) in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let index = call
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(k as u64);
            if !started.contains(&index) {
                started.push(index);
                let id = call.get("id").and_then(Value::as_str).unwrap_or("");
                let name = call
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                sink.call_start(index, id, name);
            }
            if let Some(a) = call.pointer("/function/arguments").and_then(Value::as_str) {
                if !a.is_empty() {
                    sink.call_arguments(index, a);
                }
            }
        }
    }
    if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
        sink.finish_reason(f);
    }
}

/// Feeds a whole `chat.completion` to `sink`.
pub fn feed_completion(completion: &Value, sink: &mut impl AnswerSink) {
    let choice = completion
        .get("choices")
        .and_then(|c| c.get(0))
        .unwrap_or(&Value::Null);
    let message = choice.get("message").unwrap_or(&Value::Null);
    if let Some(t) = message.get("content").and_then(Value::as_str) {
        if !t.is_empty() {
            sink.text(t);
        }
    }
    for call in tool_calls::in_message(message) {
        let index = call.call_index as u64;
        sink.call_start(index, call.id.as_deref().unwrap_or(""), &call.name);
        if !call.arguments.is_empty() {
            sink.call_arguments(index, &call.arguments);
        }
    }
    if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
        sink.finish_reason(f);
    }
    if let Some(u) = completion.get("usage").filter(|u| u.is_object()) {
        sink.usage(u);
    }
}

/// Token counts from a chat `usage` object: (prompt, completion, cached prompt).
pub fn token_counts(usage: &Value) -> (u64, u64, u64) {
    let n = |p: &str| usage.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    (
        n("/prompt_tokens"),
        n("/completion_tokens"),
        n("/prompt_tokens_details/cached_tokens"),
    )
}
