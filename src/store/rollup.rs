//! Per-minute rollups of the traffic log, kept by the writer in the same transaction as the rows
//! they count: requests, errors, rails blocks and tokens per (minute, route, arm), with latency,
//! time-to-first-token and gateway-overhead histograms. The dashboard reads these, never the
//! traffic table, so a page costs the same with a thousand rows or a million.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{params, Connection, OptionalExtension};
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

impl Minute {
    /// Counts a record; `unparsable`: one of its tool calls has arguments that are not JSON (the
    /// writer works that out as it stores the calls).
    fn add(&mut self, r: &TrafficRecord, unparsable: bool) {
        self.requests += 1;
        self.errors += u64::from(r.status >= 400);
        if let Some(rails) = &r.rails {
            self.blocked +=
                u64::from(rails.get("status").and_then(Value::as_str) == Some("blocked"));
            self.rails.add(rails);
        }
        let usage = r.response.as_ref().and_then(|v| v.get("usage"));
        let tokens = |k: &str| {
            usage
                .and_then(|u| u.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        self.prompt_tokens += tokens("prompt_tokens");
        self.completion_tokens += tokens("completion_tokens");
        if let Some(names) = r.tool_name_agreement {
            self.compared += 1;
            self.agreed_names += u64::from(names);
            self.agreed_args += u64::from(names && r.tool_args_agreement == Some(true));
        }
        self.parse_failures += u64::from(unparsable);
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

/// A batch's records summed by (minute, route, arm).
#[derive(Default)]
pub struct Rollup(HashMap<(i64, String, String), Minute>);

impl Rollup {
    pub fn add(&mut self, r: &TrafficRecord, unparsable: bool) {
        self.0
            .entry((minute_of(r.ts_ms), r.route.clone(), r.arm.clone()))
            .or_default()
            .add(r, unparsable);
    }

    /// Adds the batch's sums to the stored minutes, in the batch's transaction.
    pub fn write(&self, tx: &Connection) -> Result<(), StoreError> {
        for ((minute, route, arm), m) in &self.0 {
            let mut total = read_minute(tx, *minute, route, arm)?.unwrap_or_default();
            total.merge(m);
            tx.prepare_cached(
                "INSERT OR REPLACE INTO traffic_minutes (minute_ms, route, arm, requests, errors,
                    blocked, prompt_tokens, completion_tokens, compared, agreed_names, agreed_args,
                    parse_failures, latency, ttft, overhead, rails)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?
            .execute(params![
                minute,
                route,
                arm,
                total.requests as i64,
                total.errors as i64,
                total.blocked as i64,
                total.prompt_tokens as i64,
                total.completion_tokens as i64,
                total.compared as i64,
                total.agreed_names as i64,
                total.agreed_args as i64,
                total.parse_failures as i64,
                serde_json::to_string(&total.latency)?,
                serde_json::to_string(&total.ttft)?,
                serde_json::to_string(&total.overhead)?,
                serde_json::to_string(&total.rails)?,
            ])?;
        }
        Ok(())
    }
}

/// The figure columns of `traffic_minutes`, in `figures_at`'s order.
const FIGURES: &str = "requests, errors, blocked, prompt_tokens, completion_tokens, compared,
    agreed_names, agreed_args, parse_failures, latency, ttft, overhead, rails";

fn figures_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Minute> {
    let count = |i: usize| r.get::<_, i64>(at + i).map(|v| v.max(0) as u64);
    fn json<T: serde::de::DeserializeOwned>(
        r: &rusqlite::Row<'_>,
        i: usize,
    ) -> rusqlite::Result<T> {
        let text: String = r.get(i)?;
        serde_json::from_str(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        })
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

fn read_minute(
    conn: &Connection,
    minute: i64,
    route: &str,
    arm: &str,
) -> Result<Option<Minute>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {FIGURES} FROM traffic_minutes WHERE minute_ms = ?1 AND route = ?2 AND arm = ?3"
        ))?
        .query_row(params![minute, route, arm], |r| figures_at(r, 0))
        .optional()?)
}

/// The stored minutes in `[since_ms, until_ms)`, optionally of one route, oldest first:
/// `(minute, route, arm, figures)`.
pub fn minutes(
    conn: &Connection,
    since_ms: i64,
    until_ms: i64,
    route: Option<&str>,
) -> Result<Vec<(i64, String, String, Minute)>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT minute_ms, route, arm, {FIGURES}
         FROM traffic_minutes
         WHERE minute_ms >= ?1 AND minute_ms < ?2 AND (?3 IS NULL OR route = ?3)
         ORDER BY minute_ms"
    ))?;
    let rows = stmt.query_map(params![since_ms, until_ms, route], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, figures_at(r, 3)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
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
