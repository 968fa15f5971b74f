//! NeMo-shaped entity and customization endpoints (scope `admin`): `POST/GET /v1/namespaces`,
//! `POST/GET/PATCH/DELETE /v1/datasets[/{namespace}/{name}]`, dataset file upload with
//! `PUT /v1/datasets/{namespace}/{name}/files/{path}` (for example `training/data.jsonl`), and
//! `POST/GET /v1/customization/jobs[/{id}[/status]]` with `POST .../{id}/cancel`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde_json::{json, Value};

use super::{authorize, authorized_json, AppState};
use crate::config::Scope;
use crate::flywheel::jobs::{JobRunner, CUSTOMIZATION};
use crate::store::entities::{self, EntityError, Job};
use crate::wire::error::ApiError;

pub(super) fn entity_error(e: EntityError) -> ApiError {
    match e {
        EntityError::NotFound(m) => ApiError::not_found(m),
        EntityError::Conflict(m) => {
            ApiError::new(StatusCode::CONFLICT, "invalid_request_error", m).with_code("conflict")
        }
        EntityError::Invalid(m) => ApiError::invalid(m),
        EntityError::Db(e) => ApiError::internal(format!("database: {e}")),
    }
}

pub(super) fn runner(state: &AppState) -> Result<&Arc<JobRunner>, ApiError> {
    state.jobs.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "customization is not available: the gateway has no data directory store",
        )
    })
}

pub(super) fn db(state: &AppState) -> Result<rusqlite::Connection, ApiError> {
    let r = runner(state)?;
    crate::store::open(&r.context().db).map_err(|e| ApiError::internal(e.to_string()))
}

pub(super) fn list_body(data: Vec<Value>) -> Json<Value> {
    let n = data.len();
    Json(
        json!({"object": "list", "data": data, "pagination": {"page": 1, "page_size": n, "current_page_size": n, "total_pages": 1, "total_results": n}}),
    )
}

pub async fn create_namespace(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let run = async {
        let body = Value::Object(authorized_json(&state, req, Scope::Admin).await?);
        let id = body
            .get("id")
            .or_else(|| body.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid_param("id", "'id' is required"))?;
        let ns = entities::create_namespace(
            &db(&state)?,
            id,
            body.get("description").and_then(Value::as_str),
        )
        .map_err(entity_error)?;
        Ok::<_, ApiError>((StatusCode::CREATED, Json(ns)))
    };
    run.await.into_response()
}

pub async fn list_namespaces(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        let list = entities::list_namespaces(&db(&state)?).map_err(entity_error)?;
        Ok::<_, ApiError>(list_body(list))
    };
    run().into_response()
}

pub async fn create_dataset(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let run = async {
        let body = Value::Object(authorized_json(&state, req, Scope::Admin).await?);
        let ds = entities::create_dataset(&db(&state)?, &body).map_err(entity_error)?;
        Ok::<_, ApiError>((StatusCode::CREATED, Json(ds)))
    };
    run.await.into_response()
}

pub async fn list_datasets(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        let ns = parts.uri.query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("namespace=").map(str::to_string))
        });
        let list = entities::list_datasets(&db(&state)?, ns.as_deref()).map_err(entity_error)?;
        Ok::<_, ApiError>(list_body(list))
    };
    run().into_response()
}

fn dataset_dir(state: &AppState, ns: &str, name: &str) -> Result<std::path::PathBuf, ApiError> {
    entities::check_name("namespace", ns).map_err(entity_error)?;
    entities::check_name("dataset", name).map_err(entity_error)?;
    Ok(runner(state)?
        .context()
        .data_dir
        .join("datasets")
        .join(ns)
        .join(name))
}

/// The dataset with the files it holds.
fn dataset_with_files(state: &AppState, ns: &str, name: &str) -> Result<Value, ApiError> {
    let mut ds = entities::get_dataset(&db(state)?, ns, name).map_err(entity_error)?;
    let dir = dataset_dir(state, ns, name)?;
    let mut files = Vec::new();
    for split in ["training", "validation", "testing"] {
        for e in std::fs::read_dir(dir.join(split))
            .into_iter()
            .flatten()
            .flatten()
        {
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            files.push(json!({"path": format!("{split}/{}", e.file_name().to_string_lossy()), "size": size}));
        }
    }
    ds["files"] = Value::Array(files);
    Ok(ds)
}

pub async fn get_dataset(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    req: Request,
) -> Response {
    let (parts, _) = req.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        Ok::<_, ApiError>(Json(dataset_with_files(&state, &ns, &name)?))
    };
    run().into_response()
}

pub async fn patch_dataset(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    req: Request,
) -> Response {
    let run = async {
        let body = Value::Object(authorized_json(&state, req, Scope::Admin).await?);
        let ds = entities::patch_dataset(&db(&state)?, &ns, &name, &body).map_err(entity_error)?;
        Ok::<_, ApiError>(Json(ds))
    };
    run.await.into_response()
}

pub async fn delete_dataset(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    req: Request,
) -> Response {
    let (parts, _) = req.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        let dir = dataset_dir(&state, &ns, &name)?;
        entities::delete_dataset(&db(&state)?, &ns, &name).map_err(entity_error)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
        }
        Ok::<_, ApiError>(Json(
            json!({"message": "Resource deleted successfully.", "id": format!("{ns}/{name}"), "deleted_at": entities::now()}),
        ))
    };
    run().into_response()
}

/// Stores one dataset file. `path` is `<split>/<file>.jsonl` with split training, validation or
/// testing; the body is the file. Each row is checked before anything is written.
pub async fn upload_file(
    State(state): State<Arc<AppState>>,
    Path((ns, name, path)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    let run = async {
        let (parts, body) = req.into_parts();
        authorize(&state, &parts, Scope::Admin)?;
        let bytes: Bytes = axum::body::to_bytes(body, state.body_limit.max(256 << 20))
            .await
            .map_err(|_| ApiError::too_large(state.body_limit.max(256 << 20)))?;
        let stored = store_dataset_file(&state, &ns, &name, &path, &bytes)?;
        Ok::<_, ApiError>((StatusCode::CREATED, Json(stored)))
    };
    run.await.into_response()
}

/// Checks and stores one dataset file: `path` is `<split>/<file>.jsonl` with split training,
/// validation or testing; every row is checked before anything is written, and the file appears
/// whole or not at all.
pub(super) fn store_dataset_file(
    state: &AppState,
    ns: &str,
    name: &str,
    path: &str,
    bytes: &[u8],
) -> Result<Value, ApiError> {
    entities::get_dataset(&db(state)?, ns, name).map_err(entity_error)?;
    let (split, file) = path.split_once('/').unwrap_or(("", path));
    let file_ok = !file.is_empty()
        && !file.contains('/')
        && !file.starts_with('.')
        && (file.ends_with(".jsonl") || file.ends_with(".json"));
    if !matches!(split, "training" | "validation" | "testing") || !file_ok {
        return Err(ApiError::invalid_param(
            "path",
            format!("'{path}' must be training/, validation/ or testing/ followed by a .jsonl file name"),
        ));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|_| ApiError::invalid("the file is not UTF-8 text"))?;
    // Test files may also hold the expected calls beside the messages (NeMo's test rows).
    let records = if split == "testing" {
        crate::flywheel::dataset::parse_eval_items(text).map(|v| v.len())
    } else {
        crate::flywheel::dataset::parse_openai_jsonl(text).map(|v| v.len())
    }
    .map_err(|e| ApiError::invalid(format!("{path}: {e}")))?;
    let dir = dataset_dir(state, ns, name)?.join(split);
    std::fs::create_dir_all(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
    let tmp = dir.join(format!(".{file}.partial"));
    std::fs::write(&tmp, bytes).map_err(|e| ApiError::internal(e.to_string()))?;
    std::fs::rename(&tmp, dir.join(file)).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json!({"path": path, "records": records, "size": bytes.len()}))
}

/// Downloads one dataset file (JSONL), as stored.
pub async fn download_file(
    State(state): State<Arc<AppState>>,
    Path((ns, name, path)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    let (parts, _) = req.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        entities::get_dataset(&db(&state)?, &ns, &name).map_err(entity_error)?;
        let (split, file) = path.split_once('/').unwrap_or(("", path.as_str()));
        if !matches!(split, "training" | "validation" | "testing")
            || file.is_empty()
            || file.contains('/')
            || file.starts_with('.')
        {
            return Err(ApiError::not_found(format!(
                "dataset '{ns}/{name}' has no file '{path}'"
            )));
        }
        let full = dataset_dir(&state, &ns, &name)?.join(split).join(file);
        let bytes = std::fs::read(&full).map_err(|_| {
            ApiError::not_found(format!("dataset '{ns}/{name}' has no file '{path}'"))
        })?;
        Ok(([(http::header::CONTENT_TYPE, "application/jsonl")], bytes))
    };
    run().into_response()
}

/// A job of `kind` after the caller's scope is checked.
pub(super) fn authorized_job(
    state: &AppState,
    parts: &http::request::Parts,
    kind: &str,
    id: &str,
) -> Result<Job, ApiError> {
    authorize(state, parts, Scope::Admin)?;
    entities::get_job(&db(state)?, kind, id).map_err(entity_error)
}

/// A job as NeMo's services show it: the accepted request plus id, times, status and details.
pub(super) fn job_json(job: &Job) -> Value {
    let mut v = job.spec.clone();
    if let Some(o) = v.as_object_mut() {
        let resolved = o.remove("_resolved");
        o.insert("id".into(), json!(job.id));
        o.insert("created_at".into(), json!(job.created_at));
        o.insert("updated_at".into(), json!(job.updated_at));
        o.insert("status".into(), json!(job.status));
        o.insert("status_details".into(), job.status_details.clone());
        if let Some(r) = resolved {
            o.insert("output_model".into(), r["output_model"].clone());
        }
    }
    v
}

pub async fn create_job(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let run = async {
        let body = Value::Object(authorized_json(&state, req, Scope::Admin).await?);
        let runner = runner(&state)?;
        let conn = db(&state)?;
        let id = runner.create(&conn, &body).map_err(entity_error)?;
        let job = entities::get_job(&conn, CUSTOMIZATION, &id).map_err(entity_error)?;
        Ok::<_, ApiError>((StatusCode::OK, Json(job_json(&job))))
    };
    run.await.into_response()
}

/// Every job of `kind`, newest first, after the caller's scope is checked.
pub(super) fn authorized_job_list(
    state: &AppState,
    parts: &http::request::Parts,
    kind: &str,
) -> Response {
    let run = || {
        authorize(state, parts, Scope::Admin)?;
        let jobs = entities::list_jobs(&db(state)?, kind).map_err(entity_error)?;
        Ok::<_, ApiError>(list_body(jobs.iter().map(job_json).collect()))
    };
    run().into_response()
}

pub async fn list_jobs(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    authorized_job_list(&state, &parts, CUSTOMIZATION)
}

pub async fn get_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let (parts, _) = req.into_parts();
    authorized_job(&state, &parts, CUSTOMIZATION, &id)
        .map(|job| Json(job_json(&job)))
        .into_response()
}

pub async fn job_status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let (parts, _) = req.into_parts();
    let run = || {
        let job = authorized_job(&state, &parts, CUSTOMIZATION, &id)?;
        let mut s = json!({"id": job.id, "created_at": job.created_at, "updated_at": job.updated_at, "status": job.status});
        if let (Some(o), Some(d)) = (s.as_object_mut(), job.status_details.as_object()) {
            for (k, v) in d {
                o.insert(k.clone(), v.clone());
            }
        }
        Ok::<_, ApiError>(Json(s))
    };
    run().into_response()
}

pub async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let (parts, _) = req.into_parts();
    let run = || {
        authorize(&state, &parts, Scope::Admin)?;
        let conn = db(&state)?;
        runner(&state)?.cancel(&conn, &id).map_err(entity_error)?;
        let job = entities::get_job(&conn, CUSTOMIZATION, &id).map_err(entity_error)?;
        Ok::<_, ApiError>(Json(job_json(&job)))
    };
    run().into_response()
}
