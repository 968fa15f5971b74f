//! The slice of the Hugging Face Hub API that NeMo Data Store serves at `/v1/hf`, so the
//! `huggingface_hub` client of NVIDIA's notebooks (`HfApi(endpoint=<gateway>/v1/hf)`) creates
//! dataset repos and uploads files into the entity store: `POST /v1/hf/api/repos/create`,
//! `POST /v1/hf/api/datasets/{ns}/{name}/preupload/{revision}` and
//! `POST /v1/hf/api/datasets/{ns}/{name}/commit/{revision}` (NDJSON, files inline as base64; every
//! file is declared "regular", so no LFS or Xet transfer is asked for). Each file goes through the
//! same checks as `PUT /v1/datasets/{ns}/{name}/files/{path}`; a commit is applied only when all its
//! files pass. Scope `admin`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use http::StatusCode;
use serde_json::{json, Value};

use super::customization::{db, entity_error, store_dataset_file};
use super::{authorize, authorized_json, AppState};
use crate::config::Scope;
use crate::store::entities::{self, EntityError};
use crate::wire::error::ApiError;

/// `{name, organization, type, private}` → a dataset `organization/name` (namespace created if
/// needed); 409 when it exists, which `create_repo(exist_ok=True)` accepts.
pub async fn create_repo(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let body = match authorized_json(&state, req, Scope::Admin).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
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
    let created = (|| {
        let conn = db(&state)?;
        if ns != "default" {
            match entities::create_namespace(&conn, &ns, None) {
                Ok(_) | Err(EntityError::Conflict(_)) => {}
                Err(e) => return Err(entity_error(e)),
            }
        }
        entities::create_dataset(&conn, &json!({"namespace": ns, "name": name}))
            .map_err(entity_error)
    })();
    match created {
        Ok(_) => Json(json!({"url": url, "name": format!("{ns}/{name}")})).into_response(),
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
    Path((ns, name, _revision)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    let run = async {
        let body = authorized_json(&state, req, Scope::Admin).await?;
        entities::get_dataset(&db(&state)?, &ns, &name).map_err(entity_error)?;
        let files: Vec<Value> = body
            .get("files")
            .and_then(Value::as_array)
            .map(|fs| {
                fs.iter()
                    .map(|f| json!({"path": f.get("path").cloned().unwrap_or(Value::Null), "uploadMode": "regular", "shouldIgnore": false}))
                    .collect()
            })
            .unwrap_or_default();
        Ok::<_, ApiError>(Json(json!({"files": files})))
    };
    run.await.into_response()
}

/// Applies a commit: NDJSON lines `{"key": "header" | "file" | ..., "value": {...}}`; files carry
/// `path`, `content` and `encoding: "base64"`.
pub async fn commit(
    State(state): State<Arc<AppState>>,
    Path((ns, name, revision)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    let run = async {
        let (parts, body) = req.into_parts();
        authorize(&state, &parts, Scope::Admin)?;
        let limit = state.body_limit.max(256 << 20);
        let bytes = axum::body::to_bytes(body, limit)
            .await
            .map_err(|_| ApiError::too_large(limit))?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| ApiError::invalid("the commit is not UTF-8 NDJSON"))?;
        let mut files = Vec::new();
        let mut summary = String::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| ApiError::invalid(format!("commit line {}: {e}", i + 1)))?;
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
                        .ok_or_else(|| {
                            ApiError::invalid(format!(
                                "commit line {}: a file without a path",
                                i + 1
                            ))
                        })?;
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
                    return Err(ApiError::invalid(format!(
                    "commit line {}: '{other}' operations are not supported (upload files inline)",
                    i + 1
                )))
                }
                None => {
                    return Err(ApiError::invalid(format!(
                        "commit line {}: no 'key'",
                        i + 1
                    )))
                }
            }
        }
        // Check every file before writing any: a commit is applied whole or not at all.
        for (path, data) in &files {
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
        for (path, data) in &files {
            store_dataset_file(&state, &ns, &name, path, data)?;
        }
        let oid = format!("{:040x}", uuid::Uuid::now_v7().as_u128());
        tracing::info!(dataset = %format!("{ns}/{name}"), files = files.len(), summary = %summary, "dataset commit");
        Ok::<_, ApiError>(Json(json!({
            "commitUrl": format!("datasets/{ns}/{name}/commit/{oid}"),
            "commitOid": oid,
            "commitMessage": summary,
            "pullRequestUrl": null,
            "revision": revision,
        })))
    };
    run.await.into_response()
}
