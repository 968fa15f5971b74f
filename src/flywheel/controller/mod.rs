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
use super::sources;
use crate::config::{
    Config, MetricConfig, MetricLevel, Optimize, RolloutConfig, RouteConfig, RouteFlywheelConfig,
    TargetConfig,
};
use crate::engine::Engine;
use crate::gateway::Gateway;
use crate::store::entities::{self, EntityError};
use crate::store::feedback::{self, FeedbackIndex};
use crate::store::runs::{self as fstore, now_ms, RolloutEvent, RouteState, Slice, Stage};
use crate::store::traffic::{self, AnsweredBy, ExportFilter};
use crate::store::Db;
use crate::store::StoreError;

mod fleet;
mod replicas;
mod rollout;
mod run;
mod schedule;

use rollout::{event, initial_state, targets};
use run::{stage_stats, stage_stats_since};
use schedule::drift_signal;

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
    /// An upstream's servers refused an adapter the rollout needs.
    #[error("{0}")]
    Fleet(String),
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
    db: Db,
    data_dir: PathBuf,
    /// Routes with a run in progress.
    running: Mutex<HashSet<String>>,
    /// This replica leads the flywheel (see `replicas`; unused on SQLite, where it always does).
    leading: std::sync::atomic::AtomicBool,
    /// Serializes rollout transitions (the ticker and manual actions).
    transitions: Mutex<()>,
    /// The upstream fleets adapters are pushed to.
    fleets: fleet::Fleets,
    /// The runtime the fleet calls run on (they are made from blocking code).
    rt: tokio::runtime::Handle,
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
        db: Db,
    ) -> anyhow::Result<Arc<Self>> {
        let this = Arc::new(Self {
            db,
            data_dir: config.data_dir.clone(),
            config,
            gateway,
            jobs,
            engines,
            running: Mutex::default(),
            leading: std::sync::atomic::AtomicBool::new(false),
            transitions: Mutex::default(),
            fleets: fleet::Fleets::default(),
            rt: tokio::runtime::Handle::current(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        });
        if this.replicated() {
            // The leader restores and resumes when it takes the lead; every replica follows
            // the stored rollouts.
            this.start_replication();
        } else {
            let restoring = this.clone();
            let runs = tokio::task::spawn_blocking(move || restoring.restore()).await??;
            for run in runs {
                this.spawn_run(run);
            }
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
        if tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("flywheel tasks still running 5 s after shutdown; leaving them");
        }
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

    fn conn(&self) -> Result<crate::store::Conn, FlywheelError> {
        Ok(self.db.open()?)
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
                    tracing::info!(route = %route.name, stage = state.stage.as_str(), champion = %state.installed.champion, "flywheel rollout restored");
                    self.reconcile_fleet(&conn, &state)?;
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

    /// A route's flywheel status: stage, what is installed, the live figures of a rollout in
    /// progress, and its transitions.
    pub fn route_status(&self, route: &str) -> Result<Value, FlywheelError> {
        self.route(route)?;
        let conn = self.conn()?;
        self.status(&conn, route)
    }

    fn status(&self, conn: &crate::store::Conn, route: &str) -> Result<Value, FlywheelError> {
        let state = self.state(conn, route)?;
        let live = stage_stats(conn, &state)?;
        let events = fstore::list_events(conn, Some(route), None)?;
        let plan = self
            .route(route)?
            .0
            .flywheel
            .as_ref()
            .map(|f| f.rollout.clone());
        Ok(json!({
            "plan": plan,
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

#[cfg(test)]
mod tests {
    use super::rollout::watch_starvation;
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
            episode_id: None,
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

    async fn db(records: Vec<TrafficRecord>) -> (tempfile::TempDir, crate::store::Conn) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let writer = TrafficLog::start(
            &crate::store::Db::new(path.clone()),
            1024,
            64,
            Duration::from_millis(1),
        )
        .unwrap();
        for r in records {
            assert!(writer.log().record(r));
        }
        writer.close().await;
        let conn = crate::store::open(&path).unwrap();
        (dir, conn)
    }

    #[tokio::test]
    async fn a_champion_whose_feedback_falls_below_its_floor_drifts() {
        let teacher = TargetConfig::upstream("big", "teacher");
        let champion = TargetConfig::local_adapter("tiny", "fw/agent-1");
        let now = now_ms();
        let rows: Vec<TrafficRecord> = (0..10)
            .map(|i| {
                rec(
                    now - 5_000 + i,
                    "champion",
                    &champion,
                    answer("get_weather", "{}"),
                )
            })
            .collect();
        let ids: Vec<String> = rows.iter().map(|r| r.id.to_string()).collect();
        let (d, conn) = db(rows).await;
        // Three answers in ten liked (one of them first disliked: the latest value counts).
        let writer = TrafficLog::start(
            &crate::store::Db::new(d.path().join("f.db")),
            64,
            8,
            Duration::from_millis(1),
        )
        .unwrap();
        let thumbs = |n: usize, id: &str, value: f64| crate::store::feedback::Feedback {
            id: format!("f{n}"),
            ts_ms: now + n as i64,
            key_name: "k".into(),
            request_id: Some(id.to_string()),
            episode_id: None,
            metric: Some("thumbs_up".into()),
            value: Some(value),
            comment: None,
            demonstration: None,
        };
        writer
            .log()
            .feedback(thumbs(0, &ids[0], 0.0))
            .await
            .unwrap();
        for (i, id) in ids.iter().enumerate() {
            let liked = if i < 3 { 1.0 } else { 0.0 };
            writer
                .log()
                .feedback(thumbs(i + 1, id, liked))
                .await
                .unwrap();
        }
        writer.close().await;
        let metrics: Vec<MetricConfig> =
            serde_json::from_value(json!([{"name": "thumbs_up", "type": "boolean"}])).unwrap();
        let sig = fstore::tool_signature(&tool("get_weather")).unwrap();
        let signal = |floor: f64, min_samples: usize| {
            let mut r = route(&champion, &teacher);
            r.flywheel.as_mut().unwrap().drift.feedback_floors =
                vec![crate::config::FeedbackFloor {
                    metric: "thumbs_up".into(),
                    floor,
                    min_samples,
                }];
            let fw = r.flywheel.clone().unwrap();
            drift_signal(&conn, &r, &fw, &state(&r, &[&sig]), &metrics, now + 100).unwrap()
        };
        let s = signal(0.5, 10).unwrap();
        assert_eq!(s["signal"], "feedback", "{s}");
        assert!((s["mean"].as_f64().unwrap() - 0.3).abs() < 1e-9, "{s}");
        assert_eq!(s["values"], 10);
        assert!(signal(0.25, 10).is_none(), "above its floor");
        assert!(signal(0.5, 11).is_none(), "too few values");
    }

    #[tokio::test]
    async fn a_canary_without_traffic_is_recorded_as_starved_once_and_as_fed_when_it_comes() {
        let teacher = TargetConfig::upstream("big", "teacher");
        let candidate = TargetConfig::local_adapter("tiny", "fw/agent-1");
        let now = now_ms();
        let window = 60_000;
        // The route is busy, but every request went to the champion.
        let busy = (0..20)
            .map(|i| {
                rec(
                    now - 30_000 + i,
                    "champion",
                    &teacher,
                    answer("get_weather", "{}"),
                )
            })
            .collect();
        let (_d, conn) = db(busy).await;
        let r = route(&teacher, &teacher);
        let mut plan = r.flywheel.clone().unwrap().rollout;
        plan.starved_after_secs = (window / 1000) as f64;
        let mut s = state(&r, &[]);
        s.stage = Stage::Canary;
        s.candidate = Some(candidate.clone());
        s.stage_started_ms = now - 2 * window;
        // Not starved while the stage is younger than the window.
        let mut young = s.clone();
        young.stage_started_ms = now - window / 2;
        assert_eq!(
            watch_starvation(&conn, &mut young, &plan, now).unwrap(),
            None
        );
        assert_eq!(
            watch_starvation(&conn, &mut s, &plan, now).unwrap(),
            Some("starved")
        );
        assert_eq!(s.starved_since_ms, Some(now));
        // Said once, not at every check.
        assert_eq!(
            watch_starvation(&conn, &mut s, &plan, now + 1_000).unwrap(),
            None
        );
        let events = fstore::list_events(&conn, Some("agent"), None).unwrap();
        let starved: Vec<_> = events.iter().filter(|e| e.action == "starved").collect();
        assert_eq!(starved.len(), 1);
        assert_eq!(starved[0].numbers["candidate_requests"], 0);
        assert_eq!(starved[0].numbers["route_requests"], 20);
        // A canary request arrives: fed again.
        let writer = TrafficLog::start(
            &crate::store::Db::new(_d.path().join("f.db")),
            16,
            4,
            Duration::from_millis(1),
        )
        .unwrap();
        assert!(writer.log().record(rec(
            now + 2_000,
            "canary",
            &candidate,
            answer("get_weather", "{}")
        )));
        writer.close().await;
        assert_eq!(
            watch_starvation(&conn, &mut s, &plan, now + 3_000).unwrap(),
            Some("fed")
        );
        assert_eq!(s.starved_since_ms, None);
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
        let signal = drift_signal(&conn, &r, &fw, &state(&r, &[]), &[], now)
            .unwrap()
            .unwrap();
        assert_eq!(signal["signal"], "new_tools");
        assert_eq!(signal["requests"], 6);
        let sig = fstore::tool_signature(&tool("get_weather")).unwrap();
        assert!(drift_signal(&conn, &r, &fw, &state(&r, &[&sig]), &[], now)
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
        assert!(drift_signal(&conn, &r, &fw, &state(&r, &[]), &[], now)
            .unwrap()
            .is_none());
        assert!(
            drift_signal(&conn, &r, &fw, &state(&r, &[]), &[], now + 120_000)
                .unwrap()
                .is_none()
        );
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
        let signal = drift_signal(&conn, &r, &fw, &state(&r, &[&sig]), &[], now)
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
        let signal = drift_signal(&conn, &r, &fw, &state(&r, &[&sig]), &[], now)
            .unwrap()
            .unwrap();
        assert_eq!(signal["signal"], "parse_failures", "{signal}");
        assert!(signal["reason"].as_str().unwrap().contains("0.200"));
    }
}
