//! Flywheel runs and rollouts (scope `admin`): `POST/GET /v1/flywheel/runs`,
//! `GET /v1/flywheel/runs/{id}`, `GET /v1/flywheel/routes[/{route}]` and
//! `POST /v1/flywheel/routes/{route}/{promote|rollback|pause|resume}`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::Json;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::customization::list_body;
use super::extract::{Admin, OptionalJsonObject, Query};
use super::{blocking, AppState};
use crate::flywheel::controller::{FlywheelController, FlywheelError};
use crate::wire::error::ApiError;

type Reply<T> = Result<T, ApiError>;

impl From<FlywheelError> for ApiError {
    fn from(e: FlywheelError) -> Self {
        match e {
            FlywheelError::NotFound(m) => ApiError::not_found(m),
            FlywheelError::Conflict(m) => ApiError::conflict(m),
            FlywheelError::Invalid(m) => ApiError::invalid(m),
            FlywheelError::Fleet(m) => ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", m)
                .with_code("adapter_push_failed"),
            FlywheelError::Store(e) => ApiError::internal(e.to_string()),
        }
    }
}

/// The flywheel's controller; the controller reads the database, so handlers call it through
/// [`blocking`].
fn controller(state: &AppState) -> Reply<Arc<FlywheelController>> {
    state.flywheel.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The flywheel is unavailable: it needs the traffic log and a local model (see the gateway's start-up log).",
        )
    })
}

pub async fn create_run(
    State(state): State<Arc<AppState>>,
    _: Admin,
    OptionalJsonObject(body): OptionalJsonObject,
) -> Reply<impl IntoResponse> {
    let c = controller(&state)?;
    let route = body
        .get("route")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid_param("route", "'route' (a route name) is required."))?
        .to_string();
    let trigger =
        json!({"kind": "manual", "reason": body.get("reason").cloned().unwrap_or(Value::Null)});
    let overrides = body.get("hyperparameters").cloned();
    let run = blocking(move || {
        let id = c.trigger(&route, trigger, overrides.as_ref())?;
        Ok(c.run(&id)?)
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(run)))
}

#[derive(Deserialize)]
pub struct RunFilter {
    route: Option<String>,
    limit: Option<usize>,
}

/// Runs, newest first: `route` filters, `limit` (100 by default, at most 1,000) bounds.
pub async fn list_runs(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Query(filter): Query<RunFilter>,
) -> Reply<Json<Value>> {
    let c = controller(&state)?;
    let limit = filter.limit.unwrap_or(100).min(1000);
    let runs = blocking(move || Ok(c.runs(filter.route.as_deref(), limit)?)).await?;
    Ok(list_body(
        runs.iter()
            .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
            .collect(),
    ))
}

pub async fn get_run(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Reply<Json<Value>> {
    let c = controller(&state)?;
    Ok(Json(blocking(move || Ok(c.run(&id)?)).await?))
}

pub async fn list_routes(State(state): State<Arc<AppState>>, _: Admin) -> Reply<Json<Value>> {
    let c = controller(&state)?;
    let data = blocking(move || {
        c.route_names()
            .iter()
            .map(|r| Ok(c.route_status(r)?))
            .collect::<Reply<Vec<Value>>>()
    })
    .await?;
    Ok(list_body(data))
}

pub async fn get_route(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(route): Path<String>,
) -> Reply<Json<Value>> {
    let c = controller(&state)?;
    Ok(Json(blocking(move || Ok(c.route_status(&route)?)).await?))
}

pub async fn route_action(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((route, action)): Path<(String, String)>,
    OptionalJsonObject(body): OptionalJsonObject,
) -> Reply<Json<Value>> {
    let c = controller(&state)?;
    let reason = body
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Ok(Json(
        blocking(move || Ok(c.act(&route, &action, &reason)?)).await?,
    ))
}
