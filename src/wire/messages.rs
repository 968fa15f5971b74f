//! Anthropic's Messages API (`POST /v1/messages`) over the chat pipeline.
//!
//! A request is parsed and checked once ([`parse_request`]) and translated into a
//! chat-completions body: `system` becomes the system message, `tool_use` blocks an assistant
//! message's `tool_calls`, `tool_result` blocks `tool` messages (each must answer a `tool_use`
//! made before it), `tools[].input_schema` chat function parameters, `tool_choice`
//! `auto`/`any`/`tool`/`none` the chat equivalents, `stop_sequences` `stop`. The answer goes back
//! through [`MessageBuilder`], which emits Anthropic's stream events and the final message.
//! Errors use Anthropic's envelope (see [`super::error::anthropic_body`]); a field is named in
//! the message as Anthropic does (`messages.1.content.0.tool_use_id: ...`).
//!
//! Not handled: server tools (web search, code execution, bash, text editor, computer use),
//! `document` and `thinking` blocks, and extended thinking are refused with a 400 naming them;
//! `cache_control` marks are accepted and ignored (the local engine's prefix cache reuses any
//! shared prompt prefix on its own), as are `output_config.effort`, `service_tier` and `speed`.
//! `output_config.format` (a JSON schema) becomes the chat `response_format`. `temperature`,
//! `top_p` and `top_k`, which today's SDK no longer sends but older clients do, are honoured.

use serde_json::{json, Map, Value};

use super::answer::{token_counts, AnswerSink, EventBuilder};
use super::chat::{check_schema, expected, valid_function_name};
use super::error::ApiError;

/// A validated Messages request, already in the chat shape.
#[derive(Debug, Clone)]
pub struct MessagesRequest {
    pub model: String,
    pub stream: bool,
    pub chat: Map<String, Value>,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    // Anthropic names the field at the start of its message; the OpenAI-style param is kept too.
    let message = message.into();
    ApiError::invalid(format!("{param}: {message}")).with_param(param)
}

/// A fresh id with Anthropic's prefix.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

fn number(
    body: &Map<String, Value>,
    key: &str,
    min: f64,
    max: f64,
) -> Result<Option<f64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if (min..=max).contains(&x) {
                Ok(Some(x))
            } else {
                Err(invalid(
                    key,
                    format!("must be between {min} and {max}; got {x}"),
                ))
            }
        }
        Some(v) => Err(invalid(key, format!("expected a number, got {v}"))),
    }
}

/// Parses and validates a Messages request body into its chat translation.
pub fn parse_request(body: &Map<String, Value>) -> Result<MessagesRequest, ApiError> {
    let model = match body.get("model") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(invalid("model", "Field required (a non-empty string)")),
    };
    let max_tokens = match body.get("max_tokens") {
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n >= 1) => n.as_u64().unwrap_or(1),
        Some(v) => {
            return Err(invalid(
                "max_tokens",
                format!("must be an integer of at least 1; got {v}"),
            ))
        }
        None => return Err(invalid("max_tokens", "Field required")),
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(invalid("stream", format!("expected a boolean, got {v}"))),
    };
    if let Some(t) = body.get("thinking") {
        if t.get("type").and_then(Value::as_str) != Some("disabled") {
            return Err(invalid(
                "thinking",
                "extended thinking is not supported by the models behind this gateway; remove 'thinking'",
            ));
        }
    }
    let (tools, names) = parse_tools(body.get("tools"))?;
    let choice = parse_tool_choice(body.get("tool_choice"), &names)?;
    let mut messages: Vec<Value> = parse_system(body.get("system"))?.into_iter().collect();
    messages.extend(parse_messages(body.get("messages"))?);
    let mut chat = Map::new();
    chat.insert("model".into(), json!(model));
    chat.insert("messages".into(), Value::Array(messages));
    chat.insert("max_tokens".into(), json!(max_tokens));
    if !tools.is_empty() {
        chat.insert("tools".into(), Value::Array(tools));
    }
    if let Some((choice, parallel)) = choice {
        chat.insert("tool_choice".into(), choice);
        if !parallel {
            chat.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    sampling(body, &mut chat)?;
    output_format(body, &mut chat)?;
    user(body, &mut chat)?;
    if stream {
        chat.insert("stream".into(), json!(true));
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(MessagesRequest {
        model,
        stream,
        chat,
    })
}

/// The system prompt, a string or text blocks (joined by newlines), as a chat system message.
fn parse_system(system: Option<&Value>) -> Result<Option<Value>, ApiError> {
    match system {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(json!({"role": "system", "content": s}))),
        Some(Value::Array(blocks)) => {
            let mut text = String::new();
            for (i, b) in blocks.iter().enumerate() {
                match (
                    b.get("type").and_then(Value::as_str),
                    b.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => {
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(t);
                    }
                    _ => {
                        return Err(invalid(
                            &format!("system.{i}"),
                            "system blocks must be text blocks {\"type\": \"text\", \"text\": ...}",
                        ))
                    }
                }
            }
            Ok(Some(json!({"role": "system", "content": text})))
        }
        Some(v) => Err(invalid(
            "system",
            format!("expected a string or text blocks, got {v}"),
        )),
    }
}

/// `stop_sequences`, `temperature`, `top_p` and `top_k`, checked, in their chat names.
fn sampling(body: &Map<String, Value>, chat: &mut Map<String, Value>) -> Result<(), ApiError> {
    match body.get("stop_sequences") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) && a.len() <= 4 => {
            if !a.is_empty() {
                chat.insert("stop".into(), Value::Array(a.clone()));
            }
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            return Err(invalid(
                "stop_sequences",
                format!(
                    "at most 4 stop sequences are supported by this gateway; got {}",
                    a.len()
                ),
            ))
        }
        Some(v) => {
            return Err(invalid(
                "stop_sequences",
                format!("expected an array of strings, got {v}"),
            ))
        }
    }
    if let Some(t) = number(body, "temperature", 0.0, 1.0)? {
        chat.insert("temperature".into(), json!(t));
    }
    if let Some(p) = number(body, "top_p", 0.0, 1.0)? {
        chat.insert("top_p".into(), json!(p));
    }
    match body.get("top_k") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            chat.insert("top_k".into(), json!(n));
        }
        Some(v) => {
            return Err(invalid(
                "top_k",
                format!("expected a non-negative integer, got {v}"),
            ))
        }
    }
    Ok(())
}

/// Structured outputs: `output_config.format` is a JSON schema the answer must follow.
fn output_format(body: &Map<String, Value>, chat: &mut Map<String, Value>) -> Result<(), ApiError> {
    match body.get("output_config").and_then(|o| o.get("format")) {
        None | Some(Value::Null) => {}
        Some(f) if f.get("type").and_then(Value::as_str) == Some("json_schema") => {
            let Some(schema) = f.get("schema") else {
                return Err(invalid("output_config.format.schema", "Field required"));
            };
            check_schema(schema, "output_config.format.schema", 0)
                .map_err(|e| invalid("output_config.format.schema", e.message))?;
            chat.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}),
            );
        }
        Some(_) => return Err(invalid("output_config.format.type", "must be json_schema")),
    }
    Ok(())
}

/// `metadata.user_id` as the chat request's `user`.
fn user(body: &Map<String, Value>, chat: &mut Map<String, Value>) -> Result<(), ApiError> {
    match body.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => match m.get("user_id") {
            None | Some(Value::Null) => {}
            Some(Value::String(u)) => {
                chat.insert("user".into(), json!(u));
            }
            Some(v) => {
                return Err(invalid(
                    "metadata.user_id",
                    format!("expected a string, got {v}"),
                ))
            }
        },
        Some(v) => return Err(invalid("metadata", format!("expected an object, got {v}"))),
    }
    Ok(())
}

fn parse_tools(tools: Option<&Value>) -> Result<(Vec<Value>, Vec<String>), ApiError> {
    let tools = match tools {
        None | Some(Value::Null) => return Ok((Vec::new(), Vec::new())),
        Some(Value::Array(a)) => a,
        Some(v) => return Err(invalid("tools", format!("expected an array, got {v}"))),
    };
    let mut out = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let p = format!("tools.{i}");
        match t.get("type").and_then(Value::as_str) {
            None | Some("custom") => {}
            Some(other) => {
                return Err(invalid(
                    &format!("{p}.type"),
                    format!("the server tool '{other}' is not supported by this gateway; declare a custom tool with an input_schema and run it in your agent"),
                ))
            }
        }
        let name = match t.get("name").and_then(Value::as_str) {
            Some(n) if valid_function_name(n) => n.to_string(),
            Some(n) => {
                return Err(invalid(
                    &format!("{p}.name"),
                    format!(
                    "'{n}' is not a valid tool name (1–64 characters of a-z, A-Z, 0-9, _, - and .)"
                ),
                ))
            }
            None => return Err(invalid(&format!("{p}.name"), "Field required")),
        };
        if names.contains(&name) {
            return Err(invalid(
                &format!("{p}.name"),
                format!("tool name '{name}' is defined twice"),
            ));
        }
        let Some(schema) = t.get("input_schema") else {
            return Err(invalid(&format!("{p}.input_schema"), "Field required"));
        };
        check_schema(schema, &format!("{p}.input_schema"), 0)
            .map_err(|e| invalid(&format!("{p}.input_schema"), e.message))?;
        let mut function = json!({"name": name, "parameters": schema});
        if let Some(d) = t.get("description") {
            if !d.is_string() {
                return Err(expected(&format!("{p}.description"), "a string", d));
            }
            function["description"] = d.clone();
        }
        out.push(json!({"type": "function", "function": function}));
        names.push(name);
    }
    Ok((out, names))
}

/// The chat `tool_choice` and whether parallel calls are allowed.
fn parse_tool_choice(
    choice: Option<&Value>,
    names: &[String],
) -> Result<Option<(Value, bool)>, ApiError> {
    let Some(choice) = choice.filter(|c| !c.is_null()) else {
        return Ok(None);
    };
    let parallel = choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        != Some(true);
    let chat = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("none") => json!("none"),
        Some("any") if names.is_empty() => {
            return Err(invalid(
                "tool_choice",
                "'any' needs at least one tool in 'tools'",
            ))
        }
        Some("any") => json!("required"),
        Some("tool") => match choice.get("name").and_then(Value::as_str) {
            Some(n) if names.iter().any(|t| t == n) => {
                json!({"type": "function", "function": {"name": n}})
            }
            Some(n) => {
                return Err(invalid(
                    "tool_choice.name",
                    format!("tool '{n}' is not among 'tools'"),
                ))
            }
            None => return Err(invalid("tool_choice.name", "Field required")),
        },
        _ => {
            return Err(invalid(
                "tool_choice.type",
                "must be one of auto, any, tool, none",
            ))
        }
    };
    Ok(Some((chat, parallel)))
}

fn parse_messages(messages: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let messages = match messages {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(invalid("messages", "at least one message is required"))
        }
        Some(v) => return Err(invalid("messages", format!("expected an array, got {v}"))),
        None => return Err(invalid("messages", "Field required")),
    };
    let mut out = Vec::with_capacity(messages.len());
    let mut known_tool_uses: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let p = format!("messages.{i}");
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("user" | "assistant")) => r,
            Some(r) => {
                return Err(invalid(
                    &format!("{p}.role"),
                    format!("'{r}' is not a valid role; use user or assistant (system goes in the top-level 'system')"),
                ))
            }
            None => return Err(invalid(&format!("{p}.role"), "Field required")),
        };
        let blocks: Vec<Value> = match m.get("content") {
            Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
            Some(Value::Array(b)) => b.clone(),
            Some(v) => {
                return Err(invalid(
                    &format!("{p}.content"),
                    format!("expected a string or content blocks, got {v}"),
                ))
            }
            None => return Err(invalid(&format!("{p}.content"), "Field required")),
        };
        if role == "assistant" {
            out.push(assistant_message(&blocks, &p, &mut known_tool_uses)?);
        } else {
            out.extend(user_messages(&blocks, &p, &known_tool_uses)?);
        }
    }
    Ok(out)
}

fn assistant_message(
    blocks: &[Value],
    p: &str,
    known: &mut Vec<String>,
) -> Result<Value, ApiError> {
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bp = format!("{p}.content.{j}");
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => {
                let (Some(id), Some(name)) = (
                    b.get("id").and_then(Value::as_str),
                    b.get("name").and_then(Value::as_str),
                ) else {
                    return Err(invalid(
                        &bp,
                        "a tool_use block needs a string 'id' and 'name'",
                    ));
                };
                let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                if !input.is_object() {
                    return Err(invalid(&format!("{bp}.input"), "must be an object"));
                }
                known.push(id.to_string());
                calls.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": input.to_string()}}));
            }
            Some(
                other @ ("thinking"
                | "redacted_thinking"
                | "server_tool_use"
                | "web_search_tool_result"),
            ) => {
                return Err(invalid(
                    &format!("{bp}.type"),
                    format!("'{other}' blocks are not supported by this gateway"),
                ))
            }
            Some(other) => {
                return Err(invalid(
                    &format!("{bp}.type"),
                    format!(
                        "'{other}' is not a valid assistant content block; use text or tool_use"
                    ),
                ))
            }
            None => return Err(invalid(&format!("{bp}.type"), "Field required")),
        }
    }
    let mut m = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    Ok(m)
}

/// A user turn: its tool results as `tool` messages (in order), then its other content as one
/// user message.
fn user_messages(blocks: &[Value], p: &str, known: &[String]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    let mut parts: Vec<Value> = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bp = format!("{p}.content.{j}");
        match b.get("type").and_then(Value::as_str) {
            Some("text") => match b.get("text").and_then(Value::as_str) {
                Some(t) => parts.push(json!({"type": "text", "text": t})),
                None => return Err(invalid(&format!("{bp}.text"), "Field required")),
            },
            Some("image") => parts.push(image_part(b, &bp)?),
            Some("tool_result") => {
                let Some(id) = b.get("tool_use_id").and_then(Value::as_str) else {
                    return Err(invalid(&format!("{bp}.tool_use_id"), "Field required"));
                };
                if !known.iter().any(|k| k == id) {
                    return Err(invalid(
                        &format!("{bp}.tool_use_id"),
                        format!("unexpected tool_use_id '{id}' in tool_result: no tool_use block with this id comes before it"),
                    ));
                }
                let mut content = match b.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(items)) => {
                        let mut s = String::new();
                        for (k, item) in items.iter().enumerate() {
                            match (item.get("type").and_then(Value::as_str), item.get("text").and_then(Value::as_str)) {
                                (Some("text"), Some(t)) => s.push_str(t),
                                _ => return Err(invalid(&format!("{bp}.content.{k}"), "only text blocks are supported in a tool_result")),
                            }
                        }
                        s
                    }
                    Some(v) => return Err(invalid(&format!("{bp}.content"), format!("expected a string or text blocks, got {v}"))),
                };
                if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                    content = format!("Error: {content}");
                }
                out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
            }
            Some("tool_use") => return Err(invalid(&format!("{bp}.type"), "tool_use blocks belong in assistant messages")),
            Some(other) => {
                return Err(invalid(&format!("{bp}.type"), format!("'{other}' blocks are not supported by this gateway; use text, image or tool_result")))
            }
            None => return Err(invalid(&format!("{bp}.type"), "Field required")),
        }
    }
    if !parts.is_empty() {
        let all_text = parts.iter().all(|p| p["type"] == "text");
        let content = if all_text {
            json!(parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"))
        } else {
            Value::Array(parts)
        };
        out.push(json!({"role": "user", "content": content}));
    }
    Ok(out)
}

/// An image block as a chat `image_url` part (base64 sources become data URLs).
fn image_part(b: &Value, bp: &str) -> Result<Value, ApiError> {
    let source = b.get("source");
    let url = match source.and_then(|s| s.get("type")).and_then(Value::as_str) {
        Some("base64") => {
            let media = source
                .and_then(|s| s.get("media_type"))
                .and_then(Value::as_str)
                .unwrap_or("image/png");
            let data = source
                .and_then(|s| s.get("data"))
                .and_then(Value::as_str)
                .unwrap_or("");
            format!("data:{media};base64,{data}")
        }
        Some("url") => source
            .and_then(|s| s.get("url"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        _ => {
            return Err(invalid(
                &format!("{bp}.source"),
                "an image needs a base64 or url source",
            ))
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

#[derive(Debug, Clone)]
enum Block {
    Text {
        text: String,
        open: bool,
    },
    ToolUse {
        index: u64,
        id: String,
        name: String,
        json: String,
        open: bool,
    },
}

/// Builds an Anthropic `message` from a chat answer, emitting the stream's events on the way.
pub struct MessageBuilder {
    id: String,
    model: String,
    blocks: Vec<Block>,
    pending_space: String,
    finish: Option<String>,
    usage: Option<Value>,
    events: Vec<(&'static str, Value)>,
    /// Events are built only for a stream (`start` was called); a whole answer needs none.
    streaming: bool,
}

impl MessageBuilder {
    pub fn new(id: String, model: String) -> Self {
        Self {
            id,
            model,
            blocks: Vec::new(),
            pending_space: String::new(),
            finish: None,
            usage: None,
            events: Vec::new(),
            streaming: false,
        }
    }

    /// Records an event (built only when streaming).
    fn emit(&mut self, kind: &'static str, event: impl FnOnce() -> Value) {
        if !self.streaming {
            return;
        }
        let mut event = event();
        event["type"] = json!(kind);
        self.events.push((kind, event));
    }

    fn close_open(&mut self) {
        for k in 0..self.blocks.len() {
            let open = match &mut self.blocks[k] {
                Block::Text { open, .. } | Block::ToolUse { open, .. } => {
                    std::mem::replace(open, false)
                }
            };
            if open {
                self.emit("content_block_stop", || json!({"index": k}));
            }
        }
    }

    fn stop_reason(&self) -> &'static str {
        match self.finish.as_deref() {
            Some("length") => "max_tokens",
            Some("tool_calls") => "tool_use",
            Some("content_filter") => "refusal",
            _ if self
                .blocks
                .iter()
                .any(|b| matches!(b, Block::ToolUse { .. })) =>
            {
                "tool_use"
            }
            _ => "end_turn",
        }
    }

    fn usage_json(&self) -> Value {
        let (input, output, cached) = self.usage.as_ref().map_or((0, 0, 0), token_counts);
        json!({"input_tokens": input.saturating_sub(cached), "output_tokens": output,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0})
    }

    pub fn message(&self) -> Value {
        let content: Vec<Value> = self
            .blocks
            .iter()
            .map(|b| match b {
                Block::Text { text, .. } => json!({"type": "text", "text": text}),
                Block::ToolUse { id, name, json, .. } => {
                    // An unparsable argument string is kept as the string, never dropped.
                    let input = if json.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str::<Value>(json).unwrap_or_else(|_| json!(json))
                    };
                    json!({"type": "tool_use", "id": id, "name": name, "input": input})
                }
            })
            .collect();
        json!({"id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": content, "stop_reason": self.stop_reason(), "stop_sequence": null,
            "usage": self.usage_json()})
    }
}

impl EventBuilder for MessageBuilder {
    /// `message_start` (with an empty message) and a `ping`.
    fn start(&mut self) {
        self.streaming = true;
        let message = json!({"id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0}});
        self.emit("message_start", || json!({"message": message}));
        self.emit("ping", || json!({}));
    }

    /// The answer ended: closes blocks, emits `message_delta` and `message_stop`, and returns the
    /// whole message.
    fn complete(&mut self) -> Value {
        self.close_open();
        let stop = self.stop_reason();
        let usage = self.usage_json();
        self.emit(
            "message_delta",
            || json!({"delta": {"stop_reason": stop, "stop_sequence": null}, "usage": usage}),
        );
        self.emit("message_stop", || json!({}));
        self.message()
    }

    /// The `error` event for a stream that broke off.
    fn fail(&mut self, error: &ApiError) {
        let body = super::error::anthropic_body(error);
        self.events.push(("error", body));
    }

    fn take_events(&mut self) -> Vec<(&'static str, Value)> {
        std::mem::take(&mut self.events)
    }
}

impl AnswerSink for MessageBuilder {
    fn text(&mut self, delta: &str) {
        let open = self
            .blocks
            .iter()
            .rposition(|b| matches!(b, Block::Text { open: true, .. }));
        let k = match open {
            Some(k) => k,
            None => {
                if delta.trim().is_empty() {
                    self.pending_space.push_str(delta);
                    return;
                }
                self.close_open();
                self.blocks.push(Block::Text {
                    text: String::new(),
                    open: true,
                });
                let k = self.blocks.len() - 1;
                self.emit(
                    "content_block_start",
                    || json!({"index": k, "content_block": {"type": "text", "text": ""}}),
                );
                k
            }
        };
        let delta = format!("{}{delta}", std::mem::take(&mut self.pending_space));
        if let Block::Text { text, .. } = &mut self.blocks[k] {
            text.push_str(&delta);
        }
        self.emit(
            "content_block_delta",
            || json!({"index": k, "delta": {"type": "text_delta", "text": delta}}),
        );
    }

    fn call_start(&mut self, index: u64, id: &str, name: &str) {
        self.pending_space.clear();
        self.close_open();
        let id = if id.is_empty() {
            new_id("toolu")
        } else {
            id.to_string()
        };
        self.blocks.push(Block::ToolUse {
            index,
            id: id.clone(),
            name: name.to_string(),
            json: String::new(),
            open: true,
        });
        let k = self.blocks.len() - 1;
        self.emit(
            "content_block_start",
            || json!({"index": k, "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
        );
    }

    fn call_arguments(&mut self, index: u64, delta: &str) {
        let Some(k) = self
            .blocks
            .iter()
            .rposition(|b| matches!(b, Block::ToolUse { index: j, .. } if *j == index))
        else {
            return;
        };
        if let Block::ToolUse { json, .. } = &mut self.blocks[k] {
            json.push_str(delta);
        }
        self.emit(
            "content_block_delta",
            || json!({"index": k, "delta": {"type": "input_json_delta", "partial_json": delta}}),
        );
    }

    fn finish_reason(&mut self, reason: &str) {
        self.finish = Some(reason.to_string());
    }

    fn usage(&mut self, usage: &Value) {
        self.usage = Some(usage.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::super::answer::{feed_chunk, feed_completion};
    use super::*;

    fn parse(v: Value) -> Result<MessagesRequest, ApiError> {
        parse_request(v.as_object().unwrap())
    }

    #[test]
    fn a_tool_round_trip_becomes_the_chat_conversation_it_stands_for() {
        let r = parse(json!({"model": "m", "max_tokens": 50, "system": [{"type": "text", "text": "be brief"}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"], "top_k": 5, "metadata": {"user_id": "u1"},
            "messages": [
                {"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {"type": "text", "text": "thanks"}]}]}))
        .unwrap();
        let c = &r.chat;
        let m = c["messages"].as_array().unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"})
        );
        assert_eq!(m[4], json!({"role": "user", "content": "thanks"}));
        assert_eq!(c["tool_choice"], "required");
        assert_eq!(c["parallel_tool_calls"], false);
        assert_eq!(c["stop"], json!(["END"]));
        assert_eq!(c["user"], "u1");
        assert_eq!(c["max_tokens"], 50);
        crate::wire::chat::validate_chat_request(c).unwrap();
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}]}),
                "messages.0.content.0.tool_use_id",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
                "messages.0.role",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
                "tools.0.type",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f", "input_schema": {"type": 7}}]}),
                "tools.0.input_schema",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}),
                "messages.0.content.0.type",
            ),
        ];
        for (body, param) in cases {
            let e = parse(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert!(e.message.starts_with(param), "{}", e.message);
        }
    }

    #[test]
    fn streamed_and_whole_answers_build_the_same_message() {
        let completion = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Let me check.",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
            "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 2}}});
        let chunks = [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Let me "}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "check."}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{\"a\""}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 2}}}),
        ];
        let mut whole = MessageBuilder::new("msg_1".into(), "m".into());
        feed_completion(&completion, &mut whole);
        let a = whole.complete();
        let mut streamed = MessageBuilder::new("msg_1".into(), "m".into());
        streamed.start();
        let mut started = Vec::new();
        for c in &chunks {
            feed_chunk(c, &mut started, &mut streamed);
        }
        let b = streamed.complete();
        assert_eq!(a, b);
        assert_eq!(a["stop_reason"], "tool_use");
        assert_eq!(a["content"][1]["input"], json!({"a": 1}));
        assert_eq!(a["usage"]["input_tokens"], 3);
        assert_eq!(a["usage"]["cache_read_input_tokens"], 2);
        let kinds: Vec<&str> = streamed.take_events().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
    }
}
