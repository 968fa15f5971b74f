//! Admin endpoints (scope `admin`): read and replace a route's rollout at runtime. The promotion
//! logic drives the same calls; a replacement is atomic and never disturbs in-flight requests.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::extract::{Admin, JsonObject};
use super::{blocking, AppState};
use crate::config::RolloutConfig;
use crate::wire::error::ApiError;

fn route_json(name: &str, r: &RolloutConfig) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("name".into(), json!(name));
    }
    v
}

pub async fn list_routes(State(state): State<Arc<AppState>>, _: Admin) -> Json<Value> {
    let routes = state.gateway.routes();
    let data: Vec<Value> = routes
        .names()
        .iter()
        .filter_map(|n| routes.get(n).map(|r| route_json(n, &r)))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn get_route(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state.gateway.routes().get(&name) {
        Some(r) => Ok(Json(route_json(&name, &r))),
        None => Err(ApiError::not_found(format!("No route named '{name}'."))),
    }
}

pub async fn put_route(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(name): Path<String>,
    JsonObject(mut body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    body.remove("name");
    let rollout: RolloutConfig = serde_json::from_value(Value::Object(body))
        .map_err(|e| ApiError::invalid(format!("Invalid rollout: {e}.")))?;
    state
        .gateway
        .config()
        .validate_rollout(&name, &rollout)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let before = state.gateway.routes().get(&name).map(|r| (*r).clone());
    // Adapters served by an upstream's servers are loaded there first.
    if let Some(flywheel) = &state.flywheel {
        let (c, r) = (flywheel.clone(), rollout.clone());
        blocking(move || Ok(c.push_rollout(&r)?)).await?;
    } else if !rollout.fleet_adapters().is_empty() {
        return Err(ApiError::invalid(
            "This rollout serves an adapter from an upstream's servers, which needs the flywheel (the traffic log and a local model) to load it there.",
        ));
    }
    state
        .gateway
        .set_rollout(&name, rollout.clone())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if let (Some(flywheel), Some(before)) = (&state.flywheel, before) {
        let (c, r) = (flywheel.clone(), rollout.clone());
        blocking(move || {
            c.retire_rollout(&before, &r);
            Ok(())
        })
        .await?;
    }
    // Replicas on one store serve the change too.
    if let Some(flywheel) = &state.flywheel {
        if let Err(e) = flywheel.share_rollout(&name, &rollout).await {
            tracing::error!(route = %name, error = %e, "the rollout changed here but could not be shared with the other replicas");
            return Err(ApiError::internal(format!(
                "The rollout changed on this replica but could not be shared with the others: {e}."
            )));
        }
    }
    Ok(Json(route_json(&name, &rollout)))
}
