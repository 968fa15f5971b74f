//! Admin endpoints (scope `admin`): read and replace a route's rollout at runtime. The promotion
//! logic drives the same calls; a replacement is atomic and never disturbs in-flight requests.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{authorize, authorized_json, AppState};
use crate::config::{RolloutConfig, Scope};
use crate::wire::error::ApiError;

fn route_json(name: &str, r: &RolloutConfig) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("name".into(), json!(name));
    }
    v
}

pub async fn list_routes(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    if let Err(e) = authorize(&state, &parts, Scope::Admin) {
        return e.into_response();
    }
    let routes = state.gateway.routes();
    let data: Vec<Value> = routes
        .names()
        .iter()
        .filter_map(|n| routes.get(n).map(|r| route_json(n, &r)))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

pub async fn get_route(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    let (parts, _) = request.into_parts();
    if let Err(e) = authorize(&state, &parts, Scope::Admin) {
        return e.into_response();
    }
    match state.gateway.routes().get(&name) {
        Some(r) => Json(route_json(&name, &r)).into_response(),
        None => ApiError::not_found(format!("No route named '{name}'.")).into_response(),
    }
}

pub async fn put_route(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    match put(state, name, request).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn put(state: Arc<AppState>, name: String, request: Request) -> Result<Response, ApiError> {
    let mut body = authorized_json(&state, request, Scope::Admin).await?;
    body.remove("name");
    let rollout: RolloutConfig = serde_json::from_value(Value::Object(body))
        .map_err(|e| ApiError::invalid(format!("Invalid rollout: {e}.")))?;
    state
        .gateway
        .set_rollout(&name, rollout.clone())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(Json(route_json(&name, &rollout)).into_response())
}
