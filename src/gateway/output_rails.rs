//! Output rails on the response path: the model's answer is checked before the client sees any of
//! it. A whole answer is checked once per choice. A streamed answer is held back per choice and
//! released in chunks (`rails.output.streaming.chunk_size` streamed pieces, or the whole answer
//! when the config does not enable output streaming), each checked with the tail of what was
//! already released as context; tool-call arguments are held until their choice finishes and
//! checked whole, so a client never holds half of a call. A blocked choice ends with the refusal
//! and `finish_reason: "content_filter"`; a safety model that cannot answer ends the stream with a
//! 503 `rails_unavailable` error (fail closed, unless the config fails open).
//!
//! Not handled here: the native Responses and Messages shapes. A request with output rails is
//! always served through the chat-completions translation, so the answer this module reads is a
//! chat completion (or a legacy text completion).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::Gateway;
use crate::rails::guardrails::OutputStreaming;
use crate::rails::{
    answer_fields, rules, AnswerText, CheckOutcome, CheckStatus, Piece, PieceKind, RailStatus,
    RailsError, Stage,
};
use crate::wire::error::ApiError;

/// The output rails a request runs: its configs, the (masked) conversation they judge the answer
/// against, and the verdict of its input check, which the traffic row keeps beside theirs.
pub(super) struct OutputCheck {
    pub ids: Vec<String>,
    pub conversation: Vec<Value>,
    pub input: CheckOutcome,
}

/// The error a check that could not complete gives (fail closed).
pub(super) fn unavailable(detail: Option<&str>) -> ApiError {
    let mut message = "The content-safety check could not be completed, so the answer was not served (the rails fail closed). Try again later.".to_string();
    if let Some(d) = detail {
        message.push_str(&format!(" ({d})"));
    }
    ApiError::new(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        message,
    )
    .with_code("rails_unavailable")
}

/// What a check found that ends the request instead of answering it.
fn failure_of(outcome: &CheckOutcome) -> Option<ApiError> {
    (outcome.status == CheckStatus::Error).then(|| {
        let detail = outcome.rails.iter().find_map(|r| {
            r.detail
                .as_deref()
                .filter(|_| r.status == RailStatus::Error)
        });
        unavailable(detail)
    })
}

fn rails_error(e: &RailsError) -> ApiError {
    unavailable(Some(&e.to_string()))
}

impl Gateway {
    /// Checks a whole answer, choice by choice, masking or replacing what the rails say. The
    /// outcome sums every choice's check; an error means the answer must not be served.
    pub(super) async fn check_whole_answer(
        &self,
        check: &OutputCheck,
        response: &mut Value,
    ) -> Result<CheckOutcome, (CheckOutcome, ApiError)> {
        let mut total = CheckOutcome::new(Stage::Output, &check.ids);
        let completions = response.get("object").and_then(Value::as_str) == Some("text_completion");
        let refusal = self.rails().settings().output_refusal_message.clone();
        let Some(choices) = response.get_mut("choices").and_then(Value::as_array_mut) else {
            return Ok(total);
        };
        for choice in choices.iter_mut() {
            let holder = if completions {
                Some(&*choice)
            } else {
                choice.get("message")
            };
            let Some(mut answer) = holder.map(|h| AnswerText::read(h, completions)) else {
                continue;
            };
            if answer.is_empty() {
                continue;
            }
            let outcome = match self
                .rails()
                .check_output(&check.ids, &check.conversation, &mut answer.pieces, self)
                .await
            {
                Ok(o) => o,
                Err(e) => return Err((total, rails_error(&e))),
            };
            let (status, masked) = (outcome.status, outcome.masked);
            let failure = failure_of(&outcome);
            total.absorb(outcome);
            if let Some(e) = failure {
                return Err((total, e));
            }
            match status {
                CheckStatus::Blocked => refuse_choice(choice, completions, &refusal),
                _ if masked => {
                    if completions {
                        answer.write_into(choice);
                    } else if let Some(message) = choice.get_mut("message") {
                        answer.write_into(message);
                    }
                    // Token log-probabilities would spell out what was masked.
                    if let Some(lp) = choice.get_mut("logprobs") {
                        *lp = Value::Null;
                    }
                }
                _ => {}
            }
        }
        Ok(total)
    }
}

/// Replaces a choice's answer with the refusal.
fn refuse_choice(choice: &mut Value, completions: bool, refusal: &str) {
    if completions {
        choice["text"] = json!(refusal);
    } else {
        choice["message"] = json!({"role": "assistant", "content": refusal, "refusal": null});
    }
    choice["finish_reason"] = json!("content_filter");
    if let Some(lp) = choice.get_mut("logprobs") {
        *lp = Value::Null;
    }
}

/// A text field of a streamed choice: what is held, and the tail of what was released.
#[derive(Default)]
struct HeldText {
    pending: Vec<String>,
    /// The last released pieces, shown to the safety models again with the next chunk.
    context: VecDeque<String>,
}

#[derive(Default)]
struct HeldCall {
    id: Option<Value>,
    name: String,
    arguments: String,
}

/// One check's worth of a choice: the pieces to check, each text field with the streamed pieces
/// it releases, and (at the end of the choice) its tool calls.
#[derive(Default)]
struct HeldChunk {
    pieces: Vec<Piece>,
    fields: Vec<(&'static str, Vec<String>)>,
    calls: Vec<(u64, HeldCall)>,
}

#[derive(Default)]
struct HeldChoice {
    fields: BTreeMap<&'static str, HeldText>,
    calls: BTreeMap<u64, HeldCall>,
    logprobs: Vec<Value>,
    /// A mask rail changed part of this answer: its log-probabilities are withheld.
    masked: bool,
    /// Finished, or ended by a block.
    done: bool,
}

/// What the stream guard hands back for one upstream chunk (or for the end of the stream).
#[derive(Default)]
pub(super) struct Released {
    pub chunks: Vec<Value>,
    /// The request cannot be served further (a safety model failed): send this and stop.
    pub failure: Option<ApiError>,
    /// Every choice has ended: stop reading the upstream.
    pub stop: bool,
}

impl Released {
    /// A chunk released as it came (no output rails).
    pub(super) fn pass(chunk: Value) -> Self {
        Self {
            chunks: vec![chunk],
            ..Self::default()
        }
    }
}

/// Holds a streamed answer back and releases it chunk by chunk as the output rails pass it.
pub(super) struct StreamGuard {
    gateway: Arc<Gateway>,
    check: OutputCheck,
    streaming: OutputStreaming,
    /// Rule rails run on the stream: hold back a trailing word so no entity is cut in two.
    hold_words: bool,
    pub outcome: CheckOutcome,
    completions: bool,
    choices: BTreeMap<u64, HeldChoice>,
    n: u64,
    /// The top-level fields (id, object, created, model, ...) of the latest upstream chunk.
    frame: Map<String, Value>,
    refusal: String,
}

impl StreamGuard {
    pub(super) fn new(gateway: Arc<Gateway>, check: OutputCheck, n: u64) -> Self {
        let (streaming, hold_words) = gateway.rails().output_streaming(&check.ids);
        let refusal = gateway.rails().settings().output_refusal_message.clone();
        let outcome = CheckOutcome::new(Stage::Output, &check.ids);
        Self {
            gateway,
            check,
            streaming,
            hold_words,
            outcome,
            completions: false,
            choices: BTreeMap::new(),
            n: n.max(1),
            frame: Map::new(),
            refusal,
        }
    }

    /// The verdicts of both stages, as the traffic row keeps them.
    pub(super) fn record(&self) -> Value {
        crate::rails::record(&self.check.input, Some(&self.outcome))
    }

    fn chunk(&self, choice: Value) -> Value {
        let mut c = self.frame.clone();
        c.insert("choices".into(), json!([choice]));
        Value::Object(c)
    }

    fn delta_chunk(&self, index: u64, delta: Value, finish: Value, logprobs: Value) -> Value {
        if self.completions {
            let text = delta.get("text").cloned().unwrap_or(json!(""));
            self.chunk(json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}))
        } else {
            self.chunk(json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}))
        }
    }

    /// Takes one upstream chunk; returns what may be released now.
    pub(super) async fn push(&mut self, chunk: Value) -> Released {
        let mut out = Released::default();
        let Value::Object(mut obj) = chunk else {
            return out;
        };
        let choices = match obj.remove("choices") {
            Some(Value::Array(c)) => c,
            _ => Vec::new(),
        };
        if choices.is_empty() {
            // A usage chunk (or a keep-alive without choices) carries no answer text.
            obj.insert("choices".into(), json!([]));
            out.chunks.push(Value::Object(obj));
            return out;
        }
        if obj.get("object").and_then(Value::as_str) == Some("text_completion") {
            self.completions = true;
        }
        let usage = obj.remove("usage").filter(|u| !u.is_null());
        self.frame = obj;
        for (pos, c) in choices.into_iter().enumerate() {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
            if self.choices.get(&index).is_some_and(|h| h.done) {
                continue;
            }
            self.take(index, &c, &mut out);
            let finish = c.get("finish_reason").cloned().unwrap_or(Value::Null);
            if !finish.is_null() {
                self.flush(index, true, &mut out).await;
                if out.failure.is_some() {
                    return out;
                }
                let blocked = self.choices.get(&index).is_some_and(|h| h.done);
                if !blocked {
                    self.finish_choice(index, finish, &mut out);
                }
            } else if self.ready(index) {
                self.flush(index, false, &mut out).await;
                if out.failure.is_some() {
                    return out;
                }
            }
        }
        if let Some(u) = usage {
            let mut c = self.frame.clone();
            c.insert("choices".into(), json!([]));
            c.insert("usage".into(), u);
            out.chunks.push(Value::Object(c));
        }
        out.stop = (0..self.n).all(|i| self.choices.get(&i).is_some_and(|h| h.done));
        out
    }

    /// The upstream ended: what is still held is checked and released (there is no finish chunk
    /// to send; the upstream sent none).
    pub(super) async fn finish(&mut self) -> Released {
        let mut out = Released::default();
        let open: Vec<u64> = self
            .choices
            .iter()
            .filter(|(_, h)| !h.done)
            .map(|(i, _)| *i)
            .collect();
        for index in open {
            self.flush(index, true, &mut out).await;
            if out.failure.is_some() {
                break;
            }
        }
        out
    }

    /// Files a chunk's choice into its held buffers; what carries no checked text (the role) is
    /// released at once.
    fn take(&mut self, index: u64, c: &Value, out: &mut Released) {
        let completions = self.completions;
        let held = self.choices.entry(index).or_default();
        let source = if completions { Some(c) } else { c.get("delta") };
        let mut passthrough = Map::new();
        if let Some(Value::Object(delta)) = source {
            for (k, v) in delta {
                if let Some(&field) = answer_fields(completions).iter().find(|f| **f == k) {
                    if let Some(t) = v.as_str().filter(|t| !t.is_empty()) {
                        held.fields
                            .entry(field)
                            .or_default()
                            .pending
                            .push(t.to_string());
                    }
                } else if k == "tool_calls" {
                    for (pos, d) in v.as_array().into_iter().flatten().enumerate() {
                        let i = d.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
                        let call = held.calls.entry(i).or_default();
                        if let Some(id) = d.get("id").filter(|x| !x.is_null()) {
                            call.id = Some(id.clone());
                        }
                        if let Some(n) = d.pointer("/function/name").and_then(Value::as_str) {
                            call.name.push_str(n);
                        }
                        if let Some(a) = d.pointer("/function/arguments").and_then(Value::as_str) {
                            call.arguments.push_str(a);
                        }
                    }
                } else if !completions && !v.is_null() {
                    passthrough.insert(k.clone(), v.clone());
                }
            }
        }
        if let Some(lp) = c.pointer("/logprobs/content").and_then(Value::as_array) {
            held.logprobs.extend(lp.iter().cloned());
        }
        if !passthrough.is_empty() {
            let chunk =
                self.delta_chunk(index, Value::Object(passthrough), Value::Null, Value::Null);
            out.chunks.push(chunk);
        }
    }

    /// Whether a text field of choice `index` holds a whole chunk.
    fn ready(&self, index: u64) -> bool {
        self.choices.get(&index).is_some_and(|h| {
            h.fields
                .values()
                .any(|f| f.pending.len() >= self.streaming.chunk_size)
        })
    }

    /// Checks what choice `index` holds and releases it (or blocks the choice). `last` releases
    /// everything, tool calls included; otherwise a trailing word may stay held for rule rails.
    async fn flush(&mut self, index: u64, last: bool, out: &mut Released) {
        let Some(mut chunk) = self.take_chunk(index, last) else {
            return;
        };
        let gateway = self.gateway.clone();
        let checked = gateway
            .rails()
            .check_output(
                &self.check.ids,
                &self.check.conversation,
                &mut chunk.pieces,
                gateway.as_ref(),
            )
            .await;
        let outcome = match checked {
            Ok(o) => o,
            Err(e) => {
                out.failure = Some(rails_error(&e));
                return;
            }
        };
        let (status, masked) = (outcome.status, outcome.masked);
        let failure = failure_of(&outcome);
        self.outcome.absorb(outcome);
        if let Some(e) = failure {
            out.failure = Some(e);
        } else if status == CheckStatus::Blocked {
            self.block(index, out);
        } else {
            self.release(index, last, chunk, masked, out);
        }
    }

    /// Takes what choice `index` has ready to check: each text field's held pieces (all of them
    /// when `last`, else those of a full chunk, short of a trailing word held for rule rails), with
    /// its released context in front, and when `last` its tool calls.
    fn take_chunk(&mut self, index: u64, last: bool) -> Option<HeldChunk> {
        let held = self.choices.get_mut(&index)?;
        let mut chunk = HeldChunk::default();
        for (&field, text) in &mut held.fields {
            if text.pending.is_empty() || (!last && text.pending.len() < self.streaming.chunk_size)
            {
                continue;
            }
            let taken = std::mem::take(&mut text.pending);
            let (released, tail) = if !last && self.hold_words {
                split_pieces(taken, rules::release_point)
            } else {
                (taken, String::new())
            };
            if !tail.is_empty() {
                text.pending.push(tail);
            }
            if released.is_empty() {
                continue;
            }
            let context = text.context.iter().map(String::as_str).collect::<String>();
            chunk.pieces.push(Piece {
                kind: PieceKind::Text,
                released: context.len(),
                text: context + &released.concat(),
            });
            chunk.fields.push((field, released));
        }
        if last {
            chunk.calls = std::mem::take(&mut held.calls).into_iter().collect();
        }
        for (_, call) in &chunk.calls {
            chunk
                .pieces
                .push(Piece::arguments(call.name.clone(), call.arguments.clone()));
        }
        (!chunk.pieces.is_empty()).then_some(chunk)
    }

    /// Sends a checked chunk (as the rails left it) to the client and keeps its text as context.
    fn release(
        &mut self,
        index: u64,
        last: bool,
        chunk: HeldChunk,
        masked: bool,
        out: &mut Released,
    ) {
        let context_size = self.streaming.context_size;
        let Some(held) = self.choices.get_mut(&index) else {
            return;
        };
        held.masked |= masked;
        let mut delta = Map::new();
        for ((field, released), piece) in chunk.fields.iter().zip(&chunk.pieces) {
            let text = piece.unreleased().to_string();
            if let Some(t) = held.fields.get_mut(field) {
                if released.concat() == text {
                    t.context.extend(released.iter().cloned());
                } else {
                    // Masked: what the client got stands in for the pieces it replaced.
                    t.context.push_back(text.clone());
                }
                while t.context.len() > context_size {
                    t.context.pop_front();
                }
            }
            delta.insert((*field).to_string(), json!(text));
        }
        if !chunk.calls.is_empty() {
            let list: Vec<Value> = chunk
                .calls
                .iter()
                .zip(&chunk.pieces[chunk.fields.len()..])
                .map(|((i, call), piece)| {
                    json!({"index": i, "id": call.id.clone().unwrap_or(Value::Null), "type": "function",
                           "function": {"name": call.name, "arguments": piece.text}})
                })
                .collect();
            delta.insert("tool_calls".into(), Value::Array(list));
        }
        // Log-probabilities go out with the last release, whole, and only for an unmasked answer:
        // each names its token, which would spell out held or masked text.
        let logprobs = if last && !held.masked && !held.logprobs.is_empty() {
            json!({"content": std::mem::take(&mut held.logprobs)})
        } else {
            Value::Null
        };
        if self.completions {
            for (field, v) in delta {
                let chunk =
                    self.delta_chunk(index, json!({field: v}), Value::Null, logprobs.clone());
                out.chunks.push(chunk);
            }
        } else {
            let chunk = self.delta_chunk(index, Value::Object(delta), Value::Null, logprobs);
            out.chunks.push(chunk);
        }
    }

    /// Ends choice `index` with the refusal.
    fn block(&mut self, index: u64, out: &mut Released) {
        if let Some(held) = self.choices.get_mut(&index) {
            held.done = true;
            held.fields.clear();
            held.calls.clear();
            held.logprobs.clear();
        }
        let field = if self.completions { "text" } else { "content" };
        let chunk = self.delta_chunk(
            index,
            json!({field: self.refusal}),
            json!("content_filter"),
            Value::Null,
        );
        out.chunks.push(chunk);
    }

    fn finish_choice(&mut self, index: u64, finish: Value, out: &mut Released) {
        if let Some(held) = self.choices.get_mut(&index) {
            held.done = true;
        }
        let delta = if self.completions {
            json!({"text": ""})
        } else {
            json!({})
        };
        out.chunks
            .push(self.delta_chunk(index, delta, finish, Value::Null));
    }
}

/// Splits streamed pieces where `cut` says the joined text may be cut: the pieces before the cut
/// (the last one possibly shortened), and the rest joined.
fn split_pieces(pieces: Vec<String>, cut: impl Fn(&str) -> usize) -> (Vec<String>, String) {
    let at_byte = cut(&pieces.concat());
    let mut before = Vec::new();
    let mut rest = String::new();
    let mut at = 0;
    for p in pieces {
        let end = at + p.len();
        if end <= at_byte {
            before.push(p);
        } else if at >= at_byte {
            rest.push_str(&p);
        } else {
            let (a, b) = p.split_at(at_byte - at);
            before.push(a.to_string());
            rest.push_str(b);
        }
        at = end;
    }
    (before, rest)
}
