//! NeMo Guardrails-shaped endpoints: guardrail configs (`POST/GET /v1/guardrail/configs`,
//! `GET/PATCH/DELETE /v1/guardrail/configs/{namespace}/{name}`, scope `admin`) and
//! `POST /v1/guardrail/checks`, which runs a config's rails alone (scope `inference`): its input
//! rails on the user's messages and, when the conversation ends with an assistant message, its
//! output rails on that answer.
//!
//! Configs are written only here, with admin scope, or in the config file: a safety model's
//! `parameters.base_url` is never read from an inference request. A config whose safety model no
//! route serves yet is accepted and returned with `warnings` naming it; checks against it answer 503
//! `rails_unavailable` until a route, a local model or the config's own endpoint serves it.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::Json;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{Admin, Inference, JsonObject, Query};
use super::{with_db, AppState};
use crate::rails::guardrails::{compile, identity};
use crate::rails::{AnswerText, CheckOutcome, CheckStatus, Stage};
use crate::store::entities::{self, check_name};
use crate::store::guardrails::{self, StoredGuardrailConfig};
use crate::wire::error::ApiError;

type Reply<T> = Result<T, ApiError>;

/// Refuses changes to configs the config file owns.
fn not_declared(state: &AppState, id: &str) -> Result<(), ApiError> {
    match state.gateway.declared_guardrails(id) {
        Some(_) => Err(ApiError::conflict(format!(
            "guardrail config '{id}' is declared in the config file; change it there"
        ))),
        None => Ok(()),
    }
}

/// Compiles `data` for `id`: an invalid config (unknown flow, missing prompt, bad parser or
/// endpoint) is refused at creation, with the field named. Whether its safety models are served is
/// not a reason to refuse it: that can change without a restart, and `warnings` says so.
fn compiled(id: &str, data: &Value) -> Result<crate::rails::GuardrailConfig, ApiError> {
    compile(id, data).map_err(|e| {
        ApiError::invalid_param("data", e.to_string()).with_code("invalid_guardrail_config")
    })
}

/// A config in the API's shape with its current `warnings`: safety models nothing serves yet, and
/// settings read differently from NeMo (or why a stored config no longer compiles).
fn with_warnings(state: &AppState, mut v: Value) -> Value {
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let warnings: Vec<String> = match compile(&id, &v["data"]) {
        Ok(c) => state.gateway.rails().warnings(&c, state.gateway.as_ref()),
        Err(e) => vec![format!("{e}; requests naming it are refused")],
    };
    v["warnings"] = json!(warnings);
    v
}

/// Tells replicas sharing this store that the configs changed (they also re-read them every few
/// seconds); nothing to do on a store of one's own.
async fn announce(state: &AppState) {
    if let Some(flywheel) = &state.flywheel {
        if let Err(e) = flywheel.announce_guardrails().await {
            tracing::warn!(error = %e, "cannot tell the other replicas of the guardrail change; they see it within seconds");
        }
    }
}

/// The config file's declared configs, in the API's shape.
fn declared_json(state: &AppState) -> Vec<Value> {
    state
        .gateway
        .declared_configs()
        .iter()
        .map(|d| {
            let data = d.load_data().unwrap_or(Value::Null);
            StoredGuardrailConfig {
                namespace: d.namespace.clone(),
                name: d.name.clone(),
                description: d.description.clone(),
                data,
                created_at: String::new(),
                updated_at: String::new(),
            }
            .to_json("config")
        })
        .map(|v| with_warnings(state, v))
        .collect()
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonObject(body): JsonObject,
) -> Reply<impl IntoResponse> {
    let body = Value::Object(body);
    let (ns, name) = identity(&body).map_err(|m| ApiError::invalid_param("name", m))?;
    check_name("namespace", &ns)?;
    check_name("guardrail config", &name)?;
    let id = format!("{ns}/{name}");
    not_declared(&state, &id)?;
    let data = body
        .get("data")
        .filter(|d| d.is_object())
        .cloned()
        .ok_or_else(|| {
            ApiError::invalid_param(
                "data",
                "'data' (an object with models, rails and prompts) is required",
            )
        })?;
    let c = compiled(&id, &data)?;
    let description = body
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_string);
    let stored = with_db(&state, move |conn| {
        Ok(guardrails::insert(
            conn,
            &ns,
            &name,
            description.as_deref(),
            &data,
        )?)
    })
    .await?;
    let warnings = state.gateway.rails().warnings(&c, state.gateway.as_ref());
    state.gateway.rails().install_stored(c, &stored.updated_at);
    announce(&state).await;
    if warnings.is_empty() {
        tracing::info!(config = %id, "guardrail config created");
    } else {
        tracing::warn!(config = %id, warnings = ?warnings, "guardrail config created with warnings");
    }
    let mut v = stored.to_json("api");
    v["warnings"] = json!(warnings);
    Ok((StatusCode::CREATED, Json(v)))
}

#[derive(Deserialize)]
pub struct ListQuery {
    page: Option<usize>,
    page_size: Option<usize>,
    sort: Option<String>,
}

fn positive(name: &str, value: Option<usize>, default: usize) -> Reply<usize> {
    match value {
        None => Ok(default),
        Some(0) => Err(ApiError::invalid_param(
            name,
            format!("{name} must be a positive integer"),
        )),
        Some(n) => Ok(n),
    }
}

/// Lists configs, NeMo-style: `page` (from 1), `page_size` (default 100), `sort` (`created_at`,
/// `-created_at`, `name`, `-name`).
pub async fn list(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Query(query): Query<ListQuery>,
) -> Reply<Json<Value>> {
    let page = positive("page", query.page, 1)?;
    let page_size = positive("page_size", query.page_size, 100)?.min(1000);
    let sort = query.sort.as_deref().unwrap_or("created_at");
    let (field, descending) = match sort.strip_prefix('-') {
        Some(f) => (f, true),
        None => (sort, false),
    };
    if !matches!(field, "created_at" | "updated_at" | "name" | "namespace") {
        return Err(ApiError::invalid_param(
            "sort",
            "sort must be one of created_at, updated_at, name, namespace (prefix '-' to reverse)",
        ));
    }
    let mut all = declared_json(&state);
    let stored = with_db(&state, |c| Ok(guardrails::list(c)?)).await?;
    all.extend(
        stored
            .iter()
            .map(|c| with_warnings(&state, c.to_json("api"))),
    );
    all.sort_by(|a, b| {
        let key = |v: &Value| v[field].as_str().unwrap_or("").to_string();
        key(a).cmp(&key(b))
    });
    if descending {
        all.reverse();
    }
    let total = all.len();
    let data: Vec<Value> = all
        .into_iter()
        .skip((page - 1) * page_size)
        .take(page_size)
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "pagination": {
            "page": page,
            "page_size": page_size,
            "current_page_size": data.len(),
            "total_pages": total.div_ceil(page_size),
            "total_results": total,
        },
        "sort": sort,
    })))
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((ns, name)): Path<(String, String)>,
) -> Reply<Json<Value>> {
    let id = format!("{ns}/{name}");
    if let Some(v) = declared_json(&state)
        .into_iter()
        .find(|v| v["id"] == id.as_str())
    {
        return Ok(Json(v));
    }
    let c = with_db(&state, move |c| Ok(guardrails::get(c, &ns, &name)?)).await?;
    Ok(Json(with_warnings(&state, c.to_json("api"))))
}

pub async fn patch(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((ns, name)): Path<(String, String)>,
    JsonObject(body): JsonObject,
) -> Reply<Json<Value>> {
    let id = format!("{ns}/{name}");
    not_declared(&state, &id)?;
    let data = match body.get("data") {
        None => None,
        Some(d) if d.is_object() => Some(d.clone()),
        Some(_) => return Err(ApiError::invalid_param("data", "'data' must be an object")),
    };
    let (get_ns, get_name) = (ns.clone(), name.clone());
    with_db(&state, move |c| Ok(guardrails::get(c, &get_ns, &get_name)?)).await?;
    let c = data.as_ref().map(|d| compiled(&id, d)).transpose()?;
    let description = body
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_string);
    let stored = with_db(&state, move |c| {
        Ok(guardrails::update(
            c,
            &ns,
            &name,
            description.as_deref(),
            data.as_ref(),
        )?)
    })
    .await?;
    if let Some(c) = c {
        state.gateway.rails().install_stored(c, &stored.updated_at);
    }
    announce(&state).await;
    tracing::info!(config = %id, "guardrail config updated");
    Ok(Json(with_warnings(&state, stored.to_json("api"))))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((ns, name)): Path<(String, String)>,
) -> Reply<Json<Value>> {
    let id = format!("{ns}/{name}");
    not_declared(&state, &id)?;
    if let Some(route) = state.gateway.route_using_guardrails(&id) {
        return Err(ApiError::conflict(format!(
            "route '{route}' checks its requests with guardrail config '{id}'; change the route in the config file first"
        )));
    }
    with_db(&state, move |c| Ok(guardrails::delete(c, &ns, &name)?)).await?;
    state.gateway.rails().remove(&id);
    announce(&state).await;
    tracing::info!(config = %id, "guardrail config deleted");
    Ok(Json(
        json!({"message": "Resource deleted successfully.", "id": id, "deleted_at": entities::now()}),
    ))
}

/// `POST /v1/guardrail/checks`: `{model, messages, guardrails: {config_id}}` →
/// `{status: "success"|"blocked"|"error", rails_status, guardrails_data}`. Without a config id the
/// config of the route named by `model` applies; with neither, no rails run (status `success`).
/// Input rails read the user messages; when the last message is the assistant's, output rails read
/// it (text and tool-call arguments) too. A config whose safety model is not served answers 503
/// `rails_unavailable`.
pub async fn check(
    State(state): State<Arc<AppState>>,
    _: Inference,
    JsonObject(body): JsonObject,
) -> Reply<Json<Value>> {
    let messages = match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        _ => {
            return Err(ApiError::invalid_param(
                "messages",
                "messages must be a non-empty array of chat messages",
            ))
        }
    };
    for (i, m) in messages.iter().enumerate() {
        if m.get("role").and_then(Value::as_str).is_none() {
            return Err(ApiError::invalid_param(
                &format!("messages[{i}]"),
                format!("messages[{i}] must be an object with a string 'role'"),
            ));
        }
    }
    let model = body.get("model").and_then(Value::as_str);
    let ids = state.gateway.guardrail_ids(model, body.get("guardrails"))?;
    let input = state.gateway.check_rails(&ids, messages).await?;
    let output = match answer_of(messages) {
        Some(mut answer)
            if input.status == CheckStatus::Passed
                && state.gateway.rails().has_output_rails(&ids) =>
        {
            let conversation = input.masked_messages.as_deref().unwrap_or(messages);
            let before = &conversation[..conversation.len() - 1];
            let outcome = state
                .gateway
                .check_output_rails(&ids, before, &mut answer.pieces)
                .await?;
            Some((outcome, answer))
        }
        _ => None,
    };
    Ok(Json(check_reply(&input, output.as_ref(), messages)))
}

/// The answer a check request ends with (its last message, when the assistant's).
fn answer_of(messages: &[Value]) -> Option<AnswerText> {
    let last = messages.last()?;
    if last.get("role").and_then(Value::as_str) != Some("assistant") {
        return None;
    }
    Some(AnswerText::read(last, false)).filter(|a| !a.is_empty())
}

/// The check's answer in NeMo's shape, both stages' verdicts summed.
fn check_reply(
    input: &CheckOutcome,
    output: Option<&(CheckOutcome, AnswerText)>,
    messages: &[Value],
) -> Value {
    let record = crate::rails::record(input, output.map(|(o, _)| o));
    let stages = std::iter::once(input).chain(output.map(|(o, _)| o));
    let mut rails_status = serde_json::Map::new();
    let mut activated = Vec::new();
    for o in stages {
        o.add_rails_status(&mut rails_status);
        let kind = if o.stage == Stage::Input {
            "input"
        } else {
            "output"
        };
        activated.extend(
            o.rails
                .iter()
                .map(|r| json!({"type": kind, "name": r.flow, "config_id": r.config})),
        );
    }
    let status = record["status"].clone();
    let mut data = json!({
        "config_ids": input.configs,
        "categories": record["categories"],
        "latency_ms": record["latency_ms"],
        "log": {"activated_rails": activated},
    });
    let mut masked = input.masked_messages.clone();
    if let Some((o, answer)) = output.filter(|(o, _)| o.masked) {
        let mut all = masked.unwrap_or_else(|| messages.to_vec());
        if let Some(last) = all.last_mut() {
            answer.write_into(last);
        }
        masked = Some(all);
        data["output_masked"] = json!(o.masked);
    }
    if let Some(m) = masked {
        data["messages"] = json!(m);
    }
    if status == "error" {
        data["error"] = json!("a safety model did not answer; the check fails closed");
    }
    json!({
        "status": status,
        "rails_status": Value::Object(rails_status),
        "guardrails_data": data,
    })
}
