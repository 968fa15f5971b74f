//! The local engine as a backend: renders the request with the model's chat template, compiles
//! what it may write (tool calls, a structured answer) into a grammar, generates its `n` choices,
//! and answers in the same OpenAI shapes (whole completions or chunk streams, logprobs included)
//! as an upstream.

mod answer;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Backend, BackendError, BackendReply, BackendRequest};
use crate::engine::grammar::{AnswerFormat, CallSyntax, Grammar, ToolSpec};
use crate::engine::sampling::SamplingParams;
use crate::engine::tools::ToolFormat;
use crate::engine::{Engine, GenerationRequest};
use crate::wire::Api;
use answer::{Answer, ChatAnswer, CompletionAnswer};

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
    /// the client sent. One prompt per request.
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
        if body.get("logprobs").is_some_and(|s| !s.is_null())
            && body.get("echo").and_then(Value::as_bool) == Some(true)
        {
            return Err(self.refuse(
                Some("echo"),
                format!(
                    "'echo' with 'logprobs' (the prompt's logprobs) is not supported by the local model '{}'; ask for one or the other.",
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
        let choice_none = body.get("tool_choice").and_then(Value::as_str) == Some("none");
        let use_tools = !completion && !tools.is_empty() && !choice_none;
        let (ids, echo) = if completion {
            self.raw_prompt(body)?
        } else {
            (self.chat_prompt(body, &tools)?, String::new())
        };
        let max_tokens = self.max_tokens(body, ids.len(), completion)?;
        let n = body.get("n").and_then(Value::as_u64).unwrap_or(1) as usize;
        if n > self.engine.max_batch {
            return Err(self.refuse(
                Some("n"),
                format!(
                    "n = {n} is more than the local model '{}' decodes at once ({}; its max_batch)",
                    self.engine.name, self.engine.max_batch
                ),
            ));
        }
        let echo =
            (completion && body.get("echo").and_then(Value::as_bool) == Some(true)).then_some(echo);
        Ok(Prepared {
            echo,
            prompt: ids,
            max_tokens,
            stop: stop_strings(body),
            sampling: sampling(body),
            tools: use_tools,
            grammar: self.grammar(body, use_tools.then_some(&tools[..]), completion)?,
            logprobs: logprobs(body, completion),
            n: n.max(1),
        })
    }

    /// A chat request's prompt: its messages (text only) rendered with the model's template, tools
    /// included, as token ids.
    fn chat_prompt(
        &self,
        body: &serde_json::Map<String, Value>,
        tools: &[Value],
    ) -> Result<Vec<u32>, BackendError> {
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        self.text_only(messages)?;
        let prompt = self
            .engine
            .chat
            .prompt(messages, tools, body.get("tool_choice"))
            .map_err(|m| self.refuse(Some("messages"), m))?;
        self.engine
            .chat
            .encode(&prompt)
            .map_err(|m| BackendError::Internal {
                backend: self.engine.name.clone(),
                message: m,
            })
    }

    /// The longest answer allowed: what the request asks for, if the context has room for it
    /// after a prompt of `prompt` tokens.
    fn max_tokens(
        &self,
        body: &serde_json::Map<String, Value>,
        prompt: usize,
        completion: bool,
    ) -> Result<usize, BackendError> {
        if prompt == 0 {
            return Err(self.refuse(Some("prompt"), "the prompt is empty".into()));
        }
        let ctx = self.engine.context_length;
        if prompt >= ctx {
            return Err(self.refuse(
                Some("messages"),
                format!("the prompt is {prompt} tokens; the model '{}' serves at most {ctx} (prompt + completion)", self.engine.name),
            ));
        }
        let room = ctx - prompt;
        let asked = body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
            .and_then(Value::as_u64)
            .map(|n| n as usize);
        match asked {
            Some(n) if n > room => Err(self.refuse(
                Some("max_tokens"),
                format!(
                    "max_tokens {n} does not fit: the prompt takes {prompt} of the model's {ctx} tokens, leaving {room}"
                ),
            )),
            Some(n) => Ok(n),
            // OpenAI's default for legacy completions; chat answers may use the whole context.
            None if completion => {
                Ok((crate::wire::completions::DEFAULT_COMPLETION_TOKENS as usize).min(room))
            }
            None => Ok(room),
        }
    }

    /// What the answer may be, as a grammar: tool calls (constrained when the engine is set to)
    /// and a structured answer (always enforced; then the calls that may stand in its place are
    /// constrained too). A format the grammar cannot enforce is refused, naming the keyword.
    fn grammar(
        &self,
        body: &serde_json::Map<String, Value>,
        tools: Option<&[Value]>,
        completion: bool,
    ) -> Result<Option<Arc<Grammar>>, BackendError> {
        let format = if completion {
            None
        } else {
            AnswerFormat::from_response_format(body.get("response_format"))
        };
        // The call grammar writes Hermes blocks and Llama 3's JSON calls (the latter only when
        // the answer is not also a formatted JSON value, which would open the same way); Mistral
        // models call unconstrained.
        let syntax = match self.engine.chat.tool_format {
            ToolFormat::Hermes => Some(CallSyntax::Hermes),
            ToolFormat::Llama3Json if format.is_none() => Some(CallSyntax::Json),
            _ => None,
        };
        let constrain = self.engine.constrain_tool_calls || format.is_some();
        let spec = syntax
            .filter(|_| constrain)
            .zip(tools)
            .map(|(syntax, tools)| ToolSpec {
                tools,
                choice: body.get("tool_choice"),
                parallel: body.get("parallel_tool_calls").and_then(Value::as_bool) != Some(false),
                syntax,
            });
        let thinking = self.engine.chat.thinking;
        let grammar = Grammar::new(spec, format.as_ref()).map_err(|e| {
            let mut param = "response_format.json_schema.schema".to_string();
            if !e.path.is_empty() {
                param = format!("{param}.{}", e.path);
            }
            self.refuse(
                Some(&param),
                format!(
                    "The local model '{}' cannot enforce this response_format: {} (at '{param}').",
                    self.engine.name, e.message
                ),
            )
        })?;
        Ok(grammar
            .map(|g| if thinking { g.after_reasoning() } else { g })
            .map(Arc::new))
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
        let (tx, rx) = mpsc::unbounded_channel();
        self.engine
            .submit(GenerationRequest {
                prompt: prepared.prompt,
                max_tokens: prepared.max_tokens,
                stop: prepared.stop,
                sampling: prepared.sampling,
                events: tx,
                adapter,
                grammar: prepared.grammar,
                logprobs: prepared.logprobs,
                n: prepared.n,
            })
            .map_err(|e| BackendError::Internal {
                backend: self.engine.name.clone(),
                message: e.to_string(),
            })?;
        let completion = request.api == Api::Completions;
        let answer = Answer {
            engine: self.engine.clone(),
            id: if completion {
                format!("cmpl-{}", uuid::Uuid::now_v7().simple())
            } else {
                format!("chatcmpl-{}", uuid::Uuid::now_v7().simple())
            },
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: request
                .adapter
                .clone()
                .unwrap_or_else(|| self.engine.name.clone()),
            n: prepared.n,
            logprobs: prepared.logprobs.is_some(),
        };
        if completion {
            let answer = CompletionAnswer {
                answer,
                echo: prepared.echo,
            };
            return answer::reply(answer, rx, request.stream).await;
        }
        let answer = ChatAnswer {
            answer,
            tools: prepared.tools,
        };
        answer::reply(answer, rx, request.stream).await
    }
}

/// The request's stop strings.
fn stop_strings(body: &serde_json::Map<String, Value>) -> Vec<String> {
    match body.get("stop") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// The request's sampling settings (OpenAI's defaults where it gives none).
fn sampling(body: &serde_json::Map<String, Value>) -> SamplingParams {
    let num = |k: &str| body.get(k).and_then(Value::as_f64);
    SamplingParams {
        temperature: num("temperature").unwrap_or(1.0) as f32,
        top_p: num("top_p").unwrap_or(1.0) as f32,
        top_k: body.get("top_k").and_then(Value::as_u64).unwrap_or(0) as usize,
        seed: body.get("seed").and_then(Value::as_i64).map(|s| s as u64),
    }
}

/// Alternatives per token to report: a legacy completion's integer `logprobs`, or a chat
/// request's `top_logprobs` when `logprobs` is true; `None` when none were asked for.
fn logprobs(body: &serde_json::Map<String, Value>, completion: bool) -> Option<usize> {
    if completion {
        return body
            .get("logprobs")
            .and_then(Value::as_u64)
            .map(|k| k as usize);
    }
    (body.get("logprobs").and_then(Value::as_bool) == Some(true)).then(|| {
        body.get("top_logprobs")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize
    })
}

struct Prepared {
    /// A completion's prompt text, to put before the answer (`echo`).
    echo: Option<String>,
    prompt: Vec<u32>,
    max_tokens: usize,
    stop: Vec<String>,
    sampling: SamplingParams,
    /// The answer may hold tool calls (parsed out of its text).
    tools: bool,
    grammar: Option<Arc<Grammar>>,
    /// Alternatives per token to report, when logprobs were asked for.
    logprobs: Option<usize>,
    n: usize,
}

impl Backend for LocalBackend {
    fn name(&self) -> &str {
        &self.engine.name
    }

    fn supports_n(&self) -> bool {
        true
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
