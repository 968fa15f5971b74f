//! The flywheel loop's configuration: when runs start (`[flywheel]`) and, per route
//! (`[routes.flywheel]`), what a run trains, how a candidate must win, how it is rolled out, and
//! what counts as drift.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ConfigError, TargetConfig};

/// `[flywheel]`: the schedule and the controller's pace, shared by every route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FlywheelConfig {
    /// Cron expression (seconds minutes hours day-of-month month day-of-week, UTC) for scheduled
    /// runs of every flywheel route; empty turns the schedule off.
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// Seconds between checks of rollouts in progress and of drift.
    #[serde(default = "default_check_interval")]
    pub check_interval_secs: f64,
    /// Training steps wait while a local engine is serving, up to this many milliseconds each.
    #[serde(default = "default_max_yield")]
    pub max_yield_ms: u64,
}

impl Default for FlywheelConfig {
    fn default() -> Self {
        Self {
            schedule: default_schedule(),
            check_interval_secs: default_check_interval(),
            max_yield_ms: default_max_yield(),
        }
    }
}

/// `[routes.flywheel]`: this route's traffic trains a student adapter that may take it over.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFlywheelConfig {
    /// The local model a candidate adapter is trained on (and evaluated on before its rollout).
    pub student: String,
    /// An upstream (a vLLM or NIM deployment of the student's base model) that serves candidates
    /// instead of the embedded engine: a winning adapter is loaded on each of its servers (see
    /// `[upstreams.lora]`) and rolled out as `{ upstream, adapter }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<String>,
    /// Whose logged answers are the ground truth. Default: the route's champion when it is an
    /// upstream model (the "teacher"); with a local champion, name the teacher here.
    #[serde(default)]
    pub teacher: Option<TargetConfig>,
    /// Only this workload's traffic is curated (default: all of the route's).
    #[serde(default)]
    pub workload_id: Option<String>,
    /// Days of traffic a run curates.
    #[serde(default = "default_window_days")]
    pub window_days: f64,
    /// Usable records (after deduplication) a run needs.
    #[serde(default = "default_min_records")]
    pub min_records: usize,
    /// What a run needs that the last completed run did not have: teaching records newer than
    /// it, plus requests and episodes that drew feedback since. Fewer and the run is skipped.
    #[serde(default = "default_min_new_records")]
    pub min_new_records: usize,
    #[serde(default = "default_validation_share")]
    pub validation_share: f64,
    #[serde(default = "default_test_share")]
    pub test_share: f64,
    /// Seed of the splits and of training.
    #[serde(default)]
    pub seed: u64,
    /// Customization hyperparameters in NeMo Customizer's shape
    /// (`{epochs, batch_size, learning_rate, lora = {adapter_dim, alpha, adapter_dropout}}`).
    #[serde(default = "empty_table")]
    pub hyperparameters: Value,
    #[serde(default)]
    pub policy: PromotionPolicy,
    #[serde(default)]
    pub rollout: RolloutPlan,
    #[serde(default)]
    pub drift: DriftConfig,
    #[serde(default)]
    pub sources: Sources,
}

/// `[routes.flywheel.sources]`: which logged answers teach. Whatever the sources, a record whose
/// request (or episode) drew negative feedback (the worse value of a boolean metric, or a value
/// failing one of `feedback`'s rules on its metric) is left out.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sources {
    /// The teacher's answers, served or logged as shadow copies.
    #[serde(default = "yes")]
    pub teacher: bool,
    /// Users' demonstrations: the answer that should have been given replaces the request's
    /// logged answer.
    #[serde(default = "yes")]
    pub demonstrations: bool,
    /// Rules on feedback (`"task_success = true"`, `"rating >= 4"`): an answer from any arm, the
    /// local champion's included, whose latest feedback passes one of them teaches.
    #[serde(default)]
    pub feedback: Vec<String>,
}

impl Default for Sources {
    fn default() -> Self {
        Self {
            teacher: true,
            demonstrations: true,
            feedback: Vec::new(),
        }
    }
}

/// When a candidate may start its rollout, judged on held-out items both targets answered.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionPolicy {
    /// `function_name_and_args_accuracy`, `function_name_accuracy` or `ast_accuracy`.
    #[serde(default = "default_metric")]
    pub metric: String,
    /// Held-out items the decision needs.
    #[serde(default = "default_min_test_items")]
    pub min_test_items: usize,
    /// Against a local champion: the candidate must gain at least this much, and the 95% paired
    /// lower bound of the gain must be above zero.
    #[serde(default)]
    pub min_improvement: f64,
    /// Against a teacher: the candidate may trail by at most this much (the 95% lower bound of the
    /// difference must be above −margin).
    #[serde(default = "default_teacher_margin")]
    pub teacher_margin: f64,
    /// The largest drop in any one tool's accuracy that is tolerated.
    #[serde(default = "default_tool_regression")]
    pub max_tool_regression: f64,
    /// How much the JSON-parse failure rate may rise (0: no worse).
    #[serde(default)]
    pub max_parse_failure_increase: f64,
    /// The candidate's p95 latency on the held-out items must stay under this, if set.
    #[serde(default)]
    pub max_latency_p95_ms: Option<f64>,
}

/// How a winning candidate reaches traffic, and the guards that send it back.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPlan {
    /// What live agreement compares: "names" (tool names) or "arguments" (names and arguments).
    #[serde(default = "default_agreement_on")]
    pub agreement_on: String,
    /// Share of the champion's successful requests mirrored to the candidate in shadow.
    #[serde(default = "default_shadow_rate")]
    pub shadow_sample_rate: f64,
    /// Compared shadow answers needed before leaving shadow.
    #[serde(default = "default_min_samples")]
    pub shadow_min_samples: usize,
    /// Agreement with the champion needed to go on to canary.
    #[serde(default = "default_min_agreement")]
    pub shadow_min_agreement: f64,
    /// Share of sticky traffic the candidate serves in canary, 0–100.
    #[serde(default = "default_canary_percent")]
    pub canary_percent: f64,
    /// Canary requests needed before the candidate becomes champion.
    #[serde(default = "default_min_samples")]
    pub canary_min_requests: usize,
    /// Share of the canary's answers also asked of the champion, to measure agreement live.
    #[serde(default = "default_shadow_rate")]
    pub canary_mirror_rate: f64,
    /// Guards: a canary below or above these is rolled back at once.
    #[serde(default = "default_min_agreement")]
    pub canary_min_agreement: f64,
    #[serde(default = "default_max_error_rate")]
    pub canary_max_error_rate: f64,
    #[serde(default = "default_max_error_rate")]
    pub canary_max_parse_failure_rate: f64,
    #[serde(default = "default_max_block_rate")]
    pub canary_max_block_rate: f64,
    /// Requests a guard needs before it may trip.
    #[serde(default = "default_guard_min")]
    pub guard_min_requests: usize,
    /// After a local adapter becomes champion: share of its traffic mirrored to the teacher, which
    /// keeps ground-truth labels and the live agreement flowing (0 stops both).
    #[serde(default = "default_teacher_rate")]
    pub teacher_sample_rate: f64,
    /// A shadow or canary stage whose candidate gets no request for this long (while the stage
    /// has lasted at least as long) is recorded as starved.
    #[serde(default = "default_starved_after")]
    pub starved_after_secs: f64,
    /// Feedback guards: a canary whose metric is worse than the champion's over the same window
    /// by more than `margin`, at one-sided 95%, is rolled back.
    #[serde(default)]
    pub feedback_guards: Vec<FeedbackGuard>,
    /// A candidate that passed its evaluation waits in `awaiting_approval` until someone with
    /// admin scope approves it (its shadow stage begins) or rejects it.
    #[serde(default)]
    pub require_approval: bool,
}

/// A canary guard on a feedback metric (`[[routes.flywheel.rollout.feedback_guards]]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackGuard {
    /// A declared metric (`[[metrics]]`).
    pub metric: String,
    /// How much worse than the champion (a rate for a boolean metric, the metric's unit for a
    /// number) the candidate may be before the guard trips.
    #[serde(default = "default_feedback_margin")]
    pub margin: f64,
    /// Values needed on each arm before the guard may trip.
    #[serde(default = "default_feedback_samples")]
    pub min_samples: usize,
}

/// A drift trigger on a feedback metric (`[[routes.flywheel.drift.feedback_floors]]`): the
/// champion's mean over the drift window on the wrong side of `floor` starts a run.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackFloor {
    pub metric: String,
    /// The worst acceptable mean (a minimum for `optimize = "max"`, a maximum for `"min"`).
    pub floor: f64,
    #[serde(default = "default_feedback_samples")]
    pub min_samples: usize,
}

fn default_feedback_margin() -> f64 {
    0.05
}
fn default_feedback_samples() -> usize {
    20
}

/// What starts a run between scheduled ones.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DriftConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Seconds of recent traffic the drift checks look at.
    #[serde(default = "default_drift_window")]
    pub window_secs: u64,
    /// Compared answers needed before agreement or parse failures can signal drift.
    #[serde(default = "default_drift_min_samples")]
    pub min_samples: usize,
    /// Live agreement of a local champion with its teacher below this is drift.
    #[serde(default = "default_drift_agreement")]
    pub min_agreement: f64,
    /// A champion's JSON-parse failure rate above this is drift.
    #[serde(default = "default_drift_parse_failures")]
    pub max_parse_failure_rate: f64,
    /// Requests using tools (name and schema) the champion was never trained on that make drift.
    #[serde(default = "default_new_tool_records")]
    pub new_tool_min_records: usize,
    /// Seconds after a run ends before drift may start another.
    #[serde(default = "default_cooldown")]
    pub cooldown_secs: u64,
    /// Feedback on the champion on the wrong side of a floor is drift.
    #[serde(default)]
    pub feedback_floors: Vec<FeedbackFloor>,
}

impl Default for PromotionPolicy {
    fn default() -> Self {
        Self {
            metric: default_metric(),
            min_test_items: default_min_test_items(),
            min_improvement: 0.0,
            teacher_margin: default_teacher_margin(),
            max_tool_regression: default_tool_regression(),
            max_parse_failure_increase: 0.0,
            max_latency_p95_ms: None,
        }
    }
}

impl Default for RolloutPlan {
    fn default() -> Self {
        Self {
            agreement_on: default_agreement_on(),
            shadow_sample_rate: default_shadow_rate(),
            shadow_min_samples: default_min_samples(),
            shadow_min_agreement: default_min_agreement(),
            canary_percent: default_canary_percent(),
            canary_min_requests: default_min_samples(),
            canary_mirror_rate: default_shadow_rate(),
            canary_min_agreement: default_min_agreement(),
            canary_max_error_rate: default_max_error_rate(),
            canary_max_parse_failure_rate: default_max_error_rate(),
            canary_max_block_rate: default_max_block_rate(),
            guard_min_requests: default_guard_min(),
            teacher_sample_rate: default_teacher_rate(),
            starved_after_secs: default_starved_after(),
            feedback_guards: Vec::new(),
            require_approval: false,
        }
    }
}

impl Default for DriftConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window_secs: default_drift_window(),
            min_samples: default_drift_min_samples(),
            min_agreement: default_drift_agreement(),
            max_parse_failure_rate: default_drift_parse_failures(),
            new_tool_min_records: default_new_tool_records(),
            cooldown_secs: default_cooldown(),
            feedback_floors: Vec::new(),
        }
    }
}

pub const METRICS: [&str; 3] = [
    "function_name_and_args_accuracy",
    "function_name_accuracy",
    "ast_accuracy",
];

impl RouteFlywheelConfig {
    /// Checks the ranges; `route` and the field name are in every message.
    pub fn validate(&self, route: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, why: String| {
            Err(ConfigError::Invalid(format!(
                "route '{route}': flywheel.{field} {why}"
            )))
        };
        let share = |x: f64| (0.0..=1.0).contains(&x);
        if !METRICS.contains(&self.policy.metric.as_str()) {
            return bad(
                "policy.metric",
                format!(
                    "'{}' is not one of {}",
                    self.policy.metric,
                    METRICS.join(", ")
                ),
            );
        }
        if !share(self.validation_share)
            || !share(self.test_share)
            || self.validation_share + self.test_share >= 1.0
        {
            return bad(
                "validation_share/test_share",
                "must be within 0–1 and leave a training share".into(),
            );
        }
        if self.test_share == 0.0 {
            return bad(
                "test_share",
                "must be above 0: a candidate is judged on held-out items".into(),
            );
        }
        if self.window_days <= 0.0 {
            return bad("window_days", "must be above 0".into());
        }
        if self.min_records == 0 {
            return bad("min_records", "must be at least 1".into());
        }
        if !self.hyperparameters.is_object() {
            return bad("hyperparameters", "must be a table".into());
        }
        let r = &self.rollout;
        if !matches!(r.agreement_on.as_str(), "names" | "arguments") {
            return bad(
                "rollout.agreement_on",
                format!("'{}' is not \"names\" or \"arguments\"", r.agreement_on),
            );
        }
        for (field, x) in [
            ("rollout.shadow_sample_rate", r.shadow_sample_rate),
            ("rollout.shadow_min_agreement", r.shadow_min_agreement),
            ("rollout.canary_mirror_rate", r.canary_mirror_rate),
            ("rollout.canary_min_agreement", r.canary_min_agreement),
            ("rollout.canary_max_error_rate", r.canary_max_error_rate),
            (
                "rollout.canary_max_parse_failure_rate",
                r.canary_max_parse_failure_rate,
            ),
            ("rollout.canary_max_block_rate", r.canary_max_block_rate),
            ("rollout.teacher_sample_rate", r.teacher_sample_rate),
            ("drift.min_agreement", self.drift.min_agreement),
            (
                "drift.max_parse_failure_rate",
                self.drift.max_parse_failure_rate,
            ),
            ("policy.teacher_margin", self.policy.teacher_margin),
            (
                "policy.max_tool_regression",
                self.policy.max_tool_regression,
            ),
        ] {
            if !share(x) {
                return bad(field, format!("{x} must be within 0–1"));
            }
        }
        if r.shadow_sample_rate == 0.0 {
            return bad(
                "rollout.shadow_sample_rate",
                "must be above 0, or a candidate never leaves shadow".into(),
            );
        }
        if !(0.0..=100.0).contains(&r.canary_percent) || r.canary_percent == 0.0 {
            return bad(
                "rollout.canary_percent",
                format!("{} must be within (0, 100]", r.canary_percent),
            );
        }
        if r.shadow_min_samples == 0 || r.canary_min_requests == 0 || r.guard_min_requests == 0 {
            return bad(
                "rollout",
                "shadow_min_samples, canary_min_requests and guard_min_requests must be at least 1"
                    .into(),
            );
        }
        Ok(())
    }
}

fn yes() -> bool {
    true
}
fn empty_table() -> Value {
    Value::Object(serde_json::Map::new())
}
fn default_schedule() -> String {
    "0 0 2 * * *".into()
}
fn default_check_interval() -> f64 {
    30.0
}
fn default_max_yield() -> u64 {
    2_000
}
fn default_window_days() -> f64 {
    7.0
}
fn default_min_records() -> usize {
    50
}
fn default_min_new_records() -> usize {
    10
}
fn default_validation_share() -> f64 {
    0.1
}
fn default_test_share() -> f64 {
    0.2
}
fn default_metric() -> String {
    METRICS[0].into()
}
fn default_min_test_items() -> usize {
    20
}
fn default_teacher_margin() -> f64 {
    0.05
}
fn default_tool_regression() -> f64 {
    0.1
}
fn default_agreement_on() -> String {
    "arguments".into()
}
fn default_shadow_rate() -> f64 {
    0.2
}
fn default_min_samples() -> usize {
    50
}
fn default_min_agreement() -> f64 {
    0.9
}
fn default_canary_percent() -> f64 {
    10.0
}
fn default_max_error_rate() -> f64 {
    0.02
}
fn default_max_block_rate() -> f64 {
    0.05
}
fn default_guard_min() -> usize {
    10
}
fn default_teacher_rate() -> f64 {
    0.1
}
fn default_starved_after() -> f64 {
    600.0
}
fn default_drift_window() -> u64 {
    3_600
}
fn default_drift_min_samples() -> usize {
    20
}
fn default_drift_agreement() -> f64 {
    0.8
}
fn default_drift_parse_failures() -> f64 {
    0.1
}
fn default_new_tool_records() -> usize {
    20
}
fn default_cooldown() -> u64 {
    3_600
}
