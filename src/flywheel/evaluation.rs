//! Evaluation jobs in NeMo Evaluator's shape: a `custom` config's `chat-completion` tasks read
//! `hf://datasets/{namespace}/{name}/{path}` from the dataset store and are scored with
//! `tool-calling` metrics; the target model runs through the same backend the gateway serves it
//! with (a route's champion, an adapter id, or a base model). Jobs run off the request path, beside
//! customization jobs, and their results are stored with the job.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{dataset, eval};
use crate::store::entities;

/// What in an evaluation request cannot run: the field (as a dotted path) and why.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub param: &'static str,
    pub message: String,
}

impl JobError {
    fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param,
            message: message.into(),
        }
    }
}

/// The job kind evaluation jobs are stored under.
pub const EVALUATION: &str = "evaluation";

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
) -> Result<Vec<eval::EvalItem>, JobError> {
    let bad = |m: String| JobError::new("config.tasks.dataset.files_url", m);
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
        let text = std::fs::read_to_string(&f).map_err(|e| {
            JobError::new(
                "config.tasks.dataset.files_url",
                format!("{}: {e}", f.display()),
            )
        })?;
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

fn parse_tasks(config: &Value, data_dir: &std::path::Path) -> Result<Vec<Task>, JobError> {
    let kind = config
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("custom");
    if kind != "custom" {
        return Err(JobError::new(
            "config.type",
            format!("config type '{kind}' is not supported (supported: custom)"),
        ));
    }
    let tasks = config
        .get("tasks")
        .and_then(Value::as_object)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| JobError::new("config.tasks", "name at least one task"))?;
    let mut out = Vec::new();
    for (name, t) in tasks {
        let ty = t
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("chat-completion");
        if ty != "chat-completion" {
            return Err(JobError::new(
                "config.tasks.type",
                format!("task '{name}' has type '{ty}' (supported: chat-completion)"),
            ));
        }
        let url = t
            .pointer("/dataset/files_url")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                JobError::new(
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
                return Err(JobError::new(
                    "config.tasks.metrics.type",
                    format!("metric '{m}' has type '{mt}' (supported: tool-calling)"),
                ));
            }
            metrics.push(m.clone());
        }
        if metrics.is_empty() {
            return Err(JobError::new(
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
pub struct EvaluationJob {
    tasks: Vec<Task>,
    backend: Arc<dyn crate::backend::Backend>,
    adapter: Option<String>,
    send_as: String,
    max_tokens: usize,
}

/// Checks an evaluation request against the dataset store and the gateway's targets.
pub fn prepare(
    gateway: &crate::gateway::Gateway,
    data_dir: &std::path::Path,
    body: &Value,
) -> Result<EvaluationJob, JobError> {
    let config = body
        .get("config")
        .ok_or_else(|| JobError::new("config", "'config' is required"))?;
    let tasks = parse_tasks(config, data_dir)?;
    let model = target_model(body).ok_or_else(|| {
        JobError::new(
            "target.model",
            "name the model (target.model.api_endpoint.model_id)",
        )
    })?;
    let (backend, adapter, send_as) = gateway.backend_for(&model).ok_or_else(|| {
        JobError::new(
            "target.model",
            format!("model '{model}' does not resolve to a served target"),
        )
    })?;
    let max_tokens = body
        .pointer("/config/params/max_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(256) as usize;
    Ok(EvaluationJob {
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
pub fn launch(job: EvaluationJob, db: crate::store::Db, data_dir: &std::path::Path, id: String) {
    let job_dir = super::jobs::job_dir(data_dir, &id);
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
        let audit_file = job_dir.join("items.json");
        if let Err(e) = std::fs::create_dir_all(&job_dir)
            .and_then(|()| std::fs::write(&audit_file, Value::Array(audit).to_string()))
        {
            tracing::warn!(error = %e, job = %id, "cannot write the evaluation's per-item audit");
        }
        match db.open() {
            Ok(conn) => {
                let r = json!({"tasks": results});
                if let Err(e) = entities::update_job(
                    &conn,
                    &id,
                    "completed",
                    &json!({"message": "completed"}),
                    Some(&r),
                ) {
                    tracing::error!(error = %e, job = %id, "cannot record evaluation results");
                }
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
    runner: &super::jobs::JobRunner,
) -> Result<(), entities::EntityError> {
    let ctx = runner.context();
    let conn = ctx
        .db
        .open()
        .map_err(|e| entities::EntityError::Invalid(e.to_string()))?;
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
                let why = json!({"message": format!("interrupted by a restart, and cannot run again: {e}")});
                entities::update_job(&conn, &job.id, "failed", &why, None)?;
            }
        }
    }
    Ok(())
}
