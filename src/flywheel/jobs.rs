//! Customization jobs: accepted in NeMo Customizer's shape, persisted, run one at a time on a
//! worker thread off the serving path, reported through `status_details` as they go, and on
//! success registered as a servable adapter under their `output_model` name. Jobs that were
//! queued or running when the process stopped are queued again at start and resume from their
//! checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use serde_json::{json, Value};

use super::dataset;
use super::train::{self, Hyperparameters, TrainError, TrainExample};
use crate::engine::chat::ChatFormat;
use crate::engine::{lora, Engine, LocalModelConfig};
use crate::store::entities::{self, EntityError};

pub const CUSTOMIZATION: &str = "customization";

/// What the worker needs from the gateway.
pub struct JobContext {
    pub db: crate::store::Db,
    pub data_dir: PathBuf,
    pub models: Vec<LocalModelConfig>,
    pub engines: Vec<Arc<Engine>>,
    /// Longest a training step waits for busy engines before going ahead anyway.
    pub max_yield: std::time::Duration,
}

pub struct JobRunner {
    queue: Mutex<mpsc::Sender<String>>,
    cancels: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
    ctx: Arc<JobContext>,
}

/// A validated customization request.
#[derive(Debug, Clone)]
pub struct CustomizationSpec {
    pub base: String,
    pub dataset: (String, String),
    pub output_model: String,
    pub hyperparameters: Hyperparameters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobRunner {
    /// Starts the worker and queues the jobs a previous process left unfinished.
    pub fn start(ctx: JobContext) -> Result<Arc<Self>, EntityError> {
        let ctx = Arc::new(ctx);
        let (tx, rx) = mpsc::channel::<String>();
        let cancels: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>> = Arc::default();
        let conn = ctx
            .db
            .open()
            .map_err(|e| EntityError::Invalid(e.to_string()))?;
        // Interrupted evaluations are run again by the API layer once the gateway can serve their
        // targets (`flywheel::evaluation::resume_unfinished`).
        reload_trained_adapters(&ctx, &conn)?;
        for job in entities::unfinished_jobs(&conn, CUSTOMIZATION)? {
            tracing::info!(job = %job.id, "queueing a job left unfinished by the previous run");
            lock(&cancels).insert(job.id.clone(), Arc::new(AtomicBool::new(false)));
            // The receiver is still here (the worker takes it below), so the send cannot fail.
            let _ = tx.send(job.id);
        }
        let worker_ctx = ctx.clone();
        let worker_cancels = cancels.clone();
        let spawned = std::thread::Builder::new()
            .name("flywheel-jobs".into())
            .spawn(move || {
                crate::background::lower_thread_priority();
                while let Ok(id) = rx.recv() {
                    // Replicas on one store queue the same unfinished jobs: the one that claims a
                    // job runs it, and holds the claim until it is done.
                    match worker_ctx.db.try_claim_blocking(&format!("job:{id}")) {
                        Ok(Some(_claim)) => {
                            let cancel =
                                lock(&worker_cancels).get(&id).cloned().unwrap_or_default();
                            run_customization(&worker_ctx, &id, &cancel);
                        }
                        Ok(None) => {
                            tracing::info!(job = %id, "another replica runs this job")
                        }
                        Err(e) => {
                            tracing::warn!(job = %id, error = %e, "cannot claim the job; the flywheel's leader will try again")
                        }
                    }
                    lock(&worker_cancels).remove(&id);
                }
            });
        if let Err(e) = spawned {
            return Err(EntityError::Invalid(format!(
                "cannot start the job worker: {e}"
            )));
        }
        Ok(Arc::new(Self {
            queue: Mutex::new(tx),
            cancels,
            ctx,
        }))
    }

    /// Queues the unfinished jobs this replica does not know of (those of a replica that
    /// stopped): the worker runs each one no live replica holds.
    pub fn adopt_unfinished(&self, conn: &crate::store::Conn) -> Result<usize, EntityError> {
        let mut adopted = 0;
        for job in entities::unfinished_jobs(conn, CUSTOMIZATION)? {
            let mut cancels = lock(&self.cancels);
            if cancels.contains_key(&job.id) {
                continue;
            }
            cancels.insert(job.id.clone(), Arc::new(AtomicBool::new(false)));
            if lock(&self.queue).send(job.id.clone()).is_ok() {
                adopted += 1;
            }
        }
        Ok(adopted)
    }

    pub fn context(&self) -> &JobContext {
        &self.ctx
    }

    /// Validates a NeMo-shaped customization request against the loaded models and the store.
    pub fn validate(
        &self,
        conn: &crate::store::Conn,
        body: &Value,
    ) -> Result<CustomizationSpec, EntityError> {
        let invalid = |m: String| EntityError::Invalid(m);
        let config = body
            .get("config")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("'config' (the base model) is required".into()))?;
        // NeMo names configs `model@version+hardware`; the model part names our base.
        let wanted = config.split(['@', '+']).next().unwrap_or(config);
        let base = self
            .ctx
            .models
            .iter()
            .find(|m| m.name == wanted || wanted.rsplit('/').next() == Some(m.name.as_str()))
            .ok_or_else(|| {
                let names: Vec<&str> = self.ctx.models.iter().map(|m| m.name.as_str()).collect();
                invalid(format!(
                    "config '{config}' names no local base model (loaded: {})",
                    names.join(", ")
                ))
            })?;
        let ds = body
            .get("dataset")
            .ok_or_else(|| invalid("'dataset' ({name, namespace}) is required".into()))?;
        let ds_name = ds
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("'dataset.name' is required".into()))?;
        let ds_ns = ds
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        entities::get_dataset(conn, ds_ns, ds_name)?;
        let hp_in = body.get("hyperparameters").cloned().unwrap_or(json!({}));
        let s = |k: &str| hp_in.get(k).and_then(Value::as_str);
        if let Some(t) = s("training_type") {
            if t != "sft" {
                return Err(invalid(format!(
                    "hyperparameters.training_type '{t}' is not supported (supported: sft)"
                )));
            }
        }
        if let Some(t) = s("finetuning_type") {
            if t != "lora" {
                return Err(invalid(format!(
                    "hyperparameters.finetuning_type '{t}' is not supported (supported: lora)"
                )));
            }
        }
        let mut hp = Hyperparameters::default();
        let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
        let whole = |v: &Value, k: &str| -> Result<Option<usize>, EntityError> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                    invalid(format!("hyperparameters.{k} must be a positive integer"))
                }),
            }
        };
        hp.epochs = whole(&hp_in, "epochs")?.unwrap_or(hp.epochs);
        hp.batch_size = whole(&hp_in, "batch_size")?.unwrap_or(hp.batch_size);
        hp.micro_batch_size = hp.micro_batch_size.min(hp.batch_size);
        hp.learning_rate = num(&hp_in, "learning_rate").unwrap_or(hp.learning_rate);
        if let Some(seed) = whole(&hp_in, "seed")? {
            hp.seed = seed as u64;
        }
        if let Some(p) = hp_in.get("precision").filter(|v| !v.is_null()) {
            hp.precision = p
                .as_str()
                .and_then(train::Precision::parse)
                .ok_or_else(|| {
                    invalid(format!(
                        "hyperparameters.precision {p} is not one of \"auto\", \"f32\", \"bf16\""
                    ))
                })?;
        }
        let lora_in = hp_in.get("lora").cloned().unwrap_or(json!({}));
        hp.adapter_dim = whole(&lora_in, "adapter_dim")?.unwrap_or(hp.adapter_dim);
        hp.alpha = num(&lora_in, "alpha").or(hp.alpha);
        hp.adapter_dropout =
            num(&lora_in, "adapter_dropout").map_or(hp.adapter_dropout, |d| d as f32);
        if let Some(Value::Array(mods)) = lora_in.get("target_modules") {
            hp.target_modules = mods
                .iter()
                .filter_map(|m| m.as_str().map(str::to_string))
                .collect();
        }
        hp.validate().map_err(|e| invalid(e.to_string()))?;
        let output = match body.get("output_model").and_then(Value::as_str) {
            Some(o) => o.split('@').next().unwrap_or(o).to_string(),
            None => {
                let name = body.get("name").and_then(Value::as_str).unwrap_or("lora");
                format!("{ds_ns}/{name}")
            }
        };
        lora::check_name(&output).map_err(|e| invalid(format!("output_model: {e}")))?;
        Ok(CustomizationSpec {
            base: base.name.clone(),
            dataset: (ds_ns.to_string(), ds_name.to_string()),
            output_model: output,
            hyperparameters: hp,
        })
    }

    /// Validates a NeMo-shaped request, records it as a job and queues it. Returns the job's id.
    pub fn create(&self, conn: &crate::store::Conn, body: &Value) -> Result<String, EntityError> {
        let spec = self.validate(conn, body)?;
        let id = format!("cust-{}", uuid::Uuid::now_v7().simple());
        let mut stored = body.clone();
        stored["_resolved"] = json!({
            "base": spec.base,
            "dataset": [spec.dataset.0, spec.dataset.1],
            "output_model": spec.output_model,
            "hyperparameters": spec.hyperparameters,
        });
        self.submit(conn, &id, &stored)?;
        Ok(id)
    }

    /// Records the job and queues it.
    fn submit(&self, conn: &crate::store::Conn, id: &str, spec: &Value) -> Result<(), EntityError> {
        entities::insert_job(conn, id, CUSTOMIZATION, spec)?;
        lock(&self.cancels).insert(id.to_string(), Arc::new(AtomicBool::new(false)));
        lock(&self.queue)
            .send(id.to_string())
            .map_err(|_| EntityError::Invalid("the job worker has stopped".into()))
    }

    /// Asks a queued or running job to stop; finished jobs cannot be cancelled.
    pub fn cancel(&self, conn: &crate::store::Conn, id: &str) -> Result<(), EntityError> {
        let job = entities::get_job(conn, CUSTOMIZATION, id)?;
        if matches!(job.status.as_str(), "completed" | "failed" | "cancelled") {
            return Err(EntityError::Conflict(format!(
                "job '{id}' has already {}; only created, pending or running jobs can be cancelled",
                job.status
            )));
        }
        if let Some(flag) = lock(&self.cancels).get(id) {
            flag.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Where a job's files live.
pub fn job_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("jobs").join(id)
}

fn dataset_files(dir: &Path, split: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(split))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl" || x == "json"))
        .collect();
    files.sort();
    files
}

fn read_split(dir: &Path, split: &str) -> Result<Vec<dataset::Record>, String> {
    let mut out = Vec::new();
    for f in dataset_files(dir, split) {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        out.extend(dataset::parse_openai_jsonl(&text).map_err(|e| format!("{split}/{name}: {e}"))?);
    }
    Ok(out)
}

/// Serves again, after a restart, the adapters that completed customization jobs registered
/// (oldest first, so that with a cap on resident adapters the newest stay loaded).
fn reload_trained_adapters(ctx: &JobContext, conn: &crate::store::Conn) -> Result<(), EntityError> {
    for job in entities::list_jobs(conn, CUSTOMIZATION)?
        .iter()
        .rev()
        .filter(|j| j.status == "completed")
    {
        let resolved = &job.spec["_resolved"];
        let (Some(base), Some(output)) =
            (resolved["base"].as_str(), resolved["output_model"].as_str())
        else {
            continue;
        };
        let Some(engine) = ctx.engines.iter().find(|e| e.name == base) else {
            continue;
        };
        let dir = lora::store_path(&ctx.data_dir.join("adapters"), output);
        if !dir.join("adapter_config.json").exists() {
            continue;
        }
        match engine.load_adapter(output, &dir) {
            Ok(_) => {
                tracing::info!(adapter = output, job = %job.id, "trained adapter served again")
            }
            Err(e) => {
                tracing::warn!(adapter = output, job = %job.id, error = %e, "cannot serve a trained adapter again")
            }
        }
    }
    Ok(())
}

/// Records a job's state; a failure to record is logged (the job itself goes on or ends as it
/// would).
fn record(
    conn: &crate::store::Conn,
    id: &str,
    status: &str,
    details: &Value,
    result: Option<&Value>,
) {
    if let Err(e) = entities::update_job(conn, id, status, details, result) {
        tracing::error!(job = id, status, error = %e, "cannot record a job's state");
    }
}

/// A customization job's training and validation examples, rendered with the base model's chat
/// format, and the base model loaded for training.
fn training_inputs(
    model: &LocalModelConfig,
    hp: &Hyperparameters,
    data: &std::path::Path,
    dataset: &str,
) -> Result<
    (
        Vec<TrainExample>,
        Vec<TrainExample>,
        train::model::TrainBase,
    ),
    String,
> {
    let train_records = read_split(data, "training")?;
    if train_records.is_empty() {
        return Err(format!(
            "dataset '{dataset}' has no records under training/ (upload training/*.jsonl)"
        ));
    }
    let val_records = read_split(data, "validation")?;
    let chat = ChatFormat::load(&model.path)?;
    let tr =
        dataset::training_examples(&chat, &train_records).map_err(|e| format!("training: {e}"))?;
    let va =
        dataset::training_examples(&chat, &val_records).map_err(|e| format!("validation: {e}"))?;
    let base = train::model::TrainBase::load_with(&model.path, hp.max_seq_len, hp.precision)
        .map_err(|e| e.to_string())?;
    Ok((tr, va, base))
}

fn run_customization(ctx: &JobContext, id: &str, cancel: &AtomicBool) {
    let conn = match ctx.db.open() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(job = id, error = %e, "cannot open the database for a job");
            return;
        }
    };
    let fail = |details: Value| record(&conn, id, "failed", &details, None);
    let job = match entities::get_job(&conn, CUSTOMIZATION, id) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(job = id, error = %e, "queued job vanished");
            return;
        }
    };
    if !["created", "pending", "running"].contains(&job.status.as_str()) {
        // Queued twice (adopted while it was being submitted) and already done.
        return;
    }
    if cancel.load(Ordering::Relaxed) {
        let why = json!({"message": "cancelled before it started"});
        return record(&conn, id, "cancelled", &why, None);
    }
    let spec = &job.spec;
    let hp: Hyperparameters =
        match serde_json::from_value(spec["_resolved"]["hyperparameters"].clone()) {
            Ok(h) => h,
            Err(e) => return fail(json!({"message": format!("stored hyperparameters: {e}")})),
        };
    let base = spec["_resolved"]["base"].as_str().unwrap_or_default();
    let output = spec["_resolved"]["output_model"]
        .as_str()
        .unwrap_or_default();
    let ns = spec["_resolved"]["dataset"][0].as_str().unwrap_or_default();
    let ds = spec["_resolved"]["dataset"][1].as_str().unwrap_or_default();
    let Some(model) = ctx.models.iter().find(|m| m.name == base) else {
        return fail(json!({"message": format!("base model '{base}' is no longer configured")}));
    };
    record(&conn, id, "running", &json!({"percentage_done": 0}), None);
    let data = ctx.data_dir.join("datasets").join(ns).join(ds);
    let (tr, va, tbase) = match training_inputs(model, &hp, &data, &format!("{ns}/{ds}")) {
        Ok(p) => p,
        Err(message) => return fail(json!({"message": message})),
    };
    let dir = job_dir(&ctx.data_dir, id);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        let why = format!("cannot make the job's directory {}: {e}", dir.display());
        return fail(json!({"message": why}));
    }
    let ckpt = dir.join("checkpoint.bin");
    let steps_per_epoch = tr.len().div_ceil(hp.batch_size);
    let mut train_losses: Vec<Value> = Vec::new();
    let started = std::time::Instant::now();
    let busy = || ctx.engines.iter().any(|e| e.in_flight() > 0);
    let pace = || {
        crate::background::yield_while(&busy, ctx.max_yield);
    };
    let mut on_progress = |p: &train::Progress| {
        train_losses.push(json!({"step": p.step, "value": p.train_loss}));
        let details = json!({
            "percentage_done": 100.0 * p.step as f64 / p.total_steps.max(1) as f64,
            "epochs_completed": p.step / steps_per_epoch.max(1),
            "steps_completed": p.step,
            "steps_per_epoch": steps_per_epoch,
            "elapsed_time": started.elapsed().as_secs_f64(),
            "tokens_per_sec": p.tokens_per_sec,
            "eta_secs": p.eta_secs,
            "metrics": {"train_loss": train_losses, "val_loss": p.val_loss},
        });
        record(&conn, id, "running", &details, None);
    };
    let control = train::Control {
        checkpoint: Some(&ckpt),
        cancel,
        pace: &pace,
    };
    let result = train::train_paced(&tbase, &tr, &va, &hp, &control, &mut on_progress);
    match result {
        Ok(out) => {
            let adir = lora::store_path(&ctx.data_dir.join("adapters"), output);
            let base_name = model.name.clone();
            let saved = out
                .lora
                .save_peft(&out.theta, &adir, &base_name, hp.adapter_dropout)
                .map_err(|e| e.to_string())
                .and_then(
                    |()| match ctx.engines.iter().find(|e| e.name == base_name) {
                        Some(engine) => engine
                            .load_adapter(output, &adir)
                            .map(|_| ())
                            .map_err(|e| e.to_string()),
                        None => Ok(()),
                    },
                );
            let val: Vec<Value> = out
                .epochs
                .iter()
                .map(|e| json!({"epoch": e.epoch, "value": e.val_loss}))
                .collect();
            let details = json!({
                "percentage_done": 100.0,
                "epochs_completed": out.epochs.len(),
                "steps_completed": out.steps,
                "steps_per_epoch": steps_per_epoch,
                "best_epoch": out.best_epoch,
                "elapsed_time": started.elapsed().as_secs_f64(),
                "tokens_per_sec": out.tokens_per_sec,
                "metrics": {"train_loss": train_losses, "val_loss": val},
            });
            match saved {
                Ok(()) => {
                    if let Err(e) = std::fs::remove_file(&ckpt) {
                        tracing::warn!(job = id, error = %e, "cannot remove the finished job's checkpoint");
                    }
                    let result = json!({"adapter_path": adir});
                    record(&conn, id, "completed", &details, Some(&result));
                    tracing::info!(
                        job = id,
                        adapter = output,
                        "customization job completed; adapter loaded"
                    );
                }
                Err(m) => {
                    fail(json!({"message": format!("saving or loading the adapter failed: {m}")}))
                }
            }
        }
        Err(TrainError::Cancelled) => {
            let why = json!({"message": "cancelled on request"});
            record(&conn, id, "cancelled", &why, None);
        }
        Err(e) => fail(json!({"message": e.to_string()})),
    }
}
