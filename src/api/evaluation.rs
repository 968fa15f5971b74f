//! NeMo Evaluator-shaped endpoints (scope `admin`): `POST/GET /v1/evaluation/jobs`,
//! `GET /v1/evaluation/jobs/{id}` and `GET /v1/evaluation/jobs/{id}/results`. The jobs themselves
//! (what a config asks for, running it, resuming after a restart) are `flywheel::evaluation`'s.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde_json::{json, Value};

use super::customization::{self, authorized_job, entity_error as entity, job_json};
use super::{authorized_json, AppState};
use crate::config::Scope;
use crate::flywheel::evaluation::{self, JobError, EVALUATION};
use crate::store::entities;
use crate::wire::error::ApiError;

fn invalid(e: JobError) -> ApiError {
    ApiError::invalid_param(e.param, e.message)
}

/// A connection and the data directory.
fn db(state: &AppState) -> Result<(rusqlite::Connection, std::path::PathBuf), ApiError> {
    Ok((
        customization::db(state)?,
        customization::runner(state)?.context().data_dir.clone(),
    ))
}

pub async fn create(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let run = async {
        let body = Value::Object(authorized_json(&state, req, Scope::Admin).await?);
        let (conn, data_dir) = db(&state)?;
        let prepared = evaluation::prepare(&state.gateway, &data_dir, &body).map_err(invalid)?;
        let id = format!("eval-{}", uuid::Uuid::now_v7().simple());
        entities::insert_job(&conn, &id, EVALUATION, &body).map_err(entity)?;
        entities::update_job(&conn, &id, "running", &json!({"message": "running"}), None)
            .map_err(entity)?;
        let db_path = customization::runner(&state)?.context().db.clone();
        evaluation::launch(prepared, db_path, &data_dir, id.clone());
        let job = entities::get_job(&conn, EVALUATION, &id).map_err(entity)?;
        Ok::<_, ApiError>((StatusCode::OK, Json(job_json(&job))))
    };
    run.await.into_response()
}

pub async fn list(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    customization::authorized_job_list(&state, &parts, EVALUATION)
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let (parts, _) = req.into_parts();
    authorized_job(&state, &parts, EVALUATION, &id)
        .map(|job| Json(job_json(&job)))
        .into_response()
}

pub async fn results(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let (parts, _) = req.into_parts();
    let run = || {
        let job = authorized_job(&state, &parts, EVALUATION, &id)?;
        let Some(mut r) = job.result.clone() else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                format!(
                    "evaluation job '{id}' is {}; results come when it completes",
                    job.status
                ),
            )
            .with_code("not_ready"));
        };
        r["id"] = json!(job.id);
        r["job"] = json!(job.id);
        r["created_at"] = json!(job.created_at);
        r["updated_at"] = json!(job.updated_at);
        Ok(Json(r))
    };
    run().into_response()
}
