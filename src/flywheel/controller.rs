//! The flywheel controller: starts runs (on the schedule, on drift, or on request), carries each
//! through curate → train → evaluate → decide, and moves a winning candidate through shadow and
//! canary to champion on live figures, rolling back when a guard trips. Every run and transition is
//! persisted with its numbers; a restart resumes runs and re-installs what each route was serving.
//! One run at a time per route; the champion serves throughout.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::curate;
use super::dataset::{self, Record};
use super::eval;
use super::jobs::{JobRunner, CUSTOMIZATION};
use super::promote::{self, Incumbent, Verdict};
use crate::config::{Config, RolloutConfig, RouteConfig, RouteFlywheelConfig, TargetConfig};
use crate::engine::Engine;
use crate::gateway::Gateway;
use crate::store::entities::{self, EntityError};
use crate::store::flywheel::{self as fstore, now_ms, RolloutEvent, RouteState, Slice, Stage};
use crate::store::traffic::{self, AnsweredBy, ExportFilter};
use crate::store::StoreError;

/// The namespace flywheel datasets and adapters are stored under.
pub const NAMESPACE: &str = "flywheel";
/// Longest answer asked of a target while evaluating.
const EVAL_MAX_TOKENS: usize = 192;
const EVAL_CONCURRENCY: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum FlywheelError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for FlywheelError {
    fn from(e: rusqlite::Error) -> Self {
        FlywheelError::Store(StoreError::Sqlite(e))
    }
}

/// How a run ended early.
enum RunEnd {
    Skipped(String),
    Failed(String),
}

pub struct FlywheelController {
    config: Arc<Config>,
    gateway: Arc<Gateway>,
    jobs: Arc<JobRunner>,
    engines: Vec<Arc<Engine>>,
    db: PathBuf,
    data_dir: PathBuf,
    /// Routes with a run in progress.
    running: Mutex<HashSet<String>>,
    /// Serializes rollout transitions (the ticker and manual actions).
    transitions: Mutex<()>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FlywheelController {
    /// Restores every flywheel route's rollout, resumes unfinished runs, and starts the ticker
    /// (rollout guards and drift) and the schedule.
    pub async fn start(
        config: Arc<Config>,
        gateway: Arc<Gateway>,
        jobs: Arc<JobRunner>,
        engines: Vec<Arc<Engine>>,
    ) -> anyhow::Result<Arc<Self>> {
        let this = Arc::new(Self {
            db: config.db_path(),
            data_dir: config.data_dir.clone(),
            config,
            gateway,
            jobs,
            engines,
            running: Mutex::default(),
            transitions: Mutex::default(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        });
        let restoring = this.clone();
        let runs = tokio::task::spawn_blocking(move || restoring.restore()).await??;
        for run in runs {
            this.spawn_run(run);
        }
        let ticker = this.clone();
        let every = Duration::from_secs_f64(this.config.flywheel.check_interval_secs);
        this.tasks.spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.stop.cancelled() => return,
                    _ = interval.tick() => {}
                }
                let t = ticker.clone();
                match tokio::task::spawn_blocking(move || t.tick()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "flywheel check failed"),
                    Err(e) => tracing::error!(error = %e, "flywheel check panicked"),
                }
            }
        });
        this.start_schedule().await?;
        Ok(this)
    }

    /// Stops the ticker and the schedule. Runs in progress stay recorded as running and resume at
    /// the next start.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }

    async fn start_schedule(self: &Arc<Self>) -> anyhow::Result<()> {
        let schedule = self.config.flywheel.schedule.trim().to_string();
        if schedule.is_empty() || !self.config.routes.iter().any(|r| r.flywheel.is_some()) {
            return Ok(());
        }
        use tokio_cron_scheduler::{Job, JobScheduler};
        let me = self.clone();
        let job = Job::new_async(schedule.as_str(), move |_, _| {
            let me = me.clone();
            Box::pin(async move {
                for route in me.flywheel_routes() {
                    let trigger = json!({"kind": "schedule"});
                    match me.trigger(&route.name, trigger, None) {
                        Ok(run) => tracing::info!(route = %route.name, run = %run, "scheduled flywheel run started"),
                        Err(e) => tracing::info!(route = %route.name, reason = %e, "scheduled flywheel run not started"),
                    }
                }
            })
        })
        .map_err(|e| anyhow::anyhow!("flywheel.schedule '{schedule}' is not a valid cron expression (sec min hour day month weekday): {e}"))?;
        let mut scheduler = JobScheduler::new().await?;
        scheduler.add(job).await?;
        scheduler.start().await?;
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            stop.cancelled().await;
            let _ = scheduler.shutdown().await;
        });
        tracing::info!(%schedule, "flywheel schedule set (UTC)");
        Ok(())
    }

    /// The routes with a `[routes.flywheel]` section.
    pub fn route_names(&self) -> Vec<String> {
        self.flywheel_routes()
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }

    fn flywheel_routes(&self) -> Vec<&RouteConfig> {
        self.config
            .routes
            .iter()
            .filter(|r| r.flywheel.is_some())
            .collect()
    }

    fn route(&self, name: &str) -> Result<(&RouteConfig, &RouteFlywheelConfig), FlywheelError> {
        let route = self
            .config
            .routes
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| FlywheelError::NotFound(format!("No route named '{name}'.")))?;
        let fw = route.flywheel.as_ref().ok_or_else(|| {
            FlywheelError::Invalid(format!(
                "Route '{name}' has no [routes.flywheel] section in the config, so it does not train."
            ))
        })?;
        Ok((route, fw))
    }

    fn conn(&self) -> Result<rusqlite::Connection, FlywheelError> {
        Ok(crate::store::open(&self.db)?)
    }

    /// Starts a run for `route` unless one is in progress. `overrides` are hyperparameters merged
    /// over the route's. Returns the run's id.
    pub fn trigger(
        self: &Arc<Self>,
        route: &str,
        trigger: Value,
        overrides: Option<&Value>,
    ) -> Result<String, FlywheelError> {
        self.route(route)?;
        if let Some(o) = overrides {
            if !o.is_object() {
                return Err(FlywheelError::Invalid(
                    "'hyperparameters' must be an object".into(),
                ));
            }
        }
        {
            let mut running = lock(&self.running);
            if running.contains(route) {
                return Err(FlywheelError::Conflict(format!(
                    "A flywheel run for route '{route}' is already in progress."
                )));
            }
            running.insert(route.to_string());
        }
        let id = format!("run-{}", uuid::Uuid::now_v7().simple());
        let mut trigger = trigger;
        if let Some(o) = overrides {
            trigger["hyperparameters"] = o.clone();
        }
        let inserted = self
            .conn()
            .and_then(|c| Ok(fstore::insert_run(&c, &id, route, &trigger)?));
        if let Err(e) = inserted {
            lock(&self.running).remove(route);
            return Err(e);
        }
        tracing::info!(route, run = %id, trigger = %trigger, "flywheel run started");
        let run = fstore::Run {
            id: id.clone(),
            route: route.to_string(),
            trigger,
            status: "running".into(),
            stage: "queued".into(),
            details: json!({}),
            decision: None,
            created_ms: now_ms(),
            updated_ms: now_ms(),
            finished_ms: None,
        };
        self.spawn_run(run);
        Ok(id)
    }

    fn spawn_run(self: &Arc<Self>, run: fstore::Run) {
        lock(&self.running).insert(run.route.clone());
        let me = self.clone();
        self.tasks.spawn(async move {
            let route = run.route.clone();
            let id = run.id.clone();
            let outcome = tokio::select! {
                r = me.clone().execute(run) => Some(r),
                _ = me.stop.cancelled() => None,
            };
            let end = |status: &str, message: String| {
                let decision = json!({"promote": false, "reason": message});
                let result = me
                    .conn()
                    .and_then(|c| Ok(fstore::finish_run(&c, &id, status, &json!({}), &decision)?));
                if let Err(e) = result {
                    tracing::error!(run = %id, error = %e, "cannot record the end of a flywheel run");
                }
            };
            match outcome {
                Some(Ok(())) | None => {}
                Some(Err(RunEnd::Skipped(why))) => {
                    tracing::info!(route = %route, run = %id, reason = %why, "flywheel run skipped");
                    end("skipped", why);
                }
                Some(Err(RunEnd::Failed(why))) => {
                    tracing::warn!(route = %route, run = %id, error = %why, "flywheel run failed; the champion keeps serving");
                    end("failed", why);
                }
            }
            lock(&me.running).remove(&route);
        });
    }

    /// Blocking store work off the async threads.
    async fn blocking<T, F>(&self, f: F) -> Result<T, RunEnd>
    where
        F: FnOnce(&rusqlite::Connection) -> Result<T, RunEnd> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let conn = crate::store::open(&db).map_err(|e| RunEnd::Failed(e.to_string()))?;
            f(&conn)
        })
        .await
        .map_err(|e| RunEnd::Failed(format!("internal error: {e}")))?
    }

    fn stage(&self, id: &str, stage: &str, details: &Value) -> Result<(), RunEnd> {
        let conn = self.conn().map_err(|e| RunEnd::Failed(e.to_string()))?;
        fstore::update_run(&conn, id, stage, details).map_err(|e| RunEnd::Failed(e.to_string()))
    }

    async fn execute(self: Arc<Self>, run: fstore::Run) -> Result<(), RunEnd> {
        let plan = self.plan(&run)?;
        let mut details = run.details.clone();
        details["window"] = json!({"since_ms": plan.window.0, "until_ms": plan.window.1});
        // A run resuming after a restart picks up its training job; otherwise it curates first.
        let job_id = match details.get("job_id").and_then(Value::as_str) {
            Some(j) => j.to_string(),
            None => {
                let j = self.curate_and_submit(&plan, &run, &mut details).await?;
                details["job_id"] = json!(j);
                self.stage(&plan.id, "training", &details)?;
                j
            }
        };
        let job = self.wait_for_job(&job_id).await?;
        details["training"] = json!({
            "job_id": job.id,
            "best_epoch": job.status_details.get("best_epoch"),
            "epochs_completed": job.status_details.get("epochs_completed"),
            "tokens_per_sec": job.status_details.get("tokens_per_sec"),
            "elapsed_time": job.status_details.get("elapsed_time"),
            "val_loss": job.status_details.pointer("/metrics/val_loss"),
        });
        self.stage(&plan.id, "evaluating", &details)?;
        let (decision, champion) = self.evaluate(&plan, &mut details).await?;
        self.stage(&plan.id, "deciding", &details)?;
        let me = self.clone();
        self.blocking(move |conn| me.decide(conn, &plan, &decision, &champion, &details))
            .await
    }

    /// What a run works on: fixed on its first attempt, so a resumed run sees the same data and
    /// writes the same dataset and adapter.
    fn plan(&self, run: &fstore::Run) -> Result<RunPlan, RunEnd> {
        let (route, fw) = self
            .route(&run.route)
            .map_err(|e| RunEnd::Failed(e.to_string()))?;
        let teacher = route
            .teacher()
            .ok_or_else(|| RunEnd::Failed("the route has no teacher".into()))?;
        let window = match (
            run.details
                .pointer("/window/since_ms")
                .and_then(Value::as_i64),
            run.details
                .pointer("/window/until_ms")
                .and_then(Value::as_i64),
        ) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                let until = now_ms();
                (until - (fw.window_days * 86_400_000.0) as i64, until)
            }
        };
        let dataset = format!("{}-{}", slug(&route.name), &run.id[run.id.len() - 8..]);
        Ok(RunPlan {
            id: run.id.clone(),
            route: route.name.clone(),
            fw: fw.clone(),
            teacher,
            window,
            output_model: format!("{NAMESPACE}/{dataset}"),
            data_root: self
                .data_dir
                .join("datasets")
                .join(NAMESPACE)
                .join(&dataset),
            dataset,
        })
    }

    /// Curates the dataset and submits the training job; returns the job's id.
    async fn curate_and_submit(
        &self,
        plan: &RunPlan,
        run: &fstore::Run,
        details: &mut Value,
    ) -> Result<String, RunEnd> {
        self.stage(&plan.id, "curating", details)?;
        let p = plan.clone();
        details["curation"] = self
            .blocking(move |conn| {
                curate_run(
                    conn,
                    &p.route,
                    &p.fw,
                    &p.teacher,
                    p.window,
                    &p.data_root,
                    &p.dataset,
                )
            })
            .await?;
        // Recorded before the job is asked for, so a refused job leaves the curation on record.
        self.stage(&plan.id, "training", details)?;
        let mut hp = plan.fw.hyperparameters.clone();
        if let Value::Object(h) = &mut hp {
            if let Some(Value::Object(o)) = run.trigger.get("hyperparameters") {
                h.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            h.entry("seed").or_insert(json!(plan.fw.seed));
        }
        let body = json!({
            "name": plan.dataset,
            "config": plan.fw.student,
            "dataset": {"name": plan.dataset, "namespace": NAMESPACE},
            "output_model": plan.output_model,
            "hyperparameters": hp,
        });
        let jobs = self.jobs.clone();
        self.blocking(move |conn| {
            jobs.create(conn, &body)
                .map_err(|e| RunEnd::Failed(format!("the training job was refused: {e}")))
        })
        .await
    }

    /// Waits for the customization job (which resumes from its checkpoint after a restart).
    async fn wait_for_job(&self, job_id: &str) -> Result<entities::Job, RunEnd> {
        loop {
            let jid = job_id.to_string();
            let job = self
                .blocking(move |conn| {
                    entities::get_job(conn, CUSTOMIZATION, &jid)
                        .map_err(|e| RunEnd::Failed(format!("training job {jid}: {e}")))
                })
                .await?;
            match job.status.as_str() {
                "completed" => return Ok(job),
                "failed" | "cancelled" => {
                    let why = job
                        .status_details
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("no message");
                    return Err(RunEnd::Failed(format!(
                        "training job {job_id} {}: {why}",
                        job.status
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Scores the candidate and the champion it would replace on the same held-out items, writes
    /// the per-item audit, and applies the policy. Returns the decision and the champion judged.
    async fn evaluate(
        &self,
        plan: &RunPlan,
        details: &mut Value,
    ) -> Result<(promote::Decision, TargetConfig), RunEnd> {
        let test = read_records(&plan.data_root.join("testing"))?;
        let items: Vec<eval::EvalItem> = test.iter().map(Record::eval_item).collect();
        let champion = self
            .gateway
            .routes()
            .get(&plan.route)
            .map(|r| r.champion.clone())
            .ok_or_else(|| RunEnd::Failed("the route disappeared".into()))?;
        let candidate = plan.candidate();
        self.ensure_adapter(&candidate)
            .map_err(|e| RunEnd::Failed(format!("the candidate adapter cannot be loaded: {e}")))?;
        let items = &items;
        let score = |model: String| async move {
            let (backend, adapter, name) = self
                .gateway
                .backend_for(&model)
                .ok_or_else(|| RunEnd::Failed(format!("'{model}' has no backend")))?;
            let at = adapter.as_deref();
            Ok::<_, RunEnd>(
                eval::run(
                    backend.as_ref(),
                    &name,
                    at,
                    items,
                    EVAL_MAX_TOKENS,
                    EVAL_CONCURRENCY,
                )
                .await,
            )
        };
        let (cand_results, cand_scores) = score(plan.output_model.clone()).await?;
        // The teacher's logged answers are the ground truth: it is not asked again.
        let champ_eval = match champion == plan.teacher {
            true => None,
            false => Some(score(plan.route.clone()).await?),
        };
        let audit = json!({
            "items": test.iter().zip(&cand_results).enumerate().map(|(i, (r, c))| json!({
                "index": i,
                "query": r.user_query(),
                "expected": r.expected_calls().iter().map(|(n, a)| json!({"name": n, "arguments": a})).collect::<Vec<_>>(),
                "candidate": c,
                "champion": champ_eval.as_ref().and_then(|(rs, _)| rs.get(i)),
            })).collect::<Vec<_>>(),
        });
        let run_dir = self.data_dir.join("flywheel").join("runs").join(&plan.id);
        let written = std::fs::create_dir_all(&run_dir)
            .and_then(|()| std::fs::write(run_dir.join("items.json"), audit.to_string()));
        if let Err(e) = written {
            tracing::warn!(run = %plan.id, error = %e, "cannot write the evaluation audit");
        }
        let incumbent = match &champ_eval {
            Some((results, scores)) => Incumbent::Local { results, scores },
            None => Incumbent::Teacher,
        };
        let decision = promote::judge(
            &plan.fw.policy,
            items,
            &cand_results,
            &cand_scores,
            &incumbent,
            plan.fw.seed,
        );
        details["evaluation"] = json!({
            "items": items.len(),
            "candidate": {"target": candidate.to_string(), "scores": cand_scores},
            "champion": {
                "target": champion.to_string(),
                "scores": champ_eval.as_ref().map(|(_, s)| json!(s)).unwrap_or_else(|| json!({"note": "the teacher's logged answers are the ground truth"})),
            },
            "audit": run_dir.join("items.json"),
        });
        Ok((decision, champion))
    }

    /// Applies a decision, unless the route changed under the run: a winner starts its shadow
    /// stage, a loser is recorded as rejected. Ends the run.
    fn decide(
        &self,
        conn: &rusqlite::Connection,
        plan: &RunPlan,
        decision: &promote::Decision,
        champion: &TargetConfig,
        details: &Value,
    ) -> Result<(), RunEnd> {
        let failed = |e: &dyn std::fmt::Display| RunEnd::Failed(e.to_string());
        let _t = lock(&self.transitions);
        let mut state = self.state(conn, &plan.route).map_err(|e| failed(&e))?;
        let void = if state.stage != Stage::Idle {
            Some(format!(
                "another candidate is in {} on this route",
                state.stage.as_str()
            ))
        } else if state.installed.champion != *champion {
            Some(format!(
                "the route's champion changed during the run (evaluated {champion}, now {})",
                state.installed.champion
            ))
        } else {
            None
        };
        let mut record = serde_json::to_value(decision).unwrap_or(Value::Null);
        if let Some(v) = &void {
            record["promote"] = json!(false);
            record["reason"] = json!(format!("{}; not rolled out: {v}", decision.reason));
        }
        let numbers = json!({"comparison": decision.comparison, "checks": decision.checks});
        let promote = decision.promote && void.is_none();
        if promote {
            let candidate = plan.candidate();
            let rollout = promote::shadow_rollout(&state.installed, &candidate, &plan.fw.rollout);
            state.before = Some(state.installed.clone());
            state.candidate = Some(candidate);
            state.candidate_tools = details
                .pointer("/curation/tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect();
            state.run_id = Some(plan.id.clone());
            self.apply(
                conn,
                &mut state,
                Stage::Shadow,
                rollout,
                "shadow",
                &decision.reason,
                numbers,
            )
            .map_err(|e| RunEnd::Failed(format!("starting the shadow stage failed: {e}")))?;
        } else {
            let reason = record["reason"].as_str().unwrap_or("");
            let mut event = event(&state, state.stage, "reject", reason, numbers);
            event.run_id = Some(plan.id.clone());
            fstore::insert_event(conn, &event).map_err(|e| failed(&e))?;
        }
        fstore::finish_run(conn, &plan.id, "completed", details, &record)
            .map_err(|e| failed(&e))?;
        tracing::info!(route = %plan.route, run = %plan.id, promote, reason = %record["reason"], "flywheel run decided");
        Ok(())
    }

    /// The route's state, created from the config the first time.
    fn state(&self, conn: &rusqlite::Connection, route: &str) -> Result<RouteState, FlywheelError> {
        if let Some(s) = fstore::get_state(conn, route)? {
            return Ok(s);
        }
        let (r, _) = self.route(route)?;
        let s = initial_state(r);
        fstore::put_state(conn, &s)?;
        Ok(s)
    }

    /// Installs `rollout` on the route, records the transition, and persists the new state.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        conn: &rusqlite::Connection,
        state: &mut RouteState,
        to: Stage,
        rollout: RolloutConfig,
        action: &str,
        reason: &str,
        numbers: Value,
    ) -> Result<(), FlywheelError> {
        for t in targets(&rollout) {
            self.ensure_adapter(t).map_err(FlywheelError::Invalid)?;
        }
        self.gateway
            .set_rollout(&state.route, rollout.clone())
            .map_err(|e| FlywheelError::Invalid(e.to_string()))?;
        let event = event(state, to, action, reason, numbers);
        fstore::insert_event(conn, &event)?;
        tracing::info!(route = %state.route, from = event.from, to = event.to, action, reason, "rollout transition");
        state.stage = to;
        state.installed = rollout;
        state.stage_started_ms = event.at_ms;
        fstore::put_state(conn, state)?;
        Ok(())
    }

    /// Loads a local target's adapter from the adapter store if its engine does not hold it.
    fn ensure_adapter(&self, t: &TargetConfig) -> Result<(), String> {
        let (Some(base), Some(adapter)) = (&t.local, &t.adapter) else {
            return Ok(());
        };
        let Some(engine) = self.engines.iter().find(|e| &e.name == base) else {
            return Err(format!("local model '{base}' is not loaded"));
        };
        if engine.adapters.contains(adapter) {
            return Ok(());
        }
        let (ns, name) = adapter.split_once('/').unwrap_or(("default", adapter));
        let dir = self.data_dir.join("adapters").join(ns).join(name);
        engine
            .load_adapter(adapter, &dir)
            .map(|_| tracing::info!(adapter, "adapter reloaded for its rollout"))
            .map_err(|e| format!("adapter '{adapter}': {e}"))
    }

    /// At start: each flywheel route gets back the rollout it had, unless the config now names
    /// another champion (the operator's change wins and the flywheel's state is reset). Returns the
    /// runs to resume.
    fn restore(&self) -> Result<Vec<fstore::Run>, FlywheelError> {
        let conn = self.conn()?;
        for route in self.flywheel_routes() {
            let state = self.state(&conn, &route.name)?;
            let fresh = |why: String| -> Result<(), FlywheelError> {
                let numbers = json!({"was": state.installed});
                fstore::insert_event(&conn, &event(&state, Stage::Idle, "reset", &why, numbers))?;
                tracing::warn!(route = %route.name, reason = %why, "flywheel state reset");
                fstore::put_state(&conn, &initial_state(route))?;
                Ok(())
            };
            if state.config_champion != route.rollout.champion {
                fresh(format!(
                    "the config now names champion {} (was {}); the flywheel's rollout was dropped",
                    route.rollout.champion, state.config_champion
                ))?;
                continue;
            }
            if state.installed == route.rollout {
                continue;
            }
            let loaded = targets(&state.installed)
                .into_iter()
                .try_for_each(|t| self.ensure_adapter(t));
            let valid = loaded.and_then(|()| {
                self.gateway
                    .set_rollout(&route.name, state.installed.clone())
                    .map_err(|e| e.to_string())
            });
            match valid {
                Ok(()) => {
                    tracing::info!(route = %route.name, stage = state.stage.as_str(), champion = %state.installed.champion, "flywheel rollout restored")
                }
                Err(e) => fresh(format!(
                    "the saved rollout cannot be served any more ({e}); back to the config's"
                ))?,
            }
        }
        let mut resume = Vec::new();
        for run in fstore::running_runs(&conn)? {
            if self.route(&run.route).is_ok() {
                tracing::info!(run = %run.id, route = %run.route, stage = %run.stage, "resuming a flywheel run");
                resume.push(run);
            } else {
                fstore::finish_run(
                    &conn,
                    &run.id,
                    "failed",
                    &json!({}),
                    &json!({"promote": false, "reason": "the route no longer has a flywheel config"}),
                )?;
            }
        }
        Ok(resume)
    }

    /// One check of every flywheel route: an operator's replacement of the rollout is respected,
    /// a rollout in progress moves on or rolls back on its live figures, and an idle route is
    /// checked for drift.
    pub fn tick(self: &Arc<Self>) -> Result<(), FlywheelError> {
        let conn = self.conn()?;
        for route in self.flywheel_routes() {
            let name = route.name.clone();
            let trigger = {
                let _t = lock(&self.transitions);
                let mut state = self.state(&conn, &name)?;
                let live = self.gateway.routes().get(&name);
                if let Some(live) = live.filter(|l| **l != state.installed) {
                    // Someone replaced the rollout through the admin API: the flywheel stands down.
                    let why = "the route's rollout was replaced through the admin API; the flywheel adopts it and stops any rollout in progress";
                    let numbers = json!({"was": state.installed, "now": *live});
                    fstore::insert_event(
                        &conn,
                        &event(&state, Stage::Idle, "reset", why, numbers),
                    )?;
                    state.stage = Stage::Idle;
                    state.installed = (*live).clone();
                    state.before = None;
                    state.candidate = None;
                    state.stage_started_ms = now_ms();
                    fstore::put_state(&conn, &state)?;
                    continue;
                }
                for t in targets(&state.installed) {
                    if let Err(e) = self.ensure_adapter(t) {
                        tracing::warn!(route = %name, error = %e, "an adapter of the route's rollout cannot be loaded");
                    }
                }
                self.step(&conn, route, &mut state)?
            };
            if let Some(trigger) = trigger {
                match self.trigger(&name, trigger, None) {
                    Ok(run) => {
                        tracing::info!(route = %name, run = %run, "drift started a flywheel run")
                    }
                    Err(e) => tracing::debug!(route = %name, reason = %e, "drift run not started"),
                }
            }
        }
        Ok(())
    }

    /// Advances or rolls back a rollout in progress; for an idle route, returns a drift trigger.
    fn step(
        &self,
        conn: &rusqlite::Connection,
        route: &RouteConfig,
        state: &mut RouteState,
    ) -> Result<Option<Value>, FlywheelError> {
        let Some(fw) = route.flywheel.as_ref() else {
            return Ok(None);
        };
        let plan = &fw.rollout;
        if let (Some(stats), Some(candidate)) = (stage_stats(conn, state)?, state.candidate.clone())
        {
            let verdict = match state.stage {
                Stage::Shadow => promote::judge_shadow(&stats, plan),
                _ => promote::judge_canary(&stats, plan),
            };
            let numbers = promote::numbers(&stats, plan);
            match verdict {
                Verdict::Advance(why) if !state.paused => {
                    self.advance(conn, route, state, &candidate, &why, numbers)?
                }
                Verdict::RollBack(why) => self.roll_back(conn, state, &why, numbers)?,
                _ => {}
            }
            return Ok(None);
        }
        match state.stage {
            Stage::Idle if fw.drift.enabled && !state.paused => {
                if lock(&self.running).contains(&route.name) {
                    return Ok(None);
                }
                drift_signal(conn, route, fw, state, now_ms())
            }
            _ => Ok(None),
        }
    }

    /// Moves a candidate one stage on: shadow → canary, canary → champion.
    fn advance(
        &self,
        conn: &rusqlite::Connection,
        route: &RouteConfig,
        state: &mut RouteState,
        candidate: &TargetConfig,
        why: &str,
        numbers: Value,
    ) -> Result<(), FlywheelError> {
        if state.stage == Stage::Canary {
            return self.to_champion(conn, route, state, candidate, why, numbers);
        }
        let plan = route
            .flywheel
            .as_ref()
            .map(|f| f.rollout.clone())
            .unwrap_or_default();
        let before = state.before.clone().unwrap_or(state.installed.clone());
        let rollout = promote::canary_rollout(&before, candidate, &plan);
        self.apply(conn, state, Stage::Canary, rollout, "canary", why, numbers)
    }

    fn to_champion(
        &self,
        conn: &rusqlite::Connection,
        route: &RouteConfig,
        state: &mut RouteState,
        candidate: &TargetConfig,
        why: &str,
        numbers: Value,
    ) -> Result<(), FlywheelError> {
        let plan = route
            .flywheel
            .as_ref()
            .map(|f| f.rollout.clone())
            .unwrap_or_default();
        let before = state.before.clone().unwrap_or(state.installed.clone());
        let teacher = route.teacher();
        let rollout = promote::champion_rollout(&before, candidate, teacher.as_ref(), &plan);
        state.known_tools = std::mem::take(&mut state.candidate_tools);
        state.candidate = None;
        self.apply(conn, state, Stage::Idle, rollout, "promote", why, numbers)?;
        state.before = Some(before);
        fstore::put_state(conn, state)?;
        Ok(())
    }

    fn roll_back(
        &self,
        conn: &rusqlite::Connection,
        state: &mut RouteState,
        why: &str,
        numbers: Value,
    ) -> Result<(), FlywheelError> {
        let before = state.before.take().ok_or_else(|| {
            FlywheelError::Conflict("there is no earlier rollout to return to".into())
        })?;
        state.candidate = None;
        state.candidate_tools.clear();
        self.apply(conn, state, Stage::Idle, before, "rollback", why, numbers)
    }

    /// Manual control: `promote` moves a candidate one stage on (shadow → canary → champion),
    /// `rollback` returns to the rollout before the candidate (or before the last promotion),
    /// `pause` holds automatic transitions (guards still roll back), `resume` lifts the hold.
    pub fn act(&self, route: &str, action: &str, reason: &str) -> Result<Value, FlywheelError> {
        let (rc, _) = self.route(route)?;
        let conn = self.conn()?;
        let _t = lock(&self.transitions);
        let mut state = self.state(&conn, route)?;
        let why = if reason.is_empty() {
            format!("{action} requested by an operator")
        } else {
            format!("{action} requested by an operator: {reason}")
        };
        let numbers = json!({"manual": true});
        match (action, state.stage, state.candidate.clone()) {
            ("promote", Stage::Shadow | Stage::Canary, Some(c)) => {
                self.advance(&conn, rc, &mut state, &c, &why, numbers)?;
            }
            ("promote", _, _) => {
                return Err(FlywheelError::Conflict(format!(
                    "Route '{route}' has no candidate rolling out; nothing to promote."
                )))
            }
            ("rollback", _, _) => {
                if state.before.is_none() {
                    return Err(FlywheelError::Conflict(format!(
                        "Route '{route}' has no earlier rollout to return to."
                    )));
                }
                self.roll_back(&conn, &mut state, &why, numbers)?;
            }
            ("pause" | "resume", _, _) => {
                state.paused = action == "pause";
                fstore::insert_event(&conn, &event(&state, state.stage, action, &why, numbers))?;
                fstore::put_state(&conn, &state)?;
            }
            _ => {
                return Err(FlywheelError::Invalid(format!(
                    "Unknown action '{action}' (promote, rollback, pause, resume)."
                )))
            }
        }
        self.status(&conn, route)
    }

    /// A route's flywheel status: stage, what is installed, the live figures of a rollout in
    /// progress, and its transitions.
    pub fn route_status(&self, route: &str) -> Result<Value, FlywheelError> {
        self.route(route)?;
        let conn = self.conn()?;
        self.status(&conn, route)
    }

    fn status(&self, conn: &rusqlite::Connection, route: &str) -> Result<Value, FlywheelError> {
        let state = self.state(conn, route)?;
        let live = stage_stats(conn, &state)?;
        let events = fstore::list_events(conn, Some(route), None)?;
        Ok(json!({
            "route": route,
            "stage": state.stage,
            "paused": state.paused,
            "champion": state.installed.champion,
            "candidate": state.candidate,
            "run_id": state.run_id,
            "stage_started_ms": state.stage_started_ms,
            "rollout": state.installed,
            "live": live,
            "running": lock(&self.running).contains(route),
            "known_tools": state.known_tools,
            "events": events,
        }))
    }

    pub fn run(&self, id: &str) -> Result<Value, FlywheelError> {
        let conn = self.conn()?;
        let run = fstore::get_run(&conn, id)?
            .ok_or_else(|| FlywheelError::NotFound(format!("No flywheel run '{id}'.")))?;
        let events = fstore::list_events(&conn, None, Some(id))?;
        let mut v = serde_json::to_value(&run).unwrap_or(Value::Null);
        v["events"] = serde_json::to_value(events).unwrap_or(Value::Null);
        Ok(v)
    }

    pub fn runs(
        &self,
        route: Option<&str>,
        limit: usize,
    ) -> Result<Vec<fstore::Run>, FlywheelError> {
        Ok(fstore::list_runs(&self.conn()?, route, limit)?)
    }
}

/// The live figures of a rollout in progress: the candidate's shadow answers in shadow, the
/// canary arm's requests in canary.
fn stage_stats(
    conn: &rusqlite::Connection,
    state: &RouteState,
) -> Result<Option<fstore::LiveStats>, FlywheelError> {
    let slice = match (state.stage, &state.candidate) {
        (Stage::Shadow, Some(c)) => Slice::ShadowsFrom {
            model: c.model_name(),
        },
        (Stage::Canary, Some(_)) => Slice::Arm { arm: "canary" },
        _ => return Ok(None),
    };
    let stats = fstore::live_stats(conn, &state.route, slice, state.stage_started_ms)?;
    Ok(Some(stats))
}

/// What one run works on.
#[derive(Clone)]
struct RunPlan {
    id: String,
    route: String,
    fw: RouteFlywheelConfig,
    teacher: TargetConfig,
    /// The traffic window curated, fixed on the first attempt.
    window: (i64, i64),
    dataset: String,
    output_model: String,
    data_root: PathBuf,
}

impl RunPlan {
    /// The adapter this run trains, on its student.
    fn candidate(&self) -> TargetConfig {
        TargetConfig::local_adapter(&self.fw.student, &self.output_model)
    }
}

/// A route's state as its config defines it: idle, the config's rollout installed.
fn initial_state(route: &RouteConfig) -> RouteState {
    RouteState {
        route: route.name.clone(),
        stage: Stage::Idle,
        paused: false,
        config_champion: route.rollout.champion.clone(),
        installed: route.rollout.clone(),
        before: None,
        candidate: None,
        run_id: None,
        stage_started_ms: now_ms(),
        known_tools: BTreeSet::new(),
        candidate_tools: BTreeSet::new(),
    }
}

/// A transition of `state`'s route from its current stage to `to`, stamped now.
fn event(
    state: &RouteState,
    to: Stage,
    action: &str,
    reason: &str,
    numbers: Value,
) -> RolloutEvent {
    RolloutEvent {
        route: state.route.clone(),
        run_id: state.run_id.clone(),
        at_ms: now_ms(),
        from: state.stage.as_str().into(),
        to: to.as_str().into(),
        action: action.into(),
        reason: reason.into(),
        numbers,
    }
}

/// Drift on an idle route: tools the champion never trained on, falling agreement with the
/// teacher, or rising parse failures. Waits out the cooldown after the last run.
fn drift_signal(
    conn: &rusqlite::Connection,
    route: &RouteConfig,
    fw: &RouteFlywheelConfig,
    state: &RouteState,
    now: i64,
) -> Result<Option<Value>, FlywheelError> {
    let mut since = now - fw.drift.window_secs as i64 * 1000;
    if let Some(last) = fstore::last_finished_run(conn, &route.name)? {
        let cool_until = last.finished_ms.unwrap_or(0) + fw.drift.cooldown_secs as i64 * 1000;
        if now < cool_until {
            return Ok(None);
        }
        // Traffic the last run already had (whatever it decided) does not signal drift again;
        // otherwise a rejected candidate would be retrained on the same data every cooldown.
        let had = last
            .details
            .pointer("/window/until_ms")
            .and_then(Value::as_i64)
            .unwrap_or(last.created_ms);
        since = since.max(had);
    }
    let sets = fstore::tool_sets(conn, &route.name, fw.workload_id.as_deref(), since)?;
    let mut unknown = BTreeSet::new();
    let mut requests = 0usize;
    for set in &sets {
        let new: Vec<&String> = set.difference(&state.known_tools).collect();
        if !new.is_empty() {
            requests += 1;
            unknown.extend(new.into_iter().cloned());
        }
    }
    if requests >= fw.drift.new_tool_min_records {
        return Ok(Some(json!({
            "kind": "drift",
            "signal": "new_tools",
            "reason": format!("{requests} recent requests use tools the champion was never trained on"),
            "tools": unknown,
            "requests": requests,
        })));
    }
    let champion_is_teacher = route.teacher().as_ref() == Some(&state.installed.champion);
    if champion_is_teacher {
        return Ok(None);
    }
    if let Some(teacher) = route.teacher() {
        let s = fstore::live_stats(
            conn,
            &route.name,
            Slice::ShadowsFrom {
                model: teacher.model_name(),
            },
            since,
        )?;
        let on_args = fw.rollout.agreement_on == "arguments";
        if s.compared as usize >= fw.drift.min_samples
            && s.agreement(on_args) < fw.drift.min_agreement
        {
            return Ok(Some(json!({
                "kind": "drift",
                "signal": "agreement",
                "reason": format!("live agreement with the teacher {:.3} < {:.3} over {} answers", s.agreement(on_args), fw.drift.min_agreement, s.compared),
                "stats": s,
            })));
        }
    }
    let s = fstore::live_stats(conn, &route.name, Slice::Arm { arm: "champion" }, since)?;
    if s.tool_calls as usize >= fw.drift.min_samples
        && s.parse_failure_rate() > fw.drift.max_parse_failure_rate
    {
        return Ok(Some(json!({
            "kind": "drift",
            "signal": "parse_failures",
            "reason": format!("the champion's JSON-parse failure rate {:.3} > {:.3} over {} tool calls", s.parse_failure_rate(), fw.drift.max_parse_failure_rate, s.tool_calls),
            "stats": s,
        })));
    }
    Ok(None)
}

fn targets(r: &RolloutConfig) -> Vec<&TargetConfig> {
    let mut v = vec![&r.champion];
    if let Some(c) = &r.canary {
        v.push(&c.target);
    }
    if let Some(s) = &r.shadow {
        v.push(&s.target);
    }
    v
}

/// A route name as a dataset or adapter name.
fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.trim_matches('-').chars().take(40).collect()
}

fn read_records(dir: &Path) -> Result<Vec<Record>, RunEnd> {
    let text = std::fs::read_to_string(dir.join("data.jsonl"))
        .map_err(|e| RunEnd::Failed(format!("{}: {e}", dir.display())))?;
    dataset::parse_openai_jsonl(&text).map_err(|e| RunEnd::Failed(e.to_string()))
}

/// Curates the teacher's answers on the route in `window` into a stored dataset
/// (`training/`, `validation/`, `testing/`). Returns the curation report.
fn curate_run(
    conn: &rusqlite::Connection,
    route: &str,
    fw: &RouteFlywheelConfig,
    teacher: &TargetConfig,
    window: (i64, i64),
    root: &Path,
    dataset_name: &str,
) -> Result<Value, RunEnd> {
    let failed = |e: &dyn std::fmt::Display| RunEnd::Failed(e.to_string());
    let filter = ExportFilter {
        workload_id: fw.workload_id.clone(),
        route: Some(route.to_string()),
        since_ms: Some(window.0),
        until_ms: Some(window.1),
        include_shadow: true,
    };
    let by = AnsweredBy {
        kind: teacher.kind(),
        backend: teacher.backend(),
        model: teacher.model_name(),
    };
    let exchanges = traffic::served_exchanges(conn, &filter, Some(&by)).map_err(|e| failed(&e))?;
    let last_until = fstore::list_runs(conn, Some(route), 50)
        .map_err(|e| failed(&e))?
        .iter()
        .filter(|r| r.status == "completed")
        .filter_map(|r| {
            r.details
                .pointer("/window/until_ms")
                .and_then(Value::as_i64)
        })
        .max();
    if let Some(last) = last_until {
        let new = exchanges.iter().filter(|x| x.ts_ms >= last).count();
        if new < fw.min_new_records {
            return Err(RunEnd::Skipped(format!(
                "only {new} answers from the teacher ({teacher}) since the last completed run (need {})",
                fw.min_new_records
            )));
        }
    }
    let (splits, report) = curate::curate(
        &exchanges,
        false,
        fw.validation_share,
        fw.test_share,
        fw.seed,
        fw.min_records,
    )
    .map_err(RunEnd::Skipped)?;
    if splits.test.len() < fw.policy.min_test_items {
        return Err(RunEnd::Skipped(format!(
            "{} held-out items after curation; the policy needs {} (collect more traffic, or raise test_share)",
            splits.test.len(),
            fw.policy.min_test_items
        )));
    }
    let tools: BTreeSet<String> = splits
        .train
        .iter()
        .flat_map(|r| r.tools.iter().filter_map(fstore::tool_signature))
        .collect();
    for (split, records) in [
        ("training", &splits.train),
        ("validation", &splits.validation),
        ("testing", &splits.test),
    ] {
        let dir = root.join(split);
        std::fs::create_dir_all(&dir).map_err(|e| failed(&e))?;
        let text: String = records
            .iter()
            .map(|r| format!("{}\n", r.to_json()))
            .collect();
        let tmp = dir.join("data.jsonl.partial");
        std::fs::write(&tmp, text).map_err(|e| failed(&e))?;
        std::fs::rename(&tmp, dir.join("data.jsonl")).map_err(|e| failed(&e))?;
    }
    match entities::create_namespace(
        conn,
        NAMESPACE,
        Some("datasets and adapters made by flywheel runs"),
    ) {
        Ok(_) | Err(EntityError::Conflict(_)) => {}
        Err(e) => return Err(failed(&e)),
    }
    let body = json!({
        "name": dataset_name,
        "namespace": NAMESPACE,
        "description": format!("teacher answers on route '{route}' curated by a flywheel run"),
        "format": "openai-jsonl",
    });
    match entities::create_dataset(conn, &body) {
        Ok(_) | Err(EntityError::Conflict(_)) => {}
        Err(e) => return Err(failed(&e)),
    }
    let mut v = serde_json::to_value(&report).unwrap_or(Value::Null);
    v["dataset"] = json!(format!("{NAMESPACE}/{dataset_name}"));
    v["teacher"] = json!(teacher.to_string());
    v["tools"] = json!(tools);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::traffic::{TrafficLog, TrafficRecord};

    fn tool(name: &str) -> Value {
        json!({"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
    }

    fn answer(name: &str, args: &str) -> Value {
        json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": name, "arguments": args}}]}}]})
    }

    fn rec(ts_ms: i64, arm: &str, target: &TargetConfig, response: Value) -> TrafficRecord {
        TrafficRecord {
            id: uuid::Uuid::now_v7(),
            ts_ms,
            workload_id: None,
            client_id: None,
            session_id: None,
            route: "agent".into(),
            target_kind: Some(target.kind().into()),
            target: Some(target.backend().into()),
            target_model: Some(target.model_name().into()),
            adapter: target.adapter.clone(),
            arm: arm.into(),
            shadow_of: None,
            attempts: 1,
            stream: false,
            status: 200,
            error: None,
            latency_ms: 1.0,
            ttft_ms: None,
            upstream_ms: None,
            rails: None,
            tool_name_agreement: None,
            tool_args_agreement: None,
            api: crate::wire::Api::Chat,
            wire_request: None,
            request: json!({"model": "agent", "messages": [{"role": "user", "content": format!("q{ts_ms}")}],
                "tools": [tool("get_weather")]}),
            response: Some(response),
        }
    }

    fn route(champion: &TargetConfig, teacher: &TargetConfig) -> RouteConfig {
        RouteConfig {
            name: "agent".into(),
            guardrails: None,
            rollout: RolloutConfig {
                champion: champion.clone(),
                canary: None,
                shadow: None,
                fallbacks: vec![],
            },
            flywheel: Some(
                serde_json::from_value(json!({
                    "student": "tiny", "teacher": teacher,
                    "drift": {"min_samples": 10, "new_tool_min_records": 5, "cooldown_secs": 60,
                              "min_agreement": 0.8, "max_parse_failure_rate": 0.1}
                }))
                .unwrap(),
            ),
        }
    }

    fn state(r: &RouteConfig, known: &[&str]) -> RouteState {
        RouteState {
            known_tools: known.iter().map(|s| s.to_string()).collect(),
            ..initial_state(r)
        }
    }

    async fn db(records: Vec<TrafficRecord>) -> (tempfile::TempDir, rusqlite::Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let writer = TrafficLog::start(&path, 1024, 64, Duration::from_millis(1)).unwrap();
        for r in records {
            assert!(writer.log().record(r));
        }
        writer.close().await;
        let conn = crate::store::open(&path).unwrap();
        (dir, conn)
    }

    #[tokio::test]
    async fn new_tools_signal_drift_once_and_not_again_after_a_run() {
        let teacher = TargetConfig::upstream("big", "teacher");
        let now = now_ms();
        let rows = (0..6)
            .map(|i| {
                rec(
                    now - 10_000 + i,
                    "champion",
                    &teacher,
                    answer("get_weather", "{}"),
                )
            })
            .collect();
        let (_d, conn) = db(rows).await;
        let r = route(&teacher, &teacher);
        let fw = r.flywheel.clone().unwrap();
        let signal = drift_signal(&conn, &r, &fw, &state(&r, &[]), now)
            .unwrap()
            .unwrap();
        assert_eq!(signal["signal"], "new_tools");
        assert_eq!(signal["requests"], 6);
        let sig = fstore::tool_signature(&tool("get_weather")).unwrap();
        assert!(drift_signal(&conn, &r, &fw, &state(&r, &[&sig]), now)
            .unwrap()
            .is_none());
        // A run that had this traffic: quiet during its cooldown, and quiet after it too.
        fstore::insert_run(&conn, "run-1", "agent", &json!({"kind": "drift"})).unwrap();
        fstore::update_run(
            &conn,
            "run-1",
            "curating",
            &json!({"window": {"since_ms": 0, "until_ms": now - 1}}),
        )
        .unwrap();
        fstore::finish_run(
            &conn,
            "run-1",
            "completed",
            &json!({}),
            &json!({"promote": false}),
        )
        .unwrap();
        assert!(drift_signal(&conn, &r, &fw, &state(&r, &[]), now)
            .unwrap()
            .is_none());
        assert!(drift_signal(&conn, &r, &fw, &state(&r, &[]), now + 120_000)
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn a_local_champion_drifts_on_teacher_disagreement_and_on_parse_failures() {
        let teacher = TargetConfig::upstream("big", "teacher");
        let champion = TargetConfig::local_adapter("tiny", "fw/agent-1");
        let now = now_ms();
        let sig = fstore::tool_signature(&tool("get_weather")).unwrap();
        let r = route(&champion, &teacher);
        let fw = r.flywheel.clone().unwrap();
        // The teacher's shadow copies disagree with the champion on 4 of 10 answers.
        let disagreeing = (0..10)
            .map(|i| {
                let mut s = rec(
                    now - 5_000 + i,
                    "shadow",
                    &teacher,
                    answer("get_weather", "{}"),
                );
                s.tool_name_agreement = Some(i >= 4);
                s.tool_args_agreement = Some(i >= 4);
                s
            })
            .collect();
        let (_d, conn) = db(disagreeing).await;
        let signal = drift_signal(&conn, &r, &fw, &state(&r, &[&sig]), now)
            .unwrap()
            .unwrap();
        assert_eq!(signal["signal"], "agreement", "{signal}");
        // The champion's own answers: 2 of 10 calls with arguments that are not JSON.
        let broken = (0..10)
            .map(|i| {
                let args = if i < 2 {
                    "{city: x"
                } else {
                    "{\"city\": \"x\"}"
                };
                rec(
                    now - 5_000 + i,
                    "champion",
                    &champion,
                    answer("get_weather", args),
                )
            })
            .collect();
        let (_d2, conn) = db(broken).await;
        let signal = drift_signal(&conn, &r, &fw, &state(&r, &[&sig]), now)
            .unwrap()
            .unwrap();
        assert_eq!(signal["signal"], "parse_failures", "{signal}");
        assert!(signal["reason"].as_str().unwrap().contains("0.200"));
    }
}
