//! Tool calls as the chat-completions wire carries them (`message.tool_calls[i].function.name` and
//! `.arguments`, the arguments a JSON string). Every reader of logged or returned answers (the
//! traffic log's `tool_calls` rows, shadow agreement, evaluation, curation, the door translators)
//! finds them through here, so a change of shape is one edit.

use serde_json::Value;

/// One tool call of one choice.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub choice_index: i64,
    pub call_index: i64,
    pub id: Option<String>,
    pub name: String,
    /// As sent: a JSON string normally; anything else is kept as its JSON text.
    pub arguments: String,
    /// Whether the call carried `arguments` at all (a call without them means no arguments).
    pub has_arguments: bool,
}

impl ToolCall {
    /// The arguments parsed, if they are JSON; a call without arguments has `{}`.
    pub fn parsed_arguments(&self) -> Option<Value> {
        if !self.has_arguments {
            return Some(Value::Object(serde_json::Map::new()));
        }
        serde_json::from_str(&self.arguments).ok()
    }
}

/// The calls of one assistant message, in order (`choice_index` 0).
pub fn in_message(message: &Value) -> Vec<ToolCall> {
    message_calls(message, 0)
}

fn message_calls(message: &Value, choice_index: i64) -> Vec<ToolCall> {
    let Some(calls) = message.get("tool_calls").and_then(Value::as_array) else {
        return Vec::new();
    };
    calls
        .iter()
        .enumerate()
        .map(|(i, call)| ToolCall {
            choice_index,
            call_index: i as i64,
            id: call.get("id").and_then(Value::as_str).map(str::to_string),
            name: call
                .pointer("/function/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            arguments: match call.pointer("/function/arguments") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            },
            has_arguments: call.pointer("/function/arguments").is_some(),
        })
        .collect()
}

/// The tool calls of every choice of a `chat.completion`, in order.
pub fn in_completion(response: Option<&Value>) -> Vec<ToolCall> {
    let Some(choices) = response
        .and_then(|r| r.get("choices"))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    choices
        .iter()
        .enumerate()
        .flat_map(|(ci, choice)| {
            let index = choice
                .get("index")
                .and_then(Value::as_i64)
                .unwrap_or(ci as i64);
            choice
                .get("message")
                .map(|m| message_calls(m, index))
                .unwrap_or_default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn calls_keep_their_choice_and_order_and_odd_arguments_survive_as_text() {
        let r = json!({"choices": [
            {"index": 0, "message": {"tool_calls": [
                {"id": "a", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                {"id": "b", "function": {"name": "g", "arguments": {"y": 2}}}]}},
            {"index": 1, "message": {"content": "no calls"}}]});
        let calls = in_completion(Some(&r));
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[1].choice_index, calls[1].call_index), (0, 1));
        assert_eq!(calls[1].arguments, "{\"y\":2}");
        assert_eq!(calls[0].parsed_arguments(), Some(json!({"x": 1})));
        let bare = in_message(
            &json!({"tool_calls": [{"function": {"name": "f"}}, {"function": {"name": "g", "arguments": ""}}]}),
        );
        assert_eq!(bare[0].parsed_arguments(), Some(json!({})));
        assert_eq!(bare[1].parsed_arguments(), None);
        assert!(in_completion(None).is_empty());
    }
}
