//! Content-safety input rails: guardrail configs (NeMo Guardrails' shape), the safety-model rails
//! and rule rails they declare, and the check that runs them before any model sees a request.
//!
//! A check reads the user-authored text of a conversation. Rules run first (microseconds): deny
//! patterns and sensitive-data detectors, which block or mask. Model rails then run in parallel on
//! the masked text, each a call to a safety model through the [`Backend`] trait, with a time limit
//! and a verdict cache keyed by a hash of exactly what the model was shown. A safety model that
//! errors or times out fails the check closed, unless its config opts in to failing open (logged at
//! warn and counted). This module decides; the gateway answers, logs and refuses.

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
pub use guardrails::GuardrailConfig;
use guardrails::{ModelRail, RailKind, RuleAction};
use parse::SafetyVerdict;

/// Finds the backend that serves a safety model's name (the gateway does, with its routing).
pub trait SafetyModels: Send + Sync {
    /// The backend, the adapter to run with, and the model name to send.
    fn safety_backend(&self, model: &str) -> Option<(Arc<dyn Backend>, Option<String>, String)>;
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

/// The outcome of checking one request against its configs.
#[derive(Debug, Clone)]
pub struct CheckOutcome {
    pub status: CheckStatus,
    pub configs: Vec<String>,
    pub rails: Vec<RailReport>,
    /// The messages with sensitive data masked, when a mask rail changed any.
    pub masked_messages: Option<Vec<Value>>,
    pub latency_ms: f64,
}

impl CheckOutcome {
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

    /// The verdict as the traffic record keeps it.
    pub fn record(&self) -> Value {
        json!({
            "status": self.status.as_str(),
            "configs": self.configs,
            "categories": self.categories(),
            "masked": self.masked_messages.is_some(),
            "latency_ms": round2(self.latency_ms),
            "rails": self.rails.iter().map(|r| {
                let mut v = json!({
                    "config": r.config,
                    "flow": r.flow,
                    "status": r.status.as_str(),
                    "categories": r.categories,
                    "latency_ms": round2(r.latency_ms),
                    "cached": r.cached,
                });
                if let Some(d) = &r.detail {
                    v["detail"] = json!(d);
                }
                v
            }).collect::<Vec<_>>(),
        })
    }

    /// NeMo's `rails_status`: each flow's status by name (with our details beside it).
    pub fn rails_status(&self) -> Value {
        let mut map = serde_json::Map::new();
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
        Value::Object(map)
    }
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
        }
    }

    pub fn settings(&self) -> &RailsConfig {
        &self.settings
    }

    /// Checks that every safety model the config names is served here.
    pub fn check_models(
        &self,
        config: &GuardrailConfig,
        models: &dyn SafetyModels,
    ) -> Result<(), String> {
        for r in &config.rails {
            if let RailKind::Model(m) = &r.kind {
                if models.safety_backend(&m.model).is_none() {
                    return Err(format!(
                        "guardrail config '{}': flow '{}' needs the model '{}', which this gateway does not serve; add a route (or a local model) named after it",
                        config.id, r.flow, m.model
                    ));
                }
            }
        }
        Ok(())
    }

    /// Installs (or replaces) a compiled config.
    pub fn install(&self, config: GuardrailConfig) {
        if let Ok(mut map) = self.configs.write() {
            map.insert(config.id.clone(), Arc::new(config));
        }
    }

    pub fn remove(&self, id: &str) {
        if let Ok(mut map) = self.configs.write() {
            map.remove(id);
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<GuardrailConfig>> {
        self.configs.read().ok()?.get(id).cloned()
    }

    /// Runs the rails of the configs `ids` (canonical `namespace/name`) over `messages`.
    pub async fn check(
        &self,
        ids: &[String],
        messages: &[Value],
        models: &dyn SafetyModels,
    ) -> Result<CheckOutcome, RailsError> {
        let started = Instant::now();
        let configs = ids
            .iter()
            .map(|id| {
                self.get(id)
                    .ok_or_else(|| RailsError::UnknownConfig(id.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut outcome = CheckOutcome {
            status: CheckStatus::Passed,
            configs: ids.to_vec(),
            rails: Vec::new(),
            masked_messages: None,
            latency_ms: 0.0,
        };
        if configs.iter().all(|c| c.rails.is_empty()) {
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
        let mut masked = false;
        for c in &configs {
            for rail in &c.rails {
                let t0 = Instant::now();
                let (status, categories) = match &rail.kind {
                    RailKind::Model(_) => continue,
                    RailKind::DenyPatterns(patterns) => {
                        let hit = text
                            .pieces
                            .iter()
                            .any(|(_, t)| patterns.iter().any(|p| p.is_match(t)));
                        if hit {
                            (RailStatus::Blocked, vec!["deny_pattern".to_string()])
                        } else {
                            (RailStatus::Success, Vec::new())
                        }
                    }
                    RailKind::SensitiveData { entities, action } => {
                        let mut found: Vec<String> = Vec::new();
                        for (_, t) in &mut text.pieces {
                            let findings = rules::detect(entities, t);
                            for f in &findings {
                                let name = f.entity.name().to_string();
                                if !found.contains(&name) {
                                    found.push(name);
                                }
                            }
                            if *action == RuleAction::Mask && !findings.is_empty() {
                                *t = rules::mask(t, &findings);
                                masked = true;
                            }
                        }
                        match action {
                            RuleAction::Block if !found.is_empty() => (RailStatus::Blocked, found),
                            // Masking lets the request through; the entities are still reported.
                            _ => (RailStatus::Success, found),
                        }
                    }
                };
                outcome.rails.push(RailReport {
                    config: c.id.clone(),
                    flow: rail.flow.clone(),
                    status,
                    categories,
                    latency_ms: t0.elapsed().as_secs_f64() * 1000.0,
                    cached: false,
                    detail: None,
                });
            }
        }
        let masked_messages = masked.then(|| text.write_into(messages));

        // Model rails in parallel, on what the rules left.
        let conversation = masked_messages.as_deref().unwrap_or(messages);
        let user_input = text.last_user_input();
        let calls = configs.iter().flat_map(|c| {
            c.rails.iter().filter_map(|rail| match &rail.kind {
                RailKind::Model(m) => {
                    Some(self.run_model_rail(c, &rail.flow, m, &user_input, conversation, models))
                }
                _ => None,
            })
        });
        outcome
            .rails
            .extend(futures_util::future::join_all(calls).await);
        outcome.masked_messages = masked_messages;

        outcome.status = if outcome
            .rails
            .iter()
            .any(|r| r.status == RailStatus::Blocked)
        {
            CheckStatus::Blocked
        } else if outcome.rails.iter().any(|r| r.status == RailStatus::Error) {
            CheckStatus::Error
        } else {
            CheckStatus::Passed
        };
        outcome.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        observe(&outcome);
        Ok(outcome)
    }

    async fn run_model_rail(
        &self,
        config: &GuardrailConfig,
        flow: &str,
        rail: &ModelRail,
        user_input: &str,
        conversation: &[Value],
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
        if user_input.trim().is_empty() {
            report.detail = Some("no user text to check".into());
            return report;
        }
        let verdict = match self
            .ask_safety_model(config, rail, user_input, conversation, models, &mut report)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                report.detail = Some(e.clone());
                if config.fail_open {
                    report.status = RailStatus::FailedOpen;
                    metrics::counter!("flywheel_rails_fail_open_total", "config" => config.id.clone(), "flow" => flow.to_string()).increment(1);
                    tracing::warn!(config = %config.id, flow, error = %e, "safety model failed; the config fails open, so the request goes through UNCHECKED");
                } else {
                    report.status = RailStatus::Error;
                    tracing::warn!(config = %config.id, flow, error = %e, "safety model failed; the request is refused (fail closed)");
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
        rail: &ModelRail,
        user_input: &str,
        conversation: &[Value],
        models: &dyn SafetyModels,
        report: &mut RailReport,
    ) -> Result<SafetyVerdict, String> {
        let history = history_lines(conversation);
        // The key covers exactly what the safety model would be shown: the rail (model, prompt,
        // parser) and the text its prompt reads.
        let mut key = Sha256::new().chain_update(rail.digest);
        match &rail.prompt {
            Some(p) if !p.uses_history => key.update(user_input.as_bytes()),
            _ => key.update(history.as_bytes()),
        }
        let key: CacheKey = key.finalize().into();
        if let Some(v) = self.cache.get(&key) {
            metrics::counter!("flywheel_rails_cache_total", "outcome" => "hit").increment(1);
            report.cached = true;
            return Ok(v);
        }
        metrics::counter!("flywheel_rails_cache_total", "outcome" => "miss").increment(1);
        let messages = match &rail.prompt {
            Some(p) => render_prompt(p, user_input, &history)?,
            None => conversation
                .iter()
                .filter(|m| {
                    matches!(
                        m.get("role").and_then(Value::as_str),
                        Some("user" | "assistant")
                    ) && m.get("content").is_some_and(Value::is_string)
                })
                .map(|m| json!({"role": m["role"], "content": m["content"]}))
                .collect(),
        };
        let (backend, adapter, model_name) = models
            .safety_backend(&rail.model)
            .ok_or_else(|| format!("the safety model '{}' is not served here", rail.model))?;
        let mut body = serde_json::Map::new();
        body.insert("model".into(), json!(model_name));
        body.insert("messages".into(), Value::Array(messages));
        body.insert("max_tokens".into(), json!(rail.max_tokens));
        body.insert("temperature".into(), json!(0));
        body.insert("stream".into(), json!(false));
        let timeout = config
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
/// `bot_response` (empty: input rails run before any answer).
fn render_prompt(
    prompt: &guardrails::Prompt,
    user_input: &str,
    history: &str,
) -> Result<Vec<Value>, String> {
    let ctx = minijinja::context! {
        user_input => user_input,
        user_query => user_input,
        history => history,
        bot_response => "",
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
    metrics::counter!("flywheel_rails_checks_total", "status" => outcome.status.as_str())
        .increment(1);
    metrics::histogram!("flywheel_rails_check_duration_seconds")
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
            metrics::counter!("flywheel_rails_blocks_total", "category" => label).increment(1);
        }
    }
}
