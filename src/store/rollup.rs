//! Per-minute rollups of the traffic log, kept by the writer in the same transaction as the rows
//! they count: requests, errors, rails blocks and tokens per (minute, route, arm), with latency,
//! time-to-first-token and gateway-overhead histograms. The dashboard reads these, never the
//! traffic table, so a page costs the same with a thousand rows or a million.

use std::collections::{BTreeMap, HashMap};

use super::sql::{args, Conn, Dialect, Row};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::traffic::TrafficRecord;
use super::StoreError;

/// The smallest latency a histogram tells apart, in ms.
const BASE_MS: f64 = 0.01;
/// Each bucket's upper bound is this much above the one before: percentiles are within ~5%.
const GROWTH: f64 = 1.1;
/// Buckets past this one (about 15 minutes) are counted in it.
const LAST_BUCKET: u16 = 230;

/// Counts of values in log-spaced buckets; bucket `b` holds values in
/// `(BASE_MS·GROWTH^(b-1), BASE_MS·GROWTH^b]`, bucket 0 everything up to `BASE_MS`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Histogram(BTreeMap<u16, u64>);

impl Histogram {
    pub fn add(&mut self, ms: f64) {
        if !ms.is_finite() || ms < 0.0 {
            return;
        }
        let b = if ms <= BASE_MS {
            0
        } else {
            ((ms / BASE_MS).ln() / GROWTH.ln())
                .ceil()
                .min(LAST_BUCKET as f64) as u16
        };
        *self.0.entry(b).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (b, n) in &other.0 {
            *self.0.entry(*b).or_default() += n;
        }
    }

    pub fn count(&self) -> u64 {
        self.0.values().sum()
    }

    /// The `q` quantile (0..=1), as the geometric middle of its bucket; None when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, n) in &self.0 {
            seen += n;
            if seen >= rank {
                return Some(if *b == 0 {
                    BASE_MS
                } else {
                    BASE_MS * GROWTH.powf(*b as f64 - 0.5)
                });
            }
        }
        None
    }
}

/// What the rails said in a minute: requests checked, verdicts served from the cache, blocks by
/// category, and each flow's latency.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RailsMinute {
    pub checked: u64,
    pub cached: u64,
    pub blocked_by_category: BTreeMap<String, u64>,
    pub flow_latency: BTreeMap<String, Histogram>,
}

impl RailsMinute {
    fn add(&mut self, rails: &Value) {
        self.checked += 1;
        if rails.get("status").and_then(Value::as_str) == Some("blocked") {
            for c in rails
                .get("categories")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                *self.blocked_by_category.entry(c.to_string()).or_default() += 1;
            }
        }
        let mut any_cached = false;
        for r in rails
            .get("rails")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            any_cached |= r.get("cached").and_then(Value::as_bool) == Some(true);
            if let (Some(flow), Some(ms)) = (
                r.get("flow").and_then(Value::as_str),
                r.get("latency_ms").and_then(Value::as_f64),
            ) {
                self.flow_latency
                    .entry(flow.to_string())
                    .or_default()
                    .add(ms);
            }
        }
        self.cached += u64::from(any_cached);
    }

    pub fn merge(&mut self, o: &RailsMinute) {
        self.checked += o.checked;
        self.cached += o.cached;
        for (c, n) in &o.blocked_by_category {
            *self.blocked_by_category.entry(c.clone()).or_default() += n;
        }
        for (f, h) in &o.flow_latency {
            self.flow_latency.entry(f.clone()).or_default().merge(h);
        }
    }
}

/// One (minute, route, arm)'s figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Minute {
    pub requests: u64,
    pub errors: u64,
    pub blocked: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Answers compared with another target's (shadows, mirrored canaries) and how many agreed
    /// on the tool names and on names and arguments.
    pub compared: u64,
    pub agreed_names: u64,
    pub agreed_args: u64,
    /// Answers with a tool call whose arguments are not JSON.
    pub parse_failures: u64,
    pub latency: Histogram,
    pub ttft: Histogram,
    /// The gateway's own time: latency less the upstream's, for requests an upstream answered.
    pub overhead: Histogram,
    pub rails: RailsMinute,
}

/// What a minute counts of one logged request: a record as the writer has it, or a stored row.
pub struct Counted<'a> {
    pub ts_ms: i64,
    pub route: &'a str,
    pub arm: &'a str,
    pub status: u16,
    pub rails: Option<&'a Value>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub name_agreement: Option<bool>,
    pub args_agreement: Option<bool>,
    /// One of its tool calls has arguments that are not JSON.
    pub unparsable: bool,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub upstream_ms: Option<f64>,
}

impl<'a> Counted<'a> {
    /// `unparsable`: the writer works that out as it stores the calls.
    pub fn of(r: &'a TrafficRecord, unparsable: bool) -> Self {
        let usage = r.response.as_ref().and_then(|v| v.get("usage"));
        let tokens = |k: &str| {
            usage
                .and_then(|u| u.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        Self {
            ts_ms: r.ts_ms,
            route: &r.route,
            arm: &r.arm,
            status: r.status,
            rails: r.rails.as_ref(),
            prompt_tokens: tokens("prompt_tokens"),
            completion_tokens: tokens("completion_tokens"),
            name_agreement: r.tool_name_agreement,
            args_agreement: r.tool_args_agreement,
            unparsable,
            latency_ms: r.latency_ms,
            ttft_ms: r.ttft_ms,
            upstream_ms: r.upstream_ms,
        }
    }
}

impl Minute {
    fn add(&mut self, r: &Counted<'_>) {
        self.requests += 1;
        self.errors += u64::from(r.status >= 400);
        if let Some(rails) = r.rails {
            self.blocked +=
                u64::from(rails.get("status").and_then(Value::as_str) == Some("blocked"));
            self.rails.add(rails);
        }
        self.prompt_tokens += r.prompt_tokens;
        self.completion_tokens += r.completion_tokens;
        if let Some(names) = r.name_agreement {
            self.compared += 1;
            self.agreed_names += u64::from(names);
            self.agreed_args += u64::from(names && r.args_agreement == Some(true));
        }
        self.parse_failures += u64::from(r.unparsable);
        self.latency.add(r.latency_ms);
        if let Some(t) = r.ttft_ms {
            self.ttft.add(t);
        }
        if let Some(up) = r.upstream_ms {
            self.overhead.add((r.latency_ms - up).max(0.0));
        }
    }

    pub fn merge(&mut self, o: &Minute) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.blocked += o.blocked;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.compared += o.compared;
        self.agreed_names += o.agreed_names;
        self.agreed_args += o.agreed_args;
        self.parse_failures += o.parse_failures;
        self.latency.merge(&o.latency);
        self.ttft.merge(&o.ttft);
        self.overhead.merge(&o.overhead);
        self.rails.merge(&o.rails);
    }
}

/// The minute a timestamp falls in.
pub fn minute_of(ts_ms: i64) -> i64 {
    ts_ms - ts_ms.rem_euclid(60_000)
}

/// The rollups are kept per minute, and per hour for long windows (a week is 168 hours a route
/// and arm, not 10,080 minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    Minute,
    Hour,
}

impl Grain {
    pub fn ms(self) -> i64 {
        match self {
            Grain::Minute => 60_000,
            Grain::Hour => 3_600_000,
        }
    }

    /// The start of the minute or hour a timestamp falls in.
    pub fn start_of(self, ts_ms: i64) -> i64 {
        ts_ms - ts_ms.rem_euclid(self.ms())
    }

    /// The table and its time column.
    fn table(self) -> (&'static str, &'static str) {
        match self {
            Grain::Minute => ("traffic_minutes", "minute_ms"),
            Grain::Hour => ("traffic_hours", "hour_ms"),
        }
    }
}

/// A batch's records summed by (minute, route, arm).
#[derive(Default)]
pub struct Rollup(HashMap<(i64, String, String), Minute>);

impl Rollup {
    pub fn add(&mut self, r: &Counted<'_>) {
        self.0
            .entry((minute_of(r.ts_ms), r.route.to_string(), r.arm.to_string()))
            .or_default()
            .add(r);
    }

    /// Adds the batch's sums to the stored minutes and hours, in the batch's transaction.
    pub fn write(&self, tx: &Conn) -> Result<(), StoreError> {
        // In one order, so writers on one PostgreSQL database lock rows in the same order.
        let mut keys: Vec<_> = self.0.keys().collect();
        keys.sort();
        for key @ (minute, route, arm) in keys {
            add_stored(tx, Grain::Minute, (*minute, route, arm), &self.0[key])?;
        }
        add_to_hours(
            tx,
            self.0
                .iter()
                .map(|((minute, route, arm), m)| (*minute, route.as_str(), arm.as_str(), m)),
        )
    }
}

/// Adds minutes' figures to the stored hours they fall in.
fn add_to_hours<'a>(
    tx: &Conn,
    minutes: impl Iterator<Item = (i64, &'a str, &'a str, &'a Minute)>,
) -> Result<(), StoreError> {
    let mut hours: HashMap<(i64, &str, &str), Minute> = HashMap::new();
    for (minute, route, arm, m) in minutes {
        hours
            .entry((Grain::Hour.start_of(minute), route, arm))
            .or_default()
            .merge(m);
    }
    let mut keys: Vec<_> = hours.keys().copied().collect();
    keys.sort();
    for key in keys {
        add_stored(tx, Grain::Hour, key, &hours[&key])?;
    }
    Ok(())
}

/// Adds `m` to the stored figures of one (start, route, arm).
fn add_stored(
    tx: &Conn,
    grain: Grain,
    (start, route, arm): (i64, &str, &str),
    m: &Minute,
) -> Result<(), StoreError> {
    let (table, column) = grain.table();
    // Several writers (replicas on one PostgreSQL database) add to the same rows: each reads its
    // row locked; a row first written by two at once is taken by one, and the other reads it.
    let lock = match tx.dialect() {
        Dialect::Sqlite => "",
        Dialect::Postgres => " FOR UPDATE",
    };
    let select = format!(
        "SELECT {FIGURES} FROM {table} WHERE {column} = ?1 AND route = ?2 AND arm = ?3{lock}"
    );
    for _ in 0..2 {
        let stored = tx.query_opt(&select, args![start, route, arm], |r| figures_at(r, 0))?;
        let existed = stored.is_some();
        let mut total = stored.unwrap_or_default();
        total.merge(m);
        let values = [
            serde_json::to_string(&total.latency)?,
            serde_json::to_string(&total.ttft)?,
            serde_json::to_string(&total.overhead)?,
            serde_json::to_string(&total.rails)?,
        ];
        let figures = args![
            start,
            route,
            arm,
            total.requests,
            total.errors,
            total.blocked,
            total.prompt_tokens,
            total.completion_tokens,
            total.compared,
            total.agreed_names,
            total.agreed_args,
            total.parse_failures,
            values[0],
            values[1],
            values[2],
            values[3],
        ];
        if existed {
            tx.execute(
                &format!(
                    "UPDATE {table} SET requests = ?4, errors = ?5, blocked = ?6, prompt_tokens = ?7,
                        completion_tokens = ?8, compared = ?9, agreed_names = ?10, agreed_args = ?11,
                        parse_failures = ?12, latency = ?13, ttft = ?14, overhead = ?15, rails = ?16
                     WHERE {column} = ?1 AND route = ?2 AND arm = ?3"
                ),
                figures,
            )?;
            return Ok(());
        }
        let added = tx.execute(
            &format!(
                "INSERT INTO {table} ({column}, route, arm, {FIGURES})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT DO NOTHING"
            ),
            figures,
        )?;
        if added == 1 {
            return Ok(());
        }
    }
    Err(StoreError::Column(format!(
        "the {table} row of {start}, {route}, {arm} could not be written"
    )))
}

/// Sums the stored minutes into hours (run once, as the hours table is created); returns how
/// many minutes.
pub fn hours_from_minutes(tx: &Conn) -> Result<u64, StoreError> {
    let minutes = rollups(tx, Grain::Minute, i64::MIN, i64::MAX, None)?;
    add_to_hours(
        tx,
        minutes
            .iter()
            .map(|(minute, route, arm, m)| (*minute, route.as_str(), arm.as_str(), m)),
    )?;
    Ok(minutes.len() as u64)
}

/// Rolls up the rows logged before the rollups were kept: every row older than the first stored
/// minute (all of them when there is none). Run once, as part of a migration; returns how many.
pub fn roll_up_existing(tx: &Conn) -> Result<u64, StoreError> {
    let first: Option<i64> = tx.value("SELECT min(minute_ms) FROM traffic_minutes", &[])?;
    // Read a chunk of rows at a time, so a big log does not sit in memory whole.
    let mut rollup = Rollup::default();
    let mut n = 0;
    let mut after = (i64::MIN, String::new());
    loop {
        let rows = tx.query(
        "SELECT ts_ms, route, arm, status, rails, prompt_tokens, completion_tokens,
                tool_name_agreement, tool_args_agreement, latency_ms, ttft_ms, upstream_ms,
                    CASE WHEN EXISTS (SELECT 1 FROM tool_calls c WHERE c.traffic_id = t.id
                                      AND c.arguments_valid_json = 0) THEN 1 ELSE 0 END,
                    id
             FROM traffic t WHERE ts_ms < ?1 AND (ts_ms, id) > (?2, ?3) ORDER BY ts_ms, id LIMIT ?4",
            args![first.unwrap_or(i64::MAX), after.0, after.1, ROLL_UP_CHUNK],
            |r| {
                let (route, arm): (String, String) = (r.get(1)?, r.get(2)?);
                let rails: Option<Value> = r
                    .get::<Option<String>>(4)?
                    .and_then(|s| serde_json::from_str(&s).ok());
                let tokens = |i: usize| r.get::<Option<i64>>(i).map(|v| v.unwrap_or(0).max(0) as u64);
                let ts_ms: i64 = r.get(0)?;
                rollup.add(&Counted {
                    ts_ms,
                    route: &route,
                    arm: &arm,
                    status: r.get(3)?,
                    rails: rails.as_ref(),
                    prompt_tokens: tokens(5)?,
                    completion_tokens: tokens(6)?,
                    name_agreement: r.get(7)?,
                    args_agreement: r.get(8)?,
                    unparsable: r.get(12)?,
                    latency_ms: r.get(9)?,
                    ttft_ms: r.get(10)?,
                    upstream_ms: r.get(11)?,
                });
                Ok((ts_ms, r.get::<String>(13)?))
            },
        )?;
        n += rows.len() as u64;
        let Some(last) = rows.last() else { break };
        after = last.clone();
        std::mem::take(&mut rollup).write(tx)?;
    }
    Ok(n)
}

/// The figure columns of `traffic_minutes`, in `figures_at`'s order.
const FIGURES: &str = "requests, errors, blocked, prompt_tokens, completion_tokens, compared,
    agreed_names, agreed_args, parse_failures, latency, ttft, overhead, rails";

/// Rows of the old log rolled up at a time.
const ROLL_UP_CHUNK: i64 = 100_000;

fn figures_at(r: &Row<'_>, at: usize) -> Result<Minute, StoreError> {
    let count = |i: usize| r.get::<i64>(at + i).map(|v| v.max(0) as u64);
    fn json<T: serde::de::DeserializeOwned>(r: &Row<'_>, i: usize) -> Result<T, StoreError> {
        let text: String = r.get(i)?;
        Ok(serde_json::from_str(&text)?)
    }
    Ok(Minute {
        requests: count(0)?,
        errors: count(1)?,
        blocked: count(2)?,
        prompt_tokens: count(3)?,
        completion_tokens: count(4)?,
        compared: count(5)?,
        agreed_names: count(6)?,
        agreed_args: count(7)?,
        parse_failures: count(8)?,
        latency: json(r, at + 9)?,
        ttft: json(r, at + 10)?,
        overhead: json(r, at + 11)?,
        rails: json(r, at + 12)?,
    })
}

/// The stored minutes in `[since_ms, until_ms)`, optionally of one route, oldest first:
/// `(minute, route, arm, figures)`.
pub fn minutes(
    conn: &Conn,
    since_ms: i64,
    until_ms: i64,
    route: Option<&str>,
) -> Result<Vec<(i64, String, String, Minute)>, StoreError> {
    rollups(conn, Grain::Minute, since_ms, until_ms, route)
}

/// The stored minutes or hours starting in `[since_ms, until_ms)`, optionally of one route,
/// oldest first: `(start, route, arm, figures)`.
pub fn rollups(
    conn: &Conn,
    grain: Grain,
    since_ms: i64,
    until_ms: i64,
    route: Option<&str>,
) -> Result<Vec<(i64, String, String, Minute)>, StoreError> {
    let (table, column) = grain.table();
    conn.query(
        &format!(
            "SELECT {column}, route, arm, {FIGURES}
             FROM {table}
             WHERE {column} >= ?1 AND {column} < ?2 AND (?3 IS NULL OR route = ?3)
             ORDER BY {column}"
        ),
        args![since_ms, until_ms, route],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, figures_at(r, 3)?)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_back_within_the_bucket_width() {
        let mut h = Histogram::default();
        for i in 1..=1000 {
            h.add(i as f64 / 10.0); // 0.1 .. 100 ms
        }
        for (q, want) in [(0.5, 50.0), (0.95, 95.0), (0.99, 99.0)] {
            let got = h.quantile(q).unwrap();
            assert!((got / want - 1.0).abs() < 0.06, "q{q}: {got} vs {want}");
        }
        assert_eq!(Histogram::default().quantile(0.5), None);
        let mut tiny = Histogram::default();
        tiny.add(0.0);
        tiny.add(f64::NAN);
        assert_eq!(tiny.count(), 1);
        assert_eq!(tiny.quantile(1.0), Some(BASE_MS));
    }

    #[test]
    fn merged_histograms_count_both_and_survive_json() {
        let (mut a, mut b) = (Histogram::default(), Histogram::default());
        a.add(1.0);
        b.add(1.0);
        b.add(1e9);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        let back: Histogram = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back, a);
        assert!(back.quantile(1.0).unwrap() > 60_000.0);
    }

    #[test]
    fn rails_verdicts_are_counted_by_category_cache_and_flow() {
        let verdict = |status: &str, cats: &[&str], cached: bool| {
            serde_json::json!({"status": status, "categories": cats, "rails": [
                {"flow": "content safety check input", "status": status, "latency_ms": 12.0, "cached": cached},
                {"flow": "detect sensitive data", "status": "success", "latency_ms": 0.2, "cached": false}]})
        };
        let mut m = RailsMinute::default();
        m.add(&verdict("blocked", &["S1", "S7"], false));
        let mut other = RailsMinute::default();
        other.add(&verdict("blocked", &["S1"], true));
        other.add(&verdict("success", &[], true));
        m.merge(&other);
        assert_eq!((m.checked, m.cached), (3, 2));
        assert_eq!(m.blocked_by_category.get("S1"), Some(&2));
        assert_eq!(m.blocked_by_category.get("S7"), Some(&1));
        let safety = &m.flow_latency["content safety check input"];
        assert_eq!(safety.count(), 3);
        assert!((safety.quantile(0.5).unwrap() / 12.0 - 1.0).abs() < 0.06);
    }

    #[test]
    fn minutes_start_on_the_minute() {
        assert_eq!(minute_of(120_001), 120_000);
        assert_eq!(minute_of(119_999), 60_000);
        assert_eq!(minute_of(-1), -60_000);
    }
}
