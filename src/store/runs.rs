//! The flywheel's records: runs (one per attempt to train and judge a candidate), each route's
//! rollout state, the log of rollout transitions with the numbers behind them, and the live
//! figures the rollout guards and drift checks read from the traffic log.

use std::collections::{BTreeMap, BTreeSet};

use super::sql::{args, Conn, Row};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::StoreError;

type Result<T, E = StoreError> = std::result::Result<T, E>;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One flywheel run as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub id: String,
    pub route: String,
    /// What started it: `{"kind": "schedule"|"drift"|"manual", ...}`.
    pub trigger: Value,
    /// `running`, `completed`, `skipped` or `failed`.
    pub status: String,
    /// `queued`, `curating`, `training`, `evaluating`, `deciding` or `done`.
    pub stage: String,
    pub details: Value,
    pub decision: Option<Value>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub finished_ms: Option<i64>,
}

fn parse(s: String) -> Value {
    serde_json::from_str(&s).unwrap_or(Value::Null)
}

fn run_row(r: &Row<'_>) -> Result<Run, StoreError> {
    Ok(Run {
        id: r.get(0)?,
        route: r.get(1)?,
        trigger: parse(r.get(2)?),
        status: r.get(3)?,
        stage: r.get(4)?,
        details: parse(r.get(5)?),
        decision: r.get::<Option<String>>(6)?.map(parse),
        created_ms: r.get(7)?,
        updated_ms: r.get(8)?,
        finished_ms: r.get(9)?,
    })
}

const RUN_COLUMNS: &str =
    "id, route, trigger, status, stage, details, decision, created_ms, updated_ms, finished_ms";

pub fn insert_run(conn: &Conn, id: &str, route: &str, trigger: &Value) -> Result<()> {
    let now = now_ms();
    conn.execute(
        "INSERT INTO flywheel_runs (id, route, trigger, status, stage, details, created_ms, updated_ms)
         VALUES (?1, ?2, ?3, 'running', 'queued', '{}', ?4, ?4)",
        args![id, route, trigger.to_string(), now],
    )?;
    Ok(())
}

/// Moves a running run to `stage`, merging `details` into what it has.
pub fn update_run(conn: &Conn, id: &str, stage: &str, details: &Value) -> Result<()> {
    let mut merged = get_run(conn, id)?.map_or(Value::Null, |r| r.details);
    merge(&mut merged, details);
    conn.execute(
        "UPDATE flywheel_runs SET stage = ?2, details = ?3, updated_ms = ?4 WHERE id = ?1",
        args![id, stage, merged.to_string(), now_ms()],
    )?;
    Ok(())
}

/// Ends a run with its status and decision.
pub fn finish_run(
    conn: &Conn,
    id: &str,
    status: &str,
    details: &Value,
    decision: &Value,
) -> Result<()> {
    let mut merged = get_run(conn, id)?.map_or(Value::Null, |r| r.details);
    merge(&mut merged, details);
    let now = now_ms();
    conn.execute(
        "UPDATE flywheel_runs SET status = ?2, stage = 'done', details = ?3, decision = ?4,
         updated_ms = ?5, finished_ms = ?5 WHERE id = ?1",
        args![id, status, merged.to_string(), decision.to_string(), now],
    )?;
    Ok(())
}

fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                a.insert(k.clone(), v.clone());
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

pub fn get_run(conn: &Conn, id: &str) -> Result<Option<Run>> {
    conn.query_opt(
        &format!("SELECT {RUN_COLUMNS} FROM flywheel_runs WHERE id = ?1"),
        args![id],
        run_row,
    )
}

/// Runs, newest first, of one route or all.
pub fn list_runs(conn: &Conn, route: Option<&str>, limit: usize) -> Result<Vec<Run>> {
    conn.query(
        &format!(
            "SELECT {RUN_COLUMNS} FROM flywheel_runs WHERE (?1 IS NULL OR route = ?1)
             ORDER BY created_ms DESC, id DESC LIMIT ?2"
        ),
        args![route, limit],
        run_row,
    )
}

pub fn running_runs(conn: &Conn) -> Result<Vec<Run>> {
    conn.query(
        &format!(
            "SELECT {RUN_COLUMNS} FROM flywheel_runs WHERE status = 'running' ORDER BY created_ms"
        ),
        &[],
        run_row,
    )
}

/// The route's most recent finished run, of any outcome.
pub fn last_finished_run(conn: &Conn, route: &str) -> Result<Option<Run>> {
    conn.query_opt(
        &format!(
            "SELECT {RUN_COLUMNS} FROM flywheel_runs WHERE route = ?1 AND finished_ms IS NOT NULL
             ORDER BY finished_ms DESC LIMIT 1"
        ),
        args![route],
        run_row,
    )
}

/// Where a route's rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Only the champion serves (a teacher may listen in as a shadow).
    Idle,
    /// The candidate answers a sample of the champion's traffic, off the response path.
    Shadow,
    /// The candidate serves a sticky share of the traffic.
    Canary,
    /// The candidate passed its evaluation and waits for a person to approve it
    /// (`require_approval`); only the champion serves.
    AwaitingApproval,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Idle => "idle",
            Stage::Shadow => "shadow",
            Stage::Canary => "canary",
            Stage::AwaitingApproval => "awaiting_approval",
        }
    }
}

/// A route's flywheel state, persisted so a restart keeps serving what was promoted and picks a
/// rollout up where it was.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteState {
    pub route: String,
    pub stage: Stage,
    /// Automatic transitions are held; guards still roll back.
    #[serde(default)]
    pub paused: bool,
    /// The champion the config named when this state began; a config naming another one resets it.
    pub config_champion: crate::config::TargetConfig,
    /// The rollout installed on the route now, as the flywheel set it.
    pub installed: crate::config::RolloutConfig,
    /// The rollout to return to when the candidate is rolled back.
    #[serde(default)]
    pub before: Option<crate::config::RolloutConfig>,
    #[serde(default)]
    pub candidate: Option<crate::config::TargetConfig>,
    /// The run whose candidate is rolling out, or whose candidate is champion.
    #[serde(default)]
    pub run_id: Option<String>,
    pub stage_started_ms: i64,
    /// Tool signatures (name and parameter schema) the champion was trained on.
    #[serde(default)]
    pub known_tools: BTreeSet<String>,
    /// The same for the candidate rolling out, which become known if it is promoted.
    #[serde(default)]
    pub candidate_tools: BTreeSet<String>,
    /// Since when the stage in progress has gone without candidate traffic (see
    /// `starved_after_secs`), while it lasts.
    #[serde(default)]
    pub starved_since_ms: Option<i64>,
}

pub fn get_state(conn: &Conn, route: &str) -> Result<Option<RouteState>> {
    let text: Option<String> = conn.query_opt(
        "SELECT state FROM flywheel_routes WHERE route = ?1",
        args![route],
        |r| r.get(0),
    )?;
    match text {
        Some(t) => Ok(Some(serde_json::from_str(&t)?)),
        None => Ok(None),
    }
}

pub fn put_state(conn: &Conn, state: &RouteState) -> Result<()> {
    conn.execute(
        "INSERT INTO flywheel_routes (route, state, updated_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT(route) DO UPDATE SET state = excluded.state, updated_ms = excluded.updated_ms",
        args![state.route, serde_json::to_string(state)?, now_ms()],
    )?;
    Ok(())
}

/// One recorded rollout transition.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutEvent {
    pub route: String,
    pub run_id: Option<String>,
    pub at_ms: i64,
    pub from: String,
    pub to: String,
    /// `shadow`, `canary`, `promote`, `rollback`, `pause`, `resume`, `reset`, `reject`, or
    /// `starved` / `fed` (a stage whose candidate gets no traffic, and gets it again).
    pub action: String,
    pub reason: String,
    pub numbers: Value,
}

pub fn insert_event(conn: &Conn, e: &RolloutEvent) -> Result<()> {
    conn.execute(
        "INSERT INTO rollout_events (route, run_id, at_ms, from_stage, to_stage, action, reason, numbers)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        args![e.route, e.run_id, e.at_ms, e.from, e.to, e.action, e.reason, e.numbers.to_string()],
    )?;
    Ok(())
}

/// A route's transitions (or a run's), oldest first.
pub fn list_events(
    conn: &Conn,
    route: Option<&str>,
    run_id: Option<&str>,
) -> Result<Vec<RolloutEvent>> {
    conn.query(
        "SELECT route, run_id, at_ms, from_stage, to_stage, action, reason, numbers FROM rollout_events
         WHERE (?1 IS NULL OR route = ?1) AND (?2 IS NULL OR run_id = ?2) ORDER BY id",
        args![route, run_id],
        |r| {
            Ok(RolloutEvent {
                route: r.get(0)?,
                run_id: r.get(1)?,
                at_ms: r.get(2)?,
                from: r.get(3)?,
                to: r.get(4)?,
                action: r.get(5)?,
                reason: r.get(6)?,
                numbers: parse(r.get(7)?),
            })
        },
    )
}

/// Live figures over a set of requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LiveStats {
    pub requests: u64,
    /// Requests that failed, or that the target failed and a fallback answered.
    pub errors: u64,
    /// Requests the rails blocked.
    pub blocked: u64,
    pub tool_calls: u64,
    pub invalid_arguments: u64,
    /// Answer pairs in which at least one side called a tool, and how many agreed.
    pub compared: u64,
    pub names_agree: u64,
    pub arguments_agree: u64,
}

impl LiveStats {
    pub fn error_rate(&self) -> f64 {
        ratio(self.errors, self.requests)
    }
    pub fn block_rate(&self) -> f64 {
        ratio(self.blocked, self.requests)
    }
    pub fn parse_failure_rate(&self) -> f64 {
        ratio(self.invalid_arguments, self.tool_calls)
    }
    /// Agreement on names, or on names and arguments.
    pub fn agreement(&self, on_arguments: bool) -> f64 {
        let agree = if on_arguments {
            self.arguments_agree
        } else {
            self.names_agree
        };
        if self.compared == 0 {
            1.0
        } else {
            agree as f64 / self.compared as f64
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Which requests to measure.
pub enum Slice<'a> {
    /// Shadow answers from one model (`target_model`) on a route: their own errors and parse
    /// failures, and their agreement with the primary answer.
    ShadowsFrom { model: &'a str },
    /// Primary requests served on one arm (`champion`, `canary`), with the agreement measured by the
    /// shadow copies made of them.
    Arm { arm: &'a str },
}

/// Figures for `slice` on `route` since `since_ms`.
/// Requests the route's clients sent since `since_ms` (shadows not counted).
pub fn route_requests_since(conn: &Conn, route: &str, since_ms: i64) -> Result<u64> {
    let n: i64 = conn.value(
        "SELECT COUNT(*) FROM traffic WHERE route = ?1 AND ts_ms >= ?2 AND arm != 'shadow'",
        args![route, since_ms],
    )?;
    Ok(n.max(0) as u64)
}

pub fn live_stats(conn: &Conn, route: &str, slice: Slice<'_>, since_ms: i64) -> Result<LiveStats> {
    let mut s = LiveStats::default();
    let (rows_sql, agree_sql, key) = match slice {
        Slice::ShadowsFrom { model } => (
            "SELECT id FROM traffic WHERE route = ?1 AND arm = 'shadow' AND ts_ms >= ?2 AND target_model = ?3",
            "SELECT COUNT(tool_name_agreement), CAST(COALESCE(SUM(tool_name_agreement), 0) AS BIGINT),
                    CAST(COALESCE(SUM(tool_args_agreement), 0) AS BIGINT)
             FROM traffic WHERE route = ?1 AND arm = 'shadow' AND ts_ms >= ?2 AND target_model = ?3",
            model,
        ),
        Slice::Arm { arm } => (
            "SELECT id FROM traffic WHERE route = ?1 AND arm = ?3 AND ts_ms >= ?2",
            "SELECT COUNT(s.tool_name_agreement), CAST(COALESCE(SUM(s.tool_name_agreement), 0) AS BIGINT),
                    CAST(COALESCE(SUM(s.tool_args_agreement), 0) AS BIGINT)
             FROM traffic p JOIN traffic s ON s.shadow_of = p.id
             WHERE p.route = ?1 AND p.arm = ?3 AND p.ts_ms >= ?2 AND s.arm = 'shadow'",
            arm,
        ),
    };
    let status = conn.dialect().json_text("rails", "status");
    let totals = format!(
        "SELECT COUNT(*),
                CAST(COALESCE(SUM(CASE WHEN (status != 200 AND status != 499) OR attempts > 1 THEN 1 ELSE 0 END), 0) AS BIGINT),
                CAST(COALESCE(SUM(CASE WHEN {status} = 'blocked' THEN 1 ELSE 0 END), 0) AS BIGINT)
         FROM traffic WHERE id IN ({rows_sql})"
    );
    let one = |sql: &str| {
        conn.query_opt(sql, args![route, since_ms, key], |r| {
            Ok((r.get::<i64>(0)?, r.get::<i64>(1)?, r.get::<i64>(2)?))
        })
        .map(Option::unwrap_or_default)
    };
    let (requests, errors, blocked) = one(&totals)?;
    let calls = format!(
        "SELECT COUNT(*), CAST(COALESCE(SUM(1 - arguments_valid_json), 0) AS BIGINT), 0 FROM tool_calls
         WHERE choice_index = 0 AND traffic_id IN ({rows_sql})"
    );
    let (tool_calls, invalid, _) = one(&calls)?;
    let (compared, names, args) = one(agree_sql)?;
    s.requests = requests as u64;
    s.errors = errors as u64;
    s.blocked = blocked as u64;
    s.tool_calls = tool_calls as u64;
    s.invalid_arguments = invalid as u64;
    s.compared = compared as u64;
    s.names_agree = names as u64;
    s.arguments_agree = args as u64;
    Ok(s)
}

/// A tool's signature: its name and a digest of its parameter schema, so a changed schema under an
/// old name counts as a new tool.
pub fn tool_signature(tool: &Value) -> Option<String> {
    use sha2::{Digest, Sha256};
    let f = tool.get("function").unwrap_or(tool);
    let name = f.get("name")?.as_str()?;
    let params = f.get("parameters").cloned().unwrap_or(Value::Null);
    let digest = Sha256::digest(canonical(&params).as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("{name}#{hex}"))
}

/// JSON with object keys sorted, so equal schemas hash equally whatever their key order.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, String> =
                m.iter().map(|(k, v)| (k, canonical(v))).collect();
            let parts: Vec<String> = sorted
                .iter()
                .map(|(k, v)| format!("{}:{v}", Value::String((*k).clone())))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// Requests a drift check reads at most (the newest): bounds the check's cost on a busy route.
const TOOL_SCAN_LIMIT: i64 = 5_000;

/// The tool signatures each answered primary request of the route offered since `since_ms`, for
/// the newest requests up to a bound.
pub fn tool_sets(
    conn: &Conn,
    route: &str,
    workload_id: Option<&str>,
    since_ms: i64,
) -> Result<Vec<BTreeSet<String>>> {
    let tools = conn.dialect().json_text("request", "tools");
    let rows = conn.query(
        &format!(
            "SELECT {tools} FROM traffic
             WHERE route = ?1 AND arm != 'shadow' AND status = 200 AND ts_ms >= ?2
               AND (?3 IS NULL OR workload_id = ?3) AND {tools} IS NOT NULL
             ORDER BY ts_ms DESC LIMIT ?4"
        ),
        args![route, since_ms, workload_id, TOOL_SCAN_LIMIT],
        |r| r.get::<Option<String>>(0),
    )?;
    let mut out = Vec::new();
    for text in rows.into_iter().flatten() {
        if let Ok(Value::Array(tools)) = serde_json::from_str::<Value>(&text) {
            out.push(tools.iter().filter_map(tool_signature).collect());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tool_signatures_ignore_key_order_and_see_schema_changes() {
        let a = json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}});
        let b = json!({"type": "function", "function": {"parameters": {"properties": {"x": {"type": "string"}}, "type": "object"}, "name": "f"}});
        let c = json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}});
        assert_eq!(tool_signature(&a), tool_signature(&b));
        assert_ne!(tool_signature(&a), tool_signature(&c));
        assert!(tool_signature(&a).unwrap().starts_with("f#"));
        assert_eq!(tool_signature(&json!({"type": "function"})), None);
    }

    #[test]
    fn runs_and_events_round_trip() {
        crate::store::testing::each_engine("runs_and_events_round_trip", |conn| {
            insert_run(conn, "r1", "agent", &json!({"kind": "manual"})).unwrap();
            update_run(conn, "r1", "curating", &json!({"a": 1})).unwrap();
            update_run(conn, "r1", "training", &json!({"b": 2})).unwrap();
            assert_eq!(running_runs(conn).unwrap().len(), 1);
            finish_run(conn, "r1", "skipped", &json!({}), &json!({"reason": "x"})).unwrap();
            let r = get_run(conn, "r1").unwrap().unwrap();
            assert_eq!((r.status.as_str(), r.stage.as_str()), ("skipped", "done"));
            assert_eq!(r.details, json!({"a": 1, "b": 2}));
            assert!(running_runs(conn).unwrap().is_empty());
            assert_eq!(last_finished_run(conn, "agent").unwrap().unwrap().id, "r1");
            assert!(last_finished_run(conn, "other").unwrap().is_none());
            insert_event(
                conn,
                &RolloutEvent {
                    route: "agent".into(),
                    run_id: Some("r1".into()),
                    at_ms: 5,
                    from: "idle".into(),
                    to: "shadow".into(),
                    action: "shadow".into(),
                    reason: "won".into(),
                    numbers: json!({"gain": 0.5}),
                },
            )
            .unwrap();
            let ev = list_events(conn, Some("agent"), None).unwrap();
            assert_eq!(ev.len(), 1);
            assert_eq!(ev[0].numbers["gain"], 0.5);
            assert!(list_events(conn, None, Some("r2")).unwrap().is_empty());
        });
    }
}

/// The flywheel's readings of the log (live figures, tools, feedback, search filters), the same
/// on both engines.
#[cfg(test)]
mod on_both_engines {
    use super::*;
    use crate::store::feedback::{self, Feedback, FeedbackIndex};
    use crate::store::search::{self, StatusFilter, TrafficQuery};
    use crate::store::traffic::{TrafficLog, TrafficRecord};
    use serde_json::json;
    use std::time::Duration;

    fn rec(i: i64, arm: &str, status: u16, call: Option<&str>) -> TrafficRecord {
        let body = json!({"model": "agent"});
        let mut r = TrafficRecord::begin(
            crate::wire::Api::Chat,
            body.as_object().unwrap(),
            None,
            1_000 + i,
        );
        r.route = "agent".into();
        r.arm = arm.into();
        r.status = status;
        r.target_model = Some(if arm == "shadow" { "cand" } else { "champ" }.into());
        r.episode_id = Some(format!("ep{}", i % 2));
        r.request = json!({"messages": [{"role": "user", "content": format!("question {i}")}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]});
        r.response = Some(match call {
            Some(args) => {
                json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": args}}]}}]})
            }
            None => {
                json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}}]})
            }
        });
        r
    }

    #[tokio::test]
    async fn live_figures_tools_feedback_and_filters_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        for db in crate::store::testing::each_db(
            "live_figures_tools_feedback_and_filters_read_alike",
            dir.path(),
        ) {
            let writer = TrafficLog::start(&db, 64, 16, Duration::ZERO).unwrap();
            let log = writer.log();
            let mut primaries = Vec::new();
            for i in 0..6 {
                let mut r = rec(
                    i,
                    "champion",
                    if i == 5 { 502 } else { 200 },
                    Some("{\"city\": \"Oslo\"}"),
                );
                if i == 4 {
                    r.rails = Some(json!({"status": "blocked"}));
                }
                primaries.push(r.id.to_string());
                let mut shadow = rec(i, "shadow", 200, Some(if i < 2 { "{oops" } else { "{}" }));
                shadow.shadow_of = Some(r.id);
                shadow.tool_name_agreement = Some(true);
                shadow.tool_args_agreement = Some(i >= 3);
                assert!(log.record(r));
                assert!(log.record(shadow));
            }
            for (n, (id, v)) in [
                (&primaries[0], 1.0),
                (&primaries[1], 0.0),
                (&primaries[0], 0.0),
            ]
            .into_iter()
            .enumerate()
            {
                let f = Feedback {
                    id: format!("f{n}"),
                    ts_ms: 5_000 + n as i64,
                    key_name: "k".into(),
                    request_id: Some(id.clone()),
                    episode_id: None,
                    metric: Some("thumbs_up".into()),
                    value: Some(v),
                    comment: None,
                    demonstration: (n == 1)
                        .then(|| json!({"role": "assistant", "content": "better"})),
                };
                log.feedback(f).await.unwrap();
            }
            writer.close().await;
            let dialect = db.dialect();
            db.call(move |conn| {
                assert_eq!(route_requests_since(conn, "agent", 0)?, 6, "{dialect:?}");
                let shadows = live_stats(conn, "agent", Slice::ShadowsFrom { model: "cand" }, 0)?;
                assert_eq!(
                    (
                        shadows.requests,
                        shadows.tool_calls,
                        shadows.invalid_arguments
                    ),
                    (6, 6, 2)
                );
                assert_eq!(
                    (
                        shadows.compared,
                        shadows.names_agree,
                        shadows.arguments_agree
                    ),
                    (6, 6, 3)
                );
                let champion = live_stats(conn, "agent", Slice::Arm { arm: "champion" }, 0)?;
                assert_eq!(
                    (champion.requests, champion.errors, champion.blocked),
                    (6, 1, 1)
                );
                assert_eq!((champion.compared, champion.arguments_agree), (6, 3));
                let tools = tool_sets(conn, "agent", None, 0)?;
                assert_eq!(tools.len(), 5, "answered primaries only");
                assert!(tools[0].iter().all(|t| t.starts_with("get_weather#")));
                let index = FeedbackIndex::load(conn, "agent", 0, 10_000)?;
                assert_eq!(
                    index.requests[&primaries[0]]["thumbs_up"], 0.0,
                    "the latest counts"
                );
                assert!(index.demonstrations.contains_key(&primaries[1]));
                let mut by_arm = feedback::values_by_arm(conn, "agent", 0, "thumbs_up", false)?;
                by_arm.sort_by(|a, b| a.1.total_cmp(&b.1));
                assert_eq!(
                    by_arm,
                    [("champion".to_string(), 0.0), ("champion".to_string(), 0.0)]
                );
                assert_eq!(feedback::for_episode(conn, "ep0")?.len(), 2);
                assert!(feedback::episode_exists(conn, "ep1")?);
                let find = |q: TrafficQuery| -> Result<usize> {
                    Ok(search::search(conn, &TrafficQuery { limit: 50, ..q })?
                        .rows
                        .len())
                };
                assert_eq!(
                    find(TrafficQuery {
                        status: Some(StatusFilter::Error),
                        ..Default::default()
                    })?,
                    1
                );
                assert_eq!(
                    find(TrafficQuery {
                        arm: Some("shadow".into()),
                        ..Default::default()
                    })?,
                    6
                );
                assert_eq!(
                    find(TrafficQuery {
                        verdict: Some("blocked".into()),
                        ..Default::default()
                    })?,
                    1
                );
                assert_eq!(
                    find(TrafficQuery {
                        verdict: Some("none".into()),
                        ..Default::default()
                    })?,
                    11
                );
                assert_eq!(
                    find(TrafficQuery {
                        tool: Some("get_weather".into()),
                        ..Default::default()
                    })?,
                    12
                );
                assert_eq!(
                    find(TrafficQuery {
                        text: Some("QUESTION 3".into()),
                        ..Default::default()
                    })?,
                    2
                );
                let page = search::search(
                    conn,
                    &TrafficQuery {
                        limit: 5,
                        ..Default::default()
                    },
                )?;
                assert_eq!(page.rows[0]["tools"], json!(["get_weather"]));
                let rest = search::search(
                    conn,
                    &TrafficQuery {
                        limit: 50,
                        before: page.next,
                        ..Default::default()
                    },
                )?;
                assert_eq!(page.rows.len() + rest.rows.len(), 12);
                Ok::<_, StoreError>(())
            })
            .await
            .unwrap();
        }
    }
}
