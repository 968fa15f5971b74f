//! OpenAI's Responses API (`POST /v1/responses`) over the chat pipeline.
//!
//! A request is parsed once into [`ResponsesRequest`] (every field checked, errors naming the
//! field as `input[2].call_id`), then translated into a chat-completions body: `instructions`
//! become the system message, input items become messages (`function_call` items an assistant
//! message's `tool_calls`, `function_call_output` items `tool` messages), flat function tools
//! become chat tools and `text.format` becomes `response_format`. The answer, whole or streamed,
//! goes back through [`ResponseBuilder`], which emits the typed stream events (with
//! `sequence_number`) and the final `response` object from the same state.
//!
//! Not handled: built-in tools (web search, file search, computer use, code interpreter, MCP,
//! shell, image generation), `background`, `conversation`, stored `prompt` templates and
//! `item_reference` inputs are refused with a 400 naming them; `include`, `reasoning`,
//! `truncation` and `service_tier` are accepted and have no effect (the models behind this
//! gateway's local engine do not reason, and a prompt that does not fit is refused, never
//! truncated).

use serde_json::{json, Map, Value};

use super::answer::{token_counts, AnswerSink, EventBuilder};
use super::chat::{
    check_schema, expected, optional_bool, optional_int, optional_number, optional_string,
    required_model, valid_function_name,
};
use super::error::ApiError;

/// Tool types of the Responses API that run on OpenAI's side; this gateway serves function tools.
const BUILT_IN_TOOLS: &[&str] = &[
    "web_search",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "file_search",
    "computer_use_preview",
    "computer",
    "code_interpreter",
    "image_generation",
    "mcp",
    "local_shell",
    "shell",
    "apply_patch",
    "custom",
];

/// A validated Responses request.
#[derive(Debug, Clone)]
pub struct ResponsesRequest {
    pub model: String,
    pub stream: bool,
    /// Whether the response is kept for `previous_response_id` and `GET /v1/responses/{id}`.
    pub store: bool,
    pub previous_response_id: Option<String>,
    pub instructions: Option<String>,
    /// The input as items, each with an id (`msg_…`, `fc_…`, `fco_…`), as `input_items` lists them.
    pub input_items: Vec<Value>,
    /// The function tools in the chat shape.
    pub chat_tools: Vec<Value>,
    /// The chat `tool_choice`, if one was given.
    pub chat_tool_choice: Option<Value>,
    pub parallel_tool_calls: bool,
    /// The chat `response_format`, if `text.format` asked for JSON.
    pub response_format: Option<Value>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub user: Option<String>,
    pub metadata: Option<Map<String, Value>>,
    /// The request's own fields as the response object echoes them.
    pub echo: Map<String, Value>,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, message)
}

fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, message).with_code("unsupported_parameter")
}

/// A fresh item or response id with OpenAI's prefixes.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Parses and validates a Responses request body.
pub fn parse_request(body: &Map<String, Value>) -> Result<ResponsesRequest, ApiError> {
    let model = required_model(body)?;
    for (key, what) in [
        ("background", "Background responses are not supported by this gateway; send the request without 'background' and wait for the answer (or stream it)."),
        ("conversation", "Conversations are not supported by this gateway; continue a conversation with 'previous_response_id'."),
        ("prompt", "Stored prompt templates are not supported by this gateway; send 'instructions' and 'input' instead."),
    ] {
        match body.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(_) => return Err(unsupported(key, what)),
        }
    }
    let stream = optional_bool(body, "stream")?.unwrap_or(false);
    let store = optional_bool(body, "store")?.unwrap_or(true);
    let previous_response_id = optional_string(body, "previous_response_id")?.map(str::to_string);
    let instructions = match body.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => return Err(expected("instructions", "a string", v)),
    };
    let input_items = parse_input(body.get("input"))?;
    let (chat_tools, names) = parse_tools(body.get("tools"))?;
    let chat_tool_choice = parse_tool_choice(body.get("tool_choice"), &names)?;
    let parallel_tool_calls = optional_bool(body, "parallel_tool_calls")?.unwrap_or(true);
    let response_format = parse_text_format(body.get("text"))?;
    let max_output_tokens = optional_int(body, "max_output_tokens", 1, i64::MAX)?;
    optional_number(body, "temperature", 0.0, 2.0)?;
    optional_number(body, "top_p", 0.0, 1.0)?;
    let temperature = body.get("temperature").and_then(Value::as_f64);
    let top_p = body.get("top_p").and_then(Value::as_f64);
    let user = optional_string(body, "user")?.map(str::to_string);
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            for (k, v) in m {
                if !v.is_string() {
                    return Err(expected(&format!("metadata.{k}"), "a string", v));
                }
            }
            Some(m.clone())
        }
        Some(v) => return Err(expected("metadata", "an object", v)),
    };
    let mut echo = Map::new();
    echo.insert("instructions".into(), json!(instructions));
    echo.insert("tools".into(), echoed_tools(&chat_tools));
    echo.insert(
        "tool_choice".into(),
        body.get("tool_choice")
            .cloned()
            .unwrap_or_else(|| json!("auto")),
    );
    echo.insert("parallel_tool_calls".into(), json!(parallel_tool_calls));
    echo.insert(
        "text".into(),
        body.get("text")
            .cloned()
            .unwrap_or_else(|| json!({"format": {"type": "text"}})),
    );
    echo.insert("max_output_tokens".into(), json!(max_output_tokens));
    echo.insert("temperature".into(), json!(temperature.unwrap_or(1.0)));
    echo.insert("top_p".into(), json!(top_p.unwrap_or(1.0)));
    echo.insert(
        "metadata".into(),
        Value::Object(metadata.clone().unwrap_or_default()),
    );
    echo.insert("previous_response_id".into(), json!(previous_response_id));
    echo.insert("store".into(), json!(store));
    if let Some(u) = &user {
        echo.insert("user".into(), json!(u));
    }
    echo.insert(
        "truncation".into(),
        body.get("truncation")
            .cloned()
            .unwrap_or_else(|| json!("disabled")),
    );
    echo.insert("reasoning".into(), json!({"effort": null, "summary": null}));
    echo.insert("service_tier".into(), json!("default"));
    Ok(ResponsesRequest {
        model,
        stream,
        store,
        previous_response_id,
        instructions,
        input_items,
        chat_tools,
        chat_tool_choice,
        parallel_tool_calls,
        response_format,
        max_output_tokens,
        temperature,
        top_p,
        user,
        metadata,
        echo,
    })
}

/// The input as a list of items with ids: a string is one user message.
fn parse_input(input: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let items = match input {
        None | Some(Value::Null) => {
            return Err(invalid("input", "Missing required parameter: 'input'.")
                .with_code("missing_required_parameter"))
        }
        Some(Value::String(s)) => {
            return Ok(vec![
                json!({"id": new_id("msg"), "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": s}]}),
            ])
        }
        Some(Value::Array(a)) => a,
        Some(v) => return Err(expected("input", "a string or an array of input items", v)),
    };
    if items.is_empty() {
        return Err(invalid("input", "'input' must contain at least one item."));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_item(item, &format!("input[{i}]")))
        .collect()
}

fn parse_item(item: &Value, p: &str) -> Result<Value, ApiError> {
    let Value::Object(o) = item else {
        return Err(expected(p, "an object", item));
    };
    let kind = match o.get("type") {
        None if o.contains_key("role") => "message",
        Some(Value::String(t)) => t.as_str(),
        Some(v) => return Err(expected(&format!("{p}.type"), "a string", v)),
        None => {
            return Err(invalid(
                &format!("{p}.type"),
                format!("Missing required parameter: '{p}.type'."),
            ))
        }
    };
    let id = |prefix: &str| {
        o.get("id")
            .and_then(Value::as_str)
            .map_or_else(|| new_id(prefix), str::to_string)
    };
    let string = |key: &str| -> Result<String, ApiError> {
        match o.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(expected(&format!("{p}.{key}"), "a string", v)),
            None => Err(invalid(
                &format!("{p}.{key}"),
                format!("Missing required parameter: '{p}.{key}'."),
            )
            .with_code("missing_required_parameter")),
        }
    };
    match kind {
        "message" => {
            let role = string("role")?;
            if !["user", "assistant", "system", "developer"].contains(&role.as_str()) {
                return Err(invalid(
                    &format!("{p}.role"),
                    format!("Invalid value for '{p}.role': '{role}'. Supported values are: user, assistant, system, developer."),
                ));
            }
            let content = parse_content(o.get("content"), &format!("{p}.content"), &role)?;
            Ok(
                json!({"id": id("msg"), "type": "message", "role": role, "content": content, "status": "completed"}),
            )
        }
        "function_call" => {
            let call_id = string("call_id")?;
            let name = string("name")?;
            let arguments = string("arguments")?;
            Ok(json!({"id": id("fc"), "type": "function_call", "call_id": call_id, "name": name,
                "arguments": arguments, "status": "completed"}))
        }
        "function_call_output" => {
            let call_id = string("call_id")?;
            let output = match o.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (k, part) in parts.iter().enumerate() {
                        match part.get("type").and_then(Value::as_str) {
                            Some("input_text") | Some("output_text") => text.push_str(
                                part.get("text").and_then(Value::as_str).unwrap_or_default(),
                            ),
                            _ => {
                                return Err(unsupported(
                                    &format!("{p}.output[{k}]"),
                                    format!("'{p}.output[{k}]': only text parts are supported in a function call's output."),
                                ))
                            }
                        }
                    }
                    text
                }
                Some(v) => return Err(expected(&format!("{p}.output"), "a string", v)),
                None => {
                    return Err(invalid(
                        &format!("{p}.output"),
                        format!("Missing required parameter: '{p}.output'."),
                    )
                    .with_code("missing_required_parameter"))
                }
            };
            Ok(json!({"id": id("fco"), "type": "function_call_output", "call_id": call_id,
                "output": output, "status": "completed"}))
        }
        "item_reference" => Err(unsupported(
            p,
            format!("'{p}': item references are not supported; send the item itself, or continue from a stored response with 'previous_response_id'."),
        )),
        "reasoning" => Err(unsupported(
            p,
            format!("'{p}': reasoning items are not supported; the models behind this gateway do not produce them."),
        )),
        other => Err(invalid(
            &format!("{p}.type"),
            format!("Invalid value for '{p}.type': '{other}'. Supported item types: message, function_call, function_call_output."),
        )
        .with_code("invalid_value")),
    }
}

/// A message's content as a list of parts (a string becomes one text part).
fn parse_content(content: Option<&Value>, p: &str, role: &str) -> Result<Value, ApiError> {
    let text_type = if role == "assistant" {
        "output_text"
    } else {
        "input_text"
    };
    match content {
        Some(Value::String(s)) => Ok(json!([{"type": text_type, "text": s}])),
        Some(Value::Array(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for (k, part) in parts.iter().enumerate() {
                let pp = format!("{p}[{k}]");
                match part.get("type").and_then(Value::as_str) {
                    Some("input_text") | Some("output_text") | Some("text") => {
                        let Some(t) = part.get("text").and_then(Value::as_str) else {
                            return Err(invalid(
                                &format!("{pp}.text"),
                                format!("'{pp}' needs a string 'text'."),
                            ));
                        };
                        out.push(json!({"type": text_type, "text": t}));
                    }
                    Some("refusal") => {
                        let t = part.get("refusal").and_then(Value::as_str).unwrap_or("");
                        out.push(json!({"type": "refusal", "refusal": t}));
                    }
                    Some("input_image") => {
                        let Some(url) = part.get("image_url").and_then(Value::as_str) else {
                            return Err(unsupported(
                                &pp,
                                format!("'{pp}': images are accepted as 'image_url' (a URL or a data URL); file ids are not supported."),
                            ));
                        };
                        out.push(json!({"type": "input_image", "image_url": url}));
                    }
                    Some(other) => {
                        return Err(unsupported(
                            &format!("{pp}.type"),
                            format!("'{pp}.type' '{other}' is not supported; use input_text, output_text or input_image."),
                        ))
                    }
                    None => {
                        return Err(invalid(
                            &format!("{pp}.type"),
                            format!("'{pp}' needs a string 'type'."),
                        ))
                    }
                }
            }
            Ok(Value::Array(out))
        }
        Some(v) => Err(expected(p, "a string or an array of content parts", v)),
        None => Err(invalid(p, format!("Missing required parameter: '{p}'."))
            .with_code("missing_required_parameter")),
    }
}

/// Function tools (flat shape) into chat tools, with their names.
fn parse_tools(tools: Option<&Value>) -> Result<(Vec<Value>, Vec<String>), ApiError> {
    let tools = match tools {
        None | Some(Value::Null) => return Ok((Vec::new(), Vec::new())),
        Some(Value::Array(a)) => a,
        Some(v) => return Err(expected("tools", "an array", v)),
    };
    let mut out = Vec::with_capacity(tools.len());
    let mut names: Vec<String> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let p = format!("tools[{i}]");
        let Value::Object(t) = t else {
            return Err(expected(&p, "an object", t));
        };
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) if BUILT_IN_TOOLS.contains(&other) || other.starts_with("web_search") => {
                return Err(unsupported(
                    &format!("{p}.type"),
                    format!("The built-in tool '{other}' is not supported by this gateway; only function tools are (declare it as a function and run it in your agent)."),
                ))
            }
            Some(other) => {
                return Err(invalid(
                    &format!("{p}.type"),
                    format!("Invalid value for '{p}.type': '{other}'. Supported: function."),
                ))
            }
            None => {
                return Err(invalid(
                    &format!("{p}.type"),
                    format!("Missing required parameter: '{p}.type'."),
                ))
            }
        }
        let name = match t.get("name") {
            Some(Value::String(n)) if valid_function_name(n) => n.clone(),
            Some(Value::String(n)) => {
                return Err(invalid(
                    &format!("{p}.name"),
                    format!("Invalid '{p}.name': '{n}'. Names are 1–64 characters of a-z, A-Z, 0-9, _, - and ."),
                ))
            }
            _ => {
                return Err(invalid(
                    &format!("{p}.name"),
                    format!("Missing required parameter: '{p}.name'."),
                ))
            }
        };
        if names.contains(&name) {
            return Err(invalid(
                &format!("{p}.name"),
                format!("Tool name '{name}' is defined twice."),
            ));
        }
        let mut function = Map::new();
        function.insert("name".into(), json!(name));
        match t.get("description") {
            None | Some(Value::Null) => {}
            Some(Value::String(d)) => {
                function.insert("description".into(), json!(d));
            }
            Some(v) => return Err(expected(&format!("{p}.description"), "a string", v)),
        }
        match t.get("parameters") {
            None | Some(Value::Null) => {}
            Some(schema) => {
                check_schema(schema, &format!("{p}.parameters"), 0)?;
                function.insert("parameters".into(), schema.clone());
            }
        }
        if let Some(Value::Bool(strict)) = t.get("strict") {
            function.insert("strict".into(), json!(strict));
        }
        out.push(json!({"type": "function", "function": function}));
        names.push(name);
    }
    Ok((out, names))
}

/// The function tools as a response object lists them (every field the spec requires present).
fn echoed_tools(chat_tools: &[Value]) -> Value {
    Value::Array(
        chat_tools
            .iter()
            .map(|t| {
                let f = &t["function"];
                json!({"type": "function", "name": f["name"],
                    "description": f.get("description").cloned().unwrap_or(Value::Null),
                    "parameters": f.get("parameters").cloned().unwrap_or(Value::Null),
                    "strict": f.get("strict").cloned().unwrap_or(Value::Null)})
            })
            .collect(),
    )
}

fn parse_tool_choice(choice: Option<&Value>, names: &[String]) -> Result<Option<Value>, ApiError> {
    match choice {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "none" | "auto" => Ok(Some(json!(s))),
            "required" if names.is_empty() => Err(invalid(
                "tool_choice",
                "'tool_choice' is 'required' but no function 'tools' were given.",
            )),
            "required" => Ok(Some(json!(s))),
            other => Err(invalid(
                "tool_choice",
                format!("Invalid value for 'tool_choice': '{other}'. Supported: none, auto, required, or {{\"type\": \"function\", \"name\": ...}}."),
            )),
        },
        Some(Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("function") => match o.get("name").and_then(Value::as_str) {
                Some(n) if names.iter().any(|t| t == n) => {
                    Ok(Some(json!({"type": "function", "function": {"name": n}})))
                }
                Some(n) => Err(invalid(
                    "tool_choice.name",
                    format!("'tool_choice' names function '{n}', which is not among 'tools'."),
                )),
                None => Err(invalid(
                    "tool_choice.name",
                    "A function 'tool_choice' needs a 'name'.",
                )),
            },
            Some(other) => Err(unsupported(
                "tool_choice.type",
                format!("'tool_choice' of type '{other}' is not supported; use none, auto, required, or a function."),
            )),
            None => Err(invalid("tool_choice.type", "'tool_choice' needs a 'type'.")),
        },
        Some(v) => Err(expected("tool_choice", "a string or an object", v)),
    }
}

/// `text.format` as a chat `response_format` (none for plain text).
fn parse_text_format(text: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let format = match text {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(t)) => match t.get("format") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(f)) => f,
            Some(v) => return Err(expected("text.format", "an object", v)),
        },
        Some(v) => return Err(expected("text", "an object", v)),
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let name = match format.get("name") {
                Some(Value::String(n)) if !n.is_empty() => n.clone(),
                _ => {
                    return Err(invalid(
                        "text.format.name",
                        "'text.format' of type json_schema needs a 'name'.",
                    )
                    .with_code("missing_required_parameter"))
                }
            };
            let Some(schema) = format.get("schema") else {
                return Err(invalid(
                    "text.format.schema",
                    "'text.format' of type json_schema needs a 'schema'.",
                )
                .with_code("missing_required_parameter"));
            };
            check_schema(schema, "text.format.schema", 0)?;
            let mut js = Map::new();
            js.insert("name".into(), json!(name));
            js.insert("schema".into(), schema.clone());
            for key in ["strict", "description"] {
                if let Some(v) = format.get(key) {
                    js.insert(key.into(), v.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": js})))
        }
        _ => Err(invalid(
            "text.format.type",
            "'text.format.type' must be one of text, json_object, json_schema.",
        )),
    }
}

/// The ids of the calls an assistant made in a chat conversation.
fn call_ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .flat_map(|m| {
            super::tool_calls::in_message(m)
                .into_iter()
                .filter_map(|c| c.id)
        })
        .collect()
}

/// The input items as chat messages, after `history` (the stored conversation this request
/// continues). Checks that every `function_call_output` answers a call made before it.
pub fn input_messages(items: &[Value], history: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut known = call_ids(history);
    let mut out: Vec<Value> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item.get("type").and_then(Value::as_str) {
            Some("message") => out.push(message_to_chat(item)),
            Some("function_call") => {
                let call_id = item.get("call_id").and_then(Value::as_str).unwrap_or("");
                known.push(call_id.to_string());
                let call = json!({"id": call_id, "type": "function", "function": {
                    "name": item.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": item.get("arguments").cloned().unwrap_or(Value::Null)}});
                // Consecutive calls are one assistant turn's parallel calls.
                match out.last_mut() {
                    Some(last)
                        if last.get("role").and_then(Value::as_str) == Some("assistant")
                            && last.get("tool_calls").is_some() =>
                    {
                        if let Some(Value::Array(calls)) = last.get_mut("tool_calls") {
                            calls.push(call);
                        }
                    }
                    _ => out
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            Some("function_call_output") => {
                let call_id = item.get("call_id").and_then(Value::as_str).unwrap_or("");
                if !known.iter().any(|k| k == call_id) {
                    return Err(invalid(
                        &format!("input[{i}].call_id"),
                        format!("No tool call found for function call output with call_id '{call_id}': the call must appear earlier in 'input' or in the response named by 'previous_response_id'."),
                    ));
                }
                out.push(json!({"role": "tool", "tool_call_id": call_id,
                    "content": item.get("output").cloned().unwrap_or(json!(""))}));
            }
            _ => {}
        }
    }
    Ok(out)
}

fn message_to_chat(item: &Value) -> Value {
    let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
    let parts = item
        .get("content")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let texts_only = parts
        .iter()
        .all(|p| p.get("text").is_some_and(Value::is_string));
    let content = if texts_only || role == "assistant" {
        let text: String = parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect();
        json!(text)
    } else {
        Value::Array(
            parts
                .iter()
                .map(|p| match p.get("type").and_then(Value::as_str) {
                    Some("input_image") => {
                        json!({"type": "image_url", "image_url": {"url": p.get("image_url").cloned().unwrap_or(Value::Null)}})
                    }
                    _ => {
                        json!({"type": "text", "text": p.get("text").cloned().unwrap_or(json!(""))})
                    }
                })
                .collect(),
        )
    };
    json!({"role": role, "content": content})
}

impl ResponsesRequest {
    /// The chat-completions body for this request, continuing `history` (the stored conversation
    /// of `previous_response_id`, instructions not included: they never carry over), and this
    /// turn's input as chat messages (what a stored response adds to the conversation).
    pub fn to_chat(&self, history: &[Value]) -> Result<(Map<String, Value>, Vec<Value>), ApiError> {
        let turn = input_messages(&self.input_items, history)?;
        let mut messages = Vec::with_capacity(history.len() + turn.len() + 1);
        if let Some(i) = &self.instructions {
            messages.push(json!({"role": "system", "content": i}));
        }
        messages.extend(history.iter().cloned());
        messages.extend(turn.iter().cloned());
        let mut body = Map::new();
        body.insert("model".into(), json!(self.model));
        body.insert("messages".into(), Value::Array(messages));
        if !self.chat_tools.is_empty() {
            body.insert("tools".into(), Value::Array(self.chat_tools.clone()));
            body.insert(
                "parallel_tool_calls".into(),
                json!(self.parallel_tool_calls),
            );
        }
        if let Some(c) = &self.chat_tool_choice {
            body.insert("tool_choice".into(), c.clone());
        }
        if let Some(f) = &self.response_format {
            body.insert("response_format".into(), f.clone());
        }
        if let Some(n) = self.max_output_tokens {
            body.insert("max_tokens".into(), json!(n));
        }
        if let Some(t) = self.temperature {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(t) = self.top_p {
            body.insert("top_p".into(), json!(t));
        }
        if let Some(u) = &self.user {
            body.insert("user".into(), json!(u));
        }
        if let Some(m) = &self.metadata {
            body.insert("metadata".into(), Value::Object(m.clone()));
        }
        if self.stream {
            body.insert("stream".into(), json!(true));
            // The final event carries usage, so the pipeline must see it.
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Ok((body, turn))
    }
}

/// A chat conversation as Responses input items (no ids: they are new to whoever reads them),
/// for an upstream that is sent the whole conversation instead of a `previous_response_id`.
pub fn items_from_chat(messages: &[Value]) -> Vec<Value> {
    let mut items = Vec::with_capacity(messages.len());
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        match role {
            "tool" => items.push(json!({"type": "function_call_output",
                "call_id": m.get("tool_call_id").cloned().unwrap_or(Value::Null),
                "output": m.get("content").cloned().unwrap_or(json!(""))})),
            _ => {
                let text = match m.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect(),
                    _ => String::new(),
                };
                if !text.is_empty() {
                    items.push(json!({"type": "message", "role": role, "content": text}));
                }
                for call in super::tool_calls::in_message(m) {
                    items.push(json!({"type": "function_call", "call_id": call.id,
                        "name": call.name, "arguments": call.arguments}));
                }
            }
        }
    }
    items
}

/// One output item while it is being built.
#[derive(Debug, Clone)]
enum OutputItem {
    Message {
        id: String,
        text: String,
        open: bool,
    },
    Call {
        id: String,
        index: u64,
        call_id: String,
        name: String,
        arguments: String,
        open: bool,
    },
}

/// Builds a `response` object from a chat answer, emitting the stream's typed events on the way
/// (`response.created` … `response.completed`), each with its `sequence_number`.
pub struct ResponseBuilder {
    id: String,
    model: String,
    created_at: i64,
    echo: Map<String, Value>,
    items: Vec<OutputItem>,
    /// Whitespace seen before any visible text: a message item opens only for visible text, so an
    /// answer that is a tool call does not carry an empty message.
    pending_space: String,
    finish: Option<String>,
    usage: Option<Value>,
    events: Vec<(&'static str, Value)>,
    sequence: u64,
    /// Events are built only for a stream (`start` was called); a whole answer needs none.
    streaming: bool,
}

impl ResponseBuilder {
    pub fn new(id: String, model: String, created_at: i64, echo: Map<String, Value>) -> Self {
        Self {
            id,
            model,
            created_at,
            echo,
            items: Vec::new(),
            pending_space: String::new(),
            finish: None,
            usage: None,
            events: Vec::new(),
            sequence: 0,
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
        event["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        self.events.push((kind, event));
    }

    fn close_open(&mut self) {
        if !self.streaming {
            for item in &mut self.items {
                match item {
                    OutputItem::Message { open, .. } | OutputItem::Call { open, .. } => {
                        *open = false
                    }
                }
            }
            return;
        }
        for k in 0..self.items.len() {
            let (open, event) = match &self.items[k] {
                OutputItem::Message { id, text, open } => (*open, (id.clone(), text.clone(), None)),
                OutputItem::Call {
                    id,
                    name,
                    arguments,
                    open,
                    ..
                } => (*open, (id.clone(), arguments.clone(), Some(name.clone()))),
            };
            if !open {
                continue;
            }
            let (item_id, text, name) = event;
            match name {
                None => {
                    self.emit(
                        "response.output_text.done",
                        || json!({"item_id": item_id, "output_index": k, "content_index": 0, "text": text, "logprobs": []}),
                    );
                    self.emit(
                        "response.content_part.done",
                        || json!({"item_id": item_id, "output_index": k, "content_index": 0,
                            "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []}}),
                    );
                }
                Some(name) => self.emit(
                    "response.function_call_arguments.done",
                    || json!({"item_id": item_id, "output_index": k, "name": name, "arguments": text}),
                ),
            }
            match &mut self.items[k] {
                OutputItem::Message { open, .. } | OutputItem::Call { open, .. } => *open = false,
            }
            let item = item_json(&self.items[k], "completed");
            self.emit(
                "response.output_item.done",
                || json!({"output_index": k, "item": item}),
            );
        }
    }

    fn response(&self, status: &str, incomplete: Option<Value>) -> Value {
        let output: Vec<Value> = self
            .items
            .iter()
            .map(|i| {
                let item_status = match status {
                    "in_progress" | "incomplete" => status,
                    _ => "completed",
                };
                item_json(i, item_status)
            })
            .collect();
        let output_text: String = self
            .items
            .iter()
            .filter_map(|i| match i {
                OutputItem::Message { text, .. } => Some(text.as_str()),
                OutputItem::Call { .. } => None,
            })
            .collect();
        let usage = self.usage.as_ref().map(|u| {
            let (input, output, cached) = token_counts(u);
            json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input + output})
        });
        let mut r = Map::new();
        r.insert("id".into(), json!(self.id));
        r.insert("object".into(), json!("response"));
        r.insert("created_at".into(), json!(self.created_at));
        r.insert("status".into(), json!(status));
        let done = status != "in_progress";
        r.insert(
            "completed_at".into(),
            if status == "completed" {
                json!(now_secs())
            } else {
                Value::Null
            },
        );
        r.insert("error".into(), Value::Null);
        r.insert(
            "incomplete_details".into(),
            incomplete.unwrap_or(Value::Null),
        );
        r.insert("model".into(), json!(self.model));
        r.insert("output".into(), Value::Array(output));
        if done {
            r.insert("output_text".into(), json!(output_text));
        }
        for (k, v) in &self.echo {
            r.insert(k.clone(), v.clone());
        }
        if let Some(u) = usage {
            r.insert("usage".into(), u);
        }
        Value::Object(r)
    }

    /// The `response.failed` event for a stream that broke off after `sequence` events.
    pub fn failure_event(&mut self, error: &ApiError, sequence: u64) -> (&'static str, Value) {
        self.streaming = true;
        self.sequence = sequence;
        self.fail(error);
        self.events
            .pop()
            .unwrap_or(("response.failed", Value::Null))
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn item_json(item: &OutputItem, status: &str) -> Value {
    match item {
        OutputItem::Message { id, text, open } => {
            let status = if *open { "in_progress" } else { status };
            json!({"id": id, "type": "message", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
        }
        OutputItem::Call {
            id,
            call_id,
            name,
            arguments,
            open,
            ..
        } => {
            let status = if *open { "in_progress" } else { status };
            json!({"id": id, "type": "function_call", "status": status, "call_id": call_id,
                "name": name, "arguments": arguments})
        }
    }
}

impl EventBuilder for ResponseBuilder {
    /// `response.created` and `response.in_progress`.
    fn start(&mut self) {
        self.streaming = true;
        let r = self.response("in_progress", None);
        self.emit("response.created", || json!({"response": r}));
        let r = self.response("in_progress", None);
        self.emit("response.in_progress", || json!({"response": r}));
    }

    /// The answer ended normally: closes open items and emits `response.completed` (or
    /// `response.incomplete` when the token limit or a content filter cut it short).
    fn complete(&mut self) -> Value {
        self.close_open();
        let (status, details) = match self.finish.as_deref() {
            Some("length") => ("incomplete", Some(json!({"reason": "max_output_tokens"}))),
            Some("content_filter") => ("incomplete", Some(json!({"reason": "content_filter"}))),
            _ => ("completed", None),
        };
        let r = self.response(status, details);
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        if self.streaming {
            self.emit(kind, || json!({"response": r.clone()}));
        }
        r
    }

    /// The answer broke off: emits `response.failed` with the error.
    fn fail(&mut self, error: &ApiError) {
        let mut r = self.response("failed", None);
        r["error"] = json!({"code": error.code.clone().unwrap_or_else(|| "server_error".into()), "message": error.message});
        self.emit("response.failed", || json!({"response": r}));
    }

    /// The events emitted since the last call, in order.
    fn take_events(&mut self) -> Vec<(&'static str, Value)> {
        std::mem::take(&mut self.events)
    }
}

impl AnswerSink for ResponseBuilder {
    fn text(&mut self, delta: &str) {
        let open_message = self
            .items
            .iter()
            .rposition(|i| matches!(i, OutputItem::Message { open: true, .. }));
        let k = match open_message {
            Some(k) => k,
            None => {
                if delta.trim().is_empty() {
                    self.pending_space.push_str(delta);
                    return;
                }
                self.close_open();
                let id = new_id("msg");
                self.items.push(OutputItem::Message {
                    id: id.clone(),
                    text: String::new(),
                    open: true,
                });
                let k = self.items.len() - 1;
                self.emit(
                    "response.output_item.added",
                    || json!({"output_index": k, "item": {"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
                );
                self.emit(
                    "response.content_part.added",
                    || json!({"item_id": id, "output_index": k, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
                );
                k
            }
        };
        let delta = format!("{}{delta}", std::mem::take(&mut self.pending_space));
        let item_id = match &mut self.items[k] {
            OutputItem::Message { id, text, .. } => {
                text.push_str(&delta);
                id.clone()
            }
            OutputItem::Call { id, .. } => id.clone(),
        };
        self.emit(
            "response.output_text.delta",
            || json!({"item_id": item_id, "output_index": k, "content_index": 0, "delta": delta, "logprobs": []}),
        );
    }

    fn call_start(&mut self, index: u64, id: &str, name: &str) {
        self.pending_space.clear();
        self.close_open();
        let call_id = if id.is_empty() {
            new_id("call")
        } else {
            id.to_string()
        };
        let item_id = new_id("fc");
        self.items.push(OutputItem::Call {
            id: item_id,
            index,
            call_id,
            name: name.to_string(),
            arguments: String::new(),
            open: true,
        });
        let k = self.items.len() - 1;
        let item = item_json(&self.items[k], "in_progress");
        self.emit(
            "response.output_item.added",
            || json!({"output_index": k, "item": item}),
        );
    }

    fn call_arguments(&mut self, index: u64, delta: &str) {
        let Some(k) = self
            .items
            .iter()
            .rposition(|i| matches!(i, OutputItem::Call { index: j, .. } if *j == index))
        else {
            return;
        };
        let item_id = match &mut self.items[k] {
            OutputItem::Call { id, arguments, .. } => {
                arguments.push_str(delta);
                id.clone()
            }
            OutputItem::Message { id, .. } => id.clone(),
        };
        self.emit(
            "response.function_call_arguments.delta",
            || json!({"item_id": item_id, "output_index": k, "delta": delta}),
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

    fn req(v: Value) -> Result<ResponsesRequest, ApiError> {
        parse_request(v.as_object().unwrap())
    }

    #[test]
    fn a_tool_round_trip_becomes_the_chat_conversation_it_stands_for() {
        let r = req(json!({"model": "m", "instructions": "be brief",
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "input": [
                {"role": "user", "content": "weather in Paris?"},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}}}))
        .unwrap();
        let (body, turn) = r.to_chat(&[]).unwrap();
        let m = body["messages"].as_array().unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(
            m[1],
            json!({"role": "user", "content": "weather in Paris?"})
        );
        assert_eq!(m[2]["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"})
        );
        assert_eq!(body["tool_choice"]["function"]["name"], "get_weather");
        assert_eq!(body["tools"][0]["function"]["parameters"]["type"], "object");
        assert_eq!(body["response_format"]["json_schema"]["name"], "w");
        // Instructions are not part of what a continuation replays.
        assert_eq!(turn.len(), 3);
        crate::wire::chat::validate_chat_request(&body).unwrap();
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (
                json!({"model": "m", "input": [{"type": "bogus"}]}),
                "input[0].type",
            ),
            (
                json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}),
                "input[0].call_id",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"model": "m", "input": "x", "background": true}),
                "background",
            ),
            (
                json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nonsense"}}}}),
                "text.format.schema",
            ),
            (json!({"model": "m", "input": []}), "input"),
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": 3}]}),
                "tools[0].parameters",
            ),
        ];
        for (body, param) in cases {
            let e = req(body.clone()).and_then(|r| r.to_chat(&[]).map(|_| ()));
            let e = e.expect_err(&body.to_string());
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert_eq!(e.status, http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn a_call_output_may_answer_a_call_from_the_stored_conversation() {
        let history = vec![
            json!({"role": "user", "content": "hi"}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c9", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
        ];
        let r = req(json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "c9", "output": "42"}]})).unwrap();
        let (body, turn) = r.to_chat(&history).unwrap();
        assert_eq!(body["messages"].as_array().unwrap().len(), 3);
        assert_eq!(
            turn,
            vec![json!({"role": "tool", "tool_call_id": "c9", "content": "42"})]
        );
    }

    /// The same answer, whole or chunked, builds the same output.
    #[test]
    fn streamed_and_whole_answers_build_the_same_response() {
        let completion = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "\n",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
            "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}});
        let chunks = [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "\n"}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}),
        ];
        let echo = Map::new();
        let mut whole = ResponseBuilder::new("resp_1".into(), "m".into(), 1, echo.clone());
        feed_completion(&completion, &mut whole);
        let a = whole.complete();
        let mut streamed = ResponseBuilder::new("resp_1".into(), "m".into(), 1, echo);
        streamed.start();
        let mut started = Vec::new();
        for c in &chunks {
            feed_chunk(c, &mut started, &mut streamed);
        }
        let b = streamed.complete();
        let strip = |mut v: Value| {
            for item in v["output"].as_array_mut().unwrap() {
                item.as_object_mut().unwrap().remove("id");
            }
            v.as_object_mut().unwrap().remove("completed_at");
            v
        };
        assert_eq!(strip(a.clone()), strip(b));
        assert_eq!(
            a["output"].as_array().unwrap().len(),
            1,
            "no empty message item: {a}"
        );
        assert_eq!(a["output"][0]["call_id"], "c1");
        assert_eq!(a["usage"]["total_tokens"], 8);
        let events = streamed.take_events();
        let kinds: Vec<&str> = events.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        for (i, (_, e)) in events.iter().enumerate() {
            assert_eq!(e["sequence_number"], i as u64);
        }
    }

    #[test]
    fn a_cut_off_answer_is_incomplete() {
        let mut b = ResponseBuilder::new("resp_1".into(), "m".into(), 1, Map::new());
        feed_completion(
            &json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "abc"}, "finish_reason": "length"}]}),
            &mut b,
        );
        let r = b.complete();
        assert_eq!(r["status"], "incomplete");
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(r["output_text"], "abc");
    }
}
