//! NeMo-shaped entity and customization endpoints (scope `admin`): `POST/GET /v1/namespaces`,
//! `POST/GET/PATCH/DELETE /v1/datasets[/{namespace}/{name}]`, dataset file upload with
//! `PUT /v1/datasets/{namespace}/{name}/files/{path}` (for example `training/data.jsonl`), and
//! `POST/GET /v1/customization/jobs[/{id}[/status]]` with `POST .../{id}/cancel`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::Json;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{Admin, JsonObject, Query};
use super::{with_db, AppState};
use crate::flywheel::jobs::{JobRunner, CUSTOMIZATION};
use crate::store::entities::{self, Job};
use crate::wire::error::ApiError;

type Reply<T> = Result<T, ApiError>;

pub(super) fn runner(state: &AppState) -> Result<&Arc<JobRunner>, ApiError> {
    state.jobs.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "customization is not available: the gateway has no data directory store",
        )
    })
}

pub(super) fn list_body(data: Vec<Value>) -> Json<Value> {
    let n = data.len();
    Json(
        json!({"object": "list", "data": data, "pagination": {"page": 1, "page_size": n, "current_page_size": n, "total_pages": 1, "total_results": n}}),
    )
}

pub async fn create_namespace(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonObject(body): JsonObject,
) -> Reply<impl IntoResponse> {
    let id = body
        .get("id")
        .or_else(|| body.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid_param("id", "'id' is required"))?
        .to_string();
    let description = body
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_string);
    let ns = with_db(&state, move |c| {
        Ok(entities::create_namespace(c, &id, description.as_deref())?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(ns)))
}

pub async fn list_namespaces(
    State(state): State<Arc<AppState>>,
    _: Admin,
) -> Reply<impl IntoResponse> {
    let list = with_db(&state, |c| Ok(entities::list_namespaces(c)?)).await?;
    Ok(list_body(list))
}

pub async fn create_dataset(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonObject(body): JsonObject,
) -> Reply<impl IntoResponse> {
    let body = Value::Object(body);
    let ds = with_db(&state, move |c| Ok(entities::create_dataset(c, &body)?)).await?;
    Ok((StatusCode::CREATED, Json(ds)))
}

#[derive(Deserialize)]
pub struct DatasetFilter {
    namespace: Option<String>,
}

pub async fn list_datasets(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Query(filter): Query<DatasetFilter>,
) -> Reply<impl IntoResponse> {
    let list = with_db(&state, move |c| {
        Ok(entities::list_datasets(c, filter.namespace.as_deref())?)
    })
    .await?;
    Ok(list_body(list))
}

/// Where a dataset's files live.
pub(super) fn dataset_dir(state: &AppState, ns: &str, name: &str) -> Result<PathBuf, ApiError> {
    entities::check_name("namespace", ns)?;
    entities::check_name("dataset", name)?;
    Ok(runner(state)?
        .context()
        .data_dir
        .join("datasets")
        .join(ns)
        .join(name))
}

/// The dataset with the files it holds.
fn dataset_with_files(
    conn: &crate::store::Conn,
    dir: &std::path::Path,
    ns: &str,
    name: &str,
) -> Result<Value, ApiError> {
    let mut ds = entities::get_dataset(conn, ns, name)?;
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
    _: Admin,
    Path((ns, name)): Path<(String, String)>,
) -> Reply<impl IntoResponse> {
    let dir = dataset_dir(&state, &ns, &name)?;
    let ds = with_db(&state, move |c| dataset_with_files(c, &dir, &ns, &name)).await?;
    Ok(Json(ds))
}

pub async fn patch_dataset(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((ns, name)): Path<(String, String)>,
    JsonObject(body): JsonObject,
) -> Reply<impl IntoResponse> {
    let body = Value::Object(body);
    let ds = with_db(&state, move |c| {
        Ok(entities::patch_dataset(c, &ns, &name, &body)?)
    })
    .await?;
    Ok(Json(ds))
}

pub async fn delete_dataset(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((ns, name)): Path<(String, String)>,
) -> Reply<impl IntoResponse> {
    let dir = dataset_dir(&state, &ns, &name)?;
    let id = format!("{ns}/{name}");
    with_db(&state, move |c| {
        entities::delete_dataset(c, &ns, &name)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
        }
        Ok(())
    })
    .await?;
    Ok(Json(
        json!({"message": "Resource deleted successfully.", "id": id, "deleted_at": entities::now()}),
    ))
}

/// Stores one dataset file. `path` is `<split>/<file>.jsonl` with split training, validation or
/// testing; the body is the file. Each row is checked before anything is written.
pub async fn upload_file(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((ns, name, path)): Path<(String, String, String)>,
    body: axum::body::Body,
) -> Reply<impl IntoResponse> {
    let limit = state.body_limit.max(256 << 20);
    let bytes: Bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::too_large(limit))?;
    let dir = dataset_dir(&state, &ns, &name)?;
    let stored = with_db(&state, move |c| {
        store_dataset_file(c, &dir, &ns, &name, &path, &bytes)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(stored)))
}

/// Checks and stores one file of the dataset `ns/name` (whose directory is `dir`): `path` is
/// `<split>/<file>.jsonl` with split training, validation or testing; every row is checked before
/// anything is written, and the file appears whole or not at all.
pub(super) fn store_dataset_file(
    conn: &crate::store::Conn,
    dir: &std::path::Path,
    ns: &str,
    name: &str,
    path: &str,
    bytes: &[u8],
) -> Result<Value, ApiError> {
    entities::get_dataset(conn, ns, name)?;
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
    let dir = dir.join(split);
    std::fs::create_dir_all(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
    let tmp = dir.join(format!(".{file}.partial"));
    std::fs::write(&tmp, bytes).map_err(|e| ApiError::internal(e.to_string()))?;
    std::fs::rename(&tmp, dir.join(file)).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json!({"path": path, "records": records, "size": bytes.len()}))
}

/// Downloads one dataset file (JSONL), as stored.
pub async fn download_file(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((ns, name, path)): Path<(String, String, String)>,
) -> Reply<impl IntoResponse> {
    let dir = dataset_dir(&state, &ns, &name)?;
    let bytes = with_db(&state, move |c| {
        entities::get_dataset(c, &ns, &name)?;
        let missing = || ApiError::not_found(format!("dataset '{ns}/{name}' has no file '{path}'"));
        let (split, file) = path.split_once('/').unwrap_or(("", path.as_str()));
        if !matches!(split, "training" | "validation" | "testing")
            || file.is_empty()
            || file.contains('/')
            || file.starts_with('.')
        {
            return Err(missing());
        }
        std::fs::read(dir.join(split).join(file)).map_err(|_| missing())
    })
    .await?;
    Ok(([(http::header::CONTENT_TYPE, "application/jsonl")], bytes))
}

/// The job `id` of `kind`.
pub(super) async fn job(state: &AppState, kind: &'static str, id: String) -> Reply<Job> {
    with_db(state, move |c| Ok(entities::get_job(c, kind, &id)?)).await
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

pub async fn create_job(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonObject(body): JsonObject,
) -> Reply<impl IntoResponse> {
    let runner = runner(&state)?.clone();
    let body = Value::Object(body);
    let job = with_db(&state, move |c| {
        let id = runner.create(c, &body)?;
        Ok(entities::get_job(c, CUSTOMIZATION, &id)?)
    })
    .await?;
    Ok(Json(job_json(&job)))
}

/// Every job of `kind`, newest first.
pub(super) async fn job_list(state: &AppState, kind: &'static str) -> Reply<Json<Value>> {
    let jobs = with_db(state, move |c| Ok(entities::list_jobs(c, kind)?)).await?;
    Ok(list_body(jobs.iter().map(job_json).collect()))
}

pub async fn list_jobs(State(state): State<Arc<AppState>>, _: Admin) -> Reply<Json<Value>> {
    job_list(&state, CUSTOMIZATION).await
}

pub async fn get_job(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Reply<Json<Value>> {
    Ok(Json(job_json(&job(&state, CUSTOMIZATION, id).await?)))
}

pub async fn job_status(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Reply<Json<Value>> {
    let job = job(&state, CUSTOMIZATION, id).await?;
    let mut s = json!({"id": job.id, "created_at": job.created_at, "updated_at": job.updated_at, "status": job.status});
    if let (Some(o), Some(d)) = (s.as_object_mut(), job.status_details.as_object()) {
        for (k, v) in d {
            o.insert(k.clone(), v.clone());
        }
    }
    Ok(Json(s))
}

pub async fn cancel_job(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Reply<Json<Value>> {
    let runner = runner(&state)?.clone();
    let job = with_db(&state, move |c| {
        runner.cancel(c, &id)?;
        Ok(entities::get_job(c, CUSTOMIZATION, &id)?)
    })
    .await?;
    Ok(Json(job_json(&job)))
}
