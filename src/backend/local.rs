//! The local engine as a backend: renders the request with the model's chat template, generates,
//! and answers in the same OpenAI shapes (whole completions or chunk streams) as an upstream.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Backend, BackendError, BackendReply, BackendRequest, ChunkStream};
use crate::engine::grammar::ToolGrammar;
use crate::engine::sampling::SamplingParams;
use crate::engine::tools::{Parsed, ParsedCall, ToolCallParser};
use crate::engine::{Engine, FinishReason, GenEvent, GenerationRequest};
use crate::wire::Api;

pub struct LocalBackend {
    engine: Arc<Engine>,
}

impl LocalBackend {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    fn refuse(&self, param: Option<&str>, message: String) -> BackendError {
        BackendError::Unsupported {
            backend: self.engine.name.clone(),
            message,
            param: param.map(str::to_string),
        }
    }

    /// A legacy completion's prompt as token ids: the text itself (no chat template) or the ids
    /// the client sent. One prompt per request: this engine serves `n = 1`.
    fn raw_prompt(
        &self,
        body: &serde_json::Map<String, Value>,
    ) -> Result<(Vec<u32>, String), BackendError> {
        if body.get("suffix").is_some_and(|s| !s.is_null()) {
            return Err(self.refuse(
                Some("suffix"),
                format!(
                    "'suffix' (fill-in-the-middle) is not supported by the local model '{}'.",
                    self.engine.name
                ),
            ));
        }
        if body.get("logprobs").is_some_and(|s| !s.is_null()) {
            return Err(self.refuse(
                Some("logprobs"),
                format!(
                    "'logprobs' is not supported on completions by the local model '{}'.",
                    self.engine.name
                ),
            ));
        }
        if body
            .get("best_of")
            .and_then(Value::as_u64)
            .is_some_and(|n| n > 1)
        {
            return Err(self.refuse(
                Some("best_of"),
                "the local engine serves best_of = 1 only".into(),
            ));
        }
        let vocab = self.engine.shape.vocab;
        let ids = |ids: &[Value]| -> Result<Vec<u32>, BackendError> {
            ids.iter()
                .map(|t| match t.as_u64() {
                    Some(t) if (t as usize) < vocab => Ok(t as u32),
                    _ => Err(self.refuse(
                        Some("prompt"),
                        format!("token id {t} is outside the model's vocabulary of {vocab}"),
                    )),
                })
                .collect()
        };
        let one = match body.get("prompt") {
            Some(Value::Array(a)) if a.len() == 1 => &a[0],
            Some(Value::Array(a)) if a.iter().all(Value::is_number) => return Ok((ids(a)?, String::new())),
            Some(Value::Array(_)) => {
                return Err(self.refuse(
                    Some("prompt"),
                    format!("the local model '{}' takes one prompt per request; send the prompts as separate requests", self.engine.name),
                ))
            }
            Some(p) => p,
            None => return Err(self.refuse(Some("prompt"), "a prompt is required".into())),
        };
        match one {
            Value::String(text) => {
                let ids = self
                    .engine
                    .chat
                    .encode(text)
                    .map_err(|m| BackendError::Internal {
                        backend: self.engine.name.clone(),
                        message: m,
                    })?;
                Ok((ids, text.clone()))
            }
            Value::Array(a) => Ok((ids(a)?, String::new())),
            _ => Err(self.refuse(
                Some("prompt"),
                "the prompt must be text or token ids".into(),
            )),
        }
    }

    /// Refuses content the model cannot read (images, audio, files) rather than dropping it.
    fn text_only(&self, messages: &[Value]) -> Result<(), BackendError> {
        for (i, m) in messages.iter().enumerate() {
            let Some(parts) = m.get("content").and_then(Value::as_array) else {
                continue;
            };
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                if kind != "text" {
                    return Err(self.refuse(
                        Some(&format!("messages[{i}].content[{j}]")),
                        format!("the local model '{}' is text-only and cannot read '{kind}' content; send text, or use a route to a model that reads it", self.engine.name),
                    ));
                }
            }
        }
        Ok(())
    }

    fn prepare(
        &self,
        api: Api,
        body: &serde_json::Map<String, Value>,
    ) -> Result<Prepared, BackendError> {
        if api == Api::Embeddings {
            return Err(self.refuse(
                Some("model"),
                format!(
                    "the local model '{}' is a chat model and cannot embed",
                    self.engine.name
                ),
            ));
        }
        let completion = api == Api::Completions;
        let tools: Vec<Value> = body
            .get("tools")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let choice_none = body.get("tool_choice").and_then(Value::as_str) == Some("none");
        let use_tools = !completion && !tools.is_empty() && !choice_none;
        let (ids, echo) = if completion {
            self.raw_prompt(body)?
        } else {
            self.text_only(&messages)?;
            let prompt = self
                .engine
                .chat
                .prompt(&messages, &tools, body.get("tool_choice"))
                .map_err(|m| self.refuse(Some("messages"), m))?;
            let ids = self
                .engine
                .chat
                .encode(&prompt)
                .map_err(|m| BackendError::Internal {
                    backend: self.engine.name.clone(),
                    message: m,
                })?;
            (ids, String::new())
        };
        if ids.is_empty() {
            return Err(self.refuse(Some("prompt"), "the prompt is empty".into()));
        }
        let ctx = self.engine.context_length;
        if ids.len() >= ctx {
            return Err(self.refuse(
                Some("messages"),
                format!("the prompt is {} tokens; the model '{}' serves at most {ctx} (prompt + completion)", ids.len(), self.engine.name),
            ));
        }
        let room = ctx - ids.len();
        let asked = body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
            .and_then(Value::as_u64)
            .map(|n| n as usize);
        let max_tokens = match asked {
            Some(n) if n > room => {
                return Err(self.refuse(
                    Some("max_tokens"),
                    format!(
                        "max_tokens {n} does not fit: the prompt takes {} of the model's {ctx} tokens, leaving {room}",
                        ids.len()
                    ),
                ))
            }
            Some(n) => n,
            // OpenAI's default for legacy completions; chat answers may use the whole context.
            None if completion => (crate::wire::completions::DEFAULT_COMPLETION_TOKENS as usize).min(room),
            None => room,
        };
        let stop = match body.get("stop") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        let num = |k: &str| body.get(k).and_then(Value::as_f64);
        let sampling = SamplingParams {
            temperature: num("temperature").unwrap_or(1.0) as f32,
            top_p: num("top_p").unwrap_or(1.0) as f32,
            top_k: body.get("top_k").and_then(Value::as_u64).unwrap_or(0) as usize,
            seed: body.get("seed").and_then(Value::as_i64).map(|s| s as u64),
        };
        let grammar = if use_tools && self.engine.constrain_tool_calls {
            let parallel = body.get("parallel_tool_calls").and_then(Value::as_bool) != Some(false);
            ToolGrammar::new(&tools, body.get("tool_choice"), parallel).map(Arc::new)
        } else {
            None
        };
        let echo =
            (completion && body.get("echo").and_then(Value::as_bool) == Some(true)).then_some(echo);
        Ok(Prepared {
            echo,
            prompt: ids,
            max_tokens,
            stop,
            sampling,
            tools: use_tools,
            grammar,
        })
    }

    async fn run(&self, request: BackendRequest) -> Result<BackendReply, BackendError> {
        let adapter =
            match &request.adapter {
                Some(id) => Some(self.engine.adapters.get(id).ok_or_else(|| {
                    BackendError::UnknownModel {
                        backend: self.engine.name.clone(),
                        message: format!(
                        "The adapter '{id}' is not loaded on '{}'; load it with POST /v1/adapters.",
                        self.engine.name
                    ),
                    }
                })?),
                None => None,
            };
        let prepared = self.prepare(request.api, &request.body)?;
        let with_tools = prepared.tools;
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.engine
            .submit(GenerationRequest {
                prompt: prepared.prompt,
                max_tokens: prepared.max_tokens,
                stop: prepared.stop,
                sampling: prepared.sampling,
                events: tx,
                adapter,
                tools: prepared.grammar,
            })
            .map_err(|e| BackendError::Internal {
                backend: self.engine.name.clone(),
                message: e.to_string(),
            })?;
        let id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let model = request
            .adapter
            .clone()
            .unwrap_or_else(|| self.engine.name.clone());
        if request.api == Api::Completions {
            let answer = CompletionAnswer {
                model,
                created,
                echo: prepared.echo,
            };
            return answer.reply(rx, request.stream).await;
        }
        if !request.stream {
            let mut text = String::new();
            let mut calls: Vec<ParsedCall> = Vec::new();
            let mut parser = ToolCallParser::default();
            let take = |parsed: Vec<Parsed>, text: &mut String, calls: &mut Vec<ParsedCall>| {
                for p in parsed {
                    match p {
                        Parsed::Text(t) => text.push_str(&t),
                        Parsed::Call(c) => calls.push(c),
                    }
                }
            };
            while let Some(ev) = rx.recv().await {
                match ev {
                    GenEvent::Delta(d) if with_tools => {
                        take(parser.push(&d), &mut text, &mut calls)
                    }
                    GenEvent::Delta(d) => text.push_str(&d),
                    GenEvent::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                    } => {
                        take(parser.finish(), &mut text, &mut calls);
                        let mut message =
                            json!({"role": "assistant", "content": text, "refusal": null});
                        let mut finish = finish_reason.as_str();
                        if !calls.is_empty() {
                            let trimmed = text.trim();
                            message["content"] = if trimmed.is_empty() {
                                Value::Null
                            } else {
                                json!(trimmed)
                            };
                            message["tool_calls"] = Value::Array(
                                calls.iter().map(|c| tool_call_json(c, None)).collect(),
                            );
                            // A call cut off by max_tokens still says `length`, as OpenAI does.
                            if finish_reason != FinishReason::Length {
                                finish = "tool_calls";
                            }
                        }
                        return Ok(BackendReply::Full(json!({
                            "id": id,
                            "object": "chat.completion",
                            "created": created,
                            "model": model,
                            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
                            "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
                        })));
                    }
                    GenEvent::Error(message) => {
                        return Err(BackendError::Internal {
                            backend: model,
                            message,
                        })
                    }
                }
            }
            return Err(BackendError::Internal {
                backend: model,
                message: "generation ended without a result".into(),
            });
        }
        let chunk = move |delta: Value, finish: Option<&str>| {
            json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            })
        };
        let first = chunk(json!({"role": "assistant", "content": ""}), None);
        let backend = self.engine.name.clone();
        let state = StreamState {
            rx,
            parser: with_tools.then(ToolCallParser::default),
            calls: 0,
            ended: false,
        };
        // After the role chunk: content and tool-call chunks, the finish chunk, then the usage chunk.
        let rest = futures_util::stream::unfold(state, move |mut st| {
            let chunk = chunk.clone();
            let backend = backend.clone();
            async move {
                if st.ended {
                    return None;
                }
                let out = match st.rx.recv().await {
                    Some(GenEvent::Delta(d)) => match st.parser.as_mut().map(|p| p.push(&d)) {
                        Some(parsed) => st.chunks(parsed, &chunk),
                        None => vec![Ok(chunk(json!({"content": d}), None))],
                    },
                    Some(GenEvent::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                    }) => {
                        let tail = st
                            .parser
                            .as_mut()
                            .map(ToolCallParser::finish)
                            .unwrap_or_default();
                        let mut out = st.chunks(tail, &chunk);
                        let finish = if st.calls > 0 && finish_reason != FinishReason::Length {
                            "tool_calls"
                        } else {
                            finish_reason.as_str()
                        };
                        out.push(Ok(chunk(json!({}), Some(finish))));
                        let mut usage_chunk = chunk(json!({}), None);
                        usage_chunk["choices"] = json!([]);
                        usage_chunk["usage"] =
                            usage(prompt_tokens, completion_tokens, cached_tokens);
                        out.push(Ok(usage_chunk));
                        st.ended = true;
                        out
                    }
                    Some(GenEvent::Error(message)) => {
                        st.ended = true;
                        vec![Err(BackendError::Internal { backend, message })]
                    }
                    None => {
                        st.ended = true;
                        let message = "generation stopped unexpectedly".to_string();
                        vec![Err(BackendError::Internal { backend, message })]
                    }
                };
                Some((out, st))
            }
        });
        let stream = futures_util::StreamExt::flat_map(rest, futures_util::stream::iter);
        let chunks: ChunkStream = Box::pin(futures_util::StreamExt::chain(
            futures_util::stream::once(async { Ok(first) }),
            stream,
        ));
        Ok(BackendReply::Stream {
            chunks,
            usage_injected: true,
        })
    }
}

fn failed(backend: &str, message: String) -> BackendError {
    BackendError::Internal {
        backend: backend.to_string(),
        message,
    }
}

/// A legacy completion's answer: raw text, no tool calls.
struct CompletionAnswer {
    model: String,
    created: u64,
    echo: Option<String>,
}

impl CompletionAnswer {
    fn object(&self, id: &str, text: &str, finish: Option<&str>) -> Value {
        json!({
            "id": id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
        })
    }

    /// One `text_completion`, or a stream of them (then a usage chunk).
    async fn reply(
        self,
        mut rx: mpsc::UnboundedReceiver<GenEvent>,
        stream: bool,
    ) -> Result<BackendReply, BackendError> {
        let id = format!("cmpl-{}", uuid::Uuid::now_v7().simple());
        if !stream {
            let mut text = self.echo.clone().unwrap_or_default();
            while let Some(ev) = rx.recv().await {
                match ev {
                    GenEvent::Delta(d) => text.push_str(&d),
                    GenEvent::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                    } => {
                        let mut v = self.object(&id, &text, Some(finish_reason.as_str()));
                        v["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens);
                        return Ok(BackendReply::Full(v));
                    }
                    GenEvent::Error(m) => return Err(failed(&self.model, m)),
                }
            }
            return Err(failed(
                &self.model,
                "generation ended without a result".into(),
            ));
        }
        let first = self
            .echo
            .as_deref()
            .filter(|e| !e.is_empty())
            .map(|e| Ok(self.object(&id, e, None)));
        let rest = futures_util::stream::unfold(Some((self, rx, id)), |state| async move {
            let (answer, mut rx, id) = state?;
            let out = match rx.recv().await {
                Some(GenEvent::Delta(d)) => vec![Ok(answer.object(&id, &d, None))],
                Some(GenEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                }) => {
                    let mut last = answer.object(&id, "", None);
                    last["choices"] = json!([]);
                    last["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens);
                    let done = vec![
                        Ok(answer.object(&id, "", Some(finish_reason.as_str()))),
                        Ok(last),
                    ];
                    return Some((done, None));
                }
                Some(GenEvent::Error(m)) => {
                    return Some((vec![Err(failed(&answer.model, m))], None));
                }
                None => {
                    let m = "generation stopped unexpectedly".to_string();
                    return Some((vec![Err(failed(&answer.model, m))], None));
                }
            };
            Some((out, Some((answer, rx, id))))
        });
        let rest = futures_util::StreamExt::flat_map(rest, futures_util::stream::iter);
        let chunks: ChunkStream = Box::pin(futures_util::StreamExt::chain(
            futures_util::stream::iter(first),
            rest,
        ));
        Ok(BackendReply::Stream {
            chunks,
            usage_injected: true,
        })
    }
}

struct Prepared {
    /// A completion's prompt text, to put before the answer (`echo`).
    echo: Option<String>,
    prompt: Vec<u32>,
    max_tokens: usize,
    stop: Vec<String>,
    sampling: SamplingParams,
    tools: bool,
    grammar: Option<Arc<ToolGrammar>>,
}

struct StreamState {
    rx: mpsc::UnboundedReceiver<GenEvent>,
    parser: Option<ToolCallParser>,
    calls: usize,
    ended: bool,
}

impl StreamState {
    /// Parsed output as stream chunks; tool calls are numbered in order.
    fn chunks(
        &mut self,
        parsed: Vec<Parsed>,
        chunk: &impl Fn(Value, Option<&str>) -> Value,
    ) -> Vec<Result<Value, BackendError>> {
        parsed
            .into_iter()
            .map(|p| match p {
                Parsed::Text(t) => Ok(chunk(json!({"content": t}), None)),
                Parsed::Call(c) => {
                    self.calls += 1;
                    Ok(chunk(
                        json!({"tool_calls": [tool_call_json(&c, Some(self.calls - 1))]}),
                        None,
                    ))
                }
            })
            .collect()
    }
}

/// An OpenAI tool call (with `index` when it is a stream delta).
fn tool_call_json(c: &ParsedCall, index: Option<usize>) -> Value {
    let mut v = json!({
        "id": format!("call_{}", uuid::Uuid::now_v7().simple()),
        "type": "function",
        "function": {"name": c.name, "arguments": c.arguments},
    });
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

impl Backend for LocalBackend {
    fn name(&self) -> &str {
        &self.engine.name
    }

    fn supports_n(&self) -> bool {
        false
    }

    fn chat(&self, request: BackendRequest) -> BoxFuture<'_, Result<BackendReply, BackendError>> {
        Box::pin(self.run(request))
    }

    fn serves_adapter(&self, id: &str) -> bool {
        self.engine.adapters.contains(id)
    }

    fn adapter_ids(&self) -> Vec<String> {
        self.engine
            .adapters
            .list()
            .iter()
            .map(|a| a.id.clone())
            .collect()
    }
}
