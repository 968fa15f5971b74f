//! The slice of the Hugging Face Hub API that NeMo Data Store serves at `/v1/hf`, so the
//! `huggingface_hub` client of NVIDIA's notebooks (`HfApi(endpoint=<gateway>/v1/hf)`) creates
//! dataset repos and uploads files into the entity store: `POST /v1/hf/api/repos/create`,
//! `POST /v1/hf/api/datasets/{ns}/{name}/preupload/{revision}` and
//! `POST /v1/hf/api/datasets/{ns}/{name}/commit/{revision}` (NDJSON, files inline as base64; every
//! file is declared "regular", so no LFS or Xet transfer is asked for). Each file goes through the
//! same checks as `PUT /v1/datasets/{ns}/{name}/files/{path}`; a commit is applied only when all its
//! files pass. Scope `admin`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use http::StatusCode;
use serde_json::{json, Value};

use super::customization::{dataset_dir, store_dataset_file};
use super::extract::{Admin, JsonObject};
use super::{with_db, AppState};
use crate::store::entities::{self, EntityError};
use crate::wire::error::ApiError;

/// `{name, organization, type, private}` → a dataset `organization/name` (namespace created if
/// needed); 409 when it exists, which `create_repo(exist_ok=True)` accepts.
pub async fn create_repo(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonObject(body): JsonObject,
) -> Response {
    let kind = body.get("type").and_then(Value::as_str).unwrap_or("model");
    if kind != "dataset" {
        return ApiError::invalid_param(
            "type",
            format!("only dataset repos are stored here, not '{kind}'"),
        )
        .into_response();
    }
    let Some(name) = body.get("name").and_then(Value::as_str) else {
        return ApiError::invalid_param("name", "'name' is required").into_response();
    };
    let (ns, name) = match (
        body.get("organization").and_then(Value::as_str),
        name.split_once('/'),
    ) {
        (Some(org), _) => (org.to_string(), name.to_string()),
        (None, Some((o, n))) => (o.to_string(), n.to_string()),
        (None, None) => ("default".to_string(), name.to_string()),
    };
    let url = format!("datasets/{ns}/{name}");
    let dataset = json!({"namespace": ns, "name": name});
    let repo = format!("{ns}/{name}");
    let created = with_db(&state, move |c| {
        if ns != "default" {
            match entities::create_namespace(c, &ns, None) {
                Ok(_) | Err(EntityError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(entities::create_dataset(c, &dataset)?)
    })
    .await;
    match created {
        Ok(_) => Json(json!({"url": url, "name": repo})).into_response(),
        // The Hub's answer for an existing repo, which `create_repo(exist_ok=True)` accepts.
        Err(e) if e.status == StatusCode::CONFLICT => (
            StatusCode::CONFLICT,
            Json(json!({"error": "You already created this dataset repo", "url": url})),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Every file is uploaded inline with the commit.
pub async fn preupload(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((ns, name, _revision)): Path<(String, String, String)>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    with_db(&state, move |c| Ok(entities::get_dataset(c, &ns, &name)?)).await?;
    let files: Vec<Value> = body
        .get("files")
        .and_then(Value::as_array)
        .map(|fs| {
            fs.iter()
                .map(|f| json!({"path": f.get("path").cloned().unwrap_or(Value::Null), "uploadMode": "regular", "shouldIgnore": false}))
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(json!({"files": files})))
}

/// A commit's summary and its files (path, bytes), read from NDJSON lines
/// `{"key": "header" | "file" | ..., "value": {...}}`; files carry `path`, `content` and
/// `encoding: "base64"`.
type Commit = (String, Vec<(String, Vec<u8>)>);

fn parse_commit(text: &str) -> Result<Commit, ApiError> {
    let mut files = Vec::new();
    let mut summary = String::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = |what: String| ApiError::invalid(format!("commit line {}: {what}", i + 1));
        let v: Value = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        match v.get("key").and_then(Value::as_str) {
            Some("header") => {
                summary = v
                    .pointer("/value/summary")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
            }
            Some("file") => {
                let path = v
                    .pointer("/value/path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| at("a file without a path".into()))?;
                let content = v
                    .pointer("/value/content")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let data = match v.pointer("/value/encoding").and_then(Value::as_str) {
                    Some("base64") => base64::engine::general_purpose::STANDARD
                        .decode(content)
                        .map_err(|e| ApiError::invalid(format!("{path}: not base64 ({e})")))?,
                    _ => content.as_bytes().to_vec(),
                };
                files.push((path.to_string(), data));
            }
            Some(other) => {
                return Err(at(format!(
                    "'{other}' operations are not supported (upload files inline)"
                )))
            }
            None => return Err(at("no 'key'".into())),
        }
    }
    Ok((summary, files))
}

/// Checks every file of a commit before any is written: a commit is applied whole or not at all.
fn check_files(files: &[(String, Vec<u8>)]) -> Result<(), ApiError> {
    for (path, data) in files {
        let (split, _) = path.split_once('/').unwrap_or(("", path));
        let text = std::str::from_utf8(data)
            .map_err(|_| ApiError::invalid(format!("{path}: not UTF-8 text")))?;
        let checked = if split == "testing" {
            crate::flywheel::dataset::parse_eval_items(text).map(|_| ())
        } else {
            crate::flywheel::dataset::parse_openai_jsonl(text).map(|_| ())
        };
        checked.map_err(|e| ApiError::invalid(format!("{path}: {e}")))?;
    }
    Ok(())
}

/// Applies a commit (see [`parse_commit`]) to the dataset `ns/name`.
pub async fn commit(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((ns, name, revision)): Path<(String, String, String)>,
    body: axum::body::Body,
) -> Result<Json<Value>, ApiError> {
    let limit = state.body_limit.max(256 << 20);
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::too_large(limit))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::invalid("the commit is not UTF-8 NDJSON"))?;
    let (summary, files) = parse_commit(text)?;
    check_files(&files)?;
    let dir = dataset_dir(&state, &ns, &name)?;
    let (dataset, count) = (format!("{ns}/{name}"), files.len());
    with_db(&state, move |c| {
        for (path, data) in &files {
            store_dataset_file(c, &dir, &ns, &name, path, data)?;
        }
        Ok(())
    })
    .await?;
    let oid = format!("{:040x}", uuid::Uuid::now_v7().as_u128());
    tracing::info!(%dataset, files = count, summary = %summary, "dataset commit");
    Ok(Json(json!({
        "commitUrl": format!("datasets/{dataset}/commit/{oid}"),
        "commitOid": oid,
        "commitMessage": summary,
        "pullRequestUrl": null,
        "revision": revision,
    })))
}
