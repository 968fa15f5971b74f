//! `GET /v1/models` and `GET /v1/models/{id}`: every name a request's `model` resolves to.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::extract::Inference;
use super::AppState;
use crate::wire::error::ApiError;

fn model_object(id: &str, route: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": 0,
        "owned_by": "flywheel",
        "route": route.unwrap_or(id),
    })
}

pub async fn list(State(state): State<Arc<AppState>>, _: Inference) -> Json<Value> {
    let data: Vec<Value> = state
        .gateway
        .model_ids()
        .iter()
        .map(|(id, route)| model_object(id, route.as_deref()))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    _: Inference,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let ids = state.gateway.model_ids();
    match ids.iter().find(|(m, _)| *m == id) {
        Some((m, route)) => Ok(Json(model_object(m, route.as_deref()))),
        None => {
            let known: Vec<String> = ids.into_iter().map(|(m, _)| m).collect();
            Err(ApiError::model_not_found(&id, &known))
        }
    }
}
