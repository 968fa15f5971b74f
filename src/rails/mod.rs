//! Content-safety rails: guardrail configs (NeMo Guardrails' shape), the safety-model rails and rule
//! rails they declare, and the checks that run them: on input, before any model sees a request, and
//! on output, on the model's answer (whole, or a streamed chunk) before the client sees it.
//!
//! An input check reads the user-authored text of a conversation; an output check reads the answer's
//! text and its tool calls' arguments. Rules run first (microseconds): deny patterns and
//! sensitive-data detectors, which block or mask. Model rails then run in parallel on the masked
//! text, each a call to a safety model through the [`Backend`] trait (a routed model, or the
//! config's own endpoint), with a time limit and a verdict cache keyed by a hash of exactly what the
//! model was shown. A safety model that errors or times out fails the check closed, unless its
//! config opts in to failing open (logged at warn and counted). A config whose safety model nothing
//! serves yet is installed, but every check against it is refused until something does. This
//! module decides; the gateway answers, logs and refuses.

pub mod guardrails;
pub mod parse;
pub mod rules;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::backend::{Backend, BackendReply, BackendRequest};
use crate::config::RailsConfig;
pub use guardrails::{Endpoint, GuardrailConfig, Stage};
use guardrails::{ModelRail, RailKind, RuleAction};
use parse::SafetyVerdict;

/// Finds the backend that serves a safety model (the gateway does, with its routing).
pub trait SafetyModels: Send + Sync {
    /// The backend, the adapter to run with, and the model name to send, for a model the gateway
    /// serves by name.
    fn safety_backend(&self, model: &str) -> Option<(Arc<dyn Backend>, Option<String>, String)>;

    /// A backend that calls a config's own endpoint directly.
    fn endpoint_backend(&self, endpoint: &Endpoint) -> Result<Arc<dyn Backend>, String>;
}

/// Why a check could not be run at all (the request is refused before any rail runs).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RailsError {
    #[error("guardrail config '{0}' does not exist")]
    UnknownConfig(String),
    #[error("messages[{message}].content[{part}] is of type '{kind}', which the content-safety rails cannot read; send text, or use a model without guardrails")]
    UnsupportedContent {
        message: usize,
        part: usize,
        kind: String,
    },
    #[error("the user text is {chars} characters, more than the {limit} the content-safety rails read; shorten the conversation")]
    InputTooLarge { chars: usize, limit: usize },
    #[error("guardrail config '{config}': flow '{flow}' needs the safety model '{model}', which this gateway does not serve; add a route (or a local model) named '{model}', or give the config's model entry a parameters.base_url, and checks work at once (no restart)")]
    ModelUnavailable {
        config: String,
        flow: String,
        model: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    Passed,
    Blocked,
    /// A rail could not decide and its config fails closed.
    Error,
}

impl CheckStatus {
    /// NeMo's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Passed => "success",
            CheckStatus::Blocked => "blocked",
            CheckStatus::Error => "error",
        }
    }

    /// The verdict of a set of rail reports: any block blocks, then any closed failure fails.
    fn of(reports: &[RailReport]) -> Self {
        if reports.iter().any(|r| r.status == RailStatus::Blocked) {
            CheckStatus::Blocked
        } else if reports.iter().any(|r| r.status == RailStatus::Error) {
            CheckStatus::Error
        } else {
            CheckStatus::Passed
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RailStatus {
    Success,
    Blocked,
    Error,
    /// Errored, and let through because the config fails open.
    FailedOpen,
}

impl RailStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RailStatus::Success => "success",
            RailStatus::Blocked => "blocked",
            RailStatus::Error => "error",
            RailStatus::FailedOpen => "failed_open",
        }
    }

    fn severity(self) -> u8 {
        match self {
            RailStatus::Success => 0,
            RailStatus::FailedOpen => 1,
            RailStatus::Error => 2,
            RailStatus::Blocked => 3,
        }
    }
}

/// What one rail decided.
#[derive(Debug, Clone)]
pub struct RailReport {
    pub config: String,
    pub flow: String,
    pub status: RailStatus,
    pub categories: Vec<String>,
    pub latency_ms: f64,
    pub cached: bool,
    pub detail: Option<String>,
}

/// The outcome of checking one request (or one answer) against its configs.
#[derive(Debug, Clone)]
pub struct CheckOutcome {
    pub stage: Stage,
    pub status: CheckStatus,
    pub configs: Vec<String>,
    pub rails: Vec<RailReport>,
    /// The messages with sensitive data masked, when an input mask rail changed any.
    pub masked_messages: Option<Vec<Value>>,
    /// Whether a mask rail changed the text.
    pub masked: bool,
    pub latency_ms: f64,
    /// How many checks this outcome sums up (a streamed answer is checked chunk by chunk).
    pub checks: u32,
}

impl CheckOutcome {
    /// A passing outcome of no checks yet.
    pub fn new(stage: Stage, ids: &[String]) -> Self {
        Self {
            stage,
            status: CheckStatus::Passed,
            configs: ids.to_vec(),
            rails: Vec::new(),
            masked_messages: None,
            masked: false,
            latency_ms: 0.0,
            checks: 0,
        }
    }

    /// Categories of the blocking rails, without repeats.
    pub fn categories(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in self
            .rails
            .iter()
            .filter(|r| r.status == RailStatus::Blocked)
        {
            for c in &r.categories {
                if !out.contains(c) {
                    out.push(c.clone());
                }
            }
        }
        out
    }

    /// Adds a later check of the same answer (the next streamed chunk): each flow keeps its worst
    /// status, all its categories and its summed latency.
    pub fn absorb(&mut self, other: CheckOutcome) {
        for r in other.rails {
            match self
                .rails
                .iter_mut()
                .find(|x| x.config == r.config && x.flow == r.flow)
            {
                Some(x) => {
                    if r.status.severity() > x.status.severity() {
                        x.status = r.status;
                        x.detail = r.detail.clone();
                    }
                    for c in r.categories {
                        if !x.categories.contains(&c) {
                            x.categories.push(c);
                        }
                    }
                    x.latency_ms += r.latency_ms;
                    x.cached &= r.cached;
                }
                None => self.rails.push(r),
            }
        }
        self.masked |= other.masked;
        self.latency_ms += other.latency_ms;
        self.checks += other.checks;
        self.status = CheckStatus::of(&self.rails);
    }

    fn rail_json(&self, r: &RailReport) -> Value {
        let mut v = json!({
            "config": r.config,
            "flow": r.flow,
            "stage": self.stage.as_str(),
            "status": r.status.as_str(),
            "categories": r.categories,
            "latency_ms": round2(r.latency_ms),
            "cached": r.cached,
        });
        if let Some(d) = &r.detail {
            v["detail"] = json!(d);
        }
        v
    }

    fn summary(&self) -> Value {
        json!({
            "status": self.status.as_str(),
            "categories": self.categories(),
            "masked": self.masked,
            "latency_ms": round2(self.latency_ms),
            "checks": self.checks,
        })
    }

    /// The verdict as the traffic record keeps it: the input check's alone.
    pub fn record(&self) -> Value {
        record(self, None)
    }

    /// NeMo's `rails_status`: each flow's status by name (with our details beside it).
    pub fn rails_status(&self) -> Value {
        let mut map = serde_json::Map::new();
        self.add_rails_status(&mut map);
        Value::Object(map)
    }

    pub fn add_rails_status(&self, map: &mut serde_json::Map<String, Value>) {
        for r in &self.rails {
            let key = if self.configs.len() > 1 {
                format!("{}: {}", r.config, r.flow)
            } else {
                r.flow.clone()
            };
            let mut v = json!({
                "status": match r.status {
                    RailStatus::FailedOpen => "success",
                    s => s.as_str(),
                },
                "categories": r.categories,
                "latency_ms": round2(r.latency_ms),
                "cached": r.cached,
            });
            if r.status == RailStatus::FailedOpen {
                v["failed_open"] = json!(true);
            }
            if let Some(d) = &r.detail {
                v["detail"] = json!(d);
            }
            map.insert(key, v);
        }
    }
}

/// The verdicts of a request as its traffic row keeps them. The top level sums both stages (a
/// request is `blocked` if its input or its answer was), so everything that reads the row's status
/// (curation, canary guards, the dashboard) counts answers withheld by output rails too; `input`
/// and `output` keep each stage's own verdict.
pub fn record(input: &CheckOutcome, output: Option<&CheckOutcome>) -> Value {
    let both: Vec<&CheckOutcome> = std::iter::once(input).chain(output).collect();
    let status = if both.iter().any(|o| o.status == CheckStatus::Blocked) {
        CheckStatus::Blocked
    } else if both.iter().any(|o| o.status == CheckStatus::Error) {
        CheckStatus::Error
    } else {
        CheckStatus::Passed
    };
    let mut categories: Vec<String> = Vec::new();
    for c in both.iter().flat_map(|o| o.categories()) {
        if !categories.contains(&c) {
            categories.push(c);
        }
    }
    let mut v = json!({
        "status": status.as_str(),
        "configs": input.configs,
        "categories": categories,
        "masked": both.iter().any(|o| o.masked),
        "latency_ms": round2(both.iter().map(|o| o.latency_ms).sum()),
        "rails": both.iter().flat_map(|o| o.rails.iter().map(|r| o.rail_json(r))).collect::<Vec<_>>(),
        "input": input.summary(),
    });
    if let Some(o) = output {
        v["output"] = o.summary();
    }
    v
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Where a piece of user text sits in the messages: (message index, content part index).
type TextSlot = (usize, Option<usize>);

/// The user-authored text of a conversation, with where each piece came from.
struct UserText {
    pieces: Vec<(TextSlot, String)>,
}

impl UserText {
    fn read(messages: &[Value]) -> Result<Self, RailsError> {
        let mut pieces = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(Value::as_str) != Some("user") {
                continue;
            }
            match m.get("content") {
                Some(Value::String(s)) => pieces.push(((i, None), s.clone())),
                Some(Value::Array(parts)) => {
                    for (j, p) in parts.iter().enumerate() {
                        let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                        match (kind, p.get("text").and_then(Value::as_str)) {
                            ("text", Some(t)) => pieces.push(((i, Some(j)), t.to_string())),
                            _ => {
                                return Err(RailsError::UnsupportedContent {
                                    message: i,
                                    part: j,
                                    kind: if kind.is_empty() {
                                        "unknown".into()
                                    } else {
                                        kind.into()
                                    },
                                })
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Self { pieces })
    }

    fn chars(&self) -> usize {
        self.pieces.iter().map(|(_, t)| t.chars().count()).sum()
    }

    /// The text of the last user message (its text parts joined by newlines).
    fn last_user_input(&self) -> String {
        let Some(((last, _), _)) = self.pieces.last() else {
            return String::new();
        };
        self.pieces
            .iter()
            .filter(|((i, _), _)| i == last)
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `messages` with this (possibly masked) text written back.
    fn write_into(&self, messages: &[Value]) -> Vec<Value> {
        let mut out = messages.to_vec();
        for ((i, part), text) in &self.pieces {
            let slot = match part {
                None => out.get_mut(*i).and_then(|m| m.get_mut("content")),
                Some(j) => out
                    .get_mut(*i)
                    .and_then(|m| m.get_mut("content"))
                    .and_then(|c| c.get_mut(*j))
                    .and_then(|p| p.get_mut("text")),
            };
            if let Some(v) = slot {
                *v = Value::String(text.clone());
            }
        }
        out
    }
}

/// What kind of text an output piece is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PieceKind {
    /// Prose: user text on input, the answer's content (or reasoning) on output.
    Text,
    /// A tool call's arguments (JSON as text), with the tool's name.
    Arguments { name: String },
}

/// One piece of text a check reads and may mask.
#[derive(Debug, Clone)]
pub struct Piece {
    pub kind: PieceKind,
    pub text: String,
    /// How many leading bytes the client already has: streamed context, shown to the rails but
    /// never masked or blocked on its own (it passed when it was released).
    pub released: usize,
}

impl Piece {
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            kind: PieceKind::Text,
            text: text.into(),
            released: 0,
        }
    }

    pub fn arguments(name: impl Into<String>, arguments: impl Into<String>) -> Self {
        Self {
            kind: PieceKind::Arguments { name: name.into() },
            text: arguments.into(),
            released: 0,
        }
    }

    /// The text not yet released.
    pub fn unreleased(&self) -> &str {
        self.text.get(self.released..).unwrap_or("")
    }
}

/// The text fields of a chat message (or delta) that reach a client, in answer order, and of a
/// legacy text completion choice.
pub fn answer_fields(completions: bool) -> &'static [&'static str] {
    if completions {
        &["text"]
    } else {
        &["reasoning_content", "content", "refusal"]
    }
}

/// Where a piece of an answer came from: a text field, or the arguments of tool call `i`.
#[derive(Debug, Clone, Copy)]
enum AnswerSlot {
    Field(&'static str),
    Call(usize),
}

/// An answer as output rails read it (a chat message, or a text completion choice): its text
/// fields, then each tool call's arguments, with where each came from to write masked text back.
pub struct AnswerText {
    pub pieces: Vec<Piece>,
    slots: Vec<AnswerSlot>,
}

impl AnswerText {
    pub fn read(holder: &Value, completions: bool) -> Self {
        let mut pieces = Vec::new();
        let mut slots = Vec::new();
        for &field in answer_fields(completions) {
            if let Some(t) = holder.get(field).and_then(Value::as_str) {
                if !t.is_empty() {
                    pieces.push(Piece::text(t));
                    slots.push(AnswerSlot::Field(field));
                }
            }
        }
        for (i, c) in holder
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let name = c.pointer("/function/name").and_then(Value::as_str);
            let args = c.pointer("/function/arguments").and_then(Value::as_str);
            if let (Some(name), Some(args)) = (name, args) {
                pieces.push(Piece::arguments(name, args));
                slots.push(AnswerSlot::Call(i));
            }
        }
        Self { pieces, slots }
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Writes the (masked) pieces back where they were read from.
    pub fn write_into(&self, holder: &mut Value) {
        for (slot, piece) in self.slots.iter().zip(&self.pieces) {
            let target = match slot {
                AnswerSlot::Field(f) => holder.get_mut(*f),
                AnswerSlot::Call(i) => holder
                    .get_mut("tool_calls")
                    .and_then(|c| c.get_mut(*i))
                    .and_then(|c| c.pointer_mut("/function/arguments")),
            };
            if let Some(t) = target {
                *t = Value::String(piece.text.clone());
            }
        }
    }
}

/// An answer as a safety model is shown it: its text, then each tool call on a line of its own.
fn bot_response(pieces: &[Piece]) -> String {
    let mut out = String::new();
    for p in pieces {
        match &p.kind {
            PieceKind::Text => out.push_str(&p.text),
            PieceKind::Arguments { name } => {
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str(&format!("[tool call] {name}({})", p.text));
            }
        }
    }
    out
}

/// The text of the last user message of a conversation (its text parts joined by newlines).
fn last_user_text(conversation: &[Value]) -> String {
    let last = conversation
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"));
    crate::wire::chat::content_text(last.and_then(|m| m.get("content")))
}

/// What a safety model's prompt reads.
struct PromptInputs<'a> {
    user_input: String,
    bot_response: String,
    conversation: &'a [Value],
}

type CacheKey = [u8; 32];

/// Cached verdicts with when each was stored, and the order they were stored in (for eviction).
#[derive(Default)]
struct CacheEntries {
    map: HashMap<CacheKey, (SafetyVerdict, Instant)>,
    order: VecDeque<CacheKey>,
}

/// Verdicts of safety models by a hash of the exact request made, bounded, with a time to live.
struct VerdictCache {
    capacity: usize,
    ttl: Duration,
    inner: Mutex<CacheEntries>,
}

impl VerdictCache {
    fn get(&self, key: &CacheKey) -> Option<SafetyVerdict> {
        let guard = self.inner.lock().ok()?;
        let (v, at) = guard.map.get(key)?;
        (at.elapsed() < self.ttl).then(|| v.clone())
    }

    fn put(&self, key: CacheKey, verdict: SafetyVerdict) {
        if self.capacity == 0 {
            return;
        }
        let Ok(mut guard) = self.inner.lock() else {
            return;
        };
        let CacheEntries { map, order } = &mut *guard;
        if map.insert(key, (verdict, Instant::now())).is_none() {
            order.push_back(key);
        }
        while map.len() > self.capacity {
            match order.pop_front() {
                Some(old) => {
                    map.remove(&old);
                }
                None => break,
            }
        }
    }
}

/// The installed guardrail configs and the machinery that checks requests against them.
pub struct Rails {
    settings: RailsConfig,
    configs: RwLock<HashMap<String, Arc<GuardrailConfig>>>,
    /// The stored version (`updated_at`) of each config installed from the store, so replicas
    /// sharing one store can follow each other's changes.
    stored: RwLock<HashMap<String, String>>,
    cache: VerdictCache,
}

impl Rails {
    pub fn new(settings: &RailsConfig) -> Self {
        Self {
            cache: VerdictCache {
                capacity: settings.cache_entries,
                ttl: Duration::from_secs(settings.cache_ttl_secs),
                inner: Mutex::new(CacheEntries::default()),
            },
            settings: settings.clone(),
            configs: RwLock::new(HashMap::new()),
            stored: RwLock::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &RailsConfig {
        &self.settings
    }

    /// The first model rail of `config` whose safety model nothing serves: (flow, model).
    fn unserved<'a>(
        config: &'a GuardrailConfig,
        models: &dyn SafetyModels,
    ) -> Option<(&'a str, &'a str)> {
        config.rails.iter().find_map(|r| match &r.kind {
            RailKind::Model(m)
                if m.endpoint.is_none() && models.safety_backend(&m.model).is_none() =>
            {
                Some((r.flow.as_str(), m.model.as_str()))
            }
            _ => None,
        })
    }

    /// Checks that every safety model the config names is served here (or has its own endpoint).
    pub fn check_models(
        &self,
        config: &GuardrailConfig,
        models: &dyn SafetyModels,
    ) -> Result<(), String> {
        match Self::unserved(config, models) {
            Some((flow, model)) => Err(format!(
                "guardrail config '{}': flow '{flow}' needs the model '{model}', which this gateway does not serve; add a route (or a local model) named after it, or give the model entry parameters.base_url",
                config.id
            )),
            None => Ok(()),
        }
    }

    /// What a config's owner should know: safety models nothing serves yet (checks are refused
    /// until something does) and settings read differently from NeMo.
    pub fn warnings(&self, config: &GuardrailConfig, models: &dyn SafetyModels) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        for r in &config.rails {
            if let RailKind::Model(m) = &r.kind {
                if m.endpoint.is_none()
                    && !seen.contains(&m.model.as_str())
                    && models.safety_backend(&m.model).is_none()
                {
                    seen.push(&m.model);
                    out.push(format!(
                        "the safety model '{}' (flow '{}') is not served by this gateway yet, so checks against this config fail with 503 rails_unavailable; add a route (or a local model) named '{}', or give the model entry parameters.base_url",
                        m.model, r.flow, m.model
                    ));
                }
            }
        }
        out.extend(config.notes.iter().cloned());
        out
    }

    /// Installs (or replaces) a compiled config.
    pub fn install(&self, config: GuardrailConfig) {
        if let Ok(mut map) = self.configs.write() {
            map.insert(config.id.clone(), Arc::new(config));
        }
    }

    /// Installs a config from the store at its stored version.
    pub fn install_stored(&self, config: GuardrailConfig, version: &str) {
        if let Ok(mut v) = self.stored.write() {
            v.insert(config.id.clone(), version.to_string());
        }
        self.install(config);
    }

    /// The stored version of an installed config from the store.
    pub fn stored_version(&self, id: &str) -> Option<String> {
        self.stored.read().ok()?.get(id).cloned()
    }

    /// The ids of the configs installed from the store.
    pub fn stored_ids(&self) -> Vec<String> {
        self.stored
            .read()
            .map(|v| v.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn remove(&self, id: &str) {
        if let Ok(mut map) = self.configs.write() {
            map.remove(id);
        }
        if let Ok(mut v) = self.stored.write() {
            v.remove(id);
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<GuardrailConfig>> {
        self.configs.read().ok()?.get(id).cloned()
    }

    /// The configs `ids` names, each with every safety model it needs served (else the check
    /// cannot run: it fails closed).
    fn ready(
        &self,
        ids: &[String],
        models: &dyn SafetyModels,
    ) -> Result<Vec<Arc<GuardrailConfig>>, RailsError> {
        let configs = ids
            .iter()
            .map(|id| {
                self.get(id)
                    .ok_or_else(|| RailsError::UnknownConfig(id.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for c in &configs {
            if let Some((flow, model)) = Self::unserved(c, models) {
                return Err(RailsError::ModelUnavailable {
                    config: c.id.clone(),
                    flow: flow.to_string(),
                    model: model.to_string(),
                });
            }
        }
        Ok(configs)
    }

    /// Whether any of the configs `ids` has output rails (unknown ids have none).
    pub fn has_output_rails(&self, ids: &[String]) -> bool {
        ids.iter()
            .filter_map(|id| self.get(id))
            .any(|c| c.has_output_rails())
    }

    /// How a streamed answer checked by `ids` is chunked: streaming when every config with output
    /// rails enables it (the smallest chunk and the largest context win), else held whole; and
    /// whether text is held back at word boundaries for rule rails.
    pub fn output_streaming(&self, ids: &[String]) -> (guardrails::OutputStreaming, bool) {
        let configs: Vec<_> = ids
            .iter()
            .filter_map(|id| self.get(id))
            .filter(|c| c.has_output_rails())
            .collect();
        let mut s = guardrails::OutputStreaming {
            enabled: !configs.is_empty() && configs.iter().all(|c| c.streaming.enabled),
            chunk_size: usize::MAX,
            context_size: 0,
        };
        for c in &configs {
            s.chunk_size = s.chunk_size.min(c.streaming.chunk_size);
            s.context_size = s.context_size.max(c.streaming.context_size);
        }
        if !s.enabled {
            s.chunk_size = usize::MAX;
        }
        (s, configs.iter().any(|c| c.has_output_rules()))
    }

    /// Runs the input rails of the configs `ids` (canonical `namespace/name`) over `messages`.
    pub async fn check(
        &self,
        ids: &[String],
        messages: &[Value],
        models: &dyn SafetyModels,
    ) -> Result<CheckOutcome, RailsError> {
        let started = Instant::now();
        let configs = self.ready(ids, models)?;
        let mut outcome = CheckOutcome::new(Stage::Input, ids);
        if configs
            .iter()
            .all(|c| c.rails_of(Stage::Input).next().is_none())
        {
            return Ok(outcome);
        }
        let mut text = UserText::read(messages)?;
        let chars = text.chars();
        if chars > self.settings.max_input_chars {
            return Err(RailsError::InputTooLarge {
                chars,
                limit: self.settings.max_input_chars,
            });
        }

        // Rules first, so that masked data never reaches a safety model.
        let mut pieces: Vec<Piece> = text.pieces.iter().map(|(_, t)| Piece::text(t)).collect();
        let (reports, masked) = run_rules(&configs, Stage::Input, &mut pieces);
        outcome.rails = reports;
        for ((_, t), p) in text.pieces.iter_mut().zip(pieces) {
            *t = p.text;
        }
        let masked_messages = masked.then(|| text.write_into(messages));

        // Model rails in parallel, on what the rules left.
        let conversation = masked_messages.as_deref().unwrap_or(messages);
        let inputs = PromptInputs {
            user_input: text.last_user_input(),
            bot_response: String::new(),
            conversation,
        };
        outcome.rails.extend(
            self.run_model_rails(&configs, Stage::Input, &inputs, models)
                .await,
        );
        outcome.masked_messages = masked_messages;
        outcome.masked = masked;
        Ok(self.conclude(outcome, started))
    }

    /// Runs the output rails of the configs `ids` over an answer (or a streamed chunk of one, its
    /// released context at the front of each piece). Masking rewrites `answer` in place.
    pub async fn check_output(
        &self,
        ids: &[String],
        conversation: &[Value],
        answer: &mut [Piece],
        models: &dyn SafetyModels,
    ) -> Result<CheckOutcome, RailsError> {
        let started = Instant::now();
        let configs = self.ready(ids, models)?;
        let mut outcome = CheckOutcome::new(Stage::Output, ids);
        if configs.iter().all(|c| !c.has_output_rails()) {
            return Ok(outcome);
        }
        let (reports, masked) = run_rules(&configs, Stage::Output, answer);
        outcome.rails = reports;
        outcome.masked = masked;
        let inputs = PromptInputs {
            user_input: last_user_text(conversation),
            bot_response: bot_response(answer),
            conversation,
        };
        outcome.rails.extend(
            self.run_model_rails(&configs, Stage::Output, &inputs, models)
                .await,
        );
        Ok(self.conclude(outcome, started))
    }

    fn conclude(&self, mut outcome: CheckOutcome, started: Instant) -> CheckOutcome {
        outcome.status = CheckStatus::of(&outcome.rails);
        outcome.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        outcome.checks = 1;
        observe(&outcome);
        outcome
    }

    async fn run_model_rails(
        &self,
        configs: &[Arc<GuardrailConfig>],
        stage: Stage,
        inputs: &PromptInputs<'_>,
        models: &dyn SafetyModels,
    ) -> Vec<RailReport> {
        let calls = configs.iter().flat_map(|c| {
            c.rails_of(stage).filter_map(move |rail| match &rail.kind {
                RailKind::Model(m) => {
                    Some(self.run_model_rail(c, stage, &rail.flow, m, inputs, models))
                }
                _ => None,
            })
        });
        futures_util::future::join_all(calls).await
    }

    async fn run_model_rail(
        &self,
        config: &GuardrailConfig,
        stage: Stage,
        flow: &str,
        rail: &ModelRail,
        inputs: &PromptInputs<'_>,
        models: &dyn SafetyModels,
    ) -> RailReport {
        let t0 = Instant::now();
        let mut report = RailReport {
            config: config.id.clone(),
            flow: flow.to_string(),
            status: RailStatus::Success,
            categories: Vec::new(),
            latency_ms: 0.0,
            cached: false,
            detail: None,
        };
        let checked = match stage {
            Stage::Input => &inputs.user_input,
            Stage::Output => &inputs.bot_response,
        };
        if checked.trim().is_empty() {
            report.detail = Some(format!("no {} text to check", stage.as_str()));
            return report;
        }
        let verdict = match self
            .ask_safety_model(config, stage, rail, inputs, models, &mut report)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                report.detail = Some(e.clone());
                let stage_name = stage.as_str();
                if config.settings(stage).fail_open {
                    report.status = RailStatus::FailedOpen;
                    metrics::counter!("flywheel_rails_fail_open_total", "config" => config.id.clone(), "flow" => flow.to_string()).increment(1);
                    tracing::warn!(config = %config.id, flow, stage = stage_name, error = %e, "safety model failed; the config fails open, so the traffic goes through UNCHECKED");
                } else {
                    report.status = RailStatus::Error;
                    tracing::warn!(config = %config.id, flow, stage = stage_name, error = %e, "safety model failed; the traffic is refused (fail closed)");
                }
                report.latency_ms = t0.elapsed().as_secs_f64() * 1000.0;
                return report;
            }
        };
        match verdict {
            SafetyVerdict::Safe => {}
            SafetyVerdict::Unsafe(cats) => {
                report.status = RailStatus::Blocked;
                report.categories = if cats.is_empty() {
                    vec!["unsafe".into()]
                } else {
                    cats
                };
            }
            SafetyVerdict::Malformed(text) => {
                report.status = RailStatus::Blocked;
                report.categories = vec!["unparseable_verdict".into()];
                report.detail = Some(format!(
                    "the safety model's answer is not a verdict: {text:?}"
                ));
            }
        }
        report.latency_ms = t0.elapsed().as_secs_f64() * 1000.0;
        report
    }

    /// The safety model's verdict, from the cache or from the model.
    async fn ask_safety_model(
        &self,
        config: &GuardrailConfig,
        stage: Stage,
        rail: &ModelRail,
        inputs: &PromptInputs<'_>,
        models: &dyn SafetyModels,
        report: &mut RailReport,
    ) -> Result<SafetyVerdict, String> {
        let history = history_lines(inputs.conversation);
        // The key covers exactly what the safety model would be shown: the rail (model, endpoint,
        // prompt, parser) and the text its prompt reads.
        let mut key = Sha256::new().chain_update(rail.digest);
        match &rail.prompt {
            Some(p) if !p.uses_history => key.update(inputs.user_input.as_bytes()),
            _ => key.update(history.as_bytes()),
        }
        key.update([0]);
        key.update(inputs.bot_response.as_bytes());
        let key: CacheKey = key.finalize().into();
        if let Some(v) = self.cache.get(&key) {
            metrics::counter!("flywheel_rails_cache_total", "outcome" => "hit").increment(1);
            report.cached = true;
            return Ok(v);
        }
        metrics::counter!("flywheel_rails_cache_total", "outcome" => "miss").increment(1);
        let messages = match &rail.prompt {
            Some(p) => render_prompt(p, inputs, &history)?,
            None => {
                let mut turns: Vec<Value> = inputs
                    .conversation
                    .iter()
                    .filter(|m| {
                        matches!(
                            m.get("role").and_then(Value::as_str),
                            Some("user" | "assistant")
                        ) && m.get("content").is_some_and(Value::is_string)
                    })
                    .map(|m| json!({"role": m["role"], "content": m["content"]}))
                    .collect();
                if stage == Stage::Output {
                    turns.push(json!({"role": "assistant", "content": inputs.bot_response}));
                }
                turns
            }
        };
        let (backend, adapter, model_name) = match &rail.endpoint {
            Some(e) => (models.endpoint_backend(e)?, None, rail.model.clone()),
            None => models
                .safety_backend(&rail.model)
                .ok_or_else(|| format!("the safety model '{}' is not served here", rail.model))?,
        };
        let mut body = serde_json::Map::new();
        body.insert("model".into(), json!(model_name));
        body.insert("messages".into(), Value::Array(messages));
        body.insert("max_tokens".into(), json!(rail.max_tokens));
        body.insert("temperature".into(), json!(0));
        body.insert("stream".into(), json!(false));
        let timeout = config
            .settings(stage)
            .timeout
            .unwrap_or(Duration::from_millis(self.settings.timeout_ms));
        let call = backend.chat(BackendRequest {
            api: crate::wire::Api::Chat,
            body,
            stream: false,
            adapter,
        });
        let reply = match tokio::time::timeout(timeout, call).await {
            Err(_) => {
                return Err(format!(
                    "the safety model '{}' did not answer within {} ms",
                    rail.model,
                    timeout.as_millis()
                ))
            }
            Ok(Err(e)) => return Err(format!("the safety model '{}' failed: {e}", rail.model)),
            Ok(Ok(BackendReply::Stream { .. })) => {
                return Err(format!(
                    "the safety model '{}' streamed its answer",
                    rail.model
                ))
            }
            Ok(Ok(BackendReply::Full(v))) => v,
        };
        let answer = reply
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .unwrap_or("");
        let verdict = rail.parser.parse(answer);
        if !matches!(verdict, SafetyVerdict::Malformed(_)) {
            self.cache.put(key, verdict.clone());
        }
        Ok(verdict)
    }
}

/// Runs the rule rails of `stage` over `pieces` (masking them in place): a report per rail, and
/// whether anything was masked. Only text the client does not have yet counts: a match that ends
/// inside a piece's released context was checked when it was released.
fn run_rules(
    configs: &[Arc<GuardrailConfig>],
    stage: Stage,
    pieces: &mut [Piece],
) -> (Vec<RailReport>, bool) {
    let mut reports = Vec::new();
    let mut masked = false;
    // Rails that block read the text as it came; masks run after them (a stable sort keeps each
    // group in config order), so one config's mask cannot hide from another config's detector what
    // the text held.
    let mut ordered: Vec<(&Arc<GuardrailConfig>, &guardrails::Rail)> = configs
        .iter()
        .flat_map(|c| c.rails_of(stage).map(move |r| (c, r)))
        .collect();
    ordered.sort_by_key(|(_, r)| {
        matches!(
            r.kind,
            RailKind::SensitiveData {
                action: RuleAction::Mask,
                ..
            }
        )
    });
    for (c, rail) in ordered {
        let t0 = Instant::now();
        let (status, categories) = match &rail.kind {
            RailKind::Model(_) => continue,
            RailKind::DenyPatterns(patterns) => {
                let hit = pieces.iter().any(|p| {
                    patterns
                        .iter()
                        .any(|re| re.find_iter(&p.text).any(|m| m.end() > p.released))
                });
                if hit {
                    (RailStatus::Blocked, vec!["deny_pattern".to_string()])
                } else {
                    (RailStatus::Success, Vec::new())
                }
            }
            RailKind::SensitiveData { entities, action } => {
                let mut found: Vec<String> = Vec::new();
                for p in pieces.iter_mut() {
                    let changed = sensitive_data(entities, *action, p, &mut found);
                    masked |= changed;
                }
                match action {
                    RuleAction::Block if !found.is_empty() => (RailStatus::Blocked, found),
                    // Masking lets the text through; the entities are still reported.
                    _ => (RailStatus::Success, found),
                }
            }
        };
        reports.push(RailReport {
            config: c.id.clone(),
            flow: rail.flow.clone(),
            status,
            categories,
            latency_ms: t0.elapsed().as_secs_f64() * 1000.0,
            cached: false,
            detail: None,
        });
    }
    (reports, masked)
}

/// Finds `entities` in the unreleased part of a piece (adding their names to `found`) and, for a
/// mask rail, masks them. Whole tool-call arguments are masked inside their JSON values, so they
/// stay valid JSON. Returns whether the piece changed.
fn sensitive_data(
    entities: &[rules::Entity],
    action: RuleAction,
    piece: &mut Piece,
    found: &mut Vec<String>,
) -> bool {
    let mut note = |e: rules::Entity| {
        let name = e.name().to_string();
        if !found.contains(&name) {
            found.push(name);
        }
    };
    if matches!(piece.kind, PieceKind::Arguments { .. }) && piece.released == 0 {
        let Some((masked, hits)) = rules::mask_arguments(entities, &piece.text) else {
            return false;
        };
        hits.into_iter().for_each(&mut note);
        if action == RuleAction::Mask {
            piece.text = masked;
            return true;
        }
        return false;
    }
    let findings: Vec<rules::Finding> = rules::detect(entities, &piece.text)
        .into_iter()
        .filter(|f| f.range.end > piece.released)
        .collect();
    findings.iter().for_each(|f| note(f.entity));
    if action != RuleAction::Mask || findings.is_empty() {
        return false;
    }
    let rest = rules::mask_after(&piece.text, &findings, piece.released);
    piece.text.truncate(piece.released);
    piece.text.push_str(&rest);
    true
}

/// The conversation as `role: text` lines (text content only).
fn history_lines(conversation: &[Value]) -> String {
    conversation
        .iter()
        .filter_map(|m| {
            let role = m.get("role")?.as_str()?;
            let text = m.get("content")?.as_str()?;
            Some(format!("{role}: {text}"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The prompt's messages, rendered for this conversation. Templates see `user_input` (the last
/// user message), `user_query` (the same), `history` (the conversation as `role: text` lines) and
/// `bot_response` (the answer on output; empty on input, which runs before any answer).
fn render_prompt(
    prompt: &guardrails::Prompt,
    inputs: &PromptInputs<'_>,
    history: &str,
) -> Result<Vec<Value>, String> {
    let ctx = minijinja::context! {
        user_input => inputs.user_input,
        user_query => inputs.user_input,
        history => history,
        bot_response => inputs.bot_response,
    };
    prompt
        .roles
        .iter()
        .enumerate()
        .map(|(i, role)| {
            prompt
                .env
                .get_template(&i.to_string())
                .and_then(|t| t.render(&ctx))
                .map(|content| json!({"role": role, "content": content}))
                .map_err(|e| format!("cannot render the safety prompt: {e}"))
        })
        .collect()
}

fn observe(outcome: &CheckOutcome) {
    let stage = outcome.stage.as_str();
    metrics::counter!("flywheel_rails_checks_total", "stage" => stage, "status" => outcome.status.as_str())
        .increment(1);
    metrics::histogram!("flywheel_rails_check_duration_seconds", "stage" => stage)
        .record(outcome.latency_ms / 1000.0);
    for r in &outcome.rails {
        metrics::histogram!("flywheel_rail_duration_seconds", "flow" => r.flow.clone())
            .record(r.latency_ms / 1000.0);
    }
    if outcome.status == CheckStatus::Blocked {
        for c in outcome.categories() {
            // Categories come from a model's answer: bounded, so a rambling model cannot blow up
            // the metric's label set.
            let label: String = c.chars().take(48).collect();
            metrics::counter!("flywheel_rails_blocks_total", "stage" => stage, "category" => label)
                .increment(1);
        }
    }
}
