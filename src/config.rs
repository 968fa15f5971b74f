//! The TOML configuration: its shape, its defaults and its validation.
//!
//! The configuration file comes in through here; other modules receive validated values and never
//! parse configuration themselves. Upstream API keys are not read here: the config names the
//! environment variable that holds each one, and the upstream client reads it once at start-up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod flywheel;
pub use flywheel::{
    DriftConfig, FeedbackFloor, FeedbackGuard, FlywheelConfig, PromotionPolicy, RolloutPlan,
    RouteFlywheelConfig, Sources, METRICS,
};
mod metrics;
pub use metrics::{is_negative, FeedbackRule, MetricConfig, MetricKind, MetricLevel, Optimize};
mod rails;
pub use rails::{BlockResponse, DeclaredGuardrailConfig, RailsConfig};

/// A configuration problem, phrased so the operator knows what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file '{path}': {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file '{path}' is not valid TOML for flywheel: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the gateway listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where state lives: the SQLite database, datasets, adapters, checkpoints.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Where the traffic log and the flywheel's state live: SQLite in `data_dir` by default, or a
    /// PostgreSQL database shared by replicas.
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub shadow: ShadowConfig,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Local models served by the embedded engine.
    #[serde(default)]
    pub models: Vec<crate::engine::LocalModelConfig>,
    #[serde(default)]
    pub adapters: AdaptersConfig,
    #[serde(default)]
    pub flywheel: FlywheelConfig,
    /// Content-safety input rails: refusals, safety-model limits, declared guardrail configs.
    #[serde(default)]
    pub rails: RailsConfig,
    /// Feedback metrics (`POST /v1/feedback`).
    #[serde(default)]
    pub metrics: Vec<MetricConfig>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptersConfig {
    /// Directories adapters may be loaded from (default: `<data_dir>/adapters`); paths elsewhere are refused.
    #[serde(default)]
    pub allowed_dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Largest accepted request body, in bytes.
    #[serde(default = "default_body_limit")]
    pub body_limit_bytes: usize,
    /// Requests served at once; more are refused with 429.
    #[serde(default = "default_max_inflight")]
    pub max_inflight_requests: usize,
    /// Seconds to wait for in-flight requests on shutdown before giving up on them.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
    /// Optional TLS listener: both paths set turns TLS on.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            body_limit_bytes: default_body_limit(),
            max_inflight_requests: default_max_inflight(),
            shutdown_grace_secs: default_shutdown_grace(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Inference,
    Admin,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A label for logs; never the key itself.
    pub name: String,
    /// Hex SHA-256 of the key (`flywheel keys hash` prints it). Keys themselves are never stored.
    pub sha256: String,
    pub scopes: Vec<Scope>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Requests without a key from a loopback address get every scope.
    #[serde(default = "yes")]
    pub allow_loopback_without_key: bool,
    #[serde(default)]
    pub keys: Vec<ApiKeyConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            allow_loopback_without_key: true,
            keys: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Record traffic to SQLite.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Records waiting to be written; beyond this they are dropped (and counted), never waited for.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Most records written in one transaction.
    /// 512 on SQLite, 4096 on PostgreSQL when not set (its transactions cost more each).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// How long the writer lets records gather before a transaction (fewer, larger commits).
    #[serde(default = "default_flush_interval")]
    pub flush_interval_ms: u64,
}

/// `[store]`: SQLite (`data_dir/flywheel.db`, the default) or PostgreSQL.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://user@host:port/database`, without a password (give it in `password_env`).
    #[serde(default)]
    pub url: Option<String>,
    /// An environment variable holding the whole URL, password included (a Kubernetes Secret,
    /// say); used when set, in place of `url`.
    #[serde(default)]
    pub url_env: Option<String>,
    /// An environment variable holding the password for `url`.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Connections a replica keeps to PostgreSQL at most.
    #[serde(default = "default_store_pool")]
    pub pool_size: usize,
}

fn default_store_pool() -> usize {
    16
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            url_env: None,
            password_env: None,
            pool_size: default_store_pool(),
        }
    }
}

impl StoreConfig {
    /// The PostgreSQL URL to connect to, password included, or None for SQLite.
    pub fn postgres_url(&self) -> Result<Option<String>, ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let from_env = match &self.url_env {
            Some(var) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Some(v),
                _ if self.url.is_none() => {
                    return invalid(format!(
                        "store.url_env names the environment variable '{var}', which is not set"
                    ))
                }
                _ => None,
            },
            None => None,
        };
        if let Some(url) = from_env {
            return Ok(Some(url));
        }
        let Some(url) = &self.url else {
            return Ok(None);
        };
        let Some(var) = &self.password_env else {
            return Ok(Some(url.clone()));
        };
        let Ok(password) = std::env::var(var) else {
            return invalid(format!(
                "store.password_env names the environment variable '{var}', which is not set"
            ));
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return invalid(format!("store.url '{url}' is not a URL"));
        };
        let Some((user, host)) = rest.split_once('@') else {
            return invalid(format!(
                "store.url '{url}' names no user (postgres://user@host/database) for the password in '{var}'"
            ));
        };
        Ok(Some(format!(
            "{scheme}://{user}:{}@{host}",
            percent_encode(&password)
        )))
    }
}

/// `s` with everything but unreserved URL characters percent-encoded.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl LogConfig {
    /// Most records in one of the writer's transactions on a store of `dialect`.
    pub fn batch_size(&self, dialect: crate::store::Dialect) -> usize {
        self.batch_size.unwrap_or(match dialect {
            crate::store::Dialect::Sqlite => 512,
            crate::store::Dialect::Postgres => 4096,
        })
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            queue_capacity: default_queue_capacity(),
            batch_size: None,
            flush_interval_ms: default_flush_interval(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Shadow requests in flight at once across all routes; sampled requests beyond it are shed.
    #[serde(default = "default_shadow_concurrency")]
    pub max_concurrency: usize,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        Self {
            max_concurrency: default_shadow_concurrency(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// OpenAI-compatible base URL, up to and including `/v1`.
    pub base_url: String,
    /// Name of the environment variable holding the API key (read once at start-up).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Extra headers sent on every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Time allowed until the response headers (and, for streams, the first event) arrive.
    #[serde(default = "default_first_byte_timeout")]
    pub first_byte_timeout_ms: u64,
    #[serde(default = "default_total_timeout")]
    pub total_timeout_ms: u64,
    /// Retries after the first attempt, on connect errors, 429 and 5xx.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    #[serde(default = "default_backoff_base")]
    pub backoff_base_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// Speak HTTP/2 without TLS negotiation (h2c). Over https, HTTP/2 is negotiated by ALPN.
    #[serde(default)]
    pub http2_prior_knowledge: bool,
    /// Whether the provider accepts `n` > 1.
    #[serde(default = "yes")]
    pub supports_n: bool,
    /// Ask streams for a usage chunk (stripped again if the client did not ask), so the log has token counts.
    #[serde(default = "yes")]
    pub request_stream_usage: bool,
    /// Idle keep-alive connections kept per host.
    #[serde(default = "default_pool_idle")]
    pub pool_max_idle_per_host: usize,
    /// PEM file of extra CA certificates to trust for this upstream (a private deployment's CA),
    /// in addition to the public web roots.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// The APIs besides chat completions this upstream serves itself (`responses` at
    /// `/responses`, `messages` at `/messages`): requests through those doors are forwarded in their
    /// own shape instead of translated to chat completions.
    #[serde(default)]
    pub native_apis: Vec<String>,
    /// `[upstreams.lora]`: how the flywheel loads adapters onto this upstream's servers (a vLLM or
    /// NIM deployment). Only needed when the defaults do not fit.
    #[serde(default)]
    pub lora: LoraPushConfig,
}

/// `[upstreams.lora]`: a target `{ upstream, adapter }` is an adapter from Flywheel's adapter store
/// served by this upstream under the adapter's name. The flywheel loads it on every server through
/// vLLM's `POST /v1/load_lora_adapter` (checking `GET /v1/models`) before traffic reaches it, and
/// unloads it (`POST /v1/unload_lora_adapter`) when no rollout needs it any more.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoraPushConfig {
    /// Each server of the deployment, by its base URL up to and including `/v1` (a load balancer
    /// in front of them reaches only one per call). Default: the upstream's `base_url`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The adapter store (`<data_dir>/adapters`) as the servers see it, when they mount the shared
    /// volume somewhere else. Default: the gateway's own path.
    #[serde(default)]
    pub adapter_dir: Option<String>,
    /// Time allowed for one load call (the server reads the adapter and may warm it up).
    #[serde(default)]
    pub load_timeout_ms: Option<u64>,
}

impl UpstreamConfig {
    /// The servers adapters are loaded on.
    pub fn lora_endpoints(&self) -> Vec<String> {
        if self.lora.endpoints.is_empty() {
            vec![self.base_url.clone()]
        } else {
            self.lora.endpoints.clone()
        }
    }
}

/// Where a request goes: an upstream provider's model (`{ upstream, model }`) or a local model
/// (`{ local }`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<String>,
    /// A LoRA adapter (`namespace/name`) from the adapter store: on the local model, or loaded on
    /// the upstream's servers and asked for by its name there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

impl TargetConfig {
    pub fn upstream(upstream: &str, model: &str) -> Self {
        Self {
            upstream: Some(upstream.into()),
            model: Some(model.into()),
            local: None,
            adapter: None,
        }
    }

    pub fn local(name: &str) -> Self {
        Self {
            upstream: None,
            model: None,
            local: Some(name.into()),
            adapter: None,
        }
    }

    /// `upstream` or `local`.
    pub fn kind(&self) -> &'static str {
        if self.local.is_some() {
            "local"
        } else {
            "upstream"
        }
    }

    /// The backend serving this target: the upstream's or the local model's name.
    pub fn backend(&self) -> &str {
        self.local
            .as_deref()
            .or(self.upstream.as_deref())
            .unwrap_or("")
    }

    /// The key of this target's backend in the gateway's backend table.
    pub fn backend_key(&self) -> BackendKey {
        match &self.local {
            Some(l) => BackendKey::Local(l.clone()),
            None => BackendKey::Upstream(self.backend().to_string()),
        }
    }

    /// The model name the backend is asked for (and that resolves to this target directly).
    pub fn model_name(&self) -> &str {
        self.adapter
            .as_deref()
            .or(self.model.as_deref())
            .or(self.local.as_deref())
            .unwrap_or("")
    }

    /// A local model with an adapter on it.
    pub fn local_adapter(name: &str, adapter: &str) -> Self {
        Self {
            adapter: Some(adapter.into()),
            ..Self::local(name)
        }
    }
}

impl RolloutConfig {
    /// The adapters from the store this rollout has an upstream serve (`{ upstream, adapter }`
    /// targets in any role), as (upstream, adapter).
    pub fn fleet_adapters(&self) -> std::collections::BTreeSet<(String, String)> {
        std::iter::once(&self.champion)
            .chain(self.canary.as_ref().map(|c| &c.target))
            .chain(self.shadow.as_ref().map(|s| &s.target))
            .chain(&self.fallbacks)
            .filter_map(|t| match (&t.upstream, &t.adapter) {
                (Some(u), Some(a)) => Some((u.clone(), a.clone())),
                _ => None,
            })
            .collect()
    }
}

/// A backend in the gateway's table: a local model or an upstream, by its configured name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendKey {
    Local(String),
    Upstream(String),
}

impl std::fmt::Display for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.local, &self.adapter) {
            (Some(l), Some(a)) => write!(f, "local:{l}+{a}"),
            (Some(l), None) => write!(f, "local:{l}"),
            (None, _) => write!(f, "{}:{}", self.backend(), self.model_name()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    pub target: TargetConfig,
    /// Share of sticky traffic sent to the canary, 0–100.
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowTargetConfig {
    pub target: TargetConfig,
    /// Share of successful primary requests mirrored to the shadow, 0–1.
    pub sample_rate: f64,
}

/// A route's rollout: who serves, who is tried, who listens in.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    pub champion: TargetConfig,
    #[serde(default)]
    pub canary: Option<CanaryConfig>,
    #[serde(default)]
    pub shadow: Option<ShadowTargetConfig>,
    /// Tried in order when the serving target fails with a connect error, timeout, 429 or 5xx.
    #[serde(default)]
    pub fallbacks: Vec<TargetConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The public model name clients ask for.
    pub name: String,
    #[serde(flatten)]
    pub rollout: RolloutConfig,
    /// Whether and how this route's traffic trains a local adapter that may take the route over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flywheel: Option<RouteFlywheelConfig>,
    /// The guardrail config (`namespace/name`, or a name in `default`) every request to this route
    /// is checked against; a request's own `guardrails.config_id` is checked in addition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guardrails: Option<String>,
}

impl RouteConfig {
    /// Whose answers are the ground truth for this route's flywheel: the configured teacher, or the
    /// route's champion when that is an upstream.
    pub fn teacher(&self) -> Option<TargetConfig> {
        let fw = self.flywheel.as_ref()?;
        fw.teacher.clone().or_else(|| {
            (self.rollout.champion.upstream.is_some()).then(|| self.rollout.champion.clone())
        })
    }
}

fn yes() -> bool {
    true
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_body_limit() -> usize {
    8 * 1024 * 1024
}
fn default_max_inflight() -> usize {
    4096
}
fn default_shutdown_grace() -> u64 {
    30
}
fn default_queue_capacity() -> usize {
    65_536
}
fn default_flush_interval() -> u64 {
    2
}
fn default_shadow_concurrency() -> usize {
    16
}
fn default_connect_timeout() -> u64 {
    5_000
}
fn default_first_byte_timeout() -> u64 {
    60_000
}
fn default_total_timeout() -> u64 {
    600_000
}
fn default_max_retries() -> u32 {
    2
}
fn default_backoff_base() -> u64 {
    100
}
fn default_backoff_max() -> u64 {
    2_000
}
fn default_pool_idle() -> usize {
    64
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        // A relative data_dir is relative to the working directory, as the README's commands assume.
        config.validate()?;
        if config.data_dir.as_os_str().is_empty() {
            config.data_dir = default_data_dir();
        }
        Ok(config)
    }

    /// The declared metric `name`.
    pub fn metric(&self, name: &str) -> Option<&MetricConfig> {
        self.metrics.iter().find(|m| m.name == name)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.server.body_limit_bytes < 1024 {
            return invalid("server.body_limit_bytes must be at least 1024".into());
        }
        if self.server.max_inflight_requests == 0 {
            return invalid("server.max_inflight_requests must be at least 1".into());
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return invalid("server.tls_cert and server.tls_key must be set together".into());
        }
        if let Some(url) = &self.store.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return invalid(format!(
                    "store.url '{url}' must start with postgres:// (SQLite is the default: leave [store] out)"
                ));
            }
            if crate::store::postgres::has_password(url) {
                return invalid(
                    "store.url must not carry a password: put it in an environment variable and name it in store.password_env (or give the whole URL in store.url_env)"
                        .into(),
                );
            }
        }
        if self.store.pool_size == 0 {
            return invalid("store.pool_size must be at least 1".into());
        }
        if self.log.queue_capacity == 0 || self.log.batch_size == Some(0) {
            return invalid("log.queue_capacity and log.batch_size must be at least 1".into());
        }
        for key in &self.auth.keys {
            let ok = key.sha256.len() == 64 && key.sha256.chars().all(|c| c.is_ascii_hexdigit());
            if !ok {
                return invalid(format!(
                    "auth key '{}': sha256 must be 64 hex characters (run `flywheel keys hash` to make one)",
                    key.name
                ));
            }
            if key.scopes.is_empty() {
                return invalid(format!("auth key '{}' has no scopes", key.name));
            }
        }
        let mut names = std::collections::HashSet::new();
        for up in &self.upstreams {
            if !names.insert(up.name.as_str()) {
                return invalid(format!("upstream '{}' is defined twice", up.name));
            }
            if !(up.base_url.starts_with("http://") || up.base_url.starts_with("https://")) {
                return invalid(format!(
                    "upstream '{}': base_url '{}' must start with http:// or https://",
                    up.name, up.base_url
                ));
            }
            if up.base_url.parse::<http::Uri>().is_err() {
                return invalid(format!(
                    "upstream '{}': base_url '{}' is not a valid URL",
                    up.name, up.base_url
                ));
            }
            if let Some(bad) = up
                .native_apis
                .iter()
                .find(|a| !["responses", "messages"].contains(&a.as_str()))
            {
                return invalid(format!(
                    "upstream '{}': native_apis lists '{bad}'; it may list responses and messages",
                    up.name
                ));
            }
            for (k, v) in &up.headers {
                if http::HeaderName::from_bytes(k.as_bytes()).is_err()
                    || http::HeaderValue::from_str(v).is_err()
                {
                    return invalid(format!("upstream '{}': header '{k}' is not valid", up.name));
                }
            }
            for e in &up.lora.endpoints {
                let http = e.starts_with("http://") || e.starts_with("https://");
                if !http || e.parse::<http::Uri>().is_err() {
                    return invalid(format!(
                        "upstream '{}': lora.endpoints entry '{e}' must be an http:// or https:// URL",
                        up.name
                    ));
                }
            }
            if up.lora.load_timeout_ms == Some(0) {
                return invalid(format!(
                    "upstream '{}': lora.load_timeout_ms must be above zero",
                    up.name
                ));
            }
            if up.total_timeout_ms == 0
                || up.first_byte_timeout_ms == 0
                || up.connect_timeout_ms == 0
            {
                return invalid(format!(
                    "upstream '{}': timeouts must be above zero",
                    up.name
                ));
            }
        }
        let mut model_names = std::collections::HashSet::new();
        for m in &self.models {
            if !model_names.insert(m.name.as_str()) {
                return invalid(format!("local model '{}' is defined twice", m.name));
            }
            let device_ok = m.device == "cpu"
                || m.device == "cuda"
                || m.device
                    .strip_prefix("cuda:")
                    .is_some_and(|n| n.parse::<usize>().is_ok());
            if !device_ok {
                return invalid(format!(
                    "local model '{}': device '{}' must be \"cpu\" or \"cuda:N\"",
                    m.name, m.device
                ));
            }
            if m.max_batch == 0 || m.context_length < 16 {
                return invalid(format!(
                    "local model '{}': max_batch must be at least 1 and context_length at least 16",
                    m.name
                ));
            }
        }
        let mut route_names = std::collections::HashSet::new();
        for route in &self.routes {
            if !route_names.insert(route.name.as_str()) {
                return invalid(format!("route '{}' is defined twice", route.name));
            }
            self.validate_rollout(&route.name, &route.rollout)?;
            if let Some(fw) = &route.flywheel {
                self.validate_route_flywheel(route, fw)?;
            }
        }
        if self.flywheel.check_interval_secs < 0.05 {
            return invalid("flywheel.check_interval_secs must be at least 0.05".into());
        }
        metrics::validate(&self.metrics)?;
        self.validate_rails()
    }

    /// Declared guardrail configs compile; a route's config is declared here or (checked at start)
    /// stored through the API.
    fn validate_rails(&self) -> Result<(), ConfigError> {
        let r = &self.rails;
        if r.timeout_ms == 0 || r.max_input_chars == 0 {
            return Err(ConfigError::Invalid(
                "rails.timeout_ms and rails.max_input_chars must be above zero".into(),
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for declared in &r.configs {
            let id = declared.id();
            crate::store::entities::check_name("guardrail config namespace", &declared.namespace)
                .and_then(|()| {
                    crate::store::entities::check_name("guardrail config", &declared.name)
                })
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if !ids.insert(id.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "guardrail config '{id}' is declared twice"
                )));
            }
            crate::rails::guardrails::compile(&id, &declared.load_data()?)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    fn validate_route_flywheel(
        &self,
        route: &RouteConfig,
        fw: &RouteFlywheelConfig,
    ) -> Result<(), ConfigError> {
        let name = &route.name;
        fw.validate(name)?;
        let metric_named = |field: &str, m: &str| {
            match self.metric(m) {
            Some(_) => Ok(()),
            None => Err(ConfigError::Invalid(format!(
                "route '{name}': flywheel.{field} names the metric '{m}', which [[metrics]] does not declare"
            ))),
        }
        };
        for g in &fw.rollout.feedback_guards {
            metric_named("rollout.feedback_guards", &g.metric)?;
            if g.margin.is_nan() || g.margin < 0.0 || g.min_samples < 2 {
                return Err(ConfigError::Invalid(format!(
                    "route '{name}': flywheel.rollout.feedback_guards '{}': margin must be at least 0 and min_samples at least 2",
                    g.metric
                )));
            }
        }
        for f in &fw.drift.feedback_floors {
            metric_named("drift.feedback_floors", &f.metric)?;
        }
        for rule in &fw.sources.feedback {
            FeedbackRule::parse(rule, &self.metrics).map_err(|e| {
                ConfigError::Invalid(format!("route '{name}': flywheel.sources.feedback {e}"))
            })?;
        }
        if !self.models.iter().any(|m| m.name == fw.student) {
            let known: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
            return Err(ConfigError::Invalid(format!(
                "route '{name}': flywheel.student '{}' is not a local model (defined: {})",
                fw.student,
                known.join(", ")
            )));
        }
        if let Some(up) = &fw.deploy {
            if !self.upstreams.iter().any(|u| &u.name == up) {
                let known: Vec<&str> = self.upstreams.iter().map(|u| u.name.as_str()).collect();
                return Err(ConfigError::Invalid(format!(
                    "route '{name}': flywheel.deploy names upstream '{up}', which is not defined (defined: {})",
                    known.join(", ")
                )));
            }
            if fw.teacher.is_none() && route.rollout.champion.upstream.as_ref() == Some(up) {
                return Err(ConfigError::Invalid(format!(
                    "route '{name}': the champion is served by '{up}', where the student is deployed, so flywheel.teacher must name whose answers are the ground truth"
                )));
            }
        }
        match route.teacher() {
            Some(t) => self.validate_target(name, "flywheel.teacher", &t),
            None => Err(ConfigError::Invalid(format!(
                "route '{name}': the champion is local, so flywheel.teacher must name whose answers are the ground truth"
            ))),
        }
    }

    /// Checks a rollout against the configured upstreams; also used for rollouts changed at runtime.
    pub fn validate_rollout(
        &self,
        route: &str,
        rollout: &RolloutConfig,
    ) -> Result<(), ConfigError> {
        let check = |t: &TargetConfig, role: &str| self.validate_target(route, role, t);
        check(&rollout.champion, "champion")?;
        if let Some(c) = &rollout.canary {
            check(&c.target, "canary")?;
            if !(0.0..=100.0).contains(&c.percent) {
                return Err(ConfigError::Invalid(format!(
                    "route '{route}': canary percent {} must be within 0–100",
                    c.percent
                )));
            }
        }
        if let Some(s) = &rollout.shadow {
            check(&s.target, "shadow")?;
            if !(0.0..=1.0).contains(&s.sample_rate) {
                return Err(ConfigError::Invalid(format!(
                    "route '{route}': shadow sample_rate {} must be within 0–1",
                    s.sample_rate
                )));
            }
        }
        for f in &rollout.fallbacks {
            check(f, "fallback")?;
        }
        Ok(())
    }

    /// Checks that a target names a defined upstream or local model, with what it needs.
    pub fn validate_target(
        &self,
        route: &str,
        role: &str,
        t: &TargetConfig,
    ) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError::Invalid(format!("route '{route}': {role} {m}")));
        match (&t.upstream, &t.local) {
            (Some(_), Some(_)) => {
                return fail("names both an upstream and a local model; pick one".into())
            }
            (None, None) => return fail("needs `upstream` and `model`, or `local`".into()),
            (None, Some(name)) => {
                if t.model.is_some() {
                    return fail(
                        "is local: drop `model` (the local model's name is its model)".into(),
                    );
                }
                if let Some(a) = &t.adapter {
                    crate::engine::lora::check_name(a).map_err(|e| {
                        ConfigError::Invalid(format!("route '{route}': {role}: {e}"))
                    })?;
                }
                if !self.models.iter().any(|m| &m.name == name) {
                    let known: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
                    return fail(format!(
                        "names local model '{name}', which is not defined (defined: {})",
                        known.join(", ")
                    ));
                }
            }
            (Some(up), None) => {
                if !self.upstreams.iter().any(|u| &u.name == up) {
                    let known: Vec<&str> = self.upstreams.iter().map(|u| u.name.as_str()).collect();
                    return fail(format!(
                        "names upstream '{up}', which is not defined (defined: {})",
                        known.join(", ")
                    ));
                }
                match &t.adapter {
                    // An adapter pushed to the upstream's servers is served under its own name.
                    Some(a) => {
                        crate::engine::lora::check_name(a).map_err(|e| {
                            ConfigError::Invalid(format!("route '{route}': {role}: {e}"))
                        })?;
                        if t.model.is_some() {
                            return fail(format!(
                                "puts adapter '{a}' on upstream '{up}', which serves it under the adapter's name: drop `model`"
                            ));
                        }
                    }
                    None if t.model.as_deref().is_none_or(str::is_empty) => {
                        return fail("needs a `model` for its upstream".into());
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// Where adapters may be loaded from.
    pub fn adapter_dirs(&self) -> Vec<PathBuf> {
        if self.adapters.allowed_dirs.is_empty() {
            vec![self.data_dir.join("adapters")]
        } else {
            self.adapters.allowed_dirs.clone()
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("flywheel.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("t.toml"),
            message: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let c = parse("").unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert!(c.log.enabled);
        assert!(c.auth.allow_loopback_without_key);
    }

    #[test]
    fn route_naming_an_unknown_upstream_is_refused_with_the_known_ones() {
        let err = parse(
            r#"
            [[upstreams]]
            name = "a"
            base_url = "http://127.0.0.1:1/v1"
            [[routes]]
            name = "m"
            champion = { upstream = "b", model = "x" }
            "#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("upstream 'b'"), "{err}");
        assert!(err.contains("defined: a"), "{err}");
    }

    #[test]
    fn canary_percent_out_of_range_is_refused() {
        let err = parse(
            r#"
            [[upstreams]]
            name = "a"
            base_url = "http://127.0.0.1:1/v1"
            [[routes]]
            name = "m"
            champion = { upstream = "a", model = "x" }
            canary = { target = { upstream = "a", model = "y" }, percent = 120.0 }
            "#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("0–100"), "{err}");
    }

    #[test]
    fn fleet_adapters_and_deploy_upstreams_are_checked() {
        let base = r#"
            [[models]]
            name = "tiny"
            path = "/models/tiny.gguf"
            [[upstreams]]
            name = "big"
            base_url = "http://127.0.0.1:3/v1"
            [[upstreams]]
            name = "vllm"
            base_url = "http://127.0.0.1:1/v1"
            [upstreams.lora]
            endpoints = ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"]
            adapter_dir = "/mnt/adapters"
        "#;
        let route = |champion: &str, canary: &str, flywheel: &str| {
            format!("{base}\n[[routes]]\nname = \"m\"\nchampion = {champion}\n{canary}\n[routes.flywheel]\nstudent = \"tiny\"\n{flywheel}\n")
        };
        let c = parse(&route(
            r#"{ upstream = "big", model = "gpt" }"#,
            r#"canary = { target = { upstream = "vllm", adapter = "flywheel/a" }, percent = 5.0 }"#,
            r#"deploy = "vllm""#,
        ))
        .unwrap();
        let up = c.upstreams.iter().find(|u| u.name == "vllm").unwrap();
        assert_eq!(up.lora_endpoints().len(), 2);
        assert_eq!(c.upstreams[0].lora_endpoints(), ["http://127.0.0.1:3/v1"]);
        let refused = |text: String, needle: &str| {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        };
        refused(
            route(
                r#"{ upstream = "big", model = "gpt" }"#,
                r#"canary = { target = { upstream = "vllm", model = "x", adapter = "flywheel/a" }, percent = 5.0 }"#,
                "",
            ),
            "drop `model`",
        );
        refused(
            route(
                r#"{ upstream = "big", model = "gpt" }"#,
                "",
                r#"deploy = "nope""#,
            ),
            "flywheel.deploy names upstream 'nope'",
        );
        refused(
            route(
                r#"{ upstream = "vllm", model = "base" }"#,
                "",
                r#"deploy = "vllm""#,
            ),
            "flywheel.teacher must name",
        );
        refused(
            format!("{base}\n").replace("http://127.0.0.1:2/v1", "ftp://127.0.0.1:2"),
            "lora.endpoints entry 'ftp://127.0.0.1:2'",
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse("listen_address = '1.2.3.4:1'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_address"), "{err}");
    }

    #[test]
    fn bad_key_hash_is_refused() {
        let err = parse(
            r#"
            [[auth.keys]]
            name = "ops"
            sha256 = "abc"
            scopes = ["admin"]
            "#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("64 hex"), "{err}");
    }
}
