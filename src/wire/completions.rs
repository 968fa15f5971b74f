//! The two doors whose bodies the pipeline keeps as they are: legacy text completions
//! (`POST /v1/completions`) and embeddings (`POST /v1/embeddings`). Their validation, the texts the
//! rails read from them, and the embeddings response as the traffic log keeps it (sizes, not
//! vectors) live here.
//!
//! Not handled here: how a local model answers a completion (raw prompt, no chat template) is the
//! local backend's business; which targets can embed is the pipeline's.

use serde_json::{json, Map, Value};

use super::chat::{
    expected, optional_bool, optional_int, optional_number, optional_string, request_info,
    required_model, stream_flags, validate_stop, ChatRequestInfo,
};
use super::error::ApiError;
use super::Api;

/// The default `max_tokens` of a completion, as OpenAI documents it.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 16;

/// Validates a `/v1/completions` body.
pub fn validate_completion_request(body: &Map<String, Value>) -> Result<ChatRequestInfo, ApiError> {
    let model = required_model(body)?;
    prompt_shape(body.get("prompt"), "prompt")?;
    optional_int(body, "max_tokens", 0, i64::MAX)?;
    optional_number(body, "temperature", 0.0, 2.0)?;
    optional_number(body, "top_p", 0.0, 1.0)?;
    optional_number(body, "presence_penalty", -2.0, 2.0)?;
    optional_number(body, "frequency_penalty", -2.0, 2.0)?;
    optional_int(body, "seed", i64::MIN, i64::MAX)?;
    optional_int(body, "logprobs", 0, 5)?;
    optional_int(body, "best_of", 1, 20)?;
    optional_bool(body, "echo")?;
    optional_string(body, "suffix")?;
    let n = optional_int(body, "n", 1, 128)?.unwrap_or(1) as u64;
    validate_stop(body.get("stop"))?;
    let (stream, include_usage) = stream_flags(body)?;
    request_info(body, model, stream, include_usage, n)
}

/// Validates a `/v1/embeddings` body.
pub fn validate_embedding_request(body: &Map<String, Value>) -> Result<ChatRequestInfo, ApiError> {
    let model = required_model(body)?;
    prompt_shape(body.get("input"), "input")?;
    match body.get("encoding_format") {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if f == "float" || f == "base64" => {}
        Some(Value::String(f)) => {
            return Err(ApiError::invalid_param(
                "encoding_format",
                format!("Invalid value for 'encoding_format': '{f}'. Supported: float, base64."),
            ))
        }
        Some(v) => return Err(expected("encoding_format", "a string", v)),
    }
    optional_int(body, "dimensions", 1, i64::MAX)?;
    if body.contains_key("stream") && body.get("stream") != Some(&Value::Bool(false)) {
        return Err(ApiError::invalid_param(
            "stream",
            "Embeddings are not streamed; remove 'stream'.",
        ));
    }
    request_info(body, model, false, false, 1)
}

/// A prompt or embedding input: a string, a list of strings, a list of token ids, or a list of
/// lists of token ids; never empty.
fn prompt_shape(v: Option<&Value>, param: &str) -> Result<(), ApiError> {
    let what =
        "a string, an array of strings, an array of token ids or an array of arrays of token ids";
    let token = |v: &Value| v.as_u64().is_some_and(|t| t <= u32::MAX as u64);
    match v {
        None | Some(Value::Null) => Err(ApiError::invalid_param(
            param,
            format!("Missing required parameter: '{param}'."),
        )
        .with_code("missing_required_parameter")),
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Err(ApiError::invalid_param(
            param,
            format!("'{param}' must not be empty."),
        )),
        Some(Value::Array(a)) => {
            let ok = a.iter().all(Value::is_string)
                || a.iter().all(token)
                || a.iter().all(|x| {
                    x.as_array()
                        .is_some_and(|t| !t.is_empty() && t.iter().all(token))
                });
            if ok {
                Ok(())
            } else {
                Err(expected(param, what, &Value::Array(a.clone())))
            }
        }
        Some(other) => Err(expected(param, what, other)),
    }
}

fn text_key(api: Api) -> &'static str {
    if api == Api::Embeddings {
        "input"
    } else {
        "prompt"
    }
}

/// The texts of a completion's `prompt` or an embedding's `input` (token-id prompts carry none the
/// rails could read).
pub fn texts(api: Api, body: &Map<String, Value>) -> Vec<String> {
    match body.get(text_key(api)) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Writes texts (the rails' masked copies, in the order `texts` gave them) back into the body.
pub fn replace_texts(api: Api, body: &mut Map<String, Value>, texts: Vec<String>) {
    let key = text_key(api);
    match body.get_mut(key) {
        Some(Value::String(s)) => {
            if let Some(t) = texts.into_iter().next() {
                *s = t;
            }
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) && a.len() == texts.len() => {
            *a = texts.into_iter().map(Value::String).collect();
        }
        _ => {}
    }
}

/// An embeddings response as the log keeps it: every vector replaced by its length (base64
/// vectors by their encoded length), everything else as it was.
pub fn without_vectors(response: &Value) -> Value {
    let mut out = response.clone();
    if let Some(data) = out.get_mut("data").and_then(Value::as_array_mut) {
        for item in data {
            if let Some(obj) = item.as_object_mut() {
                let size = match obj.remove("embedding") {
                    Some(Value::Array(v)) => json!({"dimensions": v.len()}),
                    Some(Value::String(b64)) => json!({"base64_chars": b64.len()}),
                    _ => Value::Null,
                };
                obj.insert("embedding_size".into(), size);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn prompts_of_every_documented_shape_pass_and_others_name_the_field() {
        for p in [
            json!("hi"),
            json!(["a", "b"]),
            json!([1, 2, 3]),
            json!([[1], [2, 3]]),
        ] {
            validate_completion_request(&body(json!({"model": "m", "prompt": p}))).unwrap();
        }
        for p in [json!([]), json!(["a", 1]), json!({"x": 1}), json!([[]])] {
            let e =
                validate_completion_request(&body(json!({"model": "m", "prompt": p}))).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("prompt"), "{}", e.message);
        }
        let e = validate_embedding_request(&body(json!({"model": "m"}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input"));
        let e = validate_embedding_request(&body(
            json!({"model": "m", "input": "x", "encoding_format": "int8"}),
        ))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("encoding_format"));
    }

    #[test]
    fn masked_texts_go_back_where_they_came_from() {
        let mut b = body(json!({"model": "m", "input": ["mail a@b.c", "plain"]}));
        let t = texts(Api::Embeddings, &b);
        assert_eq!(t, vec!["mail a@b.c", "plain"]);
        replace_texts(
            Api::Embeddings,
            &mut b,
            vec!["mail <EMAIL>".into(), "plain".into()],
        );
        assert_eq!(b["input"], json!(["mail <EMAIL>", "plain"]));
        let mut b = body(json!({"model": "m", "prompt": "x"}));
        replace_texts(Api::Completions, &mut b, vec!["y".into()]);
        assert_eq!(b["prompt"], "y");
    }

    #[test]
    fn logged_embeddings_keep_sizes_not_vectors() {
        let r = json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "usage": {"prompt_tokens": 2, "total_tokens": 2}});
        let logged = without_vectors(&r);
        assert!(logged["data"][0].get("embedding").is_none());
        assert_eq!(logged["data"][0]["embedding_size"]["dimensions"], 3);
        assert_eq!(logged["usage"], r["usage"]);
    }
}
