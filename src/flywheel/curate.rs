//! Curation: the answers a run's sources give (`flywheel::sources`) turned into a tool-calling
//! dataset. Blocked requests teach nothing; tool-call answers are kept (plain answers too when
//! asked, for generic workloads); string arguments must parse as JSON; records are deduplicated on
//! the user query (the better source wins) and split with seeded, tool-stratified shares.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use super::dataset::{self, Record, Splits};
use super::sources::Taught;
use crate::store::traffic::ServedExchange;

#[derive(Debug, Clone, Default, Serialize)]
pub struct CurationReport {
    pub scanned: usize,
    pub kept: usize,
    /// The kept records by source (teacher, demonstration, feedback, logged).
    pub sources: BTreeMap<String, usize>,
    /// Why the others were left out, with counts.
    pub skipped: BTreeMap<String, usize>,
    pub train: usize,
    pub validation: usize,
    pub test: usize,
}

/// Whether the recorded rails verdict blocked the request.
fn blocked(rails: &Option<Value>) -> bool {
    match rails {
        Some(v) => {
            v.get("status").and_then(Value::as_str) == Some("blocked")
                || v.get("blocked").and_then(Value::as_bool) == Some(true)
        }
        None => false,
    }
}

/// The record an exchange teaches, or why it teaches nothing.
fn record_of(x: &ServedExchange, include_plain: bool) -> Result<Record, &'static str> {
    if blocked(&x.rails) {
        return Err("blocked by rails");
    }
    let answer = x
        .response
        .pointer("/choices/0/message")
        .ok_or("no answer message")?;
    let calls = crate::wire::tool_calls::in_message(answer);
    let has_calls = !calls.is_empty();
    if !has_calls {
        let text = answer.get("content").and_then(Value::as_str).unwrap_or("");
        if !include_plain || text.trim().is_empty() {
            return Err("no tool call");
        }
    }
    let mut clean = json!({"role": "assistant", "content": answer.get("content").cloned().unwrap_or(Value::Null)});
    if has_calls {
        let mut out = Vec::new();
        for c in calls {
            let parsed = c.parsed_arguments().ok_or("arguments are not JSON")?;
            out.push(json!({"id": c.id, "type": "function",
                "function": {"name": c.name, "arguments": parsed.to_string()}}));
        }
        clean["tool_calls"] = Value::Array(out);
    }
    let mut messages = x
        .request
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .ok_or("request has no messages")?;
    messages.push(clean);
    let mut body = json!({"messages": messages, "tools": x.request.get("tools").cloned().unwrap_or(json!([]))});
    if let Some(c) = x.request.get("tool_choice") {
        body["tool_choice"] = c.clone();
    }
    // The same checks an imported file gets.
    let line = body.to_string();
    dataset::parse_openai_jsonl(&line)
        .ok()
        .and_then(|mut v| v.pop())
        .ok_or("not a valid record")
}

/// Builds the splits from what the sources give, best source first. `left_out` counts what the
/// sources already turned away; `min_records` is checked after deduplication.
pub fn curate(
    taught: &[Taught],
    left_out: BTreeMap<String, usize>,
    include_plain: bool,
    shares: (f64, f64),
    seed: u64,
    min_records: usize,
) -> Result<(Splits, CurationReport), String> {
    let (validation, test) = shares;
    let mut report = CurationReport {
        scanned: taught.len() + left_out.values().sum::<usize>(),
        skipped: left_out,
        ..CurationReport::default()
    };
    let mut seen = std::collections::HashSet::new();
    let mut records = Vec::new();
    for t in taught {
        match record_of(&t.exchange, include_plain) {
            Ok(r) if seen.insert(r.user_query()) => {
                *report.sources.entry(t.source.as_str().into()).or_default() += 1;
                records.push(r);
            }
            Ok(_) => {
                *report
                    .skipped
                    .entry("duplicate user query".into())
                    .or_default() += 1
            }
            Err(why) => *report.skipped.entry(why.to_string()).or_default() += 1,
        }
    }
    report.kept = records.len();
    if records.len() < min_records {
        return Err(format!(
            "only {} usable records (need at least {min_records}) among {} answers; skipped: {:?}",
            records.len(),
            report.scanned,
            report.skipped
        ));
    }
    let splits = dataset::split(&records, validation, test, seed);
    report.train = splits.train.len();
    report.validation = splits.validation.len();
    report.test = splits.test.len();
    if splits.train.is_empty() || (test > 0.0 && splits.test.is_empty()) {
        return Err(format!(
            "the splits came out empty (train {}, test {}): collect more traffic or lower the shares",
            splits.train.len(),
            splits.test.len()
        ));
    }
    Ok((splits, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flywheel::sources::Source;

    fn exchange(i: usize, query: &str, answer: Value, rails: Option<Value>) -> ServedExchange {
        ServedExchange {
            id: format!("r{i}"),
            ts_ms: i as i64,
            request: json!({"model": "m", "messages": [{"role": "user", "content": query}],
                "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]}),
            response: json!({"choices": [{"index": 0, "message": answer}]}),
            rails,
            shadow_of: None,
            episode_id: None,
            answered_by: "upstream:u:teacher".into(),
        }
    }

    fn call(args: &str) -> Value {
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function",
            "function": {"name": "get_weather", "arguments": args}}]})
    }

    #[test]
    fn only_clean_unblocked_tool_calls_survive_and_sizes_are_checked() {
        let mut xs: Vec<ServedExchange> = (0..20)
            .map(|i| {
                exchange(
                    i,
                    &format!("weather {i}"),
                    call(&format!("{{\"city\":\"c{i}\"}}")),
                    None,
                )
            })
            .collect();
        xs.push(exchange(20, "weather 3", call("{\"city\":\"c3\"}"), None));
        xs.push(exchange(21, "bad", call("{city: c}"), None));
        xs.push(exchange(
            22,
            "plain",
            json!({"role": "assistant", "content": "It is sunny."}),
            None,
        ));
        xs.push(exchange(
            23,
            "unsafe",
            call("{}"),
            Some(json!({"status": "blocked"})),
        ));
        let xs: Vec<Taught> = xs
            .into_iter()
            .map(|exchange| Taught {
                exchange,
                source: Source::Logged,
            })
            .collect();
        let (s, report) = curate(&xs, BTreeMap::new(), false, (0.1, 0.2), 1, 10).unwrap();
        assert_eq!(report.scanned, 24);
        assert_eq!(report.kept, 20);
        assert_eq!(report.sources["logged"], 20);
        assert_eq!(report.skipped["duplicate user query"], 1);
        assert_eq!(report.skipped["arguments are not JSON"], 1);
        assert_eq!(report.skipped["no tool call"], 1);
        assert_eq!(report.skipped["blocked by rails"], 1);
        assert_eq!(s.train.len() + s.validation.len() + s.test.len(), 20);
        assert_eq!(s.test.len(), 4);
        let args = &s.train[0].messages[1]["tool_calls"][0]["function"]["arguments"];
        assert!(args.as_str().unwrap().starts_with("{\"city\""));
        // Plain answers join for generic workloads; too few records is a clear error.
        let (_, r2) = curate(&xs, BTreeMap::new(), true, (0.1, 0.2), 1, 10).unwrap();
        assert_eq!(r2.kept, 21);
        let err = curate(&xs[..5], BTreeMap::new(), false, (0.1, 0.2), 1, 10).unwrap_err();
        assert!(err.contains("only 5 usable records"), "{err}");
    }
}
