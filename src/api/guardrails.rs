//! NeMo Guardrails-shaped endpoints: guardrail configs (`POST/GET /v1/guardrail/configs`,
//! `GET/PATCH/DELETE /v1/guardrail/configs/{namespace}/{name}`, scope `admin`) and
//! `POST /v1/guardrail/checks`, which runs a config's input rails alone (scope `inference`).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde_json::{json, Value};

use super::customization::{db, entity_error};
use super::{authorize, authorized_json, AppState};
use crate::config::Scope;
use crate::rails::config::{compile, identity};
use crate::rails::CheckStatus;
use crate::store::entities::{self, check_name};
use crate::store::guardrails::{self, StoredGuardrailConfig};
use crate::wire::error::ApiError;

fn conflict(message: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "invalid_request_error", message).with_code("conflict")
}

/// Refuses changes to configs the config file owns.
fn not_declared(state: &AppState, id: &str) -> Result<(), ApiError> {
    match state.gateway.declared_guardrails(id) {
        Some(_) => Err(conflict(format!(
            "guardrail config '{id}' is declared in the config file; change it there"
        ))),
        None => Ok(()),
    }
}

/// Compiles `data` for `id` and checks that its safety models are served, so a config that cannot
/// work is refused at creation rather than at the first request.
fn compiled(
    state: &AppState,
    id: &str,
    data: &Value,
) -> Result<crate::rails::GuardrailConfig, ApiError> {
    let c = compile(id, data).map_err(|e| {
        ApiError::invalid_param("data", e.to_string()).with_code("invalid_guardrail_config")
    })?;
    let rails = state.gateway.rails();
    rails
        .check_models(&c, state.gateway.as_ref())
        .map_err(|e| {
            ApiError::invalid_param("data.models", e).with_code("invalid_guardrail_config")
        })?;
    Ok(c)
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
        .collect()
}

pub async fn create(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let run = async {
        let body = Value::Object(authorized_json(&state, req, Scope::Admin).await?);
        let (ns, name) = identity(&body).map_err(|m| ApiError::invalid_param("name", m))?;
        check_name("namespace", &ns).map_err(entity_error)?;
        check_name("guardrail config", &name).map_err(entity_error)?;
        let id = format!("{ns}/{name}");
        not_declared(&state, &id)?;
        let data = body.get("data").filter(|d| d.is_object()).ok_or_else(|| {
            ApiError::invalid_param(
                "data",
                "'data' (an object with models, rails and prompts) is required",
            )
        })?;
        let c = compiled(&state, &id, data)?;
        let description = body.get("description").and_then(Value::as_str);
        let stored = guardrails::insert(&db(&state)?, &ns, &name, description, data)
            .map_err(entity_error)?;
        state.gateway.rails().install(c);
        tracing::info!(config = %id, "guardrail config created");
        Ok::<_, ApiError>((StatusCode::CREATED, Json(stored.to_json("api"))))
    };
    run.await.into_response()
}

/// Lists configs, NeMo-style: `page` (from 1), `page_size` (default 100), `sort` (`created_at`,
/// `-created_at`, `name`, `-name`).
pub async fn list(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        let query: Vec<(String, String)> = parts
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let param = |k: &str| {
            query
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let number = |k: &str, default: usize| -> Result<usize, ApiError> {
            match param(k) {
                None => Ok(default),
                Some(v) => v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ApiError::invalid_param(k, format!("{k} must be a positive integer"))
                }),
            }
        };
        let page = number("page", 1)?;
        let page_size = number("page_size", 100)?.min(1000);
        let mut all = declared_json(&state);
        all.extend(
            guardrails::list(&db(&state)?)
                .map_err(entity_error)?
                .iter()
                .map(|c| c.to_json("api")),
        );
        let sort = param("sort").unwrap_or("created_at");
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
        Ok::<_, ApiError>(Json(json!({
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
    };
    run().into_response()
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    req: Request,
) -> Response {
    let (parts, _) = req.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        let id = format!("{ns}/{name}");
        if let Some(v) = declared_json(&state)
            .into_iter()
            .find(|v| v["id"] == id.as_str())
        {
            return Ok(Json(v));
        }
        let c = guardrails::get(&db(&state)?, &ns, &name).map_err(entity_error)?;
        Ok::<_, ApiError>(Json(c.to_json("api")))
    };
    run().into_response()
}

pub async fn patch(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    req: Request,
) -> Response {
    let run = async {
        let body = Value::Object(authorized_json(&state, req, Scope::Admin).await?);
        let id = format!("{ns}/{name}");
        not_declared(&state, &id)?;
        let conn = db(&state)?;
        guardrails::get(&conn, &ns, &name).map_err(entity_error)?;
        let data = match body.get("data") {
            None => None,
            Some(d) if d.is_object() => Some(d),
            Some(_) => return Err(ApiError::invalid_param("data", "'data' must be an object")),
        };
        let c = data.map(|d| compiled(&state, &id, d)).transpose()?;
        let description = body.get("description").and_then(Value::as_str);
        let stored =
            guardrails::update(&conn, &ns, &name, description, data).map_err(entity_error)?;
        if let Some(c) = c {
            state.gateway.rails().install(c);
        }
        tracing::info!(config = %id, "guardrail config updated");
        Ok::<_, ApiError>(Json(stored.to_json("api")))
    };
    run.await.into_response()
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    req: Request,
) -> Response {
    let (parts, _) = req.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        let id = format!("{ns}/{name}");
        not_declared(&state, &id)?;
        if let Some(route) = state.gateway.route_using_guardrails(&id) {
            return Err(conflict(format!(
                "route '{route}' checks its requests with guardrail config '{id}'; change the route in the config file first"
            )));
        }
        guardrails::delete(&db(&state)?, &ns, &name).map_err(entity_error)?;
        state.gateway.rails().remove(&id);
        tracing::info!(config = %id, "guardrail config deleted");
        Ok::<_, ApiError>(Json(
            json!({"message": "Resource deleted successfully.", "id": id, "deleted_at": entities::now()}),
        ))
    };
    run().into_response()
}

/// `POST /v1/guardrail/checks`: `{model, messages, guardrails: {config_id}}` →
/// `{status: "success"|"blocked"|"error", rails_status, guardrails_data}`. Without a config id the
/// config of the route named by `model` applies; with neither, no rails run (status `success`).
pub async fn check(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let run = async {
        let body = authorized_json(&state, req, Scope::Inference).await?;
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
        let outcome = state.gateway.check_rails(&ids, messages).await?;
        let mut data = json!({
            "config_ids": outcome.configs,
            "categories": outcome.categories(),
            "latency_ms": outcome.record()["latency_ms"],
            "log": {"activated_rails": outcome.rails.iter().map(|r| json!({"type": "input", "name": r.flow, "config_id": r.config})).collect::<Vec<_>>()},
        });
        if let Some(masked) = &outcome.masked_messages {
            data["messages"] = json!(masked);
        }
        if outcome.status == CheckStatus::Error {
            data["error"] = json!("a safety model did not answer; the check fails closed");
        }
        Ok::<_, ApiError>(Json(json!({
            "status": outcome.status.as_str(),
            "rails_status": outcome.rails_status(),
            "guardrails_data": data,
        })))
    };
    run.await.into_response()
}
