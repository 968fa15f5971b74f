//! NeMo Evaluator-shaped endpoints (scope `admin`): `POST/GET /v1/evaluation/jobs`,
//! `GET /v1/evaluation/jobs/{id}` and `GET /v1/evaluation/jobs/{id}/results`. The jobs themselves
//! (what a config asks for, running it, resuming after a restart) are `flywheel::evaluation`'s.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::customization::{job, job_json, job_list, runner};
use super::extract::{Admin, JsonObject};
use super::{blocking, with_db, AppState};
use crate::flywheel::evaluation::{self, EVALUATION};
use crate::store::entities;
use crate::wire::error::ApiError;

pub async fn create(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let context = runner(&state)?.context();
    let (db_path, data_dir) = (context.db.clone(), context.data_dir.clone());
    let body = Value::Object(body);
    let gateway = state.gateway.clone();
    let (dir, spec) = (data_dir.clone(), body.clone());
    let prepared = blocking(move || {
        evaluation::prepare(&gateway, &dir, &spec)
            .map_err(|e| ApiError::invalid_param(e.param, e.message))
    })
    .await?;
    let id = format!("eval-{}", uuid::Uuid::now_v7().simple());
    let job_id = id.clone();
    with_db(&state, move |c| {
        entities::insert_job(c, &job_id, EVALUATION, &body)?;
        Ok(entities::update_job(
            c,
            &job_id,
            "running",
            &json!({"message": "running"}),
            None,
        )?)
    })
    .await?;
    evaluation::launch(prepared, db_path, &data_dir, id.clone());
    Ok(Json(job_json(&job(&state, EVALUATION, id).await?)))
}

pub async fn list(State(state): State<Arc<AppState>>, _: Admin) -> Result<Json<Value>, ApiError> {
    job_list(&state, EVALUATION).await
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(job_json(&job(&state, EVALUATION, id).await?)))
}

pub async fn results(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = job(&state, EVALUATION, id.clone()).await?;
    let Some(mut r) = job.result.clone() else {
        return Err(ApiError::conflict(format!(
            "evaluation job '{id}' is {}; results come when it completes",
            job.status
        ))
        .with_code("not_ready"));
    };
    r["id"] = json!(job.id);
    r["job"] = json!(job.id);
    r["created_at"] = json!(job.created_at);
    r["updated_at"] = json!(job.updated_at);
    Ok(Json(r))
}
