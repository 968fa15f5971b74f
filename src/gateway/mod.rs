//! The request pipeline, independent of HTTP and of which door a request came through: it takes an
//! `Exchange` (the door's request translated by `wire`), validates it, resolves the route and
//! rollout arm, runs the rails, calls the backend (with fallbacks), tees the outcome into the
//! traffic log, and mirrors sampled chat-shaped traffic to a shadow target off the response path.
//! Answers go back to the door as `Reply`, whole or as a channel of stream items.

pub mod agreement;
pub mod assemble;
mod output_rails;
pub mod routing;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::backend::{Backend, BackendError, BackendReply, BackendRequest, ChunkStream};
use crate::config::{BackendKey, BlockResponse, Config, ConfigError, RolloutConfig, TargetConfig};
use crate::rails::{CheckOutcome, CheckStatus, Endpoint, Rails, RailsError, SafetyModels};
use crate::store::traffic::{TrafficLog, TrafficRecord};
use crate::wire::chat::ChatRequestInfo;
use crate::wire::error::ApiError;
use crate::wire::Api;
use assemble::Assembler;
use output_rails::{OutputCheck, StreamGuard};
use routing::{Arm, Resolution, RouteTable};

/// Who is asking, as told by headers (the body's `metadata` and `user` are read by the pipeline).
#[derive(Debug, Default)]
pub struct RequestContext {
    pub workload_id: Option<String>,
    pub client_id: Option<String>,
    pub session_id: Option<String>,
    /// The `x-episode-id` header.
    pub episode_id: Option<String>,
    /// Held until the response is complete (the server's in-flight budget).
    pub permit: Option<OwnedSemaphorePermit>,
}

/// One request as the pipeline sees it, whichever door it came through.
#[derive(Debug)]
pub struct Exchange {
    pub api: Api,
    /// The internal request: a chat-completions body for the chat-shaped doors, the door's own body
    /// for completions and embeddings.
    pub body: Map<String, Value>,
    /// The client's body as it arrived, when the door translated it (logged beside `body`).
    pub wire: Option<Value>,
    /// The request in its door's own shape, for an upstream that serves that API itself (its
    /// `native_apis`); translated `body` goes to every other target.
    pub native: Option<Map<String, Value>>,
}

impl Exchange {
    pub fn chat(body: Map<String, Value>) -> Self {
        Self {
            api: Api::Chat,
            body,
            wire: None,
            native: None,
        }
    }
}

/// One item of a streamed answer: a `chat.completion.chunk` (or `text_completion` chunk), or the
/// error that ended the stream. The stream is over when the channel closes.
#[derive(Debug)]
pub enum StreamItem {
    Chunk(Value),
    Failed(ApiError),
}

/// What the pipeline hands back to the door.
pub enum Reply {
    /// A whole answer: a chat completion (or the door's own completion or embeddings body), or,
    /// when `native`, the upstream's answer in the door's own API.
    Full {
        tags: Tags,
        body: Value,
        native: bool,
    },
    /// Chunks (or, when `native`, the door's own API's events) as they arrive.
    Stream {
        tags: Tags,
        items: mpsc::Receiver<StreamItem>,
        native: bool,
    },
}

/// What a response tells its client about how it was served: its traffic record, the rollout arm
/// and the episode it belongs to (the client's, or one minted for it).
#[derive(Debug, Clone)]
pub struct Tags {
    pub id: Uuid,
    pub arm: Arm,
    pub episode: String,
}

impl Tags {
    fn of(rec: &TrafficRecord, arm: Arm) -> Self {
        Self {
            id: rec.id,
            arm,
            episode: rec.episode_id.clone().unwrap_or_default(),
        }
    }
}

pub struct Gateway {
    config: Arc<Config>,
    routes: RouteTable,
    backends: HashMap<BackendKey, Arc<dyn Backend>>,
    /// The APIs some upstream serves itself (fixed with the backends at start-up).
    native_apis: Vec<Api>,
    log: TrafficLog,
    tasks: TaskTracker,
    shadow_permits: Arc<Semaphore>,
    rails: Rails,
    /// Backends for guardrail configs' own safety-model endpoints, made on first use.
    safety_endpoints: std::sync::Mutex<HashMap<Endpoint, Arc<dyn Backend>>>,
}

/// An episode id for a request whose client sent none.
fn new_episode_id() -> String {
    Uuid::now_v7().to_string()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        backends: HashMap<BackendKey, Arc<dyn Backend>>,
        log: TrafficLog,
    ) -> Self {
        let native_apis = [Api::Responses, Api::Messages]
            .into_iter()
            .filter(|api| backends.values().any(|b| b.speaks_natively(*api)))
            .collect();
        Self {
            routes: RouteTable::new(&config.routes),
            shadow_permits: Arc::new(Semaphore::new(config.shadow.max_concurrency)),
            rails: Rails::new(&config.rails),
            safety_endpoints: std::sync::Mutex::new(HashMap::new()),
            config,
            backends,
            native_apis,
            log,
            tasks: TaskTracker::new(),
        }
    }

    /// Whether any upstream serves `api` itself (a door then also prepares its native body).
    pub fn forwards_natively(&self, api: Api) -> bool {
        self.native_apis.contains(&api)
    }

    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn log(&self) -> &TrafficLog {
        &self.log
    }

    pub fn rails(&self) -> &Rails {
        &self.rails
    }

    /// Installs the guardrail configs declared in the config file and those stored through the API,
    /// then checks that every route's config exists. A declared config whose safety model is not
    /// served here stops the start; a stored one is installed anyway (its checks fail closed).
    pub fn install_guardrails(
        &self,
        stored: &[crate::store::guardrails::StoredGuardrailConfig],
    ) -> Result<(), String> {
        use crate::rails::guardrails::compile;
        for declared in &self.config.rails.configs {
            let data = declared.load_data().map_err(|e| e.to_string())?;
            let compiled = compile(&declared.id(), &data).map_err(|e| e.to_string())?;
            self.rails.check_models(&compiled, self)?;
            self.rails.install(compiled);
        }
        for c in stored {
            match compile(&c.id(), &c.data) {
                Ok(compiled) => {
                    if let Err(e) = self.rails.check_models(&compiled, self) {
                        tracing::warn!(error = %e, "installing the guardrail config anyway: its checks will fail closed until the model is served");
                    }
                    self.rails.install_stored(compiled, &c.updated_at);
                }
                Err(e) => {
                    tracing::error!(error = %e, "a stored guardrail config no longer compiles; requests naming it are refused")
                }
            }
        }
        for route in &self.config.routes {
            if let Some(id) = &route.guardrails {
                let id = crate::rails::guardrails::canonical_id(id);
                if self.rails.get(&id).is_none() {
                    return Err(format!(
                        "route '{}': guardrails '{id}' is neither declared under [[rails.configs]] nor stored through the API",
                        route.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Follows the guardrail configs another replica changed in the shared store: installs new and
    /// changed ones, removes deleted ones (the config file's own are never touched).
    pub fn follow_guardrails(&self, stored: &[crate::store::guardrails::StoredGuardrailConfig]) {
        use crate::rails::guardrails::compile;
        for c in stored {
            let id = c.id();
            if self.declared_guardrails(&id).is_some()
                || self.rails.stored_version(&id).as_deref() == Some(c.updated_at.as_str())
            {
                continue;
            }
            match compile(&id, &c.data) {
                Ok(compiled) => {
                    self.rails.install_stored(compiled, &c.updated_at);
                    tracing::info!(config = %id, "guardrail config followed from the shared store");
                }
                Err(e) => {
                    self.rails.remove(&id);
                    tracing::error!(error = %e, "a stored guardrail config does not compile; requests naming it are refused");
                }
            }
        }
        for id in self.rails.stored_ids() {
            if !stored.iter().any(|c| c.id() == id) {
                self.rails.remove(&id);
                tracing::info!(config = %id, "guardrail config removed, as in the shared store");
            }
        }
    }

    /// Whether a route's config file names `id` as its guardrail config.
    pub fn route_using_guardrails(&self, id: &str) -> Option<&str> {
        self.config
            .routes
            .iter()
            .find(|r| {
                r.guardrails
                    .as_deref()
                    .is_some_and(|g| crate::rails::guardrails::canonical_id(g) == id)
            })
            .map(|r| r.name.as_str())
    }

    /// The guardrail configs the config file declares.
    pub fn declared_configs(&self) -> &[crate::config::DeclaredGuardrailConfig] {
        &self.config.rails.configs
    }

    /// Whether the config file declares the guardrail config `id`.
    pub fn declared_guardrails(&self, id: &str) -> Option<&crate::config::DeclaredGuardrailConfig> {
        self.config.rails.configs.iter().find(|c| c.id() == id)
    }

    /// The guardrail configs a request is checked against: its route's (always) and the one the
    /// request names in `guardrails.config_id` (in addition, never instead).
    pub fn guardrail_ids(
        &self,
        route: Option<&str>,
        requested: Option<&Value>,
    ) -> Result<Vec<String>, ApiError> {
        let mut ids = Vec::new();
        if let Some(id) = route
            .and_then(|r| self.config.routes.iter().find(|c| c.name == r))
            .and_then(|c| c.guardrails.as_deref())
        {
            ids.push(crate::rails::guardrails::canonical_id(id));
        }
        match requested {
            None | Some(Value::Null) => {}
            Some(Value::Object(g)) => match g.get("config_id") {
                Some(Value::String(id)) if !id.trim().is_empty() => {
                    let id = crate::rails::guardrails::canonical_id(id);
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                None if g.contains_key("config") => {
                    return Err(ApiError::invalid_param(
                        "guardrails.config",
                        "Inline guardrail configs are not supported; create the config with POST /v1/guardrail/configs and pass its config_id.",
                    ))
                }
                None => {}
                Some(_) => {
                    return Err(ApiError::invalid_param(
                        "guardrails.config_id",
                        "guardrails.config_id must be a non-empty string ('namespace/name', or a name in namespace 'default').",
                    ))
                }
            },
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "guardrails",
                    "guardrails must be an object such as {\"config_id\": \"default/my-config\"}.",
                ))
            }
        }
        Ok(ids)
    }

    /// Runs the rails of `ids` over `messages`, with the reasons a check cannot run as API errors.
    pub async fn check_rails(
        &self,
        ids: &[String],
        messages: &[Value],
    ) -> Result<CheckOutcome, ApiError> {
        self.rails
            .check(ids, messages, self)
            .await
            .map_err(rails_api_error)
    }

    /// Runs the output rails of `ids` over an answer to `conversation`, masking it in place.
    pub async fn check_output_rails(
        &self,
        ids: &[String],
        conversation: &[Value],
        answer: &mut [crate::rails::Piece],
    ) -> Result<CheckOutcome, ApiError> {
        self.rails
            .check_output(ids, conversation, answer, self)
            .await
            .map_err(rails_api_error)
    }

    /// Background work (stream pumps, shadows) that shutdown must wait for.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// A local model's name resolves to that base, and a loaded adapter id (`namespace/name`) to
    /// its base with the adapter, when no route claims the name.
    fn resolve_local(&self, model: &str) -> Option<Resolution> {
        let target = if self
            .backends
            .contains_key(&BackendKey::Local(model.to_string()))
        {
            TargetConfig::local(model)
        } else {
            let base = self.backends.iter().find_map(|(k, b)| match k {
                BackendKey::Local(base) if b.serves_adapter(model) => Some(base),
                _ => None,
            })?;
            TargetConfig::local_adapter(base, model)
        };
        Some(Resolution {
            route: model.to_string(),
            arm: Arm::Direct,
            targets: vec![target],
            shadow: None,
            has_canary: false,
        })
    }

    /// What a model id is served with outside a request (evaluation): the backend of the route's
    /// champion (or of the adapter or base the id names), the adapter, and the model name to send.
    pub fn backend_for(&self, model: &str) -> Option<(Arc<dyn Backend>, Option<String>, String)> {
        let resolution = self
            .routes
            .champion_of(model)
            .or_else(|| self.resolve_local(model))?;
        let target = resolution.targets.first()?;
        let backend = self.backends.get(&target.backend_key())?.clone();
        Some((
            backend,
            target.adapter.clone(),
            target.model_name().to_string(),
        ))
    }

    /// Every model name a request may use: routes, their targets, then local models and their
    /// loaded adapters.
    pub fn model_ids(&self) -> Vec<(String, Option<String>)> {
        let mut ids = self.routes.model_ids();
        let mut keys: Vec<&BackendKey> = self
            .backends
            .keys()
            .filter(|k| matches!(k, BackendKey::Local(_)))
            .collect();
        keys.sort();
        for k in keys {
            let BackendKey::Local(base) = k else {
                continue;
            };
            if !ids.iter().any(|(m, _)| m == base) {
                ids.push((base.to_string(), None));
            }
            if let Some(b) = self.backends.get(k) {
                for a in b.adapter_ids() {
                    if !ids.iter().any(|(m, _)| *m == a) {
                        ids.push((a, None));
                    }
                }
            }
        }
        ids
    }

    /// Validates and installs a new rollout for a route (adding the route if it is new).
    pub fn set_rollout(&self, route: &str, rollout: RolloutConfig) -> Result<(), ConfigError> {
        self.config.validate_rollout(route, &rollout)?;
        self.routes.set(route, rollout);
        tracing::info!(route, "rollout changed");
        Ok(())
    }

    /// Serves one exchange: validate, resolve the route and arm, run the rails, call the backend
    /// (with fallbacks), and log the outcome. Every door comes through here.
    pub async fn serve(
        self: &Arc<Self>,
        exchange: Exchange,
        ctx: RequestContext,
    ) -> Result<Reply, ApiError> {
        let started = Instant::now();
        let Exchange {
            api,
            mut body,
            wire,
            mut native,
        } = exchange;
        let mut rec = TrafficRecord::begin(api, &body, wire, now_ms());
        rec.workload_id = ctx.workload_id.clone();
        rec.client_id = ctx.client_id.clone();
        rec.session_id = ctx.session_id.clone();
        rec.episode_id = ctx.episode_id.clone();
        let info = match validate(api, &body) {
            Ok(i) => i,
            Err(e) => return Err(self.fail(rec, body, started, e)),
        };
        let labels = &info.labels;
        rec.workload_id = rec.workload_id.or(labels.workload.clone());
        rec.client_id = rec.client_id.or(labels.client.clone());
        rec.session_id = rec.session_id.or(labels.session.clone());
        let episode = ctx.episode_id.clone().or(labels.episode.clone());
        rec.episode_id = Some(episode.clone().unwrap_or_else(new_episode_id));
        // One agent task, one session or one user stays on one arm; a request with none of them
        // (its episode minted here) is drawn on its own, so a workload label cannot put a whole
        // workload on one arm.
        let sticky = episode.or(rec.session_id.clone()).or(info.user.clone());
        let resolved = self
            .routes
            .resolve(&info.model, sticky.as_deref())
            .or_else(|| self.resolve_local(&info.model));
        let Some(resolution) = resolved else {
            let known: Vec<String> = self.model_ids().into_iter().map(|(m, _)| m).collect();
            let e = ApiError::model_not_found(&info.model, &known);
            return Err(self.fail(rec, body, started, e));
        };
        rec.route = resolution.route.clone();
        rec.arm = resolution.arm.as_str().to_string();

        let ids = match self.guardrail_ids(Some(&resolution.route), body.get("guardrails")) {
            Ok(ids) => ids,
            Err(e) => return Err(self.fail(rec, body, started, e)),
        };
        let mut output = None;
        if !ids.is_empty() {
            let messages = rails_input(api, &body);
            // A client that hangs up during a slow safety check is still recorded.
            let guard = AbandonGuard {
                log: &self.log,
                parts: Some((rec, body)),
                started,
            };
            let checked = self.check_rails(&ids, &messages).await;
            let Some((rec_back, body_back)) = guard.disarm() else {
                return Err(ApiError::internal("request state was lost"));
            };
            (rec, body) = (rec_back, body_back);
            let outcome = match checked {
                Ok(o) => o,
                Err(e) => return Err(self.fail(rec, body, started, e)),
            };
            rec.rails = Some(outcome.record());
            match outcome.status {
                CheckStatus::Passed => {
                    if let Some(masked) = outcome.masked_messages.clone() {
                        apply_masked(api, &mut body, masked);
                        // The native body still holds what was masked: only the translation goes.
                        native = None;
                    }
                    if api != Api::Embeddings && self.rails.has_output_rails(&ids) {
                        // Output rails read a chat (or text) completion: the answer comes back
                        // through the translation, never in a door's native shape.
                        native = None;
                        // What the input rails read, as they left it.
                        let conversation = outcome.masked_messages.clone().unwrap_or(messages);
                        output = Some(OutputCheck {
                            conversation,
                            ids,
                            input: outcome,
                        });
                    }
                }
                CheckStatus::Blocked => {
                    let arm = resolution.arm;
                    return self.refuse(rec, body, started, &info, arm, &outcome.categories());
                }
                CheckStatus::Error => {
                    let e = ApiError::new(
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "The content-safety check could not be completed, so the request was not served (the rails fail closed). Try again later.",
                    )
                    .with_code("rails_unavailable");
                    return Err(self.fail(rec, body, started, e));
                }
            }
        }
        let call = Call {
            info,
            resolution,
            native,
            permit: ctx.permit,
            output,
        };
        self.call_targets(rec, body, started, call).await
    }

    /// Serves one chat completion request.
    pub async fn chat(
        self: &Arc<Self>,
        body: Map<String, Value>,
        ctx: RequestContext,
    ) -> Result<Reply, ApiError> {
        self.serve(Exchange::chat(body), ctx).await
    }

    /// Tries the resolution's targets in order (fallbacks on target failures) and hands back the
    /// first answer, whole or as a stream pumped by a tracked task.
    async fn call_targets(
        self: &Arc<Self>,
        mut rec: TrafficRecord,
        mut body: Map<String, Value>,
        started: Instant,
        call: Call,
    ) -> Result<Reply, ApiError> {
        let Call {
            info,
            resolution,
            native,
            permit,
            output,
        } = call;
        let api = rec.api;
        let mut upstream_wait = Duration::ZERO;
        let mut last_error: Option<BackendError> = None;
        for (i, target) in resolution.targets.iter().enumerate() {
            let Some(backend) = self.backends.get(&target.backend_key()).cloned() else {
                last_error = Some(BackendError::Connect {
                    backend: target.backend().to_string(),
                    message: "no such upstream is configured".into(),
                });
                continue;
            };
            if api == Api::Embeddings && target.local.is_some() {
                if i + 1 < resolution.targets.len() {
                    continue;
                }
                let e = self.not_an_embedding_model(&info.model);
                return Err(self.fail(rec, body, started, e));
            }
            if info.n > 1 && !backend.supports_n() {
                if i + 1 < resolution.targets.len() {
                    continue;
                }
                let e = ApiError::invalid_param(
                    "n",
                    format!("The model '{}' can only be served with n = 1.", info.model),
                );
                return Err(self.fail(rec, body, started, e));
            }
            // The shape sent: the door's own to an upstream that serves that API, else the
            // internal one (chat completions for every chat-shaped door).
            let (shape, mut forwarded) = match &native {
                Some(n) if backend.speaks_natively(api) => (api, n.clone()),
                _ if api.is_chat_shaped() => (Api::Chat, body.clone()),
                _ => (api, body.clone()),
            };
            let is_native = shape != Api::Chat && api.is_chat_shaped();
            forwarded.remove("guardrails");
            forwarded.insert(
                "model".into(),
                Value::String(target.model_name().to_string()),
            );
            rec.attempts = i as u32 + 1;
            rec.target_kind = Some(target.kind().into());
            rec.target = Some(target.backend().to_string());
            rec.target_model = Some(target.model_name().to_string());
            rec.adapter = target.adapter.clone();
            let t0 = Instant::now();
            // If the client goes away while the backend works, this future is dropped (which
            // cancels the upstream request) and the guard records the abandoned request.
            let guard = AbandonGuard {
                log: &self.log,
                parts: Some((rec, body)),
                started,
            };
            let reply = backend
                .chat(BackendRequest {
                    api: shape,
                    body: forwarded,
                    stream: info.stream,
                    adapter: target.adapter.clone(),
                })
                .await;
            let Some((rec_back, body_back)) = guard.disarm() else {
                return Err(ApiError::internal("request state was lost"));
            };
            rec = rec_back;
            body = body_back;
            upstream_wait += t0.elapsed();
            match reply {
                Ok(BackendReply::Full(mut response)) => {
                    if let Some(check) = &output {
                        let guard = AbandonGuard {
                            log: &self.log,
                            parts: Some((rec, body)),
                            started,
                        };
                        let checked = self.check_whole_answer(check, &mut response).await;
                        let Some((rec_back, body_back)) = guard.disarm() else {
                            return Err(ApiError::internal("request state was lost"));
                        };
                        (rec, body) = (rec_back, body_back);
                        match checked {
                            Ok(outcome) => {
                                rec.rails =
                                    Some(crate::rails::record(&check.input, Some(&outcome)));
                            }
                            Err((outcome, e)) => {
                                rec.rails =
                                    Some(crate::rails::record(&check.input, Some(&outcome)));
                                rec.upstream_ms = Some(ms(upstream_wait));
                                return Err(self.fail(rec, body, started, e));
                            }
                        }
                    }
                    rec.latency_ms = ms(started.elapsed());
                    rec.ttft_ms = Some(rec.latency_ms);
                    rec.upstream_ms = Some(ms(upstream_wait));
                    rec.request = Value::Object(body);
                    rec.response = Some(loggable_response(shape, &response));
                    let tags = Tags::of(&rec, resolution.arm);
                    self.finish(rec, &resolution);
                    return Ok(Reply::Full {
                        tags,
                        body: response,
                        native: is_native,
                    });
                }
                Ok(BackendReply::Stream {
                    chunks,
                    usage_injected,
                }) => {
                    let (tx, rx) = mpsc::channel(64);
                    let tags = Tags::of(&rec, resolution.arm);
                    self.log.expect(rec.id, rec.episode_id.clone());
                    rec.request = Value::Object(body);
                    let guard = output.map(|check| StreamGuard::new(self.clone(), check, info.n));
                    let pump = StreamPump {
                        gateway: self.clone(),
                        rec,
                        resolution,
                        assembler: Assembler::for_shape(shape),
                        chunks,
                        strip_usage: usage_injected && !info.include_usage,
                        tx,
                        started,
                        upstream_wait,
                        permit,
                        guard,
                    };
                    self.tasks.spawn(pump.run());
                    return Ok(Reply::Stream {
                        tags,
                        items: rx,
                        native: is_native,
                    });
                }
                Err(e) => {
                    let next = i + 1 < resolution.targets.len();
                    if e.is_target_failure() && next {
                        metrics::counter!("flywheel_fallbacks_total", "route" => resolution.route.clone()).increment(1);
                        tracing::warn!(route = %resolution.route, target = %target, error = %e, "target failed; trying the next fallback");
                        last_error = Some(e);
                        continue;
                    }
                    rec.upstream_ms = Some(ms(upstream_wait));
                    let api = ApiError::from(&e);
                    return Err(self.fail(rec, body, started, api));
                }
            }
        }
        let e = last_error.map_or_else(
            || ApiError::internal("no target could serve the request"),
            |e| ApiError::from(&e),
        );
        Err(self.fail(rec, body, started, e))
    }

    /// The error for an embeddings request whose model is served by the local chat engine, naming
    /// the routes that could embed (those whose champion is an upstream model).
    fn not_an_embedding_model(&self, model: &str) -> ApiError {
        let upstream_routes: Vec<String> = self
            .config
            .routes
            .iter()
            .filter(|r| r.rollout.champion.local.is_none())
            .map(|r| r.name.clone())
            .collect();
        let routes = if upstream_routes.is_empty() {
            "no route of this gateway has an upstream champion; add a route to an upstream embedding model".to_string()
        } else {
            format!(
                "embeddings are served by routes to an upstream embedding model: {}",
                upstream_routes.join(", ")
            )
        };
        ApiError::invalid_param(
            "model",
            format!("The model '{model}' is a chat model on the local engine and cannot embed; {routes}."),
        )
        .with_code("model_cannot_embed")
    }

    /// Answers a request the rails blocked, without any model call: an error with code
    /// `content_filter`, or a refusal message with `finish_reason: "content_filter"`, as configured.
    fn refuse(
        &self,
        mut rec: TrafficRecord,
        body: Map<String, Value>,
        started: Instant,
        info: &ChatRequestInfo,
        arm: Arm,
        categories: &[String],
    ) -> Result<Reply, ApiError> {
        let settings = self.rails.settings();
        let text = settings.refusal_message.clone();
        if settings.block_response == BlockResponse::Error || rec.api == Api::Embeddings {
            let message = if categories.is_empty() {
                text
            } else {
                format!("{text} (categories: {})", categories.join(", "))
            };
            let e = ApiError::invalid(message).with_code("content_filter");
            return Err(self.fail(rec, body, started, e));
        }
        let refusal = Refusal {
            api: rec.api,
            id: rec.id,
            created: rec.ts_ms / 1000,
            model: &info.model,
            text: &text,
            n: info.n.max(1),
        };
        let completion = refusal.whole();
        rec.latency_ms = ms(started.elapsed());
        rec.ttft_ms = Some(rec.latency_ms);
        rec.request = Value::Object(body);
        rec.response = Some(completion.clone());
        let tags = Tags::of(&rec, arm);
        self.observe(&rec);
        self.log.record(rec);
        if !info.stream {
            return Ok(Reply::Full {
                tags,
                body: completion,
                native: false,
            });
        }
        let chunks = refusal.chunks(info.include_usage);
        let (tx, rx) = mpsc::channel(chunks.len().max(1));
        for c in chunks {
            // The channel holds every chunk; sending cannot wait.
            let _ = tx.try_send(StreamItem::Chunk(c));
        }
        Ok(Reply::Stream {
            tags,
            items: rx,
            native: false,
        })
    }

    /// Records a request its door refused before translating it (a malformed Responses or
    /// Messages body, an unknown `previous_response_id`) and hands the error back: every request
    /// that reached the gateway has its row.
    pub fn reject(
        &self,
        api: Api,
        wire: Map<String, Value>,
        ctx: &RequestContext,
        e: ApiError,
    ) -> ApiError {
        let mut rec = TrafficRecord::begin(api, &wire, None, now_ms());
        rec.workload_id = ctx.workload_id.clone();
        rec.client_id = ctx.client_id.clone();
        rec.session_id = ctx.session_id.clone();
        rec.episode_id = ctx.episode_id.clone();
        self.fail(rec, wire, Instant::now(), e)
    }

    /// Records a request that ends in an error and hands the error back.
    fn fail(
        &self,
        mut rec: TrafficRecord,
        body: Map<String, Value>,
        started: Instant,
        e: ApiError,
    ) -> ApiError {
        rec.latency_ms = ms(started.elapsed());
        rec.status = e.status.as_u16();
        rec.error = Some(e.body());
        rec.request = Value::Object(body);
        metrics::counter!("flywheel_request_errors_total", "route" => rec.route.clone(), "status" => rec.status.to_string())
            .increment(1);
        self.observe(&rec);
        let e = e.logged_as(rec.id.to_string(), rec.episode_id.clone());
        self.log.record(rec);
        e
    }

    /// Records a served request and starts its shadow, if sampled.
    fn finish(self: &Arc<Self>, rec: TrafficRecord, resolution: &Resolution) {
        self.observe(&rec);
        // Shadows compare tool calls, so only chat-shaped exchanges are mirrored.
        if rec.status == 200 && rec.api.is_chat_shaped() {
            if let (Some(shadow), Some(response)) = (&resolution.shadow, &rec.response) {
                // During a canary the mirror is the champion: requests the champion answered itself
                // (its own arm, or a canary's fallback) have nothing to compare.
                let own = resolution.has_canary && served_by(&rec, &shadow.target);
                if !own && rand::random::<f64>() < shadow.sample_rate {
                    self.start_shadow(&rec, &shadow.target, response.clone());
                }
            }
        }
        self.log.record(rec);
    }

    fn observe(&self, rec: &TrafficRecord) {
        let route = rec.route.clone();
        metrics::counter!("flywheel_requests_total", "route" => route.clone(), "arm" => rec.arm.clone(), "status" => rec.status.to_string())
            .increment(1);
        metrics::histogram!("flywheel_request_duration_seconds", "route" => route.clone(), "stream" => rec.stream.to_string())
            .record(rec.latency_ms / 1000.0);
        if let Some(t) = rec.ttft_ms {
            metrics::histogram!("flywheel_time_to_first_token_seconds", "route" => route)
                .record(t / 1000.0);
        }
        if let Some(u) = rec.upstream_ms {
            metrics::histogram!("flywheel_gateway_overhead_seconds")
                .record(((rec.latency_ms - u).max(0.0)) / 1000.0);
        }
    }

    /// Mirrors a served request to the shadow target off the response path. Bounded: when all shadow
    /// slots are busy the sample is shed and counted.
    fn start_shadow(
        self: &Arc<Self>,
        primary: &TrafficRecord,
        target: &TargetConfig,
        primary_response: Value,
    ) {
        let route = primary.route.clone();
        let Ok(permit) = self.shadow_permits.clone().try_acquire_owned() else {
            metrics::counter!("flywheel_shadow_shed_total", "route" => route).increment(1);
            return;
        };
        let Some(backend) = self.backends.get(&target.backend_key()).cloned() else {
            return;
        };
        let Value::Object(mut body) = primary.request.clone() else {
            return;
        };
        body.insert(
            "model".into(),
            Value::String(target.model_name().to_string()),
        );
        body.insert("stream".into(), Value::Bool(false));
        body.remove("stream_options");
        body.remove("guardrails");
        let mut rec = primary.clone();
        rec.id = Uuid::now_v7();
        rec.ts_ms = now_ms();
        rec.arm = Arm::Shadow.as_str().into();
        rec.shadow_of = Some(primary.id);
        rec.attempts = 1;
        rec.stream = false;
        rec.target_kind = Some(target.kind().into());
        rec.target = Some(target.backend().to_string());
        rec.target_model = Some(target.model_name().to_string());
        rec.adapter = target.adapter.clone();
        rec.response = None;
        let adapter = target.adapter.clone();
        rec.ttft_ms = None;
        let gateway = self.clone();
        self.tasks.spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            let reply = backend
                .chat(BackendRequest {
                    api: Api::Chat,
                    body,
                    stream: false,
                    adapter,
                })
                .await;
            rec.latency_ms = ms(started.elapsed());
            rec.upstream_ms = Some(rec.latency_ms);
            let outcome = match reply {
                Ok(BackendReply::Full(v)) => {
                    if let Some((names, args)) = agreement::tool_call_agreement(&primary_response, &v) {
                        rec.tool_name_agreement = Some(names);
                        rec.tool_args_agreement = Some(args);
                        metrics::counter!("flywheel_shadow_tool_agreement_total", "route" => rec.route.clone(), "names" => names.to_string(), "arguments" => args.to_string())
                            .increment(1);
                    }
                    rec.status = 200;
                    rec.response = Some(v);
                    "ok"
                }
                Ok(BackendReply::Stream { .. }) => {
                    rec.status = 502;
                    rec.error = Some(ApiError::internal("shadow backend streamed a non-streaming request").body());
                    "error"
                }
                Err(e) => {
                    let api = ApiError::from(&e);
                    rec.status = api.status.as_u16();
                    rec.error = Some(api.body());
                    "error"
                }
            };
            metrics::counter!("flywheel_shadow_requests_total", "route" => rec.route.clone(), "outcome" => outcome).increment(1);
            gateway.log.record(rec);
        });
    }
}

impl SafetyModels for Gateway {
    fn safety_backend(&self, model: &str) -> Option<(Arc<dyn Backend>, Option<String>, String)> {
        self.backend_for(model)
    }

    /// A pooled upstream client for the endpoint, made once (its key read from the environment
    /// then). No retries: the rail's own time limit and fail-closed rule govern.
    fn endpoint_backend(&self, endpoint: &Endpoint) -> Result<Arc<dyn Backend>, String> {
        let mut cache = self
            .safety_endpoints
            .lock()
            .map_err(|_| "the safety endpoint cache is unavailable".to_string())?;
        if let Some(b) = cache.get(endpoint) {
            return Ok(b.clone());
        }
        let cfg: crate::config::UpstreamConfig = serde_json::from_value(serde_json::json!({
            "name": format!("guardrails endpoint {}", endpoint.base_url),
            "base_url": endpoint.base_url,
            "api_key_env": endpoint.api_key_env,
            "max_retries": 0,
            "request_stream_usage": false,
        }))
        .map_err(|e| format!("cannot configure the endpoint {}: {e}", endpoint.base_url))?;
        let backend: Arc<dyn Backend> = Arc::new(crate::backend::upstream::Upstream::new(&cfg)?);
        cache.insert(endpoint.clone(), backend.clone());
        Ok(backend)
    }
}

/// Whether `target` answered the request `rec` records.
fn served_by(rec: &TrafficRecord, target: &TargetConfig) -> bool {
    rec.target_kind.as_deref() == Some(target.kind())
        && rec.target.as_deref() == Some(target.backend())
        && rec.target_model.as_deref() == Some(target.model_name())
        && rec.adapter == target.adapter
}

/// Holds a request's record while its backend call is awaited; dropped un-disarmed (the client hung
/// up and the handler future was dropped) it logs the request as abandoned with status 499.
struct AbandonGuard<'a> {
    log: &'a TrafficLog,
    parts: Option<(TrafficRecord, Map<String, Value>)>,
    started: Instant,
}

impl AbandonGuard<'_> {
    /// Takes the record back; always `Some`, as only this (consuming) call and `drop` take it.
    fn disarm(mut self) -> Option<(TrafficRecord, Map<String, Value>)> {
        self.parts.take()
    }
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if let Some((mut rec, body)) = self.parts.take() {
            rec.latency_ms = ms(self.started.elapsed());
            rec.status = 499;
            rec.error = Some(
                serde_json::json!({"error": {"message": "client disconnected before the response", "type": "client_closed", "param": null, "code": null}}),
            );
            rec.request = Value::Object(body);
            metrics::counter!("flywheel_requests_total", "route" => rec.route.clone(), "arm" => rec.arm.clone(), "status" => "499")
                .increment(1);
            self.log.record(rec);
        }
    }
}

/// Drives one streamed response: forwards frames to the client, reassembles the completion for the
/// log, and stops the upstream the moment the client goes away.
struct StreamPump {
    gateway: Arc<Gateway>,
    rec: TrafficRecord,
    resolution: Resolution,
    /// Rebuilds the whole answer for the log, whatever the stream's shape.
    assembler: Assembler,
    chunks: ChunkStream,
    strip_usage: bool,
    tx: mpsc::Sender<StreamItem>,
    started: Instant,
    upstream_wait: Duration,
    permit: Option<OwnedSemaphorePermit>,
    /// Output rails: chunks pass through it and are released only once checked.
    guard: Option<StreamGuard>,
}

/// How handing released chunks to the client went.
enum Delivery {
    More,
    ClientGone,
    /// Every choice has ended (output rails blocked the last one): stop reading the upstream.
    Stop,
    Failed(ApiError),
}

impl StreamPump {
    /// Sends released chunks to the client, recording them for the log as sent.
    async fn deliver(&mut self, released: output_rails::Released) -> Delivery {
        for chunk in released.chunks {
            self.assembler.push(&chunk);
            if self.rec.ttft_ms.is_none() && self.assembler.carries_output(&chunk) {
                self.rec.ttft_ms = Some(ms(self.started.elapsed()));
            }
            if self.strip_usage && assemble::is_usage_only(&chunk) {
                continue;
            }
            if self.tx.send(StreamItem::Chunk(chunk)).await.is_err() {
                return Delivery::ClientGone;
            }
        }
        if let Some(e) = released.failure {
            let _ = self.tx.send(StreamItem::Failed(e.clone())).await;
            return Delivery::Failed(e);
        }
        if released.stop {
            Delivery::Stop
        } else {
            Delivery::More
        }
    }

    async fn run(mut self) {
        let _permit = self.permit.take();
        let mut client_gone = false;
        let mut failure: Option<ApiError> = None;
        loop {
            let t0 = Instant::now();
            let next = tokio::select! {
                biased;
                _ = self.tx.closed() => { client_gone = true; break; }
                item = self.chunks.next() => item,
            };
            self.upstream_wait += t0.elapsed();
            let next_was_end = next.is_none();
            let released = match next {
                None => match self.guard.as_mut() {
                    Some(g) => g.finish().await,
                    None => break,
                },
                Some(Ok(chunk)) => match self.guard.as_mut() {
                    Some(g) => g.push(chunk).await,
                    None => output_rails::Released::pass(chunk),
                },
                Some(Err(e)) => {
                    let api = ApiError::from(&e);
                    tracing::warn!(route = %self.rec.route, error = %e, "stream failed after it began");
                    let _ = self.tx.send(StreamItem::Failed(api.clone())).await;
                    failure = Some(api);
                    break;
                }
            };
            match self.deliver(released).await {
                Delivery::More if next_was_end => break,
                Delivery::More => {}
                Delivery::ClientGone => {
                    client_gone = true;
                    break;
                }
                Delivery::Stop => break,
                Delivery::Failed(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        // Drop the upstream stream now: closing its connection cancels the provider's work.
        drop(std::mem::replace(
            &mut self.chunks,
            Box::pin(futures_util::stream::empty()),
        ));
        drop(self.tx);
        let mut rec = self.rec;
        rec.latency_ms = ms(self.started.elapsed());
        rec.upstream_ms = Some(ms(self.upstream_wait));
        if let Some(g) = &self.guard {
            rec.rails = Some(g.record());
        }
        if !self.assembler.is_empty() {
            rec.response = self.assembler.finish();
        }
        if let Some(e) = failure {
            rec.status = e.status.as_u16();
            rec.error = Some(e.body());
            metrics::counter!("flywheel_request_errors_total", "route" => rec.route.clone(), "status" => rec.status.to_string())
                .increment(1);
        } else if client_gone {
            // nginx's convention for "client closed request".
            rec.status = 499;
            rec.error = Some(
                serde_json::json!({"error": {"message": "client disconnected mid-stream", "type": "client_closed", "param": null, "code": null}}),
            );
        }
        self.gateway.finish(rec, &self.resolution);
    }
}

/// What `call_targets` needs beyond the record and the body.
struct Call {
    info: ChatRequestInfo,
    resolution: Resolution,
    native: Option<Map<String, Value>>,
    permit: Option<OwnedSemaphorePermit>,
    /// The output rails the answer must pass before the client sees it.
    output: Option<OutputCheck>,
}

/// Checks a request in its door's internal shape.
fn validate(api: Api, body: &Map<String, Value>) -> Result<ChatRequestInfo, ApiError> {
    match api {
        Api::Completions => crate::wire::completions::validate_completion_request(body),
        Api::Embeddings => crate::wire::completions::validate_embedding_request(body),
        _ => crate::wire::chat::validate_chat_request(body),
    }
}

/// A reason a check cannot run, in the API's envelope.
fn rails_api_error(e: RailsError) -> ApiError {
    match &e {
        RailsError::UnknownConfig(_) => {
            ApiError::invalid_param("guardrails.config_id", e.to_string())
                .with_code("guardrail_config_not_found")
        }
        RailsError::UnsupportedContent { message, part, .. } => ApiError::invalid_param(
            &format!("messages[{message}].content[{part}]"),
            e.to_string(),
        )
        .with_code("unsupported_content"),
        RailsError::InputTooLarge { .. } => {
            ApiError::invalid_param("messages", e.to_string()).with_code("rails_input_too_large")
        }
        RailsError::ModelUnavailable { .. } => ApiError::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            e.to_string(),
        )
        .with_code("rails_unavailable"),
    }
}

/// What the rails read: the conversation, or each prompt or embedding input as a user message.
fn rails_input(api: Api, body: &Map<String, Value>) -> Vec<Value> {
    match api {
        Api::Completions | Api::Embeddings => crate::wire::completions::texts(api, body)
            .into_iter()
            .map(|t| serde_json::json!({"role": "user", "content": t}))
            .collect(),
        _ => match body.get("messages") {
            Some(Value::Array(m)) => m.clone(),
            _ => Vec::new(),
        },
    }
}

/// Puts the rails' masked text back where it was read from.
fn apply_masked(api: Api, body: &mut Map<String, Value>, masked: Vec<Value>) {
    match api {
        Api::Completions | Api::Embeddings => {
            let texts: Vec<String> = masked
                .iter()
                .map(|m| {
                    m.get("content")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                })
                .collect();
            crate::wire::completions::replace_texts(api, body, texts);
        }
        _ => {
            body.insert("messages".into(), Value::Array(masked));
        }
    }
}

/// The response as the log keeps it: whole, except embedding vectors (only their sizes are kept);
/// a native Responses or Messages answer as the chat completion it stands for.
fn loggable_response(shape: Api, response: &Value) -> Value {
    match shape {
        Api::Embeddings => crate::wire::completions::without_vectors(response),
        Api::Responses => crate::wire::native::completion_from_response(response),
        Api::Messages => crate::wire::native::completion_from_message(response),
        Api::Chat | Api::Completions => response.clone(),
    }
}

/// The answer given in place of a model's when the rails block a request.
struct Refusal<'a> {
    api: Api,
    id: Uuid,
    created: i64,
    model: &'a str,
    text: &'a str,
    n: u64,
}

impl Refusal<'_> {
    fn whole(&self) -> Value {
        use serde_json::json;
        let usage = json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0});
        if self.api == Api::Completions {
            let choices: Vec<Value> = (0..self.n)
                .map(|i| json!({"index": i, "text": self.text, "logprobs": null, "finish_reason": "content_filter"}))
                .collect();
            return json!({"id": format!("cmpl-{}", self.id.simple()), "object": "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": usage});
        }
        let choices: Vec<Value> = (0..self.n)
            .map(|i| json!({"index": i, "message": {"role": "assistant", "content": self.text, "refusal": null}, "logprobs": null, "finish_reason": "content_filter"}))
            .collect();
        json!({"id": format!("chatcmpl-{}", self.id.simple()), "object": "chat.completion",
            "created": self.created, "model": self.model, "choices": choices, "usage": usage})
    }

    fn chunks(&self, include_usage: bool) -> Vec<Value> {
        use serde_json::json;
        let completions = self.api == Api::Completions;
        let (id, object) = if completions {
            (format!("cmpl-{}", self.id.simple()), "text_completion")
        } else {
            (
                format!("chatcmpl-{}", self.id.simple()),
                "chat.completion.chunk",
            )
        };
        let chunk = |choices: Vec<Value>| json!({"id": id, "object": object, "created": self.created, "model": self.model, "choices": choices});
        let mut out = Vec::new();
        if completions {
            out.push(chunk((0..self.n).map(|i| json!({"index": i, "text": self.text, "logprobs": null, "finish_reason": "content_filter"})).collect()));
        } else {
            out.push(chunk((0..self.n).map(|i| json!({"index": i, "delta": {"role": "assistant", "content": self.text}, "logprobs": null, "finish_reason": null})).collect()));
            out.push(chunk((0..self.n).map(|i| json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": "content_filter"})).collect()));
        }
        if include_usage {
            let mut u = chunk(Vec::new());
            u["usage"] = json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0});
            out.push(u);
        }
        out
    }
}
