//! Guardrail configs in NeMo Guardrails' shape, checked and compiled into the rails that run.
//!
//! A config body is `{name, namespace, description?, data: {models, rails: {input, output, config},
//! prompts}}`. The flows Flywheel runs, on input (`rails.input.flows`, before any model sees the
//! request) and on output (`rails.output.flows`, on the model's answer before the client sees it):
//! - `content safety check input|output $model=<type>`: a NemoGuard-style safety model, prompted
//!   with the config's `content_safety_check_input|output $model=<type>` prompt;
//! - `llama guard check input|output [$model=<type>]`: a Llama Guard model (type `llama_guard`
//!   unless named), prompted with the `llama_guard_check_input|output` prompt or, without one, sent
//!   the conversation itself (Llama Guard's own chat template frames it);
//! - `regex check input|output`: deny patterns from `rails.config.regex_detection.<stage>.patterns`;
//! - `detect|mask sensitive data on input|output`: the built-in detectors named by
//!   `rails.config.sensitive_data_detection.<stage>.entities` (all of them when omitted).
//!
//! A model entry names the model the gateway serves (a route, a local model or adapter) or, with
//! `parameters.base_url`, an OpenAI-compatible endpoint the gateway calls directly (`engine` `nim`,
//! `openai`, `vllm`, `vllm_openai` or `nvidia_ai_endpoints`; the key comes from the environment
//! variable `api_key_env_var` names, never from the body).
//!
//! Not handled: dialog rails, Colang flows, `self check` and fact-checking flows, retrieval rails,
//! topical rails; a config naming them is refused with the flow named. `rails.dialog` and other
//! sections Flywheel does not run are accepted and ignored, as NeMo's microservice ignores what a
//! config does not use.
//!
//! Flywheel's own knobs sit beside the flows: `rails.<stage>.fail_open` (let traffic through when a
//! safety model errors or times out; default false) and `rails.<stage>.timeout_ms`. Output streaming
//! follows `rails.output.streaming` (`chunk_size`, `context_size`), with every chunk checked before
//! it is released.

use std::time::Duration;

use regex::Regex;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::parse::OutputParser;
use super::rules::Entity;

/// The flows this gateway knows, for error messages.
pub const FLOWS: &[&str] = &[
    "content safety check input $model=<type>",
    "content safety check output $model=<type>",
    "llama guard check input",
    "llama guard check output",
    "regex check input",
    "regex check output",
    "detect sensitive data on input",
    "detect sensitive data on output",
    "mask sensitive data on input",
    "mask sensitive data on output",
];

/// The engines whose endpoints speak OpenAI's chat completions, which a model entry with a
/// `parameters.base_url` may name.
pub const ENDPOINT_ENGINES: &[&str] = &[
    "nim",
    "nvidia_ai_endpoints",
    "openai",
    "vllm",
    "vllm_openai",
];

/// Where a rail runs: on the request, or on the model's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Input,
    Output,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Input => "input",
            Stage::Output => "output",
        }
    }

    /// The word flows end their name with (`... on input`, `... check output`).
    fn of_flow(name: &str) -> Option<(Stage, &str)> {
        for (suffix, stage) in [
            (" input", Stage::Input),
            (" on input", Stage::Input),
            (" output", Stage::Output),
            (" on output", Stage::Output),
        ] {
            if let Some(base) = name.strip_suffix(suffix) {
                return Some((stage, base.strip_suffix(" on").unwrap_or(base)));
            }
        }
        None
    }
}

/// A compiled guardrail config: the rails one request runs through.
#[derive(Debug)]
pub struct GuardrailConfig {
    /// `namespace/name`.
    pub id: String,
    pub rails: Vec<Rail>,
    pub input: StageSettings,
    pub output: StageSettings,
    pub streaming: OutputStreaming,
    /// What the config asks for that Flywheel does differently (reported with the config).
    pub notes: Vec<String>,
}

impl GuardrailConfig {
    pub fn settings(&self, stage: Stage) -> &StageSettings {
        match stage {
            Stage::Input => &self.input,
            Stage::Output => &self.output,
        }
    }

    /// The rails of one stage.
    pub fn rails_of(&self, stage: Stage) -> impl Iterator<Item = &Rail> {
        self.rails.iter().filter(move |r| r.stage == stage)
    }

    pub fn has_output_rails(&self) -> bool {
        self.rails_of(Stage::Output).next().is_some()
    }

    /// Whether any output rail is a rule (then streamed text is held back at word boundaries, so a
    /// detector never sees an entity cut in two).
    pub fn has_output_rules(&self) -> bool {
        self.rails_of(Stage::Output)
            .any(|r| !matches!(r.kind, RailKind::Model(_)))
    }
}

/// `rails.<stage>.fail_open` and `rails.<stage>.timeout_ms`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageSettings {
    /// Let traffic through (loudly) when a safety model errors or times out.
    pub fail_open: bool,
    pub timeout: Option<Duration>,
}

/// `rails.output.streaming`: how a streamed answer is checked. Without `enabled`, the whole answer
/// is held and checked at its end (NeMo refuses to stream such a config; holding is the safe reading).
#[derive(Debug, Clone, Copy)]
pub struct OutputStreaming {
    pub enabled: bool,
    /// Streamed pieces (about one token each) held and checked together.
    pub chunk_size: usize,
    /// Pieces of already released text shown to a safety model again with the next chunk.
    pub context_size: usize,
}

impl Default for OutputStreaming {
    fn default() -> Self {
        Self {
            enabled: false,
            chunk_size: 200,
            context_size: 50,
        }
    }
}

#[derive(Debug)]
pub struct Rail {
    /// The flow as the config wrote it, which names the rail in reports.
    pub flow: String,
    pub stage: Stage,
    pub kind: RailKind,
}

#[derive(Debug)]
pub enum RailKind {
    Model(Box<ModelRail>),
    /// Blocks when any pattern matches the text.
    DenyPatterns(Vec<Regex>),
    /// Finds sensitive data in the text, then blocks or masks it.
    SensitiveData {
        entities: Vec<Entity>,
        action: RuleAction,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAction {
    Block,
    Mask,
}

#[derive(Debug)]
pub struct ModelRail {
    /// A digest of everything that shapes the safety model's answer apart from the conversation
    /// (model, endpoint, prompt, parser, token limit): half of a verdict's cache key.
    pub digest: [u8; 32],
    /// The model name: the name the gateway serves it under (a route, an upstream's model, a local
    /// model or adapter) or, with an endpoint, the name sent to it.
    pub model: String,
    /// Called directly instead of through the gateway's routes.
    pub endpoint: Option<Endpoint>,
    /// Without a prompt the conversation's own user and assistant turns are sent.
    pub prompt: Option<Prompt>,
    pub parser: OutputParser,
    pub max_tokens: u64,
}

/// A safety model's own OpenAI-compatible endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub engine: String,
    /// Up to and including `/v1`.
    pub base_url: String,
    /// The environment variable holding the key, if the endpoint needs one.
    pub api_key_env: Option<String>,
}

/// A prompt's messages as compiled templates (named by their index), with their roles.
#[derive(Debug)]
pub struct Prompt {
    pub env: minijinja::Environment<'static>,
    pub roles: Vec<String>,
    /// Whether a template reads `history` (then the whole conversation shapes the answer).
    pub uses_history: bool,
}

/// Why a config body was refused.
#[derive(Debug, thiserror::Error)]
#[error("guardrail config '{id}': {message}")]
pub struct ConfigBodyError {
    pub id: String,
    pub message: String,
}

/// Namespace and name of a config body, with the defaults NeMo uses.
pub fn identity(body: &Value) -> Result<(String, String), String> {
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .ok_or("'name' is required")?;
    let namespace = body
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    Ok((namespace.to_string(), name.to_string()))
}

/// A `config_id` as requests write it: `namespace/name`, or a bare name in namespace `default`.
pub fn canonical_id(config_id: &str) -> String {
    let id = config_id.trim();
    if id.contains('/') {
        id.to_string()
    } else {
        format!("default/{id}")
    }
}

/// The flows listed under `rails.<stage>.flows`.
fn stage_flows(data: &Value, stage: Stage) -> Result<Vec<String>, String> {
    let key = stage.as_str();
    match data.pointer(&format!("/rails/{key}/flows")) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|f| {
                f.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("rails.{key}.flows must be a list of strings"))
            })
            .collect(),
        Some(_) => Err(format!("rails.{key}.flows must be a list of strings")),
    }
}

fn stage_settings(data: &Value, stage: Stage) -> Result<StageSettings, String> {
    let key = stage.as_str();
    let section = data.pointer(&format!("/rails/{key}"));
    let fail_open = match section.and_then(|i| i.get("fail_open")) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(format!("rails.{key}.fail_open must be true or false")),
    };
    let timeout = match section.and_then(|i| i.get("timeout_ms")) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(ms) if ms > 0 => Some(Duration::from_millis(ms)),
            _ => {
                return Err(format!(
                    "rails.{key}.timeout_ms must be a positive number of milliseconds"
                ))
            }
        },
    };
    Ok(StageSettings { fail_open, timeout })
}

/// `rails.output.streaming`, with notes for what is read differently from NeMo.
fn output_streaming(data: &Value, notes: &mut Vec<String>) -> Result<OutputStreaming, String> {
    let mut s = OutputStreaming::default();
    let Some(section) = data.pointer("/rails/output/streaming") else {
        return Ok(s);
    };
    if section.is_null() {
        return Ok(s);
    }
    if !section.is_object() {
        return Err("rails.output.streaming must be an object".into());
    }
    let count = |key: &str, min: u64| -> Result<Option<usize>, String> {
        match section.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|n| (min..=100_000).contains(n))
                .map(|n| Some(n as usize))
                .ok_or(format!(
                    "rails.output.streaming.{key} must be a whole number from {min} to 100000"
                )),
        }
    };
    match section.get("enabled") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => s.enabled = *b,
        Some(_) => return Err("rails.output.streaming.enabled must be true or false".into()),
    }
    if let Some(n) = count("chunk_size", 1)? {
        s.chunk_size = n;
    }
    if let Some(n) = count("context_size", 0)? {
        s.context_size = n;
    }
    match section.get("stream_first") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => notes.push(
            "rails.output.streaming.stream_first is not honoured: every chunk is checked before the client receives it".into(),
        ),
        Some(_) => return Err("rails.output.streaming.stream_first must be true or false".into()),
    }
    Ok(s)
}

/// Checks and compiles the `data` of config `id`.
pub fn compile(id: &str, data: &Value) -> Result<GuardrailConfig, ConfigBodyError> {
    let err = |message: String| ConfigBodyError {
        id: id.to_string(),
        message,
    };
    if !data.is_object() {
        return Err(err("'data' must be an object".into()));
    }
    let mut notes = Vec::new();
    let input = stage_settings(data, Stage::Input).map_err(err)?;
    let output = stage_settings(data, Stage::Output).map_err(err)?;
    let streaming = output_streaming(data, &mut notes).map_err(err)?;
    let mut rails = Vec::new();
    for stage in [Stage::Input, Stage::Output] {
        for flow in stage_flows(data, stage).map_err(err)? {
            let kind = compile_flow(&flow, stage, data)
                .map_err(|m| err(format!("rails.{}.flows: '{flow}': {m}", stage.as_str())))?;
            rails.push(Rail { flow, stage, kind });
        }
    }
    Ok(GuardrailConfig {
        id: id.to_string(),
        rails,
        input,
        output,
        streaming,
        notes,
    })
}

/// Splits `name $key=value ...` into the flow's name (whitespace normalised) and its parameters.
fn split_flow(flow: &str) -> (String, Vec<(String, String)>) {
    let mut name = Vec::new();
    let mut params = Vec::new();
    for word in flow.split_whitespace() {
        match word.strip_prefix('$').and_then(|p| p.split_once('=')) {
            Some((k, v)) => params.push((k.to_string(), v.to_string())),
            None => name.push(word),
        }
    }
    (name.join(" ").to_ascii_lowercase(), params)
}

fn compile_flow(flow: &str, listed_under: Stage, data: &Value) -> Result<RailKind, String> {
    let (name, params) = split_flow(flow);
    let model_param = params
        .iter()
        .find(|(k, _)| k == "model")
        .map(|(_, v)| v.clone());
    if let Some((k, _)) = params.iter().find(|(k, _)| k != "model") {
        return Err(format!("unknown parameter '${k}'"));
    }
    let unknown = || {
        format!(
            "unknown flow (dialog rails, Colang flows and self-check flows are not supported); supported flows: {}",
            FLOWS.join("; ")
        )
    };
    let (stage, base) = Stage::of_flow(&name).ok_or_else(unknown)?;
    if stage != listed_under {
        return Err(format!(
            "this is an {} flow; list it under rails.{}.flows",
            stage.as_str(),
            stage.as_str()
        ));
    }
    let word = stage.as_str();
    match base {
        "content safety check" => {
            let ty = model_param.ok_or(format!(
                "name the safety model's type, as in 'content safety check {word} $model=content_safety'"
            ))?;
            let task = format!("content_safety_check_{word} $model={ty}");
            let generic = format!("content_safety_check_{word}");
            let prompt = find_prompt(data, &[&task, &generic]).ok_or(format!(
                "no prompt with task '{task}'; the safety model needs one (see NeMo's NemoGuard prompts)"
            ))?;
            let parser = match stage {
                Stage::Input => OutputParser::NemoGuardJson,
                Stage::Output => OutputParser::NemoGuardResponseJson,
            };
            model_rail(data, &ty, Some(prompt), parser)
        }
        "llama guard check" => {
            let ty = model_param.unwrap_or_else(|| "llama_guard".into());
            let prompt = find_prompt(data, &[&format!("llama_guard_check_{word}")]);
            model_rail(data, &ty, prompt, OutputParser::LlamaGuard)
        }
        "regex check" => {
            let path = format!("/rails/config/regex_detection/{word}/patterns");
            let patterns = data
                .pointer(&path)
                .and_then(Value::as_array)
                .filter(|a| !a.is_empty())
                .ok_or(format!(
                    "list the deny patterns in rails.config.regex_detection.{word}.patterns"
                ))?;
            patterns
                .iter()
                .map(|p| {
                    let s = p.as_str().ok_or("each pattern must be a string")?;
                    Regex::new(s).map_err(|e| format!("pattern {s:?} is not a valid regex: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(RailKind::DenyPatterns)
        }
        "detect sensitive data" | "mask sensitive data" => {
            let action = if base.starts_with("mask") {
                RuleAction::Mask
            } else {
                RuleAction::Block
            };
            let entities = sensitive_entities(data, word)?;
            Ok(RailKind::SensitiveData { entities, action })
        }
        _ => Err(unknown()),
    }
}

/// The entities `rails.config.sensitive_data_detection.<stage>.entities` names (all when omitted).
fn sensitive_entities(data: &Value, word: &str) -> Result<Vec<Entity>, String> {
    let path = format!("/rails/config/sensitive_data_detection/{word}/entities");
    let entities = match data.pointer(&path) {
        None | Some(Value::Null) => Entity::ALL.to_vec(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|e| {
                let s = e.as_str().unwrap_or_default();
                Entity::from_name(s).ok_or_else(|| {
                    format!(
                        "unknown entity {e}; known: {}",
                        Entity::ALL.map(Entity::name).join(", ")
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(format!(
                "rails.config.sensitive_data_detection.{word}.entities must be a list"
            ))
        }
    };
    if entities.is_empty() {
        return Err("the entity list is empty".into());
    }
    Ok(entities)
}

fn find_prompt<'a>(data: &'a Value, tasks: &[&str]) -> Option<&'a Value> {
    let prompts = data.get("prompts")?.as_array()?;
    tasks.iter().find_map(|t| {
        prompts.iter().find(|p| {
            p.get("task")
                .and_then(Value::as_str)
                .is_some_and(|task| split_flow(task) == split_flow(t))
        })
    })
}

/// The endpoint a model entry names with `parameters.base_url`, checked.
fn endpoint(entry: &Value, ty: &str) -> Result<Option<Endpoint>, String> {
    let params = entry.get("parameters");
    let Some(base_url) = params.and_then(|p| p.get("base_url")) else {
        return Ok(None);
    };
    let base_url = base_url
        .as_str()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .ok_or(format!(
            "the '{ty}' model entry's parameters.base_url must be a URL"
        ))?;
    let scheme_ok = base_url.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https")
            && !rest.is_empty()
            && !rest.starts_with('/')
    });
    if !scheme_ok || base_url.parse::<http::Uri>().is_err() {
        return Err(format!(
            "the '{ty}' model entry's parameters.base_url {base_url:?} is not an http(s) URL such as http://nemoguard:8000/v1"
        ));
    }
    let engine = entry
        .get("engine")
        .and_then(Value::as_str)
        .unwrap_or("nim")
        .to_ascii_lowercase();
    if !ENDPOINT_ENGINES.contains(&engine.as_str()) {
        return Err(format!(
            "the '{ty}' model entry's engine '{engine}' cannot be called at parameters.base_url; engines with an OpenAI-compatible endpoint: {}",
            ENDPOINT_ENGINES.join(", ")
        ));
    }
    if params.and_then(|p| p.get("api_key")).is_some() || entry.get("api_key").is_some() {
        return Err(format!(
            "the '{ty}' model entry holds an API key; configs are returned by the API, so name the environment variable that holds it with 'api_key_env_var' instead"
        ));
    }
    let api_key_env = match entry
        .get("api_key_env_var")
        .or_else(|| params.and_then(|p| p.get("api_key_env_var")))
    {
        None | Some(Value::Null) => None,
        Some(Value::String(v)) if is_env_name(v) => Some(v.clone()),
        Some(v) => {
            return Err(format!(
                "the '{ty}' model entry's api_key_env_var {v} is not an environment variable name"
            ))
        }
    };
    Ok(Some(Endpoint {
        engine,
        base_url: base_url.trim_end_matches('/').to_string(),
        api_key_env,
    }))
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn model_rail(
    data: &Value,
    ty: &str,
    prompt: Option<&Value>,
    default_parser: OutputParser,
) -> Result<RailKind, String> {
    let models = data.get("models").and_then(Value::as_array);
    let entry = models
        .and_then(|ms| {
            ms.iter()
                .find(|m| m.get("type").and_then(Value::as_str) == Some(ty))
        })
        .ok_or(format!("no entry in 'models' has type '{ty}'"))?;
    let model = entry
        .get("model")
        .and_then(Value::as_str)
        .or_else(|| {
            entry
                .pointer("/parameters/model_name")
                .and_then(Value::as_str)
        })
        .filter(|m| !m.is_empty())
        .ok_or(format!("the '{ty}' model entry names no 'model'"))?;
    let endpoint = endpoint(entry, ty)?;
    let mut parser = default_parser;
    let mut max_tokens = 64;
    let compiled_prompt = match prompt {
        None => None,
        Some(p) => {
            if let Some(name) = p.get("output_parser").and_then(Value::as_str) {
                parser = OutputParser::from_name(name).ok_or_else(|| {
                    format!(
                        "unknown output_parser '{name}'; known: {}",
                        OutputParser::NAMES
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
            }
            if let Some(m) = p.get("max_tokens") {
                max_tokens = m
                    .as_u64()
                    .filter(|m| (1..=4096).contains(m))
                    .ok_or("the prompt's max_tokens must be between 1 and 4096")?;
            }
            Some(compile_prompt(p)?)
        }
    };
    let mut h = Sha256::new();
    let endpoint_key = endpoint
        .as_ref()
        .map(|e| format!("{} {}", e.engine, e.base_url))
        .unwrap_or_default();
    for part in [
        model,
        &endpoint_key,
        &format!("{parser:?}"),
        &max_tokens.to_string(),
        &prompt.map(|p| p.to_string()).unwrap_or_default(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    Ok(RailKind::Model(Box::new(ModelRail {
        digest: h.finalize().into(),
        model: model.to_string(),
        endpoint,
        prompt: compiled_prompt,
        parser,
        max_tokens,
    })))
}

fn compile_prompt(p: &Value) -> Result<Prompt, String> {
    let mut messages = Vec::new();
    if let Some(list) = p.get("messages").and_then(Value::as_array) {
        for m in list {
            let role = m
                .get("type")
                .or_else(|| m.get("role"))
                .and_then(Value::as_str)
                .unwrap_or("user");
            let role = match role {
                "system" | "user" | "assistant" => role,
                "bot" => "assistant",
                other => {
                    return Err(format!(
                        "prompt message type '{other}' is not system, user, assistant or bot"
                    ))
                }
            };
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or("every prompt message needs a string 'content'")?;
            messages.push((role.to_string(), content.to_string()));
        }
    } else if let Some(content) = p.get("content").and_then(Value::as_str) {
        messages.push(("user".to_string(), content.to_string()));
    }
    if messages.is_empty() {
        return Err("the prompt has neither 'messages' nor 'content'".into());
    }
    let mut env = minijinja::Environment::new();
    let mut roles = Vec::with_capacity(messages.len());
    let mut uses_history = false;
    for (i, (role, t)) in messages.into_iter().enumerate() {
        uses_history |= t.contains("history");
        env.add_template_owned(i.to_string(), t)
            .map_err(|e| format!("the prompt template does not parse: {e}"))?;
        roles.push(role);
    }
    Ok(Prompt {
        env,
        roles,
        uses_history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The guardrail config body of NVIDIA's tool-calling tutorial (its system prompt shortened).
    fn tutorial_config() -> Value {
        json!({
            "name": "toolcalling",
            "namespace": "default",
            "data": {
                "models": [{"type": "content_safety", "engine": "nim", "model": "nvidia/llama-3.1-nemoguard-8b-content-safety"}],
                "rails": {
                    "input": {"flows": ["content safety check input $model=content_safety"]},
                    "dialog": {"single_call": {"enabled": false}}
                },
                "prompts": [{
                    "task": "content_safety_check_input $model=content_safety",
                    "messages": [
                        {"type": "system", "content": "Task: Check if there is unsafe content.\n<BEGIN CONVERSATION>\nuser: {{user_query}}\n<END CONVERSATION>\nOutput JSON:"},
                        {"type": "user", "content": "{{ user_input }}"}
                    ],
                    "output_parser": "nemoguard_parse_prompt_safety",
                    "max_tokens": 50
                }]
            }
        })
    }

    #[test]
    fn the_tutorial_config_compiles_to_one_model_rail() {
        let body = tutorial_config();
        let c = compile("default/toolcalling", &body["data"]).unwrap();
        assert_eq!(c.rails.len(), 1);
        let RailKind::Model(m) = &c.rails[0].kind else {
            panic!("expected a model rail")
        };
        assert_eq!(m.model, "nvidia/llama-3.1-nemoguard-8b-content-safety");
        assert_eq!(m.parser, OutputParser::NemoGuardJson);
        assert_eq!(m.max_tokens, 50);
        assert_eq!(m.prompt.as_ref().unwrap().roles, ["system", "user"]);
        assert!(!c.input.fail_open);
        assert!(c.rails[0].stage == Stage::Input);
        assert!(m.endpoint.is_none());
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let cases = [
            (
                json!({"rails": {"input": {"flows": ["self check facts"]}}}),
                "unknown flow",
            ),
            (
                json!({"rails": {"input": {"flows": ["content safety check input"]}}}),
                "$model=",
            ),
            (
                json!({"models": [{"type": "cs", "engine": "nim", "model": "m"}], "rails": {"input": {"flows": ["content safety check input $model=cs"]}}}),
                "no prompt with task",
            ),
            (
                json!({"models": [{"type": "cs", "engine": "nim", "model": "m"}], "rails": {"input": {"flows": ["content safety check input $model=cs"]}},
                       "prompts": [{"task": "content_safety_check_input $model=cs", "content": "{{ x", "output_parser": "nemoguard_parse_prompt_safety"}]}),
                "does not parse",
            ),
            (
                json!({"models": [{"type": "cs", "engine": "nim", "model": "m"}], "rails": {"input": {"flows": ["content safety check input $model=cs"]}},
                       "prompts": [{"task": "content_safety_check_input $model=cs", "content": "{{ user_input }}", "output_parser": "magic"}]}),
                "unknown output_parser",
            ),
            (
                json!({"rails": {"input": {"flows": ["llama guard check input"]}}}),
                "type 'llama_guard'",
            ),
            (
                json!({"rails": {"input": {"flows": ["regex check input"]}, "config": {"regex_detection": {"input": {"patterns": ["("]}}}}}),
                "not a valid regex",
            ),
            (
                json!({"rails": {"input": {"flows": ["mask sensitive data on input"]}, "config": {"sensitive_data_detection": {"input": {"entities": ["SSN_OF_MARS"]}}}}}),
                "unknown entity",
            ),
            (
                json!({"rails": {"output": {"flows": ["content safety check output $model=cs"]}},
                       "prompts": [{"task": "content_safety_check_output $model=cs", "content": "{{ bot_response }}"}]}),
                "no entry in 'models' has type 'cs'",
            ),
            (
                json!({"models": [{"type": "cs", "engine": "nim", "model": "m"}], "rails": {"output": {"flows": ["content safety check output $model=cs"]}},
                       "prompts": [{"task": "content_safety_check_input $model=cs", "content": "{{ user_input }}"}]}),
                "no prompt with task 'content_safety_check_output $model=cs'",
            ),
            (
                json!({"rails": {"input": {"flows": ["regex check output"]}}}),
                "list it under rails.output.flows",
            ),
            (
                json!({"rails": {"output": {"flows": ["self check output"]}}}),
                "Colang flows",
            ),
            (
                json!({"models": [{"type": "cs", "engine": "nim", "model": "m", "parameters": {"base_url": "file:///etc/passwd"}}],
                       "rails": {"input": {"flows": ["llama guard check input $model=cs"]}}}),
                "not an http(s) URL",
            ),
            (
                json!({"models": [{"type": "cs", "engine": "nim", "model": "m", "parameters": {"base_url": "http://guard:8000/v1", "api_key": "sk-secret"}}],
                       "rails": {"input": {"flows": ["llama guard check input $model=cs"]}}}),
                "api_key_env_var",
            ),
            (
                json!({"models": [{"type": "cs", "engine": "trt_llm", "model": "m", "parameters": {"base_url": "http://guard:8000/v1"}}],
                       "rails": {"input": {"flows": ["llama guard check input $model=cs"]}}}),
                "engine 'trt_llm'",
            ),
            (
                json!({"rails": {"output": {"flows": [], "streaming": {"chunk_size": 0}}}}),
                "chunk_size",
            ),
            (
                json!({"rails": {"input": {"flows": "regex check input"}}}),
                "list of strings",
            ),
            (
                json!({"rails": {"input": {"flows": [], "fail_open": "yes"}}}),
                "fail_open",
            ),
        ];
        for (data, expected) in cases {
            let e = compile("default/x", &data).unwrap_err().to_string();
            assert!(e.contains(expected), "{data}: {e}");
            assert!(e.starts_with("guardrail config 'default/x'"), "{e}");
        }
    }

    #[test]
    fn rule_flows_and_options() {
        let data = json!({
            "models": [{"type": "llama_guard", "engine": "vllm_openai", "parameters": {"model_name": "llama-guard-3"}}],
            "rails": {
                "input": {"flows": ["llama guard check input", "regex check input", "mask sensitive data on input"], "fail_open": true, "timeout_ms": 250},
                "config": {
                    "regex_detection": {"input": {"patterns": ["(?i)drop\\s+table"]}},
                    "sensitive_data_detection": {"input": {"entities": ["EMAIL_ADDRESS", "CREDIT_CARD"]}}
                }
            }
        });
        let c = compile("ns/r", &data).unwrap();
        assert!(c.input.fail_open);
        assert_eq!(c.input.timeout, Some(Duration::from_millis(250)));
        assert!(!c.output.fail_open);
        assert!(
            matches!(&c.rails[0].kind, RailKind::Model(m) if m.model == "llama-guard-3" && m.prompt.is_none() && m.parser == OutputParser::LlamaGuard)
        );
        assert!(matches!(&c.rails[1].kind, RailKind::DenyPatterns(p) if p.len() == 1));
        assert!(
            matches!(&c.rails[2].kind, RailKind::SensitiveData { entities, action: RuleAction::Mask } if entities.len() == 2)
        );
        // No flows at all is a pass-through config, as NeMo's `default` is.
        assert!(compile("ns/none", &json!({})).unwrap().rails.is_empty());
    }

    #[test]
    fn output_flows_endpoints_and_streaming() {
        let data = json!({
            "models": [
                {"type": "content_safety", "engine": "nim", "model": "nvidia/llama-3.1-nemoguard-8b-content-safety",
                 "parameters": {"base_url": "http://nemoguard:8000/v1/"}, "api_key_env_var": "NIM_KEY"},
                {"type": "llama_guard", "engine": "vllm_openai", "model": "llama-guard-3"}
            ],
            "rails": {
                "input": {"flows": ["content safety check input $model=content_safety"]},
                "output": {
                    "flows": ["content safety check output $model=content_safety", "llama guard check output",
                              "regex check output", "mask sensitive data on output"],
                    "fail_open": true,
                    "streaming": {"enabled": true, "chunk_size": 16, "context_size": 4, "stream_first": true}
                },
                "config": {"regex_detection": {"output": {"patterns": ["(?i)rm\\s+-rf"]}}}
            },
            "prompts": [
                {"task": "content_safety_check_input $model=content_safety", "content": "{{ user_input }}", "output_parser": "nemoguard_parse_prompt_safety"},
                {"task": "content_safety_check_output $model=content_safety", "content": "{{ user_input }} {{ bot_response }}", "output_parser": "nemoguard_parse_response_safety"}
            ]
        });
        let c = compile("default/out", &data).unwrap();
        let stages: Vec<Stage> = c.rails.iter().map(|r| r.stage).collect();
        assert_eq!(
            stages,
            [
                Stage::Input,
                Stage::Output,
                Stage::Output,
                Stage::Output,
                Stage::Output
            ]
        );
        assert!(c.has_output_rails() && c.has_output_rules());
        assert!(c.output.fail_open && !c.input.fail_open);
        assert!(c.streaming.enabled);
        assert_eq!((c.streaming.chunk_size, c.streaming.context_size), (16, 4));
        assert!(c.notes[0].contains("stream_first"), "{:?}", c.notes);
        let RailKind::Model(input) = &c.rails[0].kind else {
            panic!()
        };
        let RailKind::Model(output) = &c.rails[1].kind else {
            panic!()
        };
        let endpoint = input.endpoint.clone().unwrap();
        assert_eq!(endpoint.base_url, "http://nemoguard:8000/v1");
        assert_eq!(endpoint.api_key_env.as_deref(), Some("NIM_KEY"));
        assert_eq!(input.parser, OutputParser::NemoGuardJson);
        assert_eq!(output.parser, OutputParser::NemoGuardResponseJson);
        // The same model as input and output rails: different prompts, so different cache keys.
        assert_ne!(input.digest, output.digest);
        let RailKind::Model(guard) = &c.rails[2].kind else {
            panic!()
        };
        assert!(guard.endpoint.is_none() && guard.prompt.is_none());
        assert!(
            matches!(&c.rails[4].kind, RailKind::SensitiveData { action: RuleAction::Mask, entities } if entities.len() == Entity::ALL.len())
        );
        // Output streaming without `enabled` holds the whole answer.
        let plain = compile(
            "default/p",
            &json!({"rails": {"output": {"flows": ["detect sensitive data on output"]}}}),
        )
        .unwrap();
        assert!(!plain.streaming.enabled && plain.notes.is_empty());
    }

    #[test]
    fn ids() {
        assert_eq!(canonical_id("toolcalling"), "default/toolcalling");
        assert_eq!(canonical_id("team/x"), "team/x");
        assert_eq!(
            identity(&tutorial_config()).unwrap(),
            ("default".into(), "toolcalling".into())
        );
    }
}
