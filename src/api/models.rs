//! `GET /v1/models` and `GET /v1/models/{id}`: every name a request's `model` resolves to.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{authorize, AppState};
use crate::config::Scope;
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

pub async fn list(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    if let Err(e) = authorize(&state, &parts, Scope::Inference) {
        return e.into_response();
    }
    let data: Vec<Value> = state
        .gateway
        .model_ids()
        .iter()
        .map(|(id, route)| model_object(id, route.as_deref()))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (parts, _) = request.into_parts();
    if let Err(e) = authorize(&state, &parts, Scope::Inference) {
        return e.into_response();
    }
    let ids = state.gateway.model_ids();
    match ids.iter().find(|(m, _)| *m == id) {
        Some((m, route)) => Json(model_object(m, route.as_deref())).into_response(),
        None => {
            let known: Vec<String> = ids.into_iter().map(|(m, _)| m).collect();
            ApiError::model_not_found(&id, &known).into_response()
        }
    }
}
