//! The dashboard's data (scope `admin`), read from the per-minute rollups (`store::rollup`), never
//! from the traffic table.
//!
//! `GET /v1/dashboard/overview?window=1h|6h|1d|1w[&route=NAME]`: per route, the window's totals
//! (requests, requests per second, error and rails block rates, tokens, latency / time to first
//! token / gateway overhead p50 and p95, and the rails: checks, cache hits, blocks by category,
//! each flow's latency), the same per step (1 minute for an hour, 15 for a day, an hour for a
//! week) and per arm, and the targets each arm serves now.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{Admin, Query};
use super::{with_db, AppState};
use crate::store::rollup::{self, Grain, Minute};
use crate::store::search::{self, StatusFilter, TrafficQuery};
use crate::wire::error::ApiError;

/// The windows a page offers: name, length and series step, in ms.
const WINDOWS: &[(&str, i64, i64)] = &[
    ("1h", 3_600_000, 60_000),
    ("6h", 6 * 3_600_000, 5 * 60_000),
    ("1d", 24 * 3_600_000, 15 * 60_000),
    ("1w", 7 * 24 * 3_600_000, 3_600_000),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverviewQuery {
    window: Option<String>,
    route: Option<String>,
}

pub async fn overview(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Query(q): Query<OverviewQuery>,
) -> Result<Json<Value>, ApiError> {
    let name = q.window.unwrap_or_else(|| "1h".into());
    let &(name, length, step) = WINDOWS.iter().find(|(w, _, _)| *w == name).ok_or_else(|| {
        ApiError::invalid_param(
            "window",
            format!("Unknown window '{name}' (1h, 6h, 1d or 1w)."),
        )
    })?;
    let routes = state.gateway.routes();
    let names = match q.route {
        Some(r) if routes.get(&r).is_none() => {
            return Err(ApiError::invalid_param(
                "route",
                format!(
                    "No route named '{r}' (routes: {}).",
                    routes.names().join(", ")
                ),
            ))
        }
        Some(r) => vec![r],
        None => routes.names(),
    };
    // Steps of an hour or more are read from the hourly rollups, and the window ends with the
    // current hour; shorter ones from the minutes.
    let grain = if step % Grain::Hour.ms() == 0 {
        Grain::Hour
    } else {
        Grain::Minute
    };
    let until = grain.start_of(crate::store::runs::now_ms()) + grain.ms();
    let since = until - length;
    let only = (names.len() == 1).then(|| names[0].clone());
    let minutes = with_db(&state, move |conn| {
        Ok(rollup::rollups(conn, grain, since, until, only.as_deref())?)
    })
    .await?;
    let data: Vec<Value> = names
        .iter()
        .map(|n| {
            let rows = minutes.iter().filter(|(_, r, _, _)| r == n);
            let rollout = routes.get(n).map(|r| json!(*r)).unwrap_or(Value::Null);
            route_overview(n, rollout, rows, (since, until, step))
        })
        .collect();
    Ok(Json(json!({
        "object": "dashboard.overview",
        "window": name,
        "since_ms": since,
        "until_ms": until,
        "step_ms": step,
        "routes": data,
    })))
}

/// One route's totals, series and arms (each with its own series). Shadow answers are counted
/// under their arm but left out of the totals: they are not what clients were served.
fn route_overview<'a>(
    name: &str,
    rollout: Value,
    rows: impl Iterator<Item = &'a (i64, String, String, Minute)>,
    (since, until, step): (i64, i64, i64),
) -> Value {
    let mut total = Spans::default();
    let mut by_arm: BTreeMap<&str, Spans> = BTreeMap::new();
    for (minute, _, arm, m) in rows {
        let at = minute - (minute - since).rem_euclid(step);
        by_arm.entry(arm.as_str()).or_default().add(at, m);
        if arm != "shadow" {
            total.add(at, m);
        }
    }
    let seconds = ((until - since) / 1000) as f64;
    let step_secs = step as f64 / 1000.0;
    let arms: BTreeMap<&str, Value> = by_arm
        .iter()
        .map(|(a, s)| (*a, s.json(seconds, step_secs)))
        .collect();
    let mut v = total.json(seconds, step_secs);
    v["route"] = json!(name);
    v["rollout"] = rollout;
    v["arms"] = json!(arms);
    v
}

/// A window's figures in total and per step.
#[derive(Default)]
struct Spans {
    total: Minute,
    steps: BTreeMap<i64, Minute>,
}

impl Spans {
    fn add(&mut self, at: i64, m: &Minute) {
        self.total.merge(m);
        self.steps.entry(at).or_default().merge(m);
    }

    fn json(&self, seconds: f64, step_secs: f64) -> Value {
        let series: Vec<Value> = self
            .steps
            .iter()
            .map(|(t, m)| {
                let mut v = figures(m, step_secs);
                v["t_ms"] = json!(t);
                v
            })
            .collect();
        json!({"totals": figures(&self.total, seconds), "series": series})
    }
}

/// The figures of a span of `seconds`.
fn figures(m: &Minute, seconds: f64) -> Value {
    let rate = |n: u64| {
        if m.requests == 0 {
            Value::Null
        } else {
            json!(n as f64 / m.requests as f64)
        }
    };
    let share = |n: u64| {
        if m.compared == 0 {
            Value::Null
        } else {
            json!(n as f64 / m.compared as f64)
        }
    };
    let pcts = |h: &rollup::Histogram| json!({"p50": h.quantile(0.5), "p95": h.quantile(0.95)});
    let rails = &m.rails;
    let flows: BTreeMap<&str, Value> = rails
        .flow_latency
        .iter()
        .map(|(f, h)| (f.as_str(), pcts(h)))
        .collect();
    json!({
        "requests": m.requests,
        "requests_per_sec": m.requests as f64 / seconds.max(1.0),
        "errors": m.errors,
        "error_rate": rate(m.errors),
        "blocked": m.blocked,
        "block_rate": rate(m.blocked),
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens,
        "compared": m.compared,
        "name_agreement": share(m.agreed_names),
        "args_agreement": share(m.agreed_args),
        "parse_failures": m.parse_failures,
        "parse_failure_rate": rate(m.parse_failures),
        "latency_ms": pcts(&m.latency),
        "ttft_ms": pcts(&m.ttft),
        "overhead_ms": pcts(&m.overhead),
        "rails": {
            "checked": rails.checked,
            "cached": rails.cached,
            "cache_hit_rate": if rails.checked == 0 { Value::Null } else { json!(rails.cached as f64 / rails.checked as f64) },
            "blocked_by_category": rails.blocked_by_category,
            "flow_latency_ms": flows,
        },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficParams {
    route: Option<String>,
    workload: Option<String>,
    arm: Option<String>,
    status: Option<String>,
    tool: Option<String>,
    verdict: Option<String>,
    q: Option<String>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    cursor: Option<String>,
    limit: Option<usize>,
}

const ARMS: &[&str] = &["champion", "canary", "shadow", "direct"];
/// How far back a search looks when it names no `since_ms`.
const DEFAULT_SEARCH_SPAN_MS: i64 = 24 * 3_600_000;
const MAX_PAGE: usize = 500;

/// `GET /v1/dashboard/traffic`: exchanges matching every filter given, newest first, over the day
/// before `until_ms` (or the page's cursor, or now) unless `since_ms` says otherwise; page on with
/// `cursor` set to the response's `next_cursor`.
pub async fn traffic(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Query(p): Query<TrafficParams>,
) -> Result<Json<Value>, ApiError> {
    let query = traffic_query(&state, p)?;
    let page = with_db(&state, move |conn| Ok(search::search(conn, &query)?)).await?;
    Ok(Json(json!({
        "object": "list",
        "data": page.rows,
        "next_cursor": page.next.map(|c| c.to_string()),
    })))
}

fn traffic_query(state: &AppState, p: TrafficParams) -> Result<TrafficQuery, ApiError> {
    let text = |name: &str, v: Option<String>, max: usize| -> Result<Option<String>, ApiError> {
        match v {
            Some(s) if s.is_empty() => Ok(None),
            Some(s) if s.chars().count() > max => Err(ApiError::invalid_param(
                name,
                format!("'{name}' is longer than {max} characters."),
            )),
            other => Ok(other),
        }
    };
    let routes = state.gateway.routes();
    let route = text("route", p.route, 256)?;
    if let Some(r) = route.as_deref().filter(|r| routes.get(r).is_none()) {
        return Err(ApiError::invalid_param(
            "route",
            format!(
                "No route named '{r}' (routes: {}).",
                routes.names().join(", ")
            ),
        ));
    }
    let arm = text("arm", p.arm, 16)?;
    if let Some(a) = arm.as_deref().filter(|a| !ARMS.contains(a)) {
        return Err(ApiError::invalid_param(
            "arm",
            format!("Unknown arm '{a}' ({}).", ARMS.join(", ")),
        ));
    }
    let status = match text("status", p.status, 8)?.as_deref() {
        None => None,
        Some("ok") => Some(StatusFilter::Ok),
        Some("error") => Some(StatusFilter::Error),
        Some(s) => match s.parse::<u16>() {
            Ok(n) if (100..600).contains(&n) => Some(StatusFilter::Exactly(n)),
            _ => {
                return Err(ApiError::invalid_param(
                    "status",
                    format!("'status' is 'ok', 'error' or an HTTP status code, not '{s}'."),
                ))
            }
        },
    };
    if let (Some(a), Some(b)) = (p.since_ms, p.until_ms) {
        if a >= b {
            return Err(ApiError::invalid_param(
                "since_ms",
                format!("The time range is empty: since_ms {a} is not before until_ms {b}."),
            ));
        }
    }
    let before = match text("cursor", p.cursor, 64)? {
        None => None,
        Some(c) => Some(c.parse::<search::Cursor>().map_err(|()| {
            ApiError::invalid_param(
                "cursor",
                format!("'cursor' is a previous answer's 'next_cursor', not '{c}'."),
            )
        })?),
    };
    let q = text("q", p.q, 1000)?;
    if let Some(q) = q.as_deref() {
        if q.chars().count() < search::MIN_TEXT_CHARS {
            return Err(ApiError::invalid_param(
                "q",
                format!(
                    "A text search needs at least {} characters, not '{q}'.",
                    search::MIN_TEXT_CHARS
                ),
            ));
        }
    }
    let limit = p.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid_param(
            "limit",
            format!("'limit' is 1 to {MAX_PAGE}."),
        ));
    }
    // Searches are bounded in time, like a log viewer's: a day unless told otherwise, the day
    // before the page being asked for.
    let since_ms = p.since_ms.unwrap_or_else(|| {
        let end = match (p.until_ms, before) {
            (Some(u), Some(c)) => u.min(c.ts_ms + 1),
            (Some(u), None) => u,
            (None, Some(c)) => c.ts_ms + 1,
            (None, None) => crate::store::runs::now_ms(),
        };
        end - DEFAULT_SEARCH_SPAN_MS
    });
    Ok(TrafficQuery {
        since_ms: Some(since_ms),
        until_ms: p.until_ms,
        route,
        workload: text("workload", p.workload, 256)?,
        arm,
        status,
        tool: text("tool", p.tool, 256)?,
        verdict: text("verdict", p.verdict, 64)?,
        text: q,
        before,
        limit,
    })
}

/// `GET /v1/dashboard/traffic/{id}`: one exchange in full (request, response, tool calls, rails
/// verdict, feedback) and the shadow answers given beside it, with their agreement.
pub async fn exchange(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let found = with_db(&state, {
        let id = id.clone();
        move |conn| Ok(crate::store::traffic::exchange(conn, &id)?)
    })
    .await?;
    let (record, shadows) =
        found.ok_or_else(|| ApiError::not_found(format!("No logged request '{id}'.")))?;
    Ok(Json(
        json!({"object": "dashboard.exchange", "exchange": record, "shadows": shadows}),
    ))
}
