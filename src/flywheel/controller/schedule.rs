//! When runs start: on the cron schedule, on request, or when traffic drifts (new tools, the
//! teacher disagreeing with a local champion, parse failures).

use super::*;

impl FlywheelController {
    pub(super) async fn start_schedule(self: &Arc<Self>) -> anyhow::Result<()> {
        let schedule = self.config.flywheel.schedule.trim().to_string();
        if schedule.is_empty() || !self.config.routes.iter().any(|r| r.flywheel.is_some()) {
            return Ok(());
        }
        use tokio_cron_scheduler::{Job, JobScheduler};
        let me = self.clone();
        let job = Job::new_async(schedule.as_str(), move |_, _| {
            let me = me.clone();
            Box::pin(async move {
                if !me.leads() {
                    return;
                }
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
            if let Err(e) = scheduler.shutdown().await {
                tracing::warn!(error = %e, "the flywheel schedule did not shut down cleanly");
            }
        });
        tracing::info!(%schedule, "flywheel schedule set (UTC)");
        Ok(())
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
            // Another replica's run of the route is recorded as running.
            if let FlywheelError::Store(s) = &e {
                if s.is_unique_violation() {
                    return Err(FlywheelError::Conflict(format!(
                        "A flywheel run for route '{route}' is already in progress."
                    )));
                }
            }
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
        if self.leads() {
            self.spawn_run(run);
        } else {
            // The leader takes it up at its next check.
            lock(&self.running).remove(route);
            tracing::info!(run = %run.id, "the run is queued for the flywheel's leader");
        }
        Ok(id)
    }
}

/// Drift on an idle route: tools the champion never trained on, falling agreement with the
/// teacher, or rising parse failures. Waits out the cooldown after the last run.
/// A champion whose feedback (the latest value per request or episode since `since`) is on the
/// wrong side of a floor.
fn feedback_below_floor(
    conn: &crate::store::Conn,
    route: &RouteConfig,
    fw: &RouteFlywheelConfig,
    metrics: &[MetricConfig],
    since: i64,
) -> Result<Option<Value>, FlywheelError> {
    for floor in &fw.drift.feedback_floors {
        let Some(m) = metrics.iter().find(|m| m.name == floor.metric) else {
            continue;
        };
        let episode = m.level == MetricLevel::Episode;
        let values: Vec<f64> = feedback::values_by_arm(conn, &route.name, since, &m.name, episode)?
            .into_iter()
            .filter(|(arm, _)| arm == "champion")
            .map(|(_, v)| v)
            .collect();
        if values.len() < floor.min_samples {
            continue;
        }
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let below = match m.optimize {
            Optimize::Max => mean < floor.floor,
            Optimize::Min => mean > floor.floor,
        };
        if below {
            return Ok(Some(json!({
                "kind": "drift",
                "signal": "feedback",
                "reason": format!("the champion's {} {mean:.3} is past its floor {:.3} over {} values", m.name, floor.floor, values.len()),
                "metric": m.name,
                "mean": mean,
                "floor": floor.floor,
                "values": values.len(),
            })));
        }
    }
    Ok(None)
}

pub(super) fn drift_signal(
    conn: &crate::store::Conn,
    route: &RouteConfig,
    fw: &RouteFlywheelConfig,
    state: &RouteState,
    metrics: &[MetricConfig],
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
    if let Some(signal) = feedback_below_floor(conn, route, fw, metrics, since)? {
        return Ok(Some(signal));
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
