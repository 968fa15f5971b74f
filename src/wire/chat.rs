//! Checks a chat completion request against the OpenAI request surface before any backend sees it,
//! so bad input gets a precise 400 naming the offending parameter. The request itself is kept as the
//! client sent it (unknown fields included) and forwarded unchanged apart from `model`.

use serde_json::{Map, Value};

use crate::wire::error::ApiError;

/// What the gateway needs to know about a valid request.
#[derive(Debug, Clone)]
pub struct ChatRequestInfo {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub n: u64,
    pub user: Option<String>,
    /// The labels in the body's `metadata` (headers take precedence over them).
    pub labels: Labels,
}

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];
const JSON_SCHEMA_TYPES: &[&str] = &[
    "object", "array", "string", "number", "integer", "boolean", "null",
];

/// A message's content as text: the string, or its text parts joined by newlines.
pub(crate) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn expected(param: &str, what: &str, got: &Value) -> ApiError {
    ApiError::invalid_param(
        param,
        format!(
            "Invalid type for '{param}': expected {what}, but got {}.",
            type_name(got)
        ),
    )
    .with_code("invalid_type")
}

pub(crate) fn optional_number(
    body: &Map<String, Value>,
    key: &str,
    min: f64,
    max: f64,
) -> Result<(), ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if (min..=max).contains(&x) {
                Ok(())
            } else {
                Err(ApiError::invalid_param(
                    key,
                    format!("'{key}' must be between {min} and {max}; got {x}."),
                ))
            }
        }
        Some(v) => Err(expected(key, "a number", v)),
    }
}

pub(crate) fn optional_int(
    body: &Map<String, Value>,
    key: &str,
    min: i64,
    max: i64,
) -> Result<Option<i64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
            Some(x) => Err(ApiError::invalid_param(
                key,
                format!("'{key}' must be between {min} and {max}; got {x}."),
            )),
            None => Err(expected(key, "an integer", &Value::Number(n.clone()))),
        },
        Some(v) => Err(expected(key, "an integer", v)),
    }
}

pub(crate) fn optional_bool(
    body: &Map<String, Value>,
    key: &str,
) -> Result<Option<bool>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(expected(key, "a boolean", v)),
    }
}

pub(crate) fn optional_string<'a>(
    body: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(expected(key, "a string", v)),
    }
}

/// Validates a request body and extracts what routing and logging need.
pub fn validate_chat_request(body: &Map<String, Value>) -> Result<ChatRequestInfo, ApiError> {
    let model = required_model(body)?;
    validate_messages(body.get("messages"))?;
    let tool_names = validate_tools(body.get("tools"))?;
    validate_tool_choice(body.get("tool_choice"), &tool_names)?;
    optional_bool(body, "parallel_tool_calls")?;
    optional_number(body, "temperature", 0.0, 2.0)?;
    optional_number(body, "top_p", 0.0, 1.0)?;
    optional_number(body, "presence_penalty", -2.0, 2.0)?;
    optional_number(body, "frequency_penalty", -2.0, 2.0)?;
    optional_int(body, "max_tokens", 1, i64::MAX)?;
    optional_int(body, "max_completion_tokens", 1, i64::MAX)?;
    optional_int(body, "seed", i64::MIN, i64::MAX)?;
    let n = optional_int(body, "n", 1, 128)?.unwrap_or(1) as u64;
    validate_logprobs(body)?;
    validate_stop(body.get("stop"))?;
    validate_response_format(body.get("response_format"))?;
    let (stream, include_usage) = stream_flags(body)?;
    request_info(body, model, stream, include_usage, n)
}

/// What the pipeline needs of a valid request: the checked fields and the caller's `user` and
/// `metadata` labels.
pub(crate) fn request_info(
    body: &Map<String, Value>,
    model: String,
    stream: bool,
    include_usage: bool,
    n: u64,
) -> Result<ChatRequestInfo, ApiError> {
    let user = optional_string(body, "user")?.map(str::to_string);
    Ok(ChatRequestInfo {
        model,
        stream,
        include_usage,
        n,
        user,
        labels: labels(body)?,
    })
}

/// The `model` parameter: a non-empty string.
pub(crate) fn required_model(body: &Map<String, Value>) -> Result<String, ApiError> {
    match body.get("model") {
        None | Some(Value::Null) => Err(ApiError::invalid_param(
            "model",
            "Missing required parameter: 'model'.",
        )
        .with_code("missing_required_parameter")),
        Some(Value::String(s)) if s.is_empty() => Err(ApiError::invalid_param(
            "model",
            "'model' must not be empty.",
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(expected("model", "a string", v)),
    }
}

/// `stream` and `stream_options.include_usage`.
pub(crate) fn stream_flags(body: &Map<String, Value>) -> Result<(bool, bool), ApiError> {
    let stream = optional_bool(body, "stream")?.unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            if !stream {
                return Err(ApiError::invalid_param(
                    "stream_options",
                    "'stream_options' is only allowed when 'stream' is true.",
                ));
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(expected("stream_options.include_usage", "a boolean", v)),
            }
        }
        Some(v) => return Err(expected("stream_options", "an object", v)),
    };
    Ok((stream, include_usage))
}

/// The traffic labels a body's `metadata` may carry.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    pub workload: Option<String>,
    pub client: Option<String>,
    pub session: Option<String>,
    /// The agent task (several requests) this request belongs to.
    pub episode: Option<String>,
}

/// The longest episode id a client may send.
pub const MAX_EPISODE_ID: usize = 256;

/// A client's episode id (from `param`): 1 to 256 printable ASCII characters (it is sent back in
/// the `x-episode-id` header).
pub fn episode_id(s: &str, param: &str) -> Result<String, ApiError> {
    let s = s.trim();
    if s.is_empty()
        || s.len() > MAX_EPISODE_ID
        || !s.chars().all(|c| c.is_ascii_graphic() || c == ' ')
    {
        return Err(ApiError::invalid_param(
            param,
            format!("'{param}' must be 1 to {MAX_EPISODE_ID} printable ASCII characters."),
        ));
    }
    Ok(s.to_string())
}

/// The workload, client, session and episode ids in a body's `metadata`.
pub(crate) fn labels(body: &Map<String, Value>) -> Result<Labels, ApiError> {
    let (mut workload, mut client, mut session, mut episode) = (None, None, None, None);
    match body.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let Value::String(s) = v else {
                    return Err(expected(&format!("metadata.{k}"), "a string", v));
                };
                match k.as_str() {
                    "workload_id" => workload = Some(s.clone()),
                    "client_id" => client = Some(s.clone()),
                    "session_id" => session = Some(s.clone()),
                    "episode_id" => episode = Some(episode_id(s, "metadata.episode_id")?),
                    _ => {}
                }
            }
        }
        Some(v) => return Err(expected("metadata", "an object", v)),
    }
    Ok(Labels {
        workload,
        client,
        session,
        episode,
    })
}

fn validate_messages(messages: Option<&Value>) -> Result<(), ApiError> {
    let messages = match messages {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                "messages",
                "Missing required parameter: 'messages'.",
            )
            .with_code("missing_required_parameter"))
        }
        Some(Value::Array(a)) => a,
        Some(v) => return Err(expected("messages", "an array", v)),
    };
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "'messages' must contain at least one message.",
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        let p = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(expected(&p, "an object", m));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.as_str(),
            Some(Value::String(r)) => {
                return Err(ApiError::invalid_param(
                    &format!("{p}.role"),
                    format!(
                        "Invalid value for '{p}.role': '{r}'. Supported values are: {}.",
                        ROLES.join(", ")
                    ),
                ))
            }
            Some(v) => return Err(expected(&format!("{p}.role"), "a string", v)),
            None => {
                return Err(ApiError::invalid_param(
                    &format!("{p}.role"),
                    format!("Missing required parameter: '{p}.role'."),
                )
                .with_code("missing_required_parameter"))
            }
        };
        validate_content(
            &p,
            role,
            m.get("content"),
            m.contains_key("tool_calls") || m.contains_key("function_call"),
        )?;
        if role == "tool" {
            match m.get("tool_call_id") {
                Some(Value::String(_)) => {}
                Some(v) => return Err(expected(&format!("{p}.tool_call_id"), "a string", v)),
                None => {
                    return Err(ApiError::invalid_param(
                        &format!("{p}.tool_call_id"),
                        format!("Missing required parameter: '{p}.tool_call_id'."),
                    )
                    .with_code("missing_required_parameter"))
                }
            }
        }
        if let Some(calls) = m.get("tool_calls") {
            if role != "assistant" {
                return Err(ApiError::invalid_param(
                    &format!("{p}.tool_calls"),
                    format!("'{p}.tool_calls' is only allowed on assistant messages."),
                ));
            }
            let Value::Array(calls) = calls else {
                return Err(expected(&format!("{p}.tool_calls"), "an array", calls));
            };
            for (j, c) in calls.iter().enumerate() {
                let cp = format!("{p}.tool_calls[{j}]");
                let Value::Object(c) = c else {
                    return Err(expected(&cp, "an object", c));
                };
                if !matches!(c.get("id"), Some(Value::String(_))) {
                    return Err(ApiError::invalid_param(
                        &format!("{cp}.id"),
                        format!("'{cp}.id' must be a string."),
                    ));
                }
                let name = c.get("function").and_then(|f| f.get("name"));
                let args = c.get("function").and_then(|f| f.get("arguments"));
                if !matches!(name, Some(Value::String(_)))
                    || !matches!(args, Some(Value::String(_)))
                {
                    return Err(ApiError::invalid_param(
                        &format!("{cp}.function"),
                        format!("'{cp}.function' must have string 'name' and 'arguments'."),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn validate_content(
    p: &str,
    role: &str,
    content: Option<&Value>,
    has_calls: bool,
) -> Result<(), ApiError> {
    let cp = format!("{p}.content");
    match content {
        Some(Value::String(_)) => Ok(()),
        None | Some(Value::Null) if role == "assistant" && has_calls => Ok(()),
        None | Some(Value::Null) if role == "assistant" => Ok(()),
        None => Err(
            ApiError::invalid_param(&cp, format!("Missing required parameter: '{cp}'."))
                .with_code("missing_required_parameter"),
        ),
        Some(Value::Array(parts)) => {
            for (k, part) in parts.iter().enumerate() {
                let pp = format!("{cp}[{k}]");
                let kind = part.get("type").and_then(Value::as_str);
                match kind {
                    Some("text") if part.get("text").is_some_and(Value::is_string) => {}
                    Some("text") => {
                        return Err(ApiError::invalid_param(
                            &pp,
                            format!("'{pp}' of type text needs a string 'text'."),
                        ))
                    }
                    Some(_) => {}
                    None => {
                        return Err(ApiError::invalid_param(
                            &pp,
                            format!("'{pp}' needs a string 'type'."),
                        ))
                    }
                }
            }
            Ok(())
        }
        Some(v) => Err(expected(&cp, "a string or an array of content parts", v)),
    }
}

pub(crate) fn valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn validate_tools(tools: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let tools = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(v) => return Err(expected("tools", "an array", v)),
    };
    let mut names = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let p = format!("tools[{i}]");
        let Value::Object(t) = t else {
            return Err(expected(&p, "an object", t));
        };
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                return Err(ApiError::invalid_param(
                    &format!("{p}.type"),
                    format!("Invalid value for '{p}.type': '{other}'. Supported: function."),
                ))
            }
            None => {
                return Err(ApiError::invalid_param(
                    &format!("{p}.type"),
                    format!("Missing required parameter: '{p}.type'."),
                ))
            }
        }
        let Some(Value::Object(f)) = t.get("function") else {
            return Err(ApiError::invalid_param(
                &format!("{p}.function"),
                format!("'{p}.function' must be an object."),
            ));
        };
        let name = match f.get("name") {
            Some(Value::String(n)) if valid_function_name(n) => n.clone(),
            Some(Value::String(n)) => {
                return Err(ApiError::invalid_param(
                    &format!("{p}.function.name"),
                    format!("Invalid '{p}.function.name': '{n}'. Names are 1–64 characters of a-z, A-Z, 0-9, _, - and ."),
                ))
            }
            _ => {
                return Err(ApiError::invalid_param(
                    &format!("{p}.function.name"),
                    format!("Missing required parameter: '{p}.function.name'."),
                ))
            }
        };
        if names.contains(&name) {
            return Err(ApiError::invalid_param(
                &format!("{p}.function.name"),
                format!("Tool name '{name}' is defined twice."),
            ));
        }
        if let Some(d) = f.get("description") {
            if !d.is_string() {
                return Err(expected(
                    &format!("{p}.function.description"),
                    "a string",
                    d,
                ));
            }
        }
        if let Some(params) = f.get("parameters") {
            check_schema(params, &format!("{p}.function.parameters"), 0)?;
        }
        names.push(name);
    }
    Ok(names)
}

/// A structural check of a JSON Schema: the parts an OpenAI provider would refuse.
pub(crate) fn check_schema(schema: &Value, p: &str, depth: usize) -> Result<(), ApiError> {
    if depth > 64 {
        return Err(ApiError::invalid_param(
            p,
            format!("'{p}' is nested too deeply."),
        ));
    }
    let Value::Object(s) = schema else {
        return Err(ApiError::invalid_param(
            p,
            format!(
                "Invalid schema at '{p}': expected a JSON Schema object, got {}.",
                type_name(schema)
            ),
        ));
    };
    match s.get("type") {
        None => {}
        Some(Value::String(t)) if JSON_SCHEMA_TYPES.contains(&t.as_str()) => {}
        Some(Value::Array(ts))
            if ts
                .iter()
                .all(|t| t.as_str().is_some_and(|t| JSON_SCHEMA_TYPES.contains(&t))) => {}
        Some(t) => {
            return Err(ApiError::invalid_param(
                p,
                format!(
                    "Invalid schema at '{p}': 'type' {t} is not one of {}.",
                    JSON_SCHEMA_TYPES.join(", ")
                ),
            ))
        }
    }
    if let Some(props) = s.get("properties") {
        let Value::Object(props) = props else {
            return Err(ApiError::invalid_param(
                p,
                format!("Invalid schema at '{p}': 'properties' must be an object."),
            ));
        };
        for (k, v) in props {
            check_schema(v, &format!("{p}.properties.{k}"), depth + 1)?;
        }
    }
    if let Some(req) = s.get("required") {
        let ok = req
            .as_array()
            .is_some_and(|a| a.iter().all(Value::is_string));
        if !ok {
            return Err(ApiError::invalid_param(
                p,
                format!("Invalid schema at '{p}': 'required' must be an array of strings."),
            ));
        }
    }
    if let Some(items) = s.get("items") {
        if items.is_object() {
            check_schema(items, &format!("{p}.items"), depth + 1)?;
        }
    }
    Ok(())
}

fn validate_tool_choice(choice: Option<&Value>, tools: &[String]) -> Result<(), ApiError> {
    match choice {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) => match s.as_str() {
            "none" | "auto" => Ok(()),
            "required" if tools.is_empty() => Err(ApiError::invalid_param(
                "tool_choice",
                "'tool_choice' is 'required' but no 'tools' were given.",
            )),
            "required" => Ok(()),
            other => Err(ApiError::invalid_param(
                "tool_choice",
                format!("Invalid value for 'tool_choice': '{other}'. Supported: none, auto, required, or a named function."),
            )),
        },
        Some(Value::Object(o)) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(n)) if tools.iter().any(|t| t == n) => Ok(()),
                (Some("function"), Some(n)) => Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("'tool_choice' names function '{n}', which is not among 'tools'."),
                )),
                _ => Err(ApiError::invalid_param(
                    "tool_choice",
                    "A named 'tool_choice' must be {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                )),
            }
        }
        Some(v) => Err(expected("tool_choice", "a string or an object", v)),
    }
}

/// `logprobs` is a boolean; `top_logprobs` (0-20) comes only with `logprobs: true`.
fn validate_logprobs(body: &Map<String, Value>) -> Result<(), ApiError> {
    let on = optional_bool(body, "logprobs")?;
    if optional_int(body, "top_logprobs", 0, 20)?.is_some() && on != Some(true) {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            "'top_logprobs' needs 'logprobs': true.",
        ));
    }
    Ok(())
}

pub(crate) fn validate_stop(stop: Option<&Value>) -> Result<(), ApiError> {
    match stop {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => Ok(()),
        Some(Value::Array(_)) => Err(ApiError::invalid_param(
            "stop",
            "'stop' must be a string or an array of at most 4 strings.",
        )),
        Some(v) => Err(expected("stop", "a string or an array of strings", v)),
    }
}

fn validate_response_format(rf: Option<&Value>) -> Result<(), ApiError> {
    let rf = match rf {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(o)) => o,
        Some(v) => return Err(expected("response_format", "an object", v)),
    };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") | Some("json_object") => Ok(()),
        Some("json_schema") => {
            let js = rf.get("json_schema");
            if !js.and_then(|j| j.get("name")).is_some_and(Value::is_string) {
                return Err(ApiError::invalid_param(
                    "response_format.json_schema",
                    "'response_format' of type json_schema needs 'json_schema.name'.",
                ));
            }
            if let Some(schema) = js.and_then(|j| j.get("schema")) {
                check_schema(schema, "response_format.json_schema.schema", 0)?;
            }
            Ok(())
        }
        _ => Err(ApiError::invalid_param(
            "response_format.type",
            "'response_format.type' must be one of text, json_object, json_schema.",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episode_ids_are_printable_ascii_that_a_header_can_carry() {
        assert_eq!(episode_id("  task-7 ", "x").unwrap(), "task-7");
        assert_eq!(episode_id("agent run 12", "x").unwrap(), "agent run 12");
        for bad in ["", "   ", "t\u{7}ask", "tâche", &"x".repeat(257)] {
            let e = episode_id(bad, "metadata.episode_id").unwrap_err();
            assert_eq!(e.body()["error"]["param"], "metadata.episode_id", "{bad:?}");
        }
    }
    use serde_json::json;

    fn check(v: Value) -> Result<ChatRequestInfo, ApiError> {
        validate_chat_request(v.as_object().unwrap())
    }

    #[test]
    fn a_full_request_passes() {
        let info = check(json!({
            "model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "temperature": 0.2, "top_p": 1, "max_tokens": 5, "stop": ["\n"], "seed": 3, "n": 2,
            "metadata": {"workload_id": "w1"}, "user": "u", "some_future_field": {"x": 1}
        }))
        .unwrap();
        assert!(info.stream && info.include_usage);
        assert_eq!(info.n, 2);
        assert_eq!(info.labels.workload.as_deref(), Some("w1"));
    }

    #[test]
    fn each_bad_field_is_named_in_param() {
        let base = || json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({"messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
            (json!({"model": "m"}), "messages"),
            (json!({"model": 3, "messages": []}), "model"),
            (json!({"model": "m", "messages": []}), "messages"),
            (
                json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].tool_call_id",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
            ),
        ];
        for (v, param) in cases {
            let e = check(v.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{v}");
        }
        let with = |k: &str, val: Value| {
            let mut b = base();
            b[k] = val;
            b
        };
        let cases: Vec<(Value, &str)> = vec![
            (with("temperature", json!("hot")), "temperature"),
            (with("temperature", json!(3)), "temperature"),
            (with("n", json!(0)), "n"),
            (with("top_logprobs", json!(3)), "top_logprobs"),
            (with("top_logprobs", json!(21)), "top_logprobs"),
            (with("logprobs", json!("yes")), "logprobs"),
            (with("max_tokens", json!(1.5)), "max_tokens"),
            (with("stop", json!(["a", "b", "c", "d", "e"])), "stop"),
            (with("stream", json!("yes")), "stream"),
            (
                with("stream_options", json!({"include_usage": true})),
                "stream_options",
            ),
            (
                with(
                    "tools",
                    json!([{"type": "function", "function": {"name": "bad name"}}]),
                ),
                "tools[0].function.name",
            ),
            (
                with(
                    "tools",
                    json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "dict"}}}]),
                ),
                "tools[0].function.parameters",
            ),
            (
                with(
                    "tools",
                    json!([{"type": "function", "function": {"name": "f", "parameters": "nope"}}]),
                ),
                "tools[0].function.parameters",
            ),
            (
                with(
                    "tool_choice",
                    json!({"type": "function", "function": {"name": "g"}}),
                ),
                "tool_choice",
            ),
            (with("tool_choice", json!("required")), "tool_choice"),
            (
                with("response_format", json!({"type": "yaml"})),
                "response_format.type",
            ),
        ];
        for (v, param) in cases {
            let e = check(v.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{v}");
            assert_eq!(e.status.as_u16(), 400);
        }
    }
}
