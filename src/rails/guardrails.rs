//! Guardrail configs in NeMo Guardrails' shape, checked and compiled into the rails that run.
//!
//! A config body is `{name, namespace, description?, data: {models, rails: {input: {flows},
//! config}, prompts}}`. The input flows Flywheel runs:
//! - `content safety check input $model=<type>`: a NemoGuard-style safety model, prompted with the
//!   config's `content_safety_check_input $model=<type>` prompt;
//! - `llama guard check input [$model=<type>]`: a Llama Guard model (type `llama_guard` unless named),
//!   prompted with the `llama_guard_check_input` prompt or, without one, sent the conversation itself
//!   (Llama Guard's own chat template frames it);
//! - `regex check input`: deny patterns from `rails.config.regex_detection.input.patterns`;
//! - `detect sensitive data on input` / `mask sensitive data on input`: the built-in detectors named
//!   by `rails.config.sensitive_data_detection.input.entities` (all of them when omitted).
//!
//! Flywheel's own knobs sit beside the flows: `rails.input.fail_open` (let requests through when a
//! safety model errors or times out; default false) and `rails.input.timeout_ms`.

use std::time::Duration;

use regex::Regex;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::parse::OutputParser;
use super::rules::Entity;

/// The input flows this gateway knows, for error messages.
pub const FLOWS: &[&str] = &[
    "content safety check input $model=<type>",
    "llama guard check input",
    "regex check input",
    "detect sensitive data on input",
    "mask sensitive data on input",
];

/// A compiled guardrail config: the rails one request runs through.
#[derive(Debug)]
pub struct GuardrailConfig {
    /// `namespace/name`.
    pub id: String,
    pub rails: Vec<Rail>,
    /// Let requests through (loudly) when a safety model errors or times out.
    pub fail_open: bool,
    pub timeout: Option<Duration>,
}

#[derive(Debug)]
pub struct Rail {
    /// The flow as the config wrote it, which names the rail in reports.
    pub flow: String,
    pub kind: RailKind,
}

#[derive(Debug)]
pub enum RailKind {
    Model(Box<ModelRail>),
    /// Blocks when any pattern matches user text.
    DenyPatterns(Vec<Regex>),
    /// Finds sensitive data in user text, then blocks or masks it.
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
    /// (model, prompt, parser, token limit): half of a verdict's cache key.
    pub digest: [u8; 32],
    /// The model name the gateway serves the safety model under (a route, an upstream's model, a
    /// local model or adapter).
    pub model: String,
    /// Without a prompt the conversation's own user and assistant turns are sent.
    pub prompt: Option<Prompt>,
    pub parser: OutputParser,
    pub max_tokens: u64,
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

/// Checks and compiles the `data` of config `id`.
pub fn compile(id: &str, data: &Value) -> Result<GuardrailConfig, ConfigBodyError> {
    let err = |message: String| ConfigBodyError {
        id: id.to_string(),
        message,
    };
    if !data.is_object() {
        return Err(err("'data' must be an object".into()));
    }
    let input = data.pointer("/rails/input");
    let flows = match input.and_then(|i| i.get("flows")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|f| {
                f.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| err("rails.input.flows must be a list of strings".into()))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(err("rails.input.flows must be a list of strings".into())),
    };
    if let Some(out) = data
        .pointer("/rails/output/flows")
        .and_then(Value::as_array)
    {
        if !out.is_empty() {
            return Err(err(format!(
                "output rails are not supported (flows {}); Flywheel checks input only, so remove rails.output",
                serde_json::to_string(out).unwrap_or_default()
            )));
        }
    }
    let fail_open = match input.and_then(|i| i.get("fail_open")) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(err("rails.input.fail_open must be true or false".into())),
    };
    let timeout = match input.and_then(|i| i.get("timeout_ms")) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(ms) if ms > 0 => Some(Duration::from_millis(ms)),
            _ => {
                return Err(err(
                    "rails.input.timeout_ms must be a positive number of milliseconds".into(),
                ))
            }
        },
    };
    let mut rails = Vec::with_capacity(flows.len());
    for flow in flows {
        let kind = compile_flow(&flow, data).map_err(|m| err(format!("flow '{flow}': {m}")))?;
        rails.push(Rail { flow, kind });
    }
    Ok(GuardrailConfig {
        id: id.to_string(),
        rails,
        fail_open,
        timeout,
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

fn compile_flow(flow: &str, data: &Value) -> Result<RailKind, String> {
    let (name, params) = split_flow(flow);
    let model_param = params
        .iter()
        .find(|(k, _)| k == "model")
        .map(|(_, v)| v.clone());
    if let Some((k, _)) = params.iter().find(|(k, _)| k != "model") {
        return Err(format!("unknown parameter '${k}'"));
    }
    match name.as_str() {
        "content safety check input" => {
            let ty = model_param.ok_or(
                "name the safety model's type, as in 'content safety check input $model=content_safety'",
            )?;
            let task = format!("content_safety_check_input $model={ty}");
            let prompt = find_prompt(data, &[&task, "content_safety_check_input"]).ok_or(
                format!("no prompt with task '{task}'; the safety model needs one (see NeMo's NemoGuard prompt)"),
            )?;
            model_rail(data, &ty, Some(prompt), OutputParser::NemoGuardJson)
        }
        "llama guard check input" => {
            let ty = model_param.unwrap_or_else(|| "llama_guard".into());
            let prompt = find_prompt(data, &["llama_guard_check_input"]);
            model_rail(data, &ty, prompt, OutputParser::LlamaGuard)
        }
        "regex check input" => {
            let patterns = data
                .pointer("/rails/config/regex_detection/input/patterns")
                .and_then(Value::as_array)
                .filter(|a| !a.is_empty())
                .ok_or("list the deny patterns in rails.config.regex_detection.input.patterns")?;
            patterns
                .iter()
                .map(|p| {
                    let s = p.as_str().ok_or("each pattern must be a string")?;
                    Regex::new(s).map_err(|e| format!("pattern {s:?} is not a valid regex: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(RailKind::DenyPatterns)
        }
        "detect sensitive data on input" | "mask sensitive data on input" => {
            let action = if name.starts_with("mask") {
                RuleAction::Mask
            } else {
                RuleAction::Block
            };
            let entities =
                match data.pointer("/rails/config/sensitive_data_detection/input/entities") {
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
                        return Err(
                            "rails.config.sensitive_data_detection.input.entities must be a list"
                                .into(),
                        )
                    }
                };
            if entities.is_empty() {
                return Err("the entity list is empty".into());
            }
            Ok(RailKind::SensitiveData { entities, action })
        }
        _ => Err(format!(
            "unknown flow; supported input flows: {}",
            FLOWS.join("; ")
        )),
    }
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
    for part in [
        model,
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
        assert!(!c.fail_open);
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
                json!({"rails": {"output": {"flows": ["content safety check output $model=cs"]}}}),
                "output rails are not supported",
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
        assert!(c.fail_open);
        assert_eq!(c.timeout, Some(Duration::from_millis(250)));
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
    fn ids() {
        assert_eq!(canonical_id("toolcalling"), "default/toolcalling");
        assert_eq!(canonical_id("team/x"), "team/x");
        assert_eq!(
            identity(&tutorial_config()).unwrap(),
            ("default".into(), "toolcalling".into())
        );
    }
}
