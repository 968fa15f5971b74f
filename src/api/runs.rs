//! Flywheel runs and rollouts (scope `admin`): `POST/GET /v1/flywheel/runs`,
//! `GET /v1/flywheel/runs/{id}`, `GET /v1/flywheel/routes[/{route}]` and
//! `POST /v1/flywheel/routes/{route}/{promote|rollback|pause|resume}`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde_json::{json, Value};

use super::customization::list_body;
use super::{authorize, read_json_object, AppState};
use crate::config::Scope;
use crate::flywheel::controller::{FlywheelController, FlywheelError};
use crate::wire::error::ApiError;

fn flywheel_error(e: FlywheelError) -> ApiError {
    match e {
        FlywheelError::NotFound(m) => ApiError::not_found(m),
        FlywheelError::Conflict(m) => {
            ApiError::new(StatusCode::CONFLICT, "invalid_request_error", m).with_code("conflict")
        }
        FlywheelError::Invalid(m) => ApiError::invalid(m),
        FlywheelError::Store(e) => ApiError::internal(e.to_string()),
    }
}

fn controller(state: &AppState) -> Result<&Arc<FlywheelController>, ApiError> {
    state.flywheel.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The flywheel is unavailable: it needs the traffic log and a local model (see the gateway's start-up log).",
        )
    })
}

/// The body as a JSON object; an empty body is an empty object.
async fn optional_body(
    state: &AppState,
    request: Request,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let (parts, body) = request.into_parts();
    authorize(state, &parts, Scope::Admin)?;
    let empty = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() == b"0")
        || (parts.headers.get(http::header::CONTENT_LENGTH).is_none()
            && parts.headers.get(http::header::TRANSFER_ENCODING).is_none());
    if empty {
        return Ok(serde_json::Map::new());
    }
    read_json_object(&parts, body, state.body_limit).await
}

pub async fn create_run(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let run = async {
        let body = optional_body(&state, request).await?;
        let c = controller(&state)?;
        let route = body.get("route").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid_param("route", "'route' (a route name) is required.")
        })?;
        let trigger =
            json!({"kind": "manual", "reason": body.get("reason").cloned().unwrap_or(Value::Null)});
        let id = c
            .trigger(route, trigger, body.get("hyperparameters"))
            .map_err(flywheel_error)?;
        let run = c.run(&id).map_err(flywheel_error)?;
        Ok::<_, ApiError>((StatusCode::ACCEPTED, Json(run)))
    };
    run.await.into_response()
}

pub async fn list_runs(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        let c = controller(&state)?;
        let query: Vec<(String, String)> = parts
            .uri
            .query()
            .map(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
        let limit = match get("limit") {
            Some(l) => l
                .parse::<usize>()
                .map_err(|_| ApiError::invalid_param("limit", "'limit' must be a whole number."))?,
            None => 100,
        };
        let runs = c
            .runs(get("route"), limit.min(1000))
            .map_err(flywheel_error)?;
        Ok::<_, ApiError>(list_body(
            runs.iter()
                .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
                .collect(),
        ))
    };
    run().into_response()
}

pub async fn get_run(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (parts, _) = request.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        controller(&state)?
            .run(&id)
            .map(Json)
            .map_err(flywheel_error)
    };
    run().into_response()
}

pub async fn list_routes(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        let c = controller(&state)?;
        let mut data = Vec::new();
        for r in c.route_names() {
            data.push(c.route_status(&r).map_err(flywheel_error)?);
        }
        Ok::<_, ApiError>(list_body(data))
    };
    run().into_response()
}

pub async fn get_route(
    State(state): State<Arc<AppState>>,
    Path(route): Path<String>,
    request: Request,
) -> Response {
    let (parts, _) = request.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        controller(&state)?
            .route_status(&route)
            .map(Json)
            .map_err(flywheel_error)
    };
    run().into_response()
}

pub async fn route_action(
    State(state): State<Arc<AppState>>,
    Path((route, action)): Path<(String, String)>,
    request: Request,
) -> Response {
    let run = async {
        let body = optional_body(&state, request).await?;
        let c = controller(&state)?.clone();
        let reason = body
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let result = tokio::task::spawn_blocking(move || c.act(&route, &action, &reason))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        result.map(Json).map_err(flywheel_error)
    };
    run.await.into_response()
}
