//! Promotion: the policy that decides whether a candidate adapter may start a rollout, the rollouts
//! each stage installs on the route, and the live verdicts that move a rollout on or roll it back.
//! Pure functions over scores and counts; the controller applies them.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use super::eval::{self, EvalItem, ItemResult, PairedComparison, Scores};
use crate::config::{
    CanaryConfig, PromotionPolicy, RolloutConfig, RolloutPlan, ShadowTargetConfig, TargetConfig,
};
use crate::config::{FeedbackGuard, Optimize};
use crate::store::runs::LiveStats;

/// Who the candidate is measured against.
pub enum Incumbent<'a> {
    /// The upstream whose logged answers are the ground truth: by definition right on every item.
    Teacher,
    /// A local champion, run on the same items.
    Local {
        results: &'a [ItemResult],
        scores: &'a Scores,
    },
}

/// One test of the policy, with the figure and the limit it was held to.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub value: f64,
    pub limit: f64,
    pub detail: String,
}

/// The policy's answer, with everything it looked at.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub promote: bool,
    /// `teacher` or `champion`.
    pub against: String,
    pub metric: String,
    pub comparison: PairedComparison,
    /// Per expected tool: (items, incumbent accuracy, candidate accuracy).
    pub per_tool: BTreeMap<String, (usize, f64, f64)>,
    pub checks: Vec<Check>,
    pub reason: String,
}

fn correct(r: &ItemResult, metric: &str) -> bool {
    match metric {
        "function_name_accuracy" => r.name_match,
        "ast_accuracy" => r.ast_match,
        _ => r.name_and_args_match,
    }
}

/// The tool an item is about (its first expected call), or `(no call)`.
fn tool_of(item: &EvalItem) -> String {
    item.expected
        .first()
        .map_or_else(|| "(no call)".to_string(), |(n, _)| n.clone())
}

/// Tools with fewer held-out items than this are too noisy for a per-tool regression check.
const MIN_ITEMS_PER_TOOL: usize = 5;

impl Check {
    fn new(name: &str, passed: bool, value: f64, limit: f64, detail: String) -> Self {
        Self {
            name: name.to_string(),
            passed,
            value,
            limit,
            detail,
        }
    }
}

/// The check against the incumbent, and its name: the teacher's logged answers must be matched
/// within the margin; a local champion must be beaten by the minimum gain with the interval's
/// lower bound above zero.
fn against_incumbent(
    policy: &PromotionPolicy,
    incumbent: &Incumbent<'_>,
    comparison: &PairedComparison,
) -> (&'static str, Check) {
    let metric = policy.metric.as_str();
    match incumbent {
        Incumbent::Teacher => {
            let limit = -policy.teacher_margin;
            let check = Check::new(
                "matches_teacher",
                comparison.ci_low >= limit,
                comparison.ci_low,
                limit,
                format!(
                    "{metric} {:.3} vs the teacher's logged answers; 95% lower bound of the difference {:+.3} must be at least {limit:+.3}",
                    comparison.b, comparison.ci_low
                ),
            );
            ("teacher", check)
        }
        Incumbent::Local { .. } => {
            let check = Check::new(
                "improvement",
                comparison.difference >= policy.min_improvement && comparison.ci_low > 0.0,
                comparison.difference,
                policy.min_improvement,
                format!(
                    "{metric} {:.3} → {:.3} ({:+.3}, 95% CI [{:+.3}, {:+.3}], McNemar p = {:.3}); the gain must be at least {:+.3} with its lower bound above zero",
                    comparison.a,
                    comparison.b,
                    comparison.difference,
                    comparison.ci_low,
                    comparison.ci_high,
                    comparison.mcnemar_p,
                    policy.min_improvement
                ),
            );
            ("champion", check)
        }
    }
}

/// Per expected tool: items, the incumbent's accuracy, the candidate's.
fn per_tool(
    items: &[EvalItem],
    inc: &[bool],
    cand: &[bool],
) -> BTreeMap<String, (usize, f64, f64)> {
    let mut per_tool: BTreeMap<String, (usize, f64, f64)> = BTreeMap::new();
    for ((item, &i), &c) in items.iter().zip(inc).zip(cand) {
        let e = per_tool.entry(tool_of(item)).or_default();
        e.0 += 1;
        e.1 += f64::from(u8::from(i));
        e.2 += f64::from(u8::from(c));
    }
    for v in per_tool.values_mut() {
        v.1 /= v.0 as f64;
        v.2 /= v.0 as f64;
    }
    per_tool
}

/// Applies `policy` to a candidate's results on `items` against the incumbent's.
pub fn judge(
    policy: &PromotionPolicy,
    items: &[EvalItem],
    candidate: &[ItemResult],
    candidate_scores: &Scores,
    incumbent: &Incumbent<'_>,
    seed: u64,
) -> Decision {
    let metric = policy.metric.as_str();
    let cand: Vec<bool> = candidate.iter().map(|r| correct(r, metric)).collect();
    let inc: Vec<bool> = match incumbent {
        Incumbent::Teacher => vec![true; cand.len()],
        Incumbent::Local { results, .. } => results.iter().map(|r| correct(r, metric)).collect(),
    };
    let comparison = eval::compare_paired(&inc, &cand, seed);
    let mut checks = Vec::new();
    let n = items.len().min(cand.len()).min(inc.len());
    checks.push(Check::new(
        "held_out_items",
        n >= policy.min_test_items,
        n as f64,
        policy.min_test_items as f64,
        format!(
            "{n} held-out items (at least {} needed)",
            policy.min_test_items
        ),
    ));
    let (against, versus) = against_incumbent(policy, incumbent, &comparison);
    checks.push(versus);
    let per_tool = per_tool(&items[..n.min(items.len())], &inc, &cand);
    let worst = per_tool
        .iter()
        .filter(|(_, v)| v.0 >= MIN_ITEMS_PER_TOOL)
        .map(|(t, v)| (t.clone(), v.1 - v.2))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((tool, drop)) = worst {
        checks.push(Check::new(
            "per_tool_regression",
            drop <= policy.max_tool_regression,
            drop,
            policy.max_tool_regression,
            format!(
                "largest per-tool drop: {tool} {drop:+.3} (tools with at least {MIN_ITEMS_PER_TOOL} items)"
            ),
        ));
    }
    let inc_parse = match incumbent {
        Incumbent::Teacher => 0.0,
        Incumbent::Local { scores, .. } => scores.json_parse_failure_rate,
    };
    let limit = inc_parse + policy.max_parse_failure_increase;
    checks.push(Check::new(
        "json_parse_failures",
        candidate_scores.json_parse_failure_rate <= limit + 1e-12,
        candidate_scores.json_parse_failure_rate,
        limit,
        format!(
            "candidate parse-failure rate {:.3}, incumbent {inc_parse:.3}",
            candidate_scores.json_parse_failure_rate
        ),
    ));
    if let Some(budget) = policy.max_latency_p95_ms {
        checks.push(Check::new(
            "latency_p95",
            candidate_scores.latency_p95_ms <= budget,
            candidate_scores.latency_p95_ms,
            budget,
            format!(
                "candidate p95 latency {:.0} ms (budget {budget:.0} ms)",
                candidate_scores.latency_p95_ms
            ),
        ));
    }
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.as_str())
        .collect();
    let promote = failed.is_empty();
    let reason = if promote {
        format!(
            "candidate {metric} {:.3} vs {against} {:.3}: every check passed",
            comparison.b, comparison.a
        )
    } else {
        format!(
            "candidate {metric} {:.3} vs {against} {:.3}: failed {}",
            comparison.b,
            comparison.a,
            failed.join(", ")
        )
    };
    Decision {
        promote,
        against: against.to_string(),
        metric: metric.to_string(),
        comparison,
        per_tool,
        checks,
        reason,
    }
}

/// Shadow: the champion keeps serving; a sample of its answered requests is mirrored to the
/// candidate. A teacher listening in before is replaced for the duration.
pub fn shadow_rollout(
    before: &RolloutConfig,
    candidate: &TargetConfig,
    plan: &RolloutPlan,
) -> RolloutConfig {
    RolloutConfig {
        champion: before.champion.clone(),
        canary: None,
        shadow: Some(ShadowTargetConfig {
            target: candidate.clone(),
            sample_rate: plan.shadow_sample_rate,
        }),
        fallbacks: before.fallbacks.clone(),
    }
}

/// Canary: the candidate serves a sticky share and falls back to the champion on failure; a sample
/// of its answers is also asked of the champion (requests the champion served are not mirrored to
/// itself), which measures agreement live.
pub fn canary_rollout(
    before: &RolloutConfig,
    candidate: &TargetConfig,
    plan: &RolloutPlan,
) -> RolloutConfig {
    RolloutConfig {
        champion: before.champion.clone(),
        canary: Some(CanaryConfig {
            target: candidate.clone(),
            percent: plan.canary_percent,
        }),
        shadow: (plan.canary_mirror_rate > 0.0).then(|| ShadowTargetConfig {
            target: before.champion.clone(),
            sample_rate: plan.canary_mirror_rate,
        }),
        fallbacks: before.fallbacks.clone(),
    }
}

/// Champion: the candidate serves everything. The former champion becomes the first fallback, and a
/// teacher keeps listening in at `teacher_sample_rate` so labels and live agreement keep flowing.
pub fn champion_rollout(
    before: &RolloutConfig,
    candidate: &TargetConfig,
    teacher: Option<&TargetConfig>,
    plan: &RolloutPlan,
) -> RolloutConfig {
    let mut fallbacks = vec![before.champion.clone()];
    for f in &before.fallbacks {
        if !fallbacks.contains(f) {
            fallbacks.push(f.clone());
        }
    }
    fallbacks.retain(|f| f != candidate);
    RolloutConfig {
        champion: candidate.clone(),
        canary: None,
        shadow: teacher
            .filter(|t| *t != candidate && plan.teacher_sample_rate > 0.0)
            .map(|t| ShadowTargetConfig {
                target: t.clone(),
                sample_rate: plan.teacher_sample_rate,
            }),
        fallbacks,
    }
}

/// What the live figures say about a stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Wait(String),
    Advance(String),
    RollBack(String),
}

/// A feedback metric on the candidate's arm against the champion's, over the same window.
#[derive(Debug, Clone, Serialize)]
pub struct FeedbackComparison {
    pub metric: String,
    pub candidate_mean: f64,
    pub candidate_n: usize,
    pub champion_mean: f64,
    pub champion_n: usize,
    /// Candidate minus champion, signed so that positive is better (a metric to minimize flips).
    pub difference: f64,
    /// The one-sided 95% upper bound of `difference` (normal approximation, unequal variances).
    pub upper_95: f64,
}

fn mean_and_variance(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var)
}

/// Compares a metric's values on the two arms.
pub fn compare_feedback(
    metric: &str,
    optimize: Optimize,
    candidate: &[f64],
    champion: &[f64],
) -> FeedbackComparison {
    let (cm, cv) = mean_and_variance(candidate);
    let (hm, hv) = mean_and_variance(champion);
    let sign = if optimize == Optimize::Min { -1.0 } else { 1.0 };
    let difference = sign * (cm - hm);
    let se = (cv / candidate.len().max(1) as f64 + hv / champion.len().max(1) as f64).sqrt();
    FeedbackComparison {
        metric: metric.to_string(),
        candidate_mean: cm,
        candidate_n: candidate.len(),
        champion_mean: hm,
        champion_n: champion.len(),
        difference,
        upper_95: difference + 1.645 * se,
    }
}

/// A feedback guard trips when both arms have enough values and even the optimistic (one-sided
/// 95%) bound of the difference says the candidate is worse by more than the margin.
pub fn judge_feedback(c: &FeedbackComparison, guard: &FeedbackGuard) -> Option<String> {
    let enough = c.candidate_n >= guard.min_samples && c.champion_n >= guard.min_samples;
    (enough && c.upper_95 < -guard.margin).then(|| {
        format!(
            "canary {} {:.3} vs the champion's {:.3} over {} and {} values: worse by {:.3} (95% bound {:+.3}, margin {:.3})",
            c.metric,
            c.candidate_mean,
            c.champion_mean,
            c.candidate_n,
            c.champion_n,
            -c.difference,
            c.upper_95,
            guard.margin
        )
    })
}

/// The live figures with the limits they were held to, for the transition record.
pub fn numbers(stats: &LiveStats, plan: &RolloutPlan) -> Value {
    let on_args = plan.agreement_on == "arguments";
    json!({
        "stats": stats,
        "agreement": stats.agreement(on_args),
        "agreement_on": plan.agreement_on,
        "error_rate": stats.error_rate(),
        "parse_failure_rate": stats.parse_failure_rate(),
        "block_rate": stats.block_rate(),
    })
}

/// Shadow: enough compared answers and enough agreement go on to canary; too little agreement or a
/// failing candidate rolls back.
pub fn judge_shadow(s: &LiveStats, plan: &RolloutPlan) -> Verdict {
    let on_args = plan.agreement_on == "arguments";
    if s.requests as usize >= plan.guard_min_requests && s.error_rate() > plan.canary_max_error_rate
    {
        return Verdict::RollBack(format!(
            "the candidate failed {} of {} shadow requests ({:.3} > {:.3})",
            s.errors,
            s.requests,
            s.error_rate(),
            plan.canary_max_error_rate
        ));
    }
    if (s.compared as usize) < plan.shadow_min_samples {
        return Verdict::Wait(format!(
            "{} of {} compared shadow answers",
            s.compared, plan.shadow_min_samples
        ));
    }
    let a = s.agreement(on_args);
    if a >= plan.shadow_min_agreement {
        Verdict::Advance(format!(
            "shadow agreement with the champion {a:.3} ≥ {:.3} over {} answers",
            plan.shadow_min_agreement, s.compared
        ))
    } else {
        Verdict::RollBack(format!(
            "shadow agreement with the champion {a:.3} < {:.3} over {} answers",
            plan.shadow_min_agreement, s.compared
        ))
    }
}

/// Canary: any guard tripped rolls back at once; enough requests with every guard holding promote.
pub fn judge_canary(s: &LiveStats, plan: &RolloutPlan) -> Verdict {
    let on_args = plan.agreement_on == "arguments";
    let min = plan.guard_min_requests as u64;
    if s.requests >= min {
        let guards = [
            (
                "error rate",
                s.error_rate(),
                plan.canary_max_error_rate,
                s.requests,
            ),
            (
                "JSON-parse failure rate",
                s.parse_failure_rate(),
                plan.canary_max_parse_failure_rate,
                s.tool_calls,
            ),
            (
                "rails block rate",
                s.block_rate(),
                plan.canary_max_block_rate,
                s.requests,
            ),
        ];
        for (what, value, max, over) in guards {
            if value > max {
                return Verdict::RollBack(format!(
                    "canary {what} {value:.3} > {max:.3} over {over}"
                ));
            }
        }
    }
    if s.compared >= min && s.agreement(on_args) < plan.canary_min_agreement {
        return Verdict::RollBack(format!(
            "canary agreement with the champion {:.3} < {:.3} over {} answers",
            s.agreement(on_args),
            plan.canary_min_agreement,
            s.compared
        ));
    }
    let mirrored_enough = plan.canary_mirror_rate == 0.0 || s.compared >= min;
    if (s.requests as usize) >= plan.canary_min_requests && mirrored_enough {
        Verdict::Advance(format!(
            "{} canary requests, every guard held (errors {:.3}, parse failures {:.3}, agreement {:.3})",
            s.requests,
            s.error_rate(),
            s.parse_failure_rate(),
            s.agreement(on_args)
        ))
    } else {
        Verdict::Wait(format!(
            "{} of {} canary requests, {} compared",
            s.requests, plan.canary_min_requests, s.compared
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feedback_guard_trips_only_on_a_clearly_worse_candidate() {
        let guard = FeedbackGuard {
            metric: "task_success".into(),
            margin: 0.05,
            min_samples: 20,
        };
        let rate = |ones: usize, n: usize| -> Vec<f64> {
            (0..n).map(|i| if i < ones { 1.0 } else { 0.0 }).collect()
        };
        // 30% against 80% over 40 each: worse beyond any doubt.
        let bad = compare_feedback("task_success", Optimize::Max, &rate(12, 40), &rate(32, 40));
        assert!((bad.difference + 0.5).abs() < 1e-9);
        assert!(bad.upper_95 < -0.3, "{bad:?}");
        let why = judge_feedback(&bad, &guard).unwrap();
        assert!(why.contains("0.300") && why.contains("0.800"), "{why}");
        // 75% against 80%: within noise, no trip.
        let close = compare_feedback("task_success", Optimize::Max, &rate(30, 40), &rate(32, 40));
        assert!(judge_feedback(&close, &guard).is_none(), "{close:?}");
        // Too few values on an arm: no trip, however bad.
        let few = compare_feedback("task_success", Optimize::Max, &rate(0, 10), &rate(40, 40));
        assert!(judge_feedback(&few, &guard).is_none());
        // A metric to minimize: more is worse.
        let latency = compare_feedback("seconds", Optimize::Min, &[9.0; 30], &[3.0; 30]);
        assert_eq!(latency.difference, -6.0);
        assert!(judge_feedback(&latency, &guard).is_some());
    }

    fn item(tool: &str) -> EvalItem {
        EvalItem {
            messages: vec![],
            tools: vec![],
            tool_choice: None,
            expected: vec![(tool.to_string(), json!({}))],
            ground_truth: None,
        }
    }

    fn result(i: usize, right: bool, parse_failures: usize) -> ItemResult {
        ItemResult {
            index: i,
            name_match: right,
            name_and_args_match: right,
            ast_match: right,
            parse_failures,
            predicted: vec![eval::PredictedCall {
                name: "a".into(),
                arguments: (parse_failures == 0).then(|| json!({})),
                raw_arguments: "{}".into(),
            }],
            latency_ms: 10.0,
            error: None,
        }
    }

    fn scores(results: &[ItemResult]) -> Scores {
        eval::aggregate(results, 1.0)
    }

    #[test]
    fn a_clear_gain_over_a_local_champion_is_promoted_and_a_tie_is_not() {
        let items: Vec<EvalItem> = (0..40)
            .map(|i| item(if i % 2 == 0 { "a" } else { "b" }))
            .collect();
        let champ: Vec<ItemResult> = (0..40).map(|i| result(i, i < 10, 0)).collect();
        let cand: Vec<ItemResult> = (0..40).map(|i| result(i, i < 36, 0)).collect();
        let policy = PromotionPolicy::default();
        let cs = scores(&champ);
        let inc = Incumbent::Local {
            results: &champ,
            scores: &cs,
        };
        let d = judge(&policy, &items, &cand, &scores(&cand), &inc, 1);
        assert!(d.promote, "{d:?}");
        assert!(d.comparison.ci_low > 0.0);
        assert_eq!(d.against, "champion");
        let same = judge(&policy, &items, &champ, &cs, &inc, 1);
        assert!(!same.promote);
        assert!(same.reason.contains("improvement"), "{}", same.reason);
    }

    #[test]
    fn a_gain_that_breaks_one_tool_or_parsing_is_refused() {
        // Tool "b" was always right and is now always wrong; overall the candidate still gains.
        let items: Vec<EvalItem> = (0..60)
            .map(|i| item(if i < 50 { "a" } else { "b" }))
            .collect();
        let champ: Vec<ItemResult> = (0..60).map(|i| result(i, i >= 50, 0)).collect();
        let cand: Vec<ItemResult> = (0..60).map(|i| result(i, i < 50, 0)).collect();
        let cs = scores(&champ);
        let inc = Incumbent::Local {
            results: &champ,
            scores: &cs,
        };
        let d = judge(
            &PromotionPolicy::default(),
            &items,
            &cand,
            &scores(&cand),
            &inc,
            1,
        );
        assert!(!d.promote);
        let c = d
            .checks
            .iter()
            .find(|c| c.name == "per_tool_regression")
            .unwrap();
        assert!(!c.passed && (c.value - 1.0).abs() < 1e-9, "{c:?}");
        assert!(d.checks.iter().any(|c| c.name == "improvement" && c.passed));

        let bad_json: Vec<ItemResult> = (0..60).map(|i| result(i, true, 1)).collect();
        let d = judge(
            &PromotionPolicy::default(),
            &items,
            &bad_json,
            &scores(&bad_json),
            &inc,
            1,
        );
        assert!(!d.promote);
        assert!(d.reason.contains("json_parse_failures"), "{}", d.reason);
    }

    #[test]
    fn a_student_must_match_the_teacher_within_the_margin() {
        let items: Vec<EvalItem> = (0..50).map(|_| item("a")).collect();
        let perfect: Vec<ItemResult> = (0..50).map(|i| result(i, true, 0)).collect();
        let policy = PromotionPolicy {
            teacher_margin: 0.1,
            ..PromotionPolicy::default()
        };
        let d = judge(
            &policy,
            &items,
            &perfect,
            &scores(&perfect),
            &Incumbent::Teacher,
            3,
        );
        assert!(d.promote, "{d:?}");
        assert_eq!(d.against, "teacher");
        let weak: Vec<ItemResult> = (0..50).map(|i| result(i, i % 4 != 0, 0)).collect();
        let d = judge(
            &policy,
            &items,
            &weak,
            &scores(&weak),
            &Incumbent::Teacher,
            3,
        );
        assert!(!d.promote);
        assert!(d.reason.contains("matches_teacher"));
        // Too few held-out items is refused however good the candidate is.
        let d = judge(
            &policy,
            &items[..5],
            &perfect[..5],
            &scores(&perfect[..5]),
            &Incumbent::Teacher,
            3,
        );
        assert!(!d.promote);
        assert!(d.reason.contains("held_out_items"));
    }

    fn stats(requests: u64, errors: u64, compared: u64, agree: u64) -> LiveStats {
        LiveStats {
            requests,
            errors,
            compared,
            names_agree: agree,
            arguments_agree: agree,
            ..LiveStats::default()
        }
    }

    #[test]
    fn shadow_and_canary_verdicts_follow_the_plan() {
        let plan = RolloutPlan {
            shadow_min_samples: 20,
            canary_min_requests: 30,
            guard_min_requests: 10,
            ..RolloutPlan::default()
        };
        assert!(matches!(
            judge_shadow(&stats(10, 0, 5, 5), &plan),
            Verdict::Wait(_)
        ));
        assert!(matches!(
            judge_shadow(&stats(20, 0, 20, 19), &plan),
            Verdict::Advance(_)
        ));
        assert!(matches!(
            judge_shadow(&stats(20, 0, 20, 10), &plan),
            Verdict::RollBack(_)
        ));
        assert!(matches!(
            judge_shadow(&stats(20, 5, 0, 0), &plan),
            Verdict::RollBack(_)
        ));
        assert!(matches!(
            judge_canary(&stats(5, 3, 0, 0), &plan),
            Verdict::Wait(_)
        ));
        assert!(matches!(
            judge_canary(&stats(12, 3, 0, 0), &plan),
            Verdict::RollBack(_)
        ));
        assert!(matches!(
            judge_canary(&stats(12, 0, 12, 6), &plan),
            Verdict::RollBack(_)
        ));
        assert!(matches!(
            judge_canary(&stats(30, 0, 12, 12), &plan),
            Verdict::Advance(_)
        ));
        let mut parse = stats(30, 0, 12, 12);
        parse.tool_calls = 30;
        parse.invalid_arguments = 3;
        assert!(matches!(judge_canary(&parse, &plan), Verdict::RollBack(m) if m.contains("JSON")));
    }

    #[test]
    fn stage_rollouts_keep_the_champion_safe() {
        let teacher = TargetConfig::upstream("big", "teacher");
        let cand = TargetConfig::local_adapter("tiny", "fw/agent-1");
        let before = RolloutConfig {
            champion: teacher.clone(),
            canary: None,
            shadow: None,
            fallbacks: vec![TargetConfig::upstream("big", "backup")],
        };
        let plan = RolloutPlan::default();
        let s = shadow_rollout(&before, &cand, &plan);
        assert_eq!(s.champion, teacher);
        assert_eq!(s.shadow.unwrap().target, cand);
        let c = canary_rollout(&before, &cand, &plan);
        assert_eq!(c.canary.unwrap().target, cand);
        assert_eq!(c.shadow.unwrap().target, teacher);
        let p = champion_rollout(&before, &cand, Some(&teacher), &plan);
        assert_eq!(p.champion, cand);
        assert_eq!(p.fallbacks[0], teacher);
        assert_eq!(p.fallbacks.len(), 2);
        assert_eq!(p.shadow.unwrap().target, teacher);
    }
}
