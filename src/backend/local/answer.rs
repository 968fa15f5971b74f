//! The engine's events as OpenAI answers: chat completions (text, tool calls) and legacy
//! completions (text), whole or as chunk streams, with every choice of `n` and, when asked for,
//! each token's logprobs. A stream interleaves choices as they decode, each chunk naming its
//! choice's `index`; usage counts the prompt once and every choice's tokens.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::super::{BackendError, BackendReply, ChunkStream};
use crate::engine::chat::ChatFormat;
use crate::engine::sampling::TokenLogprob;
use crate::engine::tools::{Parsed, ParsedCall, ToolCallStream, ToolSyntax};
use crate::engine::{Engine, FinishReason, GenEvent};

/// What every answer carries.
pub(super) struct Answer {
    pub engine: Arc<Engine>,
    pub id: String,
    pub created: u64,
    /// The model (or adapter) the answer names.
    pub model: String,
    pub n: usize,
    /// Logprobs were asked for.
    pub logprobs: bool,
}

impl Answer {
    /// A token's text and bytes: its bytes as (lossy) UTF-8, or a special token's name.
    fn token(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.engine.vocab.bytes(id);
        if bytes.is_empty() {
            let name = self
                .engine
                .chat
                .tokenizer
                .tokenizer
                .id_to_token(id)
                .unwrap_or_default();
            let bytes = name.as_bytes().to_vec();
            (name, bytes)
        } else {
            (String::from_utf8_lossy(bytes).into_owned(), bytes.to_vec())
        }
    }

    /// One token's entry in a chat answer's `logprobs.content`.
    fn chat_logprob(&self, l: &TokenLogprob) -> Value {
        let entry = |id: u32, logprob: f32| {
            let (token, bytes) = self.token(id);
            json!({"token": token, "logprob": logprob, "bytes": bytes})
        };
        let mut v = entry(l.token, l.logprob);
        v["top_logprobs"] = l.top.iter().map(|&(t, lp)| entry(t, lp)).collect();
        v
    }

    fn failed(&self, message: impl Into<String>) -> BackendError {
        BackendError::Internal {
            backend: self.engine.name.clone(),
            message: message.into(),
        }
    }
}

/// Token counts over every choice: the prompt once, each choice's completion.
#[derive(Default)]
pub(super) struct Totals {
    prompt: usize,
    completion: usize,
    cached: usize,
    /// Choices finished.
    done: usize,
}

impl Totals {
    fn add(&mut self, prompt: usize, completion: usize, cached: usize) {
        self.prompt = prompt;
        self.cached = cached;
        self.completion += completion;
        self.done += 1;
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

/// How one API's answer is assembled from the engine's events, whole or streamed.
pub(super) trait Assembly: Sized + Send + 'static {
    type Choice: Send + 'static;

    fn answer(&self) -> &Answer;
    fn new_choice(&self) -> Self::Choice;
    /// Whole answers: a choice's delta, and its end.
    fn take(&self, c: &mut Self::Choice, text: String, logprobs: &[TokenLogprob]);
    fn finish(&self, c: &mut Self::Choice, reason: FinishReason);
    /// The whole answer, once every choice has ended.
    fn whole(&self, choices: &[Self::Choice], totals: &Totals) -> Value;
    /// Streams: what opens them (role chunks, echoed prompts), the chunks of a choice's delta
    /// and of its end, and the usage chunk after every choice has ended.
    fn opening(&self) -> Vec<Value>;
    fn delta_chunks(
        &self,
        index: usize,
        c: &mut Self::Choice,
        text: String,
        logprobs: &[TokenLogprob],
    ) -> Vec<Value>;
    fn end_chunks(&self, index: usize, c: &mut Self::Choice, reason: FinishReason) -> Vec<Value>;
    fn usage_chunk(&self, totals: &Totals) -> Value;
}

/// The answer to a generation: whole, or as a chunk stream.
pub(super) async fn reply<A: Assembly>(
    a: A,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    stream: bool,
) -> Result<BackendReply, BackendError> {
    if stream {
        return Ok(streamed(a, rx));
    }
    whole(a, rx).await
}

async fn whole<A: Assembly>(
    a: A,
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
) -> Result<BackendReply, BackendError> {
    let n = a.answer().n;
    let mut choices: Vec<A::Choice> = (0..n).map(|_| a.new_choice()).collect();
    let mut totals = Totals::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Delta {
                choice,
                text,
                logprobs,
            } => {
                if let Some(c) = choices.get_mut(choice) {
                    a.take(c, text, &logprobs);
                }
            }
            GenEvent::Done {
                choice,
                finish_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                if let Some(c) = choices.get_mut(choice) {
                    a.finish(c, finish_reason);
                }
                totals.add(prompt_tokens, completion_tokens, cached_tokens);
                if totals.done == n {
                    return Ok(BackendReply::Full(a.whole(&choices, &totals)));
                }
            }
            GenEvent::Error(message) => return Err(a.answer().failed(message)),
        }
    }
    Err(a.answer().failed("generation ended without a result"))
}

/// A stream being assembled.
struct Streaming<A: Assembly> {
    a: A,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    choices: Vec<A::Choice>,
    totals: Totals,
    over: bool,
}

impl<A: Assembly> Streaming<A> {
    /// The chunks one event becomes.
    fn step(&mut self, ev: Option<GenEvent>) -> Vec<Result<Value, BackendError>> {
        let a = &self.a;
        let out = match ev {
            Some(GenEvent::Delta {
                choice,
                text,
                logprobs,
            }) => match self.choices.get_mut(choice) {
                Some(c) => a.delta_chunks(choice, c, text, &logprobs),
                None => Vec::new(),
            },
            Some(GenEvent::Done {
                choice,
                finish_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            }) => {
                let mut out = match self.choices.get_mut(choice) {
                    Some(c) => a.end_chunks(choice, c, finish_reason),
                    None => Vec::new(),
                };
                self.totals
                    .add(prompt_tokens, completion_tokens, cached_tokens);
                if self.totals.done == a.answer().n {
                    out.push(a.usage_chunk(&self.totals));
                    self.over = true;
                }
                out
            }
            Some(GenEvent::Error(message)) => {
                self.over = true;
                return vec![Err(a.answer().failed(message))];
            }
            None => {
                self.over = true;
                return vec![Err(a.answer().failed("generation stopped unexpectedly"))];
            }
        };
        out.into_iter().map(Ok).collect()
    }
}

fn streamed<A: Assembly>(a: A, rx: mpsc::UnboundedReceiver<GenEvent>) -> BackendReply {
    let opening: Vec<Result<Value, BackendError>> = a.opening().into_iter().map(Ok).collect();
    let choices = (0..a.answer().n).map(|_| a.new_choice()).collect();
    let state = Streaming {
        a,
        rx,
        choices,
        totals: Totals::default(),
        over: false,
    };
    let rest = futures_util::stream::unfold(state, |mut st| async move {
        if st.over {
            return None;
        }
        let ev = st.rx.recv().await;
        let out = st.step(ev);
        Some((out, st))
    });
    let rest = futures_util::StreamExt::flat_map(rest, futures_util::stream::iter);
    let chunks: ChunkStream = Box::pin(futures_util::StreamExt::chain(
        futures_util::stream::iter(opening),
        rest,
    ));
    BackendReply::Stream {
        chunks,
        usage_injected: true,
    }
}

/// An OpenAI tool call (with `index` when it is a stream delta), its id in the model family's form.
fn tool_call_json(c: &ParsedCall, index: Option<usize>, syntax: &dyn ToolSyntax) -> Value {
    let mut v = json!({
        "id": syntax.call_id(),
        "type": "function",
        "function": {"name": c.name, "arguments": c.arguments},
    });
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

/// A chat answer's `finish_reason`: `tool_calls` when it made calls, unless `max_tokens` cut it
/// (a cut call still says `length`, as OpenAI does).
fn chat_finish(reason: FinishReason, calls: usize) -> &'static str {
    if calls > 0 && reason != FinishReason::Length {
        "tool_calls"
    } else {
        reason.as_str()
    }
}

/// One chat choice as it decodes.
pub(super) struct ChatChoice {
    syntax: &'static dyn ToolSyntax,
    parser: Option<ToolCallStream>,
    text: String,
    /// A thinking model's reasoning (`reasoning_content`).
    reasoning: String,
    calls: Vec<ParsedCall>,
    /// Calls streamed so far (their indexes).
    streamed_calls: usize,
    /// Logprob entries: all of them (whole), or those not yet sent (stream).
    logprobs: Vec<Value>,
    finish: Option<FinishReason>,
}

impl ChatChoice {
    /// A choice of `chat`'s model; tool calls are read when the request offers tools, reasoning
    /// whenever the model thinks before it answers.
    fn new(tools: bool, chat: &ChatFormat) -> Self {
        Self {
            syntax: chat.tool_format.syntax(),
            parser: (tools || chat.thinking).then(|| chat.answer_stream(tools)),
            text: String::new(),
            reasoning: String::new(),
            calls: Vec::new(),
            streamed_calls: 0,
            logprobs: Vec::new(),
            finish: None,
        }
    }

    fn parse(&mut self, text: String) -> Vec<Parsed> {
        match &mut self.parser {
            Some(p) => p.push(&text),
            None if text.is_empty() => Vec::new(),
            None => vec![Parsed::Text(text)],
        }
    }

    fn rest(&mut self) -> Vec<Parsed> {
        self.parser
            .as_mut()
            .map(ToolCallStream::finish)
            .unwrap_or_default()
    }

    fn keep(&mut self, parsed: Vec<Parsed>) {
        for p in parsed {
            match p {
                Parsed::Text(t) => self.text.push_str(&t),
                Parsed::Call(c) => self.calls.push(c),
                Parsed::Reasoning(r) => self.reasoning.push_str(&r),
            }
        }
    }

    /// The whole choice, as `choices[index]`.
    fn whole(&self, index: usize, logprobs: bool) -> Value {
        let mut message = json!({"role": "assistant", "content": self.text, "refusal": null});
        // As vLLM and DeepSeek name a thinking model's reasoning beside its answer.
        if !self.reasoning.is_empty() {
            message["reasoning_content"] = json!(self.reasoning);
        }
        if !self.calls.is_empty() {
            let trimmed = self.text.trim();
            message["content"] = if trimmed.is_empty() {
                Value::Null
            } else {
                json!(trimmed)
            };
            message["tool_calls"] = self
                .calls
                .iter()
                .map(|c| tool_call_json(c, None, self.syntax))
                .collect();
        }
        let finish = chat_finish(self.finish.unwrap_or(FinishReason::Stop), self.calls.len());
        let logprobs = if logprobs {
            json!({"content": self.logprobs, "refusal": null})
        } else {
            Value::Null
        };
        json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
    }
}

/// A chat completion from the engine's events.
pub(super) struct ChatAnswer {
    pub answer: Answer,
    /// Tool calls are parsed out of the text.
    pub tools: bool,
}

impl ChatAnswer {
    /// One `chat.completion.chunk` for choice `index`.
    fn chunk(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        let a = &self.answer;
        json!({
            "id": a.id,
            "object": "chat.completion.chunk",
            "created": a.created,
            "model": a.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        })
    }

    /// Chunks for parsed output of one choice; its pending logprobs ride on the first of them.
    fn chunks(&self, index: usize, c: &mut ChatChoice, parsed: Vec<Parsed>) -> Vec<Value> {
        let mut out = Vec::with_capacity(parsed.len());
        for p in parsed {
            let delta = match p {
                Parsed::Text(t) => json!({"content": t}),
                Parsed::Reasoning(r) => json!({"reasoning_content": r}),
                Parsed::Call(call) => {
                    c.streamed_calls += 1;
                    json!({"tool_calls": [tool_call_json(&call, Some(c.streamed_calls - 1), c.syntax)]})
                }
            };
            let logprobs = Self::pending(c);
            out.push(self.chunk(index, delta, logprobs, None));
        }
        out
    }

    /// A choice's logprobs not yet sent, as a chunk's `logprobs` (null when there are none).
    fn pending(c: &mut ChatChoice) -> Value {
        if c.logprobs.is_empty() {
            return Value::Null;
        }
        json!({"content": std::mem::take(&mut c.logprobs), "refusal": null})
    }
}

impl Assembly for ChatAnswer {
    type Choice = ChatChoice;

    fn answer(&self) -> &Answer {
        &self.answer
    }

    fn new_choice(&self) -> ChatChoice {
        ChatChoice::new(self.tools, &self.answer.engine.chat)
    }

    fn take(&self, c: &mut ChatChoice, text: String, logprobs: &[TokenLogprob]) {
        let parsed = c.parse(text);
        c.keep(parsed);
        c.logprobs
            .extend(logprobs.iter().map(|l| self.answer.chat_logprob(l)));
    }

    fn finish(&self, c: &mut ChatChoice, reason: FinishReason) {
        let rest = c.rest();
        c.keep(rest);
        c.finish = Some(reason);
    }

    fn whole(&self, choices: &[ChatChoice], totals: &Totals) -> Value {
        let a = &self.answer;
        json!({
            "id": a.id,
            "object": "chat.completion",
            "created": a.created,
            "model": a.model,
            "choices": choices
                .iter()
                .enumerate()
                .map(|(i, c)| c.whole(i, a.logprobs))
                .collect::<Vec<_>>(),
            "usage": totals.usage(),
        })
    }

    /// Each choice's role chunk.
    fn opening(&self) -> Vec<Value> {
        (0..self.answer.n)
            .map(|i| {
                self.chunk(
                    i,
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    None,
                )
            })
            .collect()
    }

    fn delta_chunks(
        &self,
        index: usize,
        c: &mut ChatChoice,
        text: String,
        logprobs: &[TokenLogprob],
    ) -> Vec<Value> {
        c.logprobs
            .extend(logprobs.iter().map(|l| self.answer.chat_logprob(l)));
        let parsed = c.parse(text);
        self.chunks(index, c, parsed)
    }

    fn end_chunks(&self, index: usize, c: &mut ChatChoice, reason: FinishReason) -> Vec<Value> {
        let rest = c.rest();
        let mut out = self.chunks(index, c, rest);
        let finish = chat_finish(reason, c.streamed_calls);
        let logprobs = Self::pending(c);
        out.push(self.chunk(index, json!({}), logprobs, Some(finish)));
        out
    }

    fn usage_chunk(&self, totals: &Totals) -> Value {
        let mut last = self.chunk(0, json!({}), Value::Null, None);
        last["choices"] = json!([]);
        last["usage"] = totals.usage();
        last
    }
}

/// One legacy completion choice's logprobs, in that API's columns.
#[derive(Default)]
struct TextLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<serde_json::Map<String, Value>>,
    text_offset: Vec<usize>,
}

impl TextLogprobs {
    fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// One legacy completion choice as it decodes.
#[derive(Default)]
pub(super) struct TextChoice {
    text: String,
    /// Characters of text so far (where the next token's `text_offset` is).
    offset: usize,
    logprobs: TextLogprobs,
    finish: Option<FinishReason>,
}

/// A legacy completion's answer: raw text, no tool calls.
pub(super) struct CompletionAnswer {
    pub answer: Answer,
    /// The prompt, to put before each choice's answer (`echo`).
    pub echo: Option<String>,
}

impl CompletionAnswer {
    fn object(&self, choices: Value) -> Value {
        let a = &self.answer;
        json!({
            "id": a.id,
            "object": "text_completion",
            "created": a.created,
            "model": a.model,
            "choices": choices,
        })
    }

    fn choice(&self, index: usize, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
    }

    /// Takes a delta's logprobs into a choice's columns.
    fn note(&self, c: &mut TextChoice, logprobs: &[TokenLogprob]) {
        let a = &self.answer;
        for l in logprobs {
            let (token, _) = a.token(l.token);
            c.logprobs.text_offset.push(c.offset);
            c.offset += token.chars().count();
            c.logprobs.tokens.push(token);
            c.logprobs.token_logprobs.push(l.logprob);
            c.logprobs.top_logprobs.push(
                l.top
                    .iter()
                    .map(|&(t, lp)| (a.token(t).0, json!(lp)))
                    .collect(),
            );
        }
    }

    /// A choice's logprobs not yet sent (null when there are none).
    fn pending(c: &mut TextChoice) -> Value {
        if c.logprobs.is_empty() {
            Value::Null
        } else {
            std::mem::take(&mut c.logprobs).json()
        }
    }
}

impl Assembly for CompletionAnswer {
    type Choice = TextChoice;

    fn answer(&self) -> &Answer {
        &self.answer
    }

    fn new_choice(&self) -> TextChoice {
        let echo = self.echo.clone().unwrap_or_default();
        TextChoice {
            offset: echo.chars().count(),
            text: echo,
            ..TextChoice::default()
        }
    }

    fn take(&self, c: &mut TextChoice, text: String, logprobs: &[TokenLogprob]) {
        c.text.push_str(&text);
        self.note(c, logprobs);
    }

    fn finish(&self, c: &mut TextChoice, reason: FinishReason) {
        c.finish = Some(reason);
    }

    fn whole(&self, choices: &[TextChoice], totals: &Totals) -> Value {
        let list: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let lp = if self.answer.logprobs {
                    c.logprobs.json()
                } else {
                    Value::Null
                };
                let finish = c.finish.unwrap_or(FinishReason::Stop).as_str();
                self.choice(i, &c.text, lp, Some(finish))
            })
            .collect();
        let mut v = self.object(Value::Array(list));
        v["usage"] = totals.usage();
        v
    }

    /// Each choice's echoed prompt, if asked for.
    fn opening(&self) -> Vec<Value> {
        match self.echo.as_deref() {
            Some(e) if !e.is_empty() => (0..self.answer.n)
                .map(|i| self.object(json!([self.choice(i, e, Value::Null, None)])))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn delta_chunks(
        &self,
        index: usize,
        c: &mut TextChoice,
        text: String,
        logprobs: &[TokenLogprob],
    ) -> Vec<Value> {
        self.note(c, logprobs);
        let lp = Self::pending(c);
        vec![self.object(json!([self.choice(index, &text, lp, None)]))]
    }

    fn end_chunks(&self, index: usize, c: &mut TextChoice, reason: FinishReason) -> Vec<Value> {
        let lp = Self::pending(c);
        vec![self.object(json!([self.choice(index, "", lp, Some(reason.as_str()))]))]
    }

    fn usage_chunk(&self, totals: &Totals) -> Value {
        let mut last = self.object(json!([]));
        last["usage"] = totals.usage();
        last
    }
}
