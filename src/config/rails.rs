//! The `[rails]` section: how blocked requests are answered, safety-model time limits, the verdict
//! cache, and guardrail configs declared in the file (`[[rails.configs]]`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ConfigError;

/// How a request the rails block is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockResponse {
    /// HTTP 400 with the OpenAI error envelope, code `content_filter`.
    #[default]
    Error,
    /// HTTP 200 with an assistant message (the refusal) and `finish_reason: "content_filter"`.
    Message,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RailsConfig {
    #[serde(default)]
    pub block_response: BlockResponse,
    /// The refusal's text (the error message, or the assistant message).
    #[serde(default = "default_refusal")]
    pub refusal_message: String,
    /// What a client receives in place of an answer (or the rest of a streamed one) that output
    /// rails blocked, always as the assistant's text with `finish_reason: "content_filter"`.
    #[serde(default = "default_output_refusal")]
    pub output_refusal_message: String,
    /// How long a safety model may take before the check fails (closed, unless the config opts in
    /// to failing open).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Verdicts of safety models kept, keyed by a hash of exactly what the model was shown.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    #[serde(default = "default_cache_ttl_secs")]
    pub cache_ttl_secs: u64,
    /// Most characters of user text one check reads; longer input is refused, never truncated
    /// (unsafe text could hide past the cut).
    #[serde(default = "default_max_input_chars")]
    pub max_input_chars: usize,
    /// Guardrail configs declared here; read-only through the API.
    #[serde(default)]
    pub configs: Vec<DeclaredGuardrailConfig>,
}

impl Default for RailsConfig {
    fn default() -> Self {
        Self {
            block_response: BlockResponse::default(),
            refusal_message: default_refusal(),
            output_refusal_message: default_output_refusal(),
            timeout_ms: default_timeout_ms(),
            cache_entries: default_cache_entries(),
            cache_ttl_secs: default_cache_ttl_secs(),
            max_input_chars: default_max_input_chars(),
            configs: Vec::new(),
        }
    }
}

/// A guardrail config written into the config file: its `data` inline (a TOML table in NeMo's
/// shape) or in a JSON file (either the `data` object or a whole `POST /v1/guardrail/configs` body).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredGuardrailConfig {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub file: Option<PathBuf>,
}

impl DeclaredGuardrailConfig {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The config's `data`, read from the file when it names one.
    pub fn load_data(&self) -> Result<Value, ConfigError> {
        let invalid =
            |m: String| ConfigError::Invalid(format!("guardrail config '{}': {m}", self.id()));
        match (&self.data, &self.file) {
            (Some(d), None) => Ok(d.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| invalid(format!("cannot read '{}': {e}", path.display())))?;
                let v: Value = serde_json::from_str(&text)
                    .map_err(|e| invalid(format!("'{}' is not valid JSON: {e}", path.display())))?;
                let whole_body = v.get("data").is_some_and(Value::is_object)
                    && v.get("rails").is_none()
                    && v.get("models").is_none();
                Ok(if whole_body { v["data"].clone() } else { v })
            }
            _ => Err(invalid("give exactly one of 'data' and 'file'".into())),
        }
    }
}

fn default_refusal() -> String {
    "This request was blocked by the content-safety policy.".into()
}
fn default_output_refusal() -> String {
    "The answer was withheld by the content-safety policy.".into()
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_cache_entries() -> usize {
    10_000
}
fn default_cache_ttl_secs() -> u64 {
    3_600
}
fn default_max_input_chars() -> usize {
    100_000
}
fn default_namespace() -> String {
    "default".into()
}
