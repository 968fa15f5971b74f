//! Tool-calling evaluation: runs a target over test items through the same `Backend` path that
//! serves traffic (temperature 0) and scores the answers with NeMo Evaluator's definitions:
//! `function_name_accuracy` (the called names match exactly, case-sensitive, order-free across
//! parallel calls) and `function_name_and_args_accuracy` (names and parsed arguments match), plus the
//! rate of calls whose arguments are not JSON, and latency percentiles. Per-item results are kept.

use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::backend::{Backend, BackendReply, BackendRequest};

/// One test item: the conversation up to the answer, the tools offered, and the expected calls.
#[derive(Debug, Clone)]
pub struct EvalItem {
    pub messages: Vec<Value>,
    pub tools: Vec<Value>,
    pub tool_choice: Option<Value>,
    /// Expected (name, arguments) pairs; empty when the right answer is no call.
    pub expected: Vec<(String, Value)>,
    /// BFCL's acceptable values per call, when the item comes from BFCL (for `ast_accuracy`).
    pub ground_truth: Option<Value>,
}

pub use super::ast::PredictedCall;

#[derive(Debug, Clone, Serialize)]
pub struct ItemResult {
    pub index: usize,
    pub name_match: bool,
    pub name_and_args_match: bool,
    /// BFCL's AST check against the acceptable values (the expected values when there are none).
    pub ast_match: bool,
    pub parse_failures: usize,
    pub predicted: Vec<PredictedCall>,
    pub latency_ms: f64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Scores {
    pub items: usize,
    pub function_name_accuracy: f64,
    pub function_name_and_args_accuracy: f64,
    pub ast_accuracy: f64,
    /// Predicted calls whose arguments were not JSON, over all predicted calls.
    pub json_parse_failure_rate: f64,
    pub errors: usize,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub items_per_sec: f64,
}

/// The calls in an OpenAI assistant message (or a whole `chat.completion`).
pub fn predicted_calls(message: &Value) -> Vec<PredictedCall> {
    let message = message.pointer("/choices/0/message").unwrap_or(message);
    crate::wire::tool_calls::in_message(message)
        .into_iter()
        .map(|c| PredictedCall {
            arguments: c.parsed_arguments(),
            name: c.name,
            raw_arguments: c.arguments,
        })
        .collect()
}

/// Whether the names match as multisets.
pub fn names_match(expected: &[(String, Value)], predicted: &[PredictedCall]) -> bool {
    let mut a: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut b: Vec<&str> = predicted.iter().map(|p| p.name.as_str()).collect();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// Whether every expected call is matched by a distinct predicted call with the same name and
/// equal arguments (JSON values, so key order and spacing do not matter), and nothing is extra.
pub fn names_and_args_match(expected: &[(String, Value)], predicted: &[PredictedCall]) -> bool {
    if expected.len() != predicted.len() {
        return false;
    }
    let mut used = vec![false; predicted.len()];
    expected.iter().all(|(name, args)| {
        let hit = predicted
            .iter()
            .enumerate()
            .position(|(i, p)| !used[i] && p.name == *name && p.arguments.as_ref() == Some(args));
        match hit {
            Some(i) => {
                used[i] = true;
                true
            }
            None => false,
        }
    })
}

/// Scores one reply against its item.
pub fn score_item(
    index: usize,
    item: &EvalItem,
    reply: Result<&Value, String>,
    latency_ms: f64,
) -> ItemResult {
    match reply {
        Ok(v) => {
            let predicted = predicted_calls(v);
            ItemResult {
                index,
                name_match: names_match(&item.expected, &predicted),
                name_and_args_match: names_and_args_match(&item.expected, &predicted),
                ast_match: {
                    let gt = item
                        .ground_truth
                        .clone()
                        .unwrap_or_else(|| super::ast::ground_truth_of(&item.expected));
                    super::ast::ast_match(&item.tools, Some(&gt), &predicted)
                },
                parse_failures: predicted.iter().filter(|p| p.arguments.is_none()).count(),
                predicted,
                latency_ms,
                error: None,
            }
        }
        Err(e) => ItemResult {
            index,
            name_match: false,
            name_and_args_match: false,
            ast_match: false,
            parse_failures: 0,
            predicted: Vec::new(),
            latency_ms,
            error: Some(e),
        },
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Aggregates per-item results.
pub fn aggregate(results: &[ItemResult], wall_secs: f64) -> Scores {
    let n = results.len();
    if n == 0 {
        return Scores::default();
    }
    let frac =
        |f: &dyn Fn(&ItemResult) -> bool| results.iter().filter(|r| f(r)).count() as f64 / n as f64;
    let calls: usize = results.iter().map(|r| r.predicted.len()).sum();
    let failures: usize = results.iter().map(|r| r.parse_failures).sum();
    let mut lat: Vec<f64> = results.iter().map(|r| r.latency_ms).collect();
    lat.sort_by(f64::total_cmp);
    Scores {
        items: n,
        function_name_accuracy: frac(&|r| r.name_match),
        function_name_and_args_accuracy: frac(&|r| r.name_and_args_match),
        ast_accuracy: frac(&|r| r.ast_match),
        json_parse_failure_rate: if calls == 0 {
            0.0
        } else {
            failures as f64 / calls as f64
        },
        errors: results.iter().filter(|r| r.error.is_some()).count(),
        latency_p50_ms: percentile(&lat, 0.5),
        latency_p95_ms: percentile(&lat, 0.95),
        items_per_sec: n as f64 / wall_secs.max(1e-9),
    }
}

/// The request the target sees for an item: greedy decoding, the item's tools and tool choice.
pub fn request_body(item: &EvalItem, model: &str, max_tokens: usize) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("messages".into(), Value::Array(item.messages.clone()));
    if !item.tools.is_empty() {
        body.insert("tools".into(), Value::Array(item.tools.clone()));
    }
    if let Some(c) = &item.tool_choice {
        body.insert("tool_choice".into(), c.clone());
    }
    body.insert("temperature".into(), json!(0));
    body.insert("max_tokens".into(), json!(max_tokens));
    body
}

/// Runs every item through `backend` (`adapter` picks a LoRA adapter on a local backend), up to
/// `concurrency` at a time, and scores them.
pub async fn run(
    backend: &dyn Backend,
    model: &str,
    adapter: Option<&str>,
    items: &[EvalItem],
    max_tokens: usize,
    concurrency: usize,
) -> (Vec<ItemResult>, Scores) {
    use futures_util::stream::{self, StreamExt};
    let started = Instant::now();
    // The futures are built first (not inside the stream's map) so the whole run stays `Send`
    // for any lifetime and can be spawned.
    let futures: Vec<_> = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let req = BackendRequest {
                api: crate::wire::Api::Chat,
                body: request_body(item, model, max_tokens),
                stream: false,
                adapter: adapter.map(str::to_string),
            };
            async move {
                let t = Instant::now();
                let reply = match backend.chat(req).await {
                    Ok(BackendReply::Full(v)) => Ok(v),
                    Ok(BackendReply::Stream { .. }) => {
                        Err("the backend streamed a non-streaming request".to_string())
                    }
                    Err(e) => Err(e.to_string()),
                };
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                score_item(i, item, reply.as_ref().map_err(Clone::clone), ms)
            }
        })
        .collect();
    let mut results: Vec<ItemResult> = stream::iter(futures)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.sort_by_key(|r| r.index);
    let scores = aggregate(&results, started.elapsed().as_secs_f64());
    (results, scores)
}

/// Two targets scored on the same items: the difference in one metric (B − A), its 95% paired
/// bootstrap interval, and McNemar's exact test on the discordant items.
#[derive(Debug, Clone, Serialize)]
pub struct PairedComparison {
    pub items: usize,
    pub a: f64,
    pub b: f64,
    pub difference: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    /// Items only A got right, and only B.
    pub only_a: usize,
    pub only_b: usize,
    pub mcnemar_p: f64,
}

/// Compares per-item outcomes `a[i]` and `b[i]` (same items, same order).
pub fn compare_paired(a: &[bool], b: &[bool], seed: u64) -> PairedComparison {
    let n = a.len().min(b.len());
    let mean = |v: &[bool]| v.iter().filter(|x| **x).count() as f64 / v.len().max(1) as f64;
    let (pa, pb) = (mean(&a[..n]), mean(&b[..n]));
    let only_a = (0..n).filter(|&i| a[i] && !b[i]).count();
    let only_b = (0..n).filter(|&i| b[i] && !a[i]).count();
    // Paired bootstrap: resample items, keep each item's pair together.
    let mut rng = super::train::model::SplitMix(seed);
    let mut diffs: Vec<f64> = (0..2000)
        .map(|_| {
            if n == 0 {
                return 0.0;
            }
            let mut d = 0i64;
            for _ in 0..n {
                let i = (rng.next_u64() % n as u64) as usize;
                d += i64::from(b[i]) - i64::from(a[i]);
            }
            d as f64 / n as f64
        })
        .collect();
    diffs.sort_by(f64::total_cmp);
    PairedComparison {
        items: n,
        a: pa,
        b: pb,
        difference: pb - pa,
        ci_low: percentile(&diffs, 0.025),
        ci_high: percentile(&diffs, 0.975),
        only_a,
        only_b,
        mcnemar_p: mcnemar_exact(only_a, only_b),
    }
}

/// Two-sided exact McNemar p-value: a binomial(n = discordant, 1/2) tail.
fn mcnemar_exact(only_a: usize, only_b: usize) -> f64 {
    let n = only_a + only_b;
    if n == 0 {
        return 1.0;
    }
    let k = only_a.min(only_b);
    // Σ_{i ≤ k} C(n, i) / 2^n, in logs to stay finite for large n.
    let ln_choose = |n: usize, i: usize| -> f64 {
        (1..=i)
            .map(|j| ((n - i + j) as f64).ln() - (j as f64).ln())
            .sum()
    };
    let tail: f64 = (0..=k)
        .map(|i| (ln_choose(n, i) - n as f64 * std::f64::consts::LN_2).exp())
        .sum();
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> Value {
        json!({"type": "function", "function": {"name": name, "arguments": args}})
    }

    #[test]
    fn paired_comparison_reports_the_difference_its_interval_and_mcnemar() {
        // B fixes 12 items A missed and breaks 2: a clear improvement.
        let mut a = vec![false; 40];
        let mut b = vec![false; 40];
        for i in 0..10 {
            a[i] = true;
            b[i] = true;
        }
        for x in b.iter_mut().skip(10).take(12) {
            *x = true;
        }
        a[30] = true;
        a[31] = true;
        let c = compare_paired(&a, &b, 1);
        assert_eq!((c.only_a, c.only_b), (2, 12));
        assert!((c.difference - 0.25).abs() < 1e-9);
        assert!(
            c.ci_low > 0.0 && c.ci_high < 0.5 && c.ci_low < 0.25 && c.ci_high > 0.25,
            "{c:?}"
        );
        // Exact binomial: 2 * P(X <= 2 | n = 14, p = 1/2) = 2 * 106 / 16384.
        assert!(
            (c.mcnemar_p - 2.0 * 106.0 / 16384.0).abs() < 1e-9,
            "{}",
            c.mcnemar_p
        );
        let same = compare_paired(&a, &a, 1);
        assert_eq!((same.difference, same.mcnemar_p), (0.0, 1.0));
    }

    #[test]
    fn parallel_calls_match_in_any_order_and_names_are_case_sensitive() {
        let expected = vec![
            ("a".to_string(), json!({"x": 1, "y": "s"})),
            ("b".to_string(), json!({})),
        ];
        let msg = json!({"role": "assistant", "tool_calls": [call("b", "{}"), call("a", "{\"y\": \"s\", \"x\": 1}")]});
        let p = predicted_calls(&msg);
        assert!(names_match(&expected, &p));
        assert!(names_and_args_match(&expected, &p));
        let msg = json!({"role": "assistant", "tool_calls": [call("B", "{}"), call("a", "{\"x\": 1, \"y\": \"s\"}")]});
        assert!(!names_match(&expected, &predicted_calls(&msg)));
        // Right names, wrong value: names count, arguments do not.
        let msg = json!({"role": "assistant", "tool_calls": [call("a", "{\"x\": 2, \"y\": \"s\"}"), call("b", "{}")]});
        let p = predicted_calls(&msg);
        assert!(names_match(&expected, &p) && !names_and_args_match(&expected, &p));
        // A duplicate call does not stand in for a missing one.
        let msg = json!({"role": "assistant", "tool_calls": [call("a", "{\"x\": 1, \"y\": \"s\"}"), call("a", "{\"x\": 1, \"y\": \"s\"}")]});
        assert!(!names_and_args_match(&expected, &predicted_calls(&msg)));
    }

    #[test]
    fn unparseable_arguments_are_counted_and_no_call_matches_an_empty_expectation() {
        let item = EvalItem {
            messages: vec![],
            tools: vec![],
            tool_choice: None,
            expected: vec![("f".into(), json!({"q": 1}))],
            ground_truth: None,
        };
        let reply = json!({"choices": [{"message": {"role": "assistant", "tool_calls": [call("f", "{q: 1")]}}]});
        let r = score_item(0, &item, Ok(&reply), 5.0);
        assert!(r.name_match && !r.name_and_args_match);
        assert_eq!(r.parse_failures, 1);
        let none = EvalItem {
            expected: vec![],
            ..item.clone()
        };
        let text = json!({"role": "assistant", "content": "no tool needed"});
        let r2 = score_item(1, &none, Ok(&text), 7.0);
        assert!(r2.name_match && r2.name_and_args_match);
        let r3 = score_item(2, &item, Err("down".into()), 9.0);
        let s = aggregate(&[r, r2, r3], 1.0);
        assert_eq!(s.items, 3);
        assert!((s.function_name_accuracy - 2.0 / 3.0).abs() < 1e-9);
        assert!((s.function_name_and_args_accuracy - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(s.json_parse_failure_rate, 1.0);
        assert_eq!(s.errors, 1);
        assert_eq!(s.latency_p50_ms, 7.0);
    }
}
