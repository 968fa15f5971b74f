//! LoRA adapter registry endpoints (scope `admin`): `GET/POST /v1/adapters`,
//! `DELETE /v1/adapters/{namespace}/{name}`, and vLLM's `POST /v1/load_lora_adapter` and
//! `POST /v1/unload_lora_adapter`. A loaded adapter is servable at once as `model: "<id>"`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::Json;
use http::StatusCode;
use serde_json::{json, Value};

use super::extract::{Admin, JsonObject};
use super::AppState;
use crate::engine::lora::{self, LoraAdapter, LoraError};
use crate::engine::Engine;
use crate::wire::error::ApiError;

fn adapter_json(a: &LoraAdapter) -> Value {
    json!({
        "id": a.id,
        "object": "adapter",
        "base_model": a.base,
        "rank": a.rank,
        "alpha": a.alpha,
        "target_modules": a.target_modules,
        "path": a.path,
        "generation": a.generation,
        "bytes": a.bytes(),
    })
}

fn lora_error(e: LoraError) -> ApiError {
    match e {
        LoraError::NotLoaded(_) => {
            ApiError::not_found(e.to_string()).with_code("adapter_not_found")
        }
        LoraError::BadName(_) => ApiError::invalid_param("name", e.to_string()),
        LoraError::PathNotAllowed { .. } => {
            ApiError::invalid_param("path", e.to_string()).with_code("path_not_allowed")
        }
        LoraError::Read { .. } | LoraError::Invalid { .. } => {
            ApiError::invalid_param("path", e.to_string()).with_code("invalid_adapter")
        }
    }
}

fn pick_engine<'a>(state: &'a AppState, base: Option<&str>) -> Result<&'a Arc<Engine>, ApiError> {
    let names = || {
        state
            .engines
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match base {
        Some(b) => state.engines.iter().find(|e| e.name == b).ok_or_else(|| {
            ApiError::invalid_param(
                "base_model",
                format!("No local model '{b}' (local models: {}).", names()),
            )
        }),
        None if state.engines.len() == 1 => Ok(&state.engines[0]),
        None if state.engines.is_empty() => Err(ApiError::invalid(
            "No local model is configured; adapters run on local models.",
        )),
        None => Err(ApiError::invalid_param(
            "base_model",
            format!("Name the base model: one of {}.", names()),
        )),
    }
}

async fn load(
    state: &Arc<AppState>,
    id: String,
    path: String,
    base: Option<String>,
) -> Result<(Arc<LoraAdapter>, Vec<String>, f64), ApiError> {
    lora::check_name(&id).map_err(lora_error)?;
    let engine = pick_engine(state, base.as_deref())?.clone();
    let dir = lora::check_path(&PathBuf::from(&path), &state.adapter_dirs).map_err(lora_error)?;
    let started = Instant::now();
    let (adapter, evicted) = tokio::task::spawn_blocking(move || engine.load_adapter(&id, &dir))
        .await
        .map_err(|e| ApiError::internal(format!("adapter loading stopped: {e}")))?
        .map_err(lora_error)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(adapter = %adapter.id, base = %adapter.base, load_ms = ms, ?evicted, "adapter loaded");
    metrics::histogram!("flywheel_adapter_load_seconds").record(ms / 1000.0);
    Ok((adapter, evicted, ms))
}

fn string_field(body: &serde_json::Map<String, Value>, key: &str) -> Result<String, ApiError> {
    match body.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(ApiError::invalid_param(
            key,
            format!("Missing required string parameter: '{key}'."),
        )),
    }
}

/// `GET /v1/adapters`: the resident adapters, each with the requests it has served since it was
/// loaded and how long it has been idle.
pub async fn list(State(state): State<Arc<AppState>>, _: Admin) -> Json<Value> {
    let data: Vec<Value> = state
        .engines
        .iter()
        .flat_map(|e| e.adapters.usage())
        .map(|u| {
            let mut v = adapter_json(&u.adapter);
            v["requests_served"] = json!(u.served);
            v["idle_s"] = json!((u.idle.as_secs_f64() * 10.0).round() / 10.0);
            v
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonObject(body): JsonObject,
) -> Result<impl IntoResponse, ApiError> {
    let id = string_field(&body, "name")?;
    let path = string_field(&body, "path")?;
    let base = body
        .get("base_model")
        .and_then(Value::as_str)
        .map(str::to_string);
    let (adapter, evicted, ms) = load(&state, id, path, base).await?;
    let mut v = adapter_json(&adapter);
    v["evicted"] = json!(evicted);
    v["load_ms"] = json!(ms);
    Ok((StatusCode::CREATED, Json(v)))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let id = format!("{ns}/{name}");
    unload(&state, &id)?;
    Ok(Json(
        json!({"id": id, "object": "adapter", "deleted": true}),
    ))
}

fn unload(state: &AppState, id: &str) -> Result<(), ApiError> {
    let engine = state
        .engines
        .iter()
        .find(|e| e.adapters.contains(id))
        .ok_or_else(|| lora_error(LoraError::NotLoaded(id.to_string())))?;
    // Requests already running keep their copy; new requests no longer resolve the id.
    engine.adapters.remove(id).map_err(lora_error)?;
    tracing::info!(adapter = id, "adapter unloaded");
    Ok(())
}

/// vLLM's `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`.
pub async fn vllm_load(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonObject(body): JsonObject,
) -> Result<String, ApiError> {
    let id = string_field(&body, "lora_name")?;
    let path = string_field(&body, "lora_path")?;
    let (adapter, _, _) = load(&state, id, path, None).await?;
    Ok(format!(
        "Success: LoRA adapter '{}' added successfully.",
        adapter.id
    ))
}

/// vLLM's `POST /v1/unload_lora_adapter {"lora_name"}`.
pub async fn vllm_unload(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonObject(body): JsonObject,
) -> Result<String, ApiError> {
    let id = string_field(&body, "lora_name")?;
    unload(&state, &id)?;
    Ok(format!(
        "Success: LoRA adapter '{id}' removed successfully."
    ))
}
