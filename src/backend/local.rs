//! The local engine as a backend: renders the request with the model's chat template, generates,
//! and answers in the same OpenAI shapes (whole completions or chunk streams) as an upstream.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Backend, BackendError, BackendReply, BackendRequest, ChunkStream};
use crate::engine::sampling::SamplingParams;
use crate::engine::{Engine, FinishReason, GenEvent, GenerationRequest};

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

    fn prepare(
        &self,
        body: &serde_json::Map<String, Value>,
    ) -> Result<(Vec<u32>, usize, Vec<String>, SamplingParams), BackendError> {
        let has_tools = body
            .get("tools")
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty());
        let choice_none = body.get("tool_choice").and_then(Value::as_str) == Some("none");
        if has_tools && !choice_none {
            return Err(self.refuse(
                Some("tools"),
                format!("tool calling on the local model '{}' is not available yet; route tool-calling traffic to an upstream", self.engine.name),
            ));
        }
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let prompt = self
            .engine
            .render(&messages, None)
            .map_err(|m| self.refuse(Some("messages"), m))?;
        let ids = self
            .engine
            .encode(&prompt)
            .map_err(|m| BackendError::Internal {
                backend: self.engine.name.clone(),
                message: m,
            })?;
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
        Ok((ids, max_tokens, stop, sampling))
    }

    async fn run(&self, request: BackendRequest) -> Result<BackendReply, BackendError> {
        let (prompt, max_tokens, stop, sampling) = self.prepare(&request.body)?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.engine
            .submit(GenerationRequest {
                prompt,
                max_tokens,
                stop,
                sampling,
                events: tx,
            })
            .map_err(|e| BackendError::Internal {
                backend: self.engine.name.clone(),
                message: e.to_string(),
            })?;
        let id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let model = self.engine.name.clone();
        if !request.stream {
            let mut text = String::new();
            while let Some(ev) = rx.recv().await {
                match ev {
                    GenEvent::Delta(d) => text.push_str(&d),
                    GenEvent::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                    } => {
                        return Ok(BackendReply::Full(json!({
                            "id": id,
                            "object": "chat.completion",
                            "created": created,
                            "model": model,
                            "choices": [{
                                "index": 0,
                                "message": {"role": "assistant", "content": text, "refusal": null},
                                "logprobs": null,
                                "finish_reason": finish_reason.as_str(),
                            }],
                            "usage": usage(prompt_tokens, completion_tokens),
                        })))
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
        let chunk = move |delta: Value, finish: Option<FinishReason>| {
            json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish.map(FinishReason::as_str)}],
            })
        };
        let first = chunk(json!({"role": "assistant", "content": ""}), None);
        let backend = self.engine.name.clone();
        // After the role chunk: one chunk per delta, the finish chunk, then the usage chunk.
        let rest = futures_util::stream::unfold((rx, false), move |(mut rx, ended)| {
            let chunk = chunk.clone();
            let backend = backend.clone();
            async move {
                if ended {
                    return None;
                }
                match rx.recv().await {
                    Some(GenEvent::Delta(d)) => {
                        Some((vec![Ok(chunk(json!({"content": d}), None))], (rx, false)))
                    }
                    Some(GenEvent::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                    }) => {
                        let fin = chunk(json!({}), Some(finish_reason));
                        let mut usage_chunk = chunk(json!({}), None);
                        usage_chunk["choices"] = json!([]);
                        usage_chunk["usage"] = usage(prompt_tokens, completion_tokens);
                        Some((vec![Ok(fin), Ok(usage_chunk)], (rx, true)))
                    }
                    Some(GenEvent::Error(message)) => Some((
                        vec![Err(BackendError::Internal { backend, message })],
                        (rx, true),
                    )),
                    None => Some((
                        vec![Err(BackendError::Internal {
                            backend,
                            message: "generation stopped unexpectedly".into(),
                        })],
                        (rx, true),
                    )),
                }
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

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
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
}
