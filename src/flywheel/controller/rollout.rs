//! A route's rollout: the ticker that checks live figures against the guards, the steps from shadow
//! to canary to champion, manual actions, and rollback.

use super::*;
use crate::config::{FeedbackGuard, RolloutPlan};

impl FlywheelController {
    /// The route's state, created from the config the first time.
    pub(super) fn state(
        &self,
        conn: &crate::store::Conn,
        route: &str,
    ) -> Result<RouteState, FlywheelError> {
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
    pub(super) fn apply(
        &self,
        conn: &crate::store::Conn,
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
        self.config
            .validate_rollout(&state.route, &rollout)
            .map_err(|e| FlywheelError::Invalid(e.to_string()))?;
        // Adapters served by an upstream's servers are loaded there before traffic is sent.
        let pushed = match self.push(&rollout) {
            Ok(calls) => calls,
            Err(f) => {
                let why = format!("the {} stage could not start: {}", to.as_str(), f.message);
                let numbers = json!({"action": action, "fleet": f.calls});
                fstore::insert_event(
                    conn,
                    &event(state, state.stage, "push_failed", &why, numbers),
                )?;
                tracing::warn!(route = %state.route, reason = %why, "rollout transition refused by the fleet");
                return Err(FlywheelError::Fleet(why));
            }
        };
        self.gateway
            .set_rollout(&state.route, rollout.clone())
            .map_err(|e| FlywheelError::Invalid(e.to_string()))?;
        let fleet: Vec<_> = pushed
            .into_iter()
            .chain(self.retire(&state.installed, &rollout))
            .collect();
        let mut numbers = numbers;
        if let (Value::Object(m), false) = (&mut numbers, fleet.is_empty()) {
            m.insert("fleet".into(), json!(fleet));
        }
        let event = event(state, to, action, reason, numbers);
        fstore::insert_event(conn, &event)?;
        tracing::info!(route = %state.route, from = event.from, to = event.to, action, reason, "rollout transition");
        state.stage = to;
        state.installed = rollout;
        state.stage_started_ms = event.at_ms;
        state.starved_since_ms = None;
        metrics::gauge!("flywheel_rollout_starved", "route" => state.route.clone()).set(0.0);
        fstore::put_state(conn, state)?;
        self.publish(conn, &state.route, &state.installed, "flywheel")?;
        Ok(())
    }

    /// Loads a local target's adapter from the adapter store if its engine does not hold it.
    pub(super) fn ensure_adapter(&self, t: &TargetConfig) -> Result<(), String> {
        let (Some(base), Some(adapter)) = (&t.local, &t.adapter) else {
            return Ok(());
        };
        let Some(engine) = self.engines.iter().find(|e| &e.name == base) else {
            return Err(format!("local model '{base}' is not loaded"));
        };
        if engine.adapters.contains(adapter) {
            return Ok(());
        }
        let dir = crate::engine::lora::store_path(&self.data_dir.join("adapters"), adapter);
        engine
            .load_adapter(adapter, &dir)
            .map(|_| tracing::info!(adapter, "adapter reloaded for its rollout"))
            .map_err(|e| format!("adapter '{adapter}': {e}"))
    }

    /// One check of every flywheel route: an operator's replacement of the rollout is respected,
    /// a rollout in progress moves on or rolls back on its live figures, and an idle route is
    /// checked for drift.
    pub fn tick(self: &Arc<Self>) -> Result<(), FlywheelError> {
        if !self.leads() {
            return Ok(());
        }
        let conn = self.conn()?;
        if self.replicated() {
            for run in self.orphaned_runs(&conn)? {
                tracing::info!(run = %run.id, route = %run.route, stage = %run.stage, "taking up a flywheel run no replica is executing");
                self.spawn_run(run);
            }
            self.adopt_jobs(&conn);
        }
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
                self.reconcile_fleet(&conn, &state)?;
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
        self.reconcile_other_routes();
        Ok(())
    }

    /// Advances or rolls back a rollout in progress; for an idle route, returns a drift trigger.
    pub(super) fn step(
        &self,
        conn: &crate::store::Conn,
        route: &RouteConfig,
        state: &mut RouteState,
    ) -> Result<Option<Value>, FlywheelError> {
        let Some(fw) = route.flywheel.as_ref() else {
            return Ok(None);
        };
        let plan = &fw.rollout;
        if let (Some(stats), Some(candidate)) = (stage_stats(conn, state)?, state.candidate.clone())
        {
            watch_starvation(conn, state, plan, now_ms())?;
            let mut verdict = match state.stage {
                Stage::Shadow => promote::judge_shadow(&stats, plan),
                _ => promote::judge_canary(&stats, plan),
            };
            let mut numbers = promote::numbers(&stats, plan);
            if state.stage == Stage::Canary && !plan.feedback_guards.is_empty() {
                let figures = self.feedback_figures(conn, state, plan)?;
                if !matches!(verdict, Verdict::RollBack(_)) {
                    let tripped = figures
                        .iter()
                        .find_map(|(c, g)| promote::judge_feedback(c, g));
                    if let Some(why) = tripped {
                        verdict = Verdict::RollBack(why);
                    }
                }
                let figures: Vec<&promote::FeedbackComparison> =
                    figures.iter().map(|(c, _)| c).collect();
                numbers["feedback"] = json!(figures);
            }
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
                drift_signal(conn, route, fw, state, &self.config.metrics, now_ms())
            }
            _ => Ok(None),
        }
    }

    /// Moves a candidate one stage on: shadow → canary, canary → champion.
    pub(super) fn advance(
        &self,
        conn: &crate::store::Conn,
        route: &RouteConfig,
        state: &mut RouteState,
        candidate: &TargetConfig,
        why: &str,
        numbers: Value,
    ) -> Result<(), FlywheelError> {
        if state.stage == Stage::Canary {
            return self.to_champion(conn, route, state, candidate, why, numbers);
        }
        let (plan, before) = next_stage(route, state);
        let rollout = promote::canary_rollout(&before, candidate, &plan);
        self.apply(conn, state, Stage::Canary, rollout, "canary", why, numbers)
    }

    pub(super) fn to_champion(
        &self,
        conn: &crate::store::Conn,
        route: &RouteConfig,
        state: &mut RouteState,
        candidate: &TargetConfig,
        why: &str,
        numbers: Value,
    ) -> Result<(), FlywheelError> {
        let (plan, before) = next_stage(route, state);
        let teacher = route.teacher();
        let rollout = promote::champion_rollout(&before, candidate, teacher.as_ref(), &plan);
        state.known_tools = std::mem::take(&mut state.candidate_tools);
        state.candidate = None;
        self.apply(conn, state, Stage::Idle, rollout, "promote", why, numbers)?;
        state.before = Some(before);
        fstore::put_state(conn, state)?;
        Ok(())
    }

    pub(super) fn roll_back(
        &self,
        conn: &crate::store::Conn,
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

    /// Holds a candidate that passed its evaluation until a person approves or rejects it; the
    /// route keeps serving as it is.
    pub(super) fn hold_for_approval(
        &self,
        conn: &crate::store::Conn,
        state: &mut RouteState,
        why: &str,
        numbers: Value,
    ) -> Result<(), FlywheelError> {
        let why = format!("{why}; awaiting approval (require_approval)");
        tracing::info!(route = %state.route, reason = %why, "rollout transition: a candidate awaits approval");
        record_stage(
            conn,
            state,
            Stage::AwaitingApproval,
            "await_approval",
            &why,
            numbers,
        )
    }

    /// Manual control: `promote` moves a candidate one stage on (shadow → canary → champion),
    /// `rollback` returns to the rollout before the candidate (or before the last promotion),
    /// `pause` holds automatic transitions (guards still roll back), `resume` lifts the hold,
    /// `approve` starts the rollout of a candidate awaiting approval and `reject` turns it down.
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
                    "Route '{route}' has no candidate rolling out; nothing to promote (a candidate awaiting approval is approved with 'approve')."
                )))
            }
            ("approve", Stage::AwaitingApproval, Some(c)) => {
                let plan = rc.flywheel.as_ref().map(|f| f.rollout.clone()).unwrap_or_default();
                let rollout = promote::shadow_rollout(&state.installed, &c, &plan);
                self.apply(&conn, &mut state, Stage::Shadow, rollout, "approve", &why, numbers)?;
            }
            ("reject", Stage::AwaitingApproval, Some(_)) => {
                state.before = None;
                state.candidate = None;
                state.candidate_tools.clear();
                record_stage(&conn, &mut state, Stage::Idle, "reject", &why, numbers)?;
            }
            ("approve" | "reject", _, _) => {
                return Err(FlywheelError::Conflict(format!(
                    "Route '{route}' has no candidate awaiting approval (its stage is {}).",
                    state.stage.as_str()
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
                    "Unknown action '{action}' (promote, rollback, pause, resume, approve, reject)."
                )))
            }
        }
        self.status(&conn, route)
    }
}

impl FlywheelController {
    /// Each feedback guard's metric on the canary against the champion since the stage began,
    /// with its guard.
    fn feedback_figures<'p>(
        &self,
        conn: &crate::store::Conn,
        state: &RouteState,
        plan: &'p RolloutPlan,
    ) -> Result<Vec<(promote::FeedbackComparison, &'p FeedbackGuard)>, FlywheelError> {
        let mut out = Vec::new();
        for guard in &plan.feedback_guards {
            let Some(m) = self.config.metric(&guard.metric) else {
                continue;
            };
            let episode = m.level == MetricLevel::Episode;
            let values = feedback::values_by_arm(
                conn,
                &state.route,
                state.stage_started_ms,
                &m.name,
                episode,
            )?;
            let arm = |name: &str| -> Vec<f64> {
                values
                    .iter()
                    .filter(|(a, _)| a == name)
                    .map(|(_, v)| *v)
                    .collect()
            };
            let c =
                promote::compare_feedback(&m.name, m.optimize, &arm("canary"), &arm("champion"));
            out.push((c, guard));
        }
        Ok(out)
    }
}

/// Records (once) that the stage in progress has gone `starved_after_secs` without a request for
/// its candidate while it lasted that long, and (once) that traffic came back: a stage that gets
/// nothing says so instead of waiting silently. Returns the action recorded, if any.
pub(super) fn watch_starvation(
    conn: &crate::store::Conn,
    state: &mut RouteState,
    plan: &RolloutPlan,
    now: i64,
) -> Result<Option<&'static str>, FlywheelError> {
    let window_ms = (plan.starved_after_secs * 1000.0) as i64;
    if now - state.stage_started_ms < window_ms {
        return Ok(None);
    }
    let recent = stage_stats_since(conn, state, now - window_ms)?.map_or(0, |s| s.requests);
    let gauge = metrics::gauge!("flywheel_rollout_starved", "route" => state.route.clone());
    let (action, reason) = match (recent, state.starved_since_ms) {
        (0, None) => {
            state.starved_since_ms = Some(now);
            gauge.set(1.0);
            ("starved", format!(
                "the {} stage's candidate received no request in the last {:.0} s; the stage waits for traffic (is the route's traffic reaching the candidate's arm?)",
                state.stage.as_str(), plan.starved_after_secs
            ))
        }
        (n, Some(since)) if n > 0 => {
            state.starved_since_ms = None;
            gauge.set(0.0);
            (
                "fed",
                format!(
                    "the candidate receives traffic again after {:.0} s without",
                    (now - since) as f64 / 1000.0
                ),
            )
        }
        _ => return Ok(None),
    };
    let route_requests = fstore::route_requests_since(conn, &state.route, now - window_ms)?;
    let numbers = json!({
        "window_secs": plan.starved_after_secs,
        "candidate_requests": recent,
        "route_requests": route_requests,
    });
    tracing::warn!(route = %state.route, stage = state.stage.as_str(), action, %reason, "rollout traffic");
    let mut event = event(state, state.stage, action, &reason, numbers);
    event.at_ms = now;
    fstore::insert_event(conn, &event)?;
    fstore::put_state(conn, state)?;
    Ok(Some(action))
}

/// A route's state as its config defines it: idle, the config's rollout installed.
pub(super) fn initial_state(route: &RouteConfig) -> RouteState {
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
        starved_since_ms: None,
    }
}

/// A transition of `state`'s route from its current stage to `to`, stamped now.
/// Records a transition that leaves the route's installed rollout as it is (a candidate held for
/// approval, or turned down while held) and persists the new stage.
fn record_stage(
    conn: &crate::store::Conn,
    state: &mut RouteState,
    to: Stage,
    action: &str,
    why: &str,
    numbers: Value,
) -> Result<(), FlywheelError> {
    let e = event(state, to, action, why, numbers);
    fstore::insert_event(conn, &e)?;
    state.stage = to;
    state.stage_started_ms = e.at_ms;
    fstore::put_state(conn, state)?;
    Ok(())
}

pub(super) fn event(
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

pub(super) fn targets(r: &RolloutConfig) -> Vec<&TargetConfig> {
    let mut v = vec![&r.champion];
    if let Some(c) = &r.canary {
        v.push(&c.target);
    }
    if let Some(s) = &r.shadow {
        v.push(&s.target);
    }
    v
}

/// The route's rollout plan and the rollout a candidate's next stage is built over (the one
/// installed before the candidate arrived).
fn next_stage(route: &RouteConfig, state: &RouteState) -> (RolloutPlan, RolloutConfig) {
    let plan = route
        .flywheel
        .as_ref()
        .map(|f| f.rollout.clone())
        .unwrap_or_default();
    let before = state.before.clone().unwrap_or(state.installed.clone());
    (plan, before)
}
