//! One run: plan (window, teacher, candidate name), curate the teacher's answers into a dataset,
//! train through a customization job, evaluate candidate, champion and teacher on the held-out
//! items, and decide by the route's policy.

use super::*;

impl FlywheelController {
    pub(super) fn spawn_run(self: &Arc<Self>, run: fstore::Run) {
        lock(&self.running).insert(run.route.clone());
        let me = self.clone();
        self.tasks.spawn(async move {
            let route = run.route.clone();
            let id = run.id.clone();
            // One replica executes a run: the one holding its claim, for as long as it runs.
            let _claim = match me.db.try_claim(&format!("run:{id}")).await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    tracing::info!(run = %id, "another replica executes this run");
                    lock(&me.running).remove(&route);
                    return;
                }
                Err(e) => {
                    tracing::warn!(run = %id, error = %e, "cannot claim the run; trying again at the next check");
                    lock(&me.running).remove(&route);
                    return;
                }
            };
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
    pub(super) async fn blocking<T, F>(&self, f: F) -> Result<T, RunEnd>
    where
        F: FnOnce(&crate::store::Conn) -> Result<T, RunEnd> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let conn = db.open().map_err(|e| RunEnd::Failed(e.to_string()))?;
            f(&conn)
        })
        .await
        .map_err(|e| RunEnd::Failed(format!("internal error: {e}")))?
    }

    pub(super) fn stage(&self, id: &str, stage: &str, details: &Value) -> Result<(), RunEnd> {
        let conn = self.conn().map_err(|e| RunEnd::Failed(e.to_string()))?;
        fstore::update_run(&conn, id, stage, details).map_err(|e| RunEnd::Failed(e.to_string()))
    }

    pub(super) async fn execute(self: Arc<Self>, run: fstore::Run) -> Result<(), RunEnd> {
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
    pub(super) fn plan(&self, run: &fstore::Run) -> Result<RunPlan, RunEnd> {
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
    pub(super) async fn curate_and_submit(
        &self,
        plan: &RunPlan,
        run: &fstore::Run,
        details: &mut Value,
    ) -> Result<String, RunEnd> {
        self.stage(&plan.id, "curating", details)?;
        // Traffic and feedback accepted before this point may still be queued: curate them too.
        if let Err(e) = self.gateway.log().caught_up().await {
            tracing::warn!(run = %plan.id, error = %e, "curating without waiting for the traffic log");
        }
        let p = plan.clone();
        let metrics = self.config.metrics.clone();
        details["curation"] = self
            .blocking(move |conn| curate_run(conn, &p, &metrics))
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
    pub(super) async fn wait_for_job(&self, job_id: &str) -> Result<entities::Job, RunEnd> {
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
    pub(super) async fn evaluate(
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
        let candidate = plan.trained();
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
    pub(super) fn decide(
        &self,
        conn: &crate::store::Conn,
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
            state.before = Some(state.installed.clone());
            state.candidate = Some(candidate.clone());
            state.candidate_tools = details
                .pointer("/curation/tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect();
            state.run_id = Some(plan.id.clone());
            if plan.fw.rollout.require_approval {
                // Nothing changes on the route until a person decides.
                self.hold_for_approval(conn, &mut state, &decision.reason, numbers)
                    .map_err(|e| failed(&e))?;
            } else {
                let rollout =
                    promote::shadow_rollout(&state.installed, &candidate, &plan.fw.rollout);
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
            }
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
}

/// The live figures of a rollout in progress: the candidate's shadow answers in shadow, the
/// canary arm's requests in canary.
pub(super) fn stage_stats(
    conn: &crate::store::Conn,
    state: &RouteState,
) -> Result<Option<fstore::LiveStats>, FlywheelError> {
    stage_stats_since(conn, state, state.stage_started_ms)
}

/// The same figures since `since_ms`.
pub(super) fn stage_stats_since(
    conn: &crate::store::Conn,
    state: &RouteState,
    since_ms: i64,
) -> Result<Option<fstore::LiveStats>, FlywheelError> {
    let slice = match (state.stage, &state.candidate) {
        (Stage::Shadow, Some(c)) => Slice::ShadowsFrom {
            model: c.model_name(),
        },
        (Stage::Canary, Some(_)) => Slice::Arm { arm: "canary" },
        _ => return Ok(None),
    };
    let stats = fstore::live_stats(conn, &state.route, slice, since_ms)?;
    Ok(Some(stats))
}

/// What one run works on.
#[derive(Clone)]
pub(super) struct RunPlan {
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
    /// The adapter this run trains, on its student: what the evaluation scores.
    fn trained(&self) -> TargetConfig {
        TargetConfig::local_adapter(&self.fw.student, &self.output_model)
    }

    /// What rolls out when the adapter wins: the trained adapter, served by the embedded engine
    /// or, for a route that deploys to an upstream fleet, by that upstream's servers.
    fn candidate(&self) -> TargetConfig {
        match &self.fw.deploy {
            Some(upstream) => TargetConfig {
                upstream: Some(upstream.clone()),
                model: None,
                local: None,
                adapter: Some(self.output_model.clone()),
            },
            None => self.trained(),
        }
    }
}

/// A route name as a dataset or adapter name.
pub(super) fn slug(name: &str) -> String {
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

pub(super) fn read_records(dir: &Path) -> Result<Vec<Record>, RunEnd> {
    let text = std::fs::read_to_string(dir.join("data.jsonl"))
        .map_err(|e| RunEnd::Failed(format!("{}: {e}", dir.display())))?;
    dataset::parse_openai_jsonl(&text).map_err(|e| RunEnd::Failed(e.to_string()))
}

/// Curates what the route's sources give in the run's window (the teacher's answers,
/// demonstrations, answers with passing feedback; see `flywheel::sources`) into a stored dataset
/// (`training/`, `validation/`, `testing/`). Returns the curation report.
pub(super) fn curate_run(
    conn: &crate::store::Conn,
    plan: &RunPlan,
    metrics: &[MetricConfig],
) -> Result<Value, RunEnd> {
    let (route, fw, teacher, window) = (&plan.route, &plan.fw, &plan.teacher, plan.window);
    let (root, dataset_name) = (&plan.data_root, &plan.dataset);
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
    let from_teacher = if fw.sources.teacher {
        traffic::served_exchanges(conn, &filter, Some(&by)).map_err(|e| failed(&e))?
    } else {
        Vec::new()
    };
    let feedback = FeedbackIndex::load(conn, route, window.0, window.1).map_err(|e| failed(&e))?;
    // The answers clients were served matter only through feedback on them: without any, the
    // window is not read a second time.
    let served = if feedback.is_empty() {
        Vec::new()
    } else {
        let served_filter = ExportFilter {
            include_shadow: false,
            ..filter
        };
        traffic::served_exchanges(conn, &served_filter, None).map_err(|e| failed(&e))?
    };
    let teacher_id = format!("{}:{}:{}", by.kind, by.backend, by.model);
    let assembled = sources::assemble(
        from_teacher,
        served,
        &feedback,
        &fw.sources,
        metrics,
        &teacher_id,
    );
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
        // New answers, and answers users judged since (a demonstration, a thumbs-down), are
        // what a new run would learn differently. The last run's window ends when it started:
        // requests from that millisecond on were outside it, but feedback given by then (even in
        // that same millisecond, before the run was asked for) was read by it.
        let new = assembled
            .taught
            .iter()
            .filter(|t| {
                t.exchange.ts_ms >= last && !feedback.request_judged_after(&t.exchange.id, last)
            })
            .count()
            + feedback.judged_after(last);
        if new < fw.min_new_records {
            return Err(RunEnd::Skipped(format!(
                "only {new} new teaching answers (the teacher's, {teacher}, demonstrations, answers with passing feedback) or newly judged requests and episodes since the last completed run (need {})",
                fw.min_new_records
            )));
        }
    }
    let (splits, report) = curate::curate(
        &assembled.taught,
        assembled.left_out,
        false,
        (fw.validation_share, fw.test_share),
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
    splits.write(root).map_err(|e| failed(&e))?;
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
