//! NeMo Evaluator-shaped endpoints (scope `admin`): `POST/GET /v1/evaluation/jobs`,
//! `GET /v1/evaluation/jobs/{id}` and `GET /v1/evaluation/jobs/{id}/results`. A `custom` config's
//! `chat-completion` tasks read `hf://datasets/{namespace}/{name}/{path}` from the dataset store
//! and are scored with `tool-calling` metrics; the target model runs through the same backend the
//! gateway serves it with (a route's champion, an adapter id, or a base model).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde_json::{json, Value};

use super::customization::{self, authorized_job, entity_error as entity, job_json};
use super::{authorized_json, AppState};
use crate::config::Scope;
use crate::flywheel::{dataset, eval};
use crate::store::entities;
use crate::wire::error::ApiError;

const EVALUATION: &str = "evaluation";

/// A connection and the data directory.
fn db(state: &AppState) -> Result<(rusqlite::Connection, std::path::PathBuf), ApiError> {
    Ok((
        customization::db(state)?,
        customization::runner(state)?.context().data_dir.clone(),
    ))
}

/// One task to run: its name, the items, and the metric names asking for tool-calling scores.
struct Task {
    name: String,
    items: Vec<eval::EvalItem>,
    metrics: Vec<String>,
}

/// Resolves `hf://datasets/{ns}/{name}[/{path}]` against the dataset store.
fn load_items(
    data_dir: &std::path::Path,
    files_url: &str,
    limit: Option<usize>,
) -> Result<Vec<eval::EvalItem>, ApiError> {
    let bad = |m: String| ApiError::invalid_param("config.tasks.dataset.files_url", m);
    let rest = files_url.strip_prefix("hf://datasets/").ok_or_else(|| {
        bad(format!(
            "'{files_url}' is not hf://datasets/<namespace>/<name>/<path>"
        ))
    })?;
    let mut parts = rest.splitn(3, '/');
    let (ns, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    entities::check_name("namespace", ns).map_err(|e| bad(e.to_string()))?;
    entities::check_name("dataset", name).map_err(|e| bad(e.to_string()))?;
    let root = data_dir.join("datasets").join(ns).join(name);
    let path = parts.next().unwrap_or("testing");
    if path.split('/').any(|p| p == ".." || p.starts_with('.')) {
        return Err(bad(format!("'{path}' may not leave the dataset")));
    }
    let target = root.join(path);
    let files: Vec<std::path::PathBuf> = if target.is_dir() {
        let mut f: Vec<_> = std::fs::read_dir(&target)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl" || x == "json"))
            .collect();
        f.sort();
        f
    } else if target.is_file() {
        vec![target]
    } else {
        return Err(bad(format!("dataset '{ns}/{name}' has no file '{path}'")));
    };
    let mut items = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| ApiError::internal(e.to_string()))?;
        let shown = f.strip_prefix(&root).unwrap_or(&f).display().to_string();
        items.extend(dataset::parse_eval_items(&text).map_err(|e| bad(format!("{shown}: {e}")))?);
    }
    if let Some(n) = limit {
        items.truncate(n);
    }
    if items.is_empty() {
        return Err(bad(format!("'{files_url}' holds no items")));
    }
    Ok(items)
}

fn parse_tasks(config: &Value, data_dir: &std::path::Path) -> Result<Vec<Task>, ApiError> {
    let kind = config
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("custom");
    if kind != "custom" {
        return Err(ApiError::invalid_param(
            "config.type",
            format!("config type '{kind}' is not supported (supported: custom)"),
        ));
    }
    let tasks = config
        .get("tasks")
        .and_then(Value::as_object)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::invalid_param("config.tasks", "name at least one task"))?;
    let mut out = Vec::new();
    for (name, t) in tasks {
        let ty = t
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("chat-completion");
        if ty != "chat-completion" {
            return Err(ApiError::invalid_param(
                "config.tasks.type",
                format!("task '{name}' has type '{ty}' (supported: chat-completion)"),
            ));
        }
        let url = t
            .pointer("/dataset/files_url")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "config.tasks.dataset.files_url",
                    format!("task '{name}' needs dataset.files_url"),
                )
            })?;
        let limit = t
            .pointer("/dataset/limit")
            .and_then(Value::as_u64)
            .map(|n| n as usize);
        let mut metrics = Vec::new();
        for (m, spec) in t
            .get("metrics")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let mt = spec.get("type").and_then(Value::as_str).unwrap_or("");
            if mt != "tool-calling" {
                return Err(ApiError::invalid_param(
                    "config.tasks.metrics.type",
                    format!("metric '{m}' has type '{mt}' (supported: tool-calling)"),
                ));
            }
            metrics.push(m.clone());
        }
        if metrics.is_empty() {
            return Err(ApiError::invalid_param(
                "config.tasks.metrics",
                format!("task '{name}' names no metric"),
            ));
        }
        out.push(Task {
            name: name.clone(),
            items: load_items(data_dir, url, limit)?,
            metrics,
        });
    }
    Ok(out)
}

fn target_model(body: &Value) -> Option<String> {
    let t = body.get("target")?;
    match t.get("model") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(m) => m
            .pointer("/api_endpoint/model_id")
            .or_else(|| m.get("name"))
            .and_then(Value::as_str)
            .map(str::to_string),
        None => None,
    }
}

/// A checked evaluation request, ready to run.
struct Prepared {
    tasks: Vec<Task>,
    backend: Arc<dyn crate::backend::Backend>,
    adapter: Option<String>,
    send_as: String,
    max_tokens: usize,
}

/// Checks an evaluation request against the dataset store and the gateway's targets.
fn prepare(
    gateway: &crate::gateway::Gateway,
    data_dir: &std::path::Path,
    body: &Value,
) -> Result<Prepared, ApiError> {
    let config = body
        .get("config")
        .ok_or_else(|| ApiError::invalid_param("config", "'config' is required"))?;
    let tasks = parse_tasks(config, data_dir)?;
    let model = target_model(body).ok_or_else(|| {
        ApiError::invalid_param(
            "target.model",
            "name the model (target.model.api_endpoint.model_id)",
        )
    })?;
    let (backend, adapter, send_as) = gateway.backend_for(&model).ok_or_else(|| {
        ApiError::invalid_param(
            "target.model",
            format!("model '{model}' does not resolve to a served target"),
        )
    })?;
    let max_tokens = body
        .pointer("/config/params/max_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(256) as usize;
    Ok(Prepared {
        tasks,
        backend,
        adapter,
        send_as,
        max_tokens,
    })
}

/// Runs a prepared evaluation off the request path and records its results. Not one of the
/// gateway's tracked tasks: shutdown must not wait minutes for an evaluation; an interrupted one
/// runs again from the start at the next start of the gateway.
fn launch(job: Prepared, db: std::path::PathBuf, data_dir: &std::path::Path, id: String) {
    let job_dir = crate::flywheel::jobs::job_dir(data_dir, &id);
    tokio::spawn(async move {
        let mut results = serde_json::Map::new();
        let mut audit = Vec::new();
        for task in &job.tasks {
            let (items, scores) = eval::run(
                job.backend.as_ref(),
                &job.send_as,
                job.adapter.as_deref(),
                &task.items,
                job.max_tokens,
                4,
            )
            .await;
            let mut metrics = serde_json::Map::new();
            for m in &task.metrics {
                let score = |v: f64| json!({"value": v, "stats": {"count": scores.items}});
                metrics.insert(m.clone(), json!({"scores": {
                    "function_name_accuracy": score(scores.function_name_accuracy),
                    "function_name_and_args_accuracy": score(scores.function_name_and_args_accuracy),
                    "ast_accuracy": score(scores.ast_accuracy),
                    "json_parse_failure_rate": score(scores.json_parse_failure_rate),
                    "latency_p50_ms": score(scores.latency_p50_ms),
                    "latency_p95_ms": score(scores.latency_p95_ms),
                }}));
            }
            results.insert(task.name.clone(), json!({"metrics": metrics}));
            audit.push(json!({"task": task.name, "scores": scores, "items": items}));
        }
        let _ = std::fs::create_dir_all(&job_dir);
        let _ = std::fs::write(job_dir.join("items.json"), Value::Array(audit).to_string());
        match crate::store::open(&db) {
            Ok(conn) => {
                let r = json!({"tasks": results});
                let _ = entities::update_job(
                    &conn,
                    &id,
                    "completed",
                    &json!({"message": "completed"}),
                    Some(&r),
                );
            }
            Err(e) => {
                tracing::error!(error = %e, job = %id, "cannot record evaluation results")
            }
        }
    });
}

/// Runs again the evaluation jobs a previous process left unfinished (their items are redone from
/// the first); one that no longer checks out (its dataset or model is gone) is failed with why.
pub fn resume_unfinished(
    gateway: &crate::gateway::Gateway,
    runner: &crate::flywheel::jobs::JobRunner,
) -> Result<(), entities::EntityError> {
    let ctx = runner.context();
    let conn =
        crate::store::open(&ctx.db).map_err(|e| entities::EntityError::Invalid(e.to_string()))?;
    for job in entities::unfinished_jobs(&conn, EVALUATION)? {
        match prepare(gateway, &ctx.data_dir, &job.spec) {
            Ok(p) => {
                tracing::info!(job = %job.id, "running again an evaluation interrupted by a restart");
                entities::update_job(
                    &conn,
                    &job.id,
                    "running",
                    &json!({"message": "running again after a restart of the gateway"}),
                    None,
                )?;
                launch(p, ctx.db.clone(), &ctx.data_dir, job.id.clone());
            }
            Err(e) => {
                let why = json!({"message": format!("interrupted by a restart, and cannot run again: {}", e.body()["error"]["message"].as_str().unwrap_or(""))});
                entities::update_job(&conn, &job.id, "failed", &why, None)?;
            }
        }
    }
    Ok(())
}

pub async fn create(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let run = async {
        let body = Value::Object(authorized_json(&state, req, Scope::Admin).await?);
        let (conn, data_dir) = db(&state)?;
        let prepared = prepare(&state.gateway, &data_dir, &body)?;
        let id = format!("eval-{}", uuid::Uuid::now_v7().simple());
        entities::insert_job(&conn, &id, EVALUATION, &body).map_err(entity)?;
        entities::update_job(&conn, &id, "running", &json!({"message": "running"}), None)
            .map_err(entity)?;
        let db_path = customization::runner(&state)?.context().db.clone();
        launch(prepared, db_path, &data_dir, id.clone());
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
