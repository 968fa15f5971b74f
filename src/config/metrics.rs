//! `[[metrics]]`: what users and agents may say about answers through `POST /v1/feedback`, each
//! metric a boolean or a number about one request or one episode, with the direction that is
//! better.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// One declared feedback metric.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricConfig {
    /// The name feedback uses (`task_success`, `rating`); the name rule of `crate::names`.
    pub name: String,
    #[serde(rename = "type")]
    pub kind: MetricKind,
    /// What a value is about: one request (`request_id`) or one episode (`episode_id`).
    #[serde(default)]
    pub level: MetricLevel,
    /// Which direction is better.
    #[serde(default)]
    pub optimize: Optimize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// `true` / `false`, stored as 1 / 0.
    Boolean,
    /// Any finite number.
    Float,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricLevel {
    #[default]
    Request,
    Episode,
}

impl MetricLevel {
    /// The feedback field that names what a value is about.
    pub fn key(self) -> &'static str {
        match self {
            MetricLevel::Request => "request_id",
            MetricLevel::Episode => "episode_id",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimize {
    #[default]
    Max,
    Min,
}

/// Names follow the name rule and are declared once; `comment` and `demonstration` are the
/// feedback kinds that need no metric and cannot be metric names.
pub(super) fn validate(metrics: &[MetricConfig]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    for m in metrics {
        if crate::names::Name::parse(&m.name).is_none() {
            return Err(ConfigError::Invalid(format!(
                "metric '{}': the name must be {}",
                m.name,
                crate::names::RULE
            )));
        }
        if matches!(m.name.as_str(), "comment" | "demonstration") {
            return Err(ConfigError::Invalid(format!(
                "metric '{}': the name is taken by a kind of feedback",
                m.name
            )));
        }
        if !names.insert(m.name.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "metric '{}' is declared twice",
                m.name
            )));
        }
    }
    Ok(())
}

/// A rule on a metric's latest value (`"task_success = true"`, `"rating >= 4"`): what makes an
/// answer worth teaching.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackRule {
    pub metric: String,
    pub op: Comparison,
    pub value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Eq,
    Ne,
    Ge,
    Gt,
    Le,
    Lt,
}

impl FeedbackRule {
    /// Reads `"<metric> <op> <value>"` (op one of `=`, `!=`, `>=`, `>`, `<=`, `<`; value a number,
    /// or `true`/`false` for a boolean metric, which takes `=` and `!=` only).
    pub fn parse(text: &str, metrics: &[MetricConfig]) -> Result<Self, String> {
        let ops = [
            ("!=", Comparison::Ne),
            (">=", Comparison::Ge),
            ("<=", Comparison::Le),
            ("==", Comparison::Eq),
            ("=", Comparison::Eq),
            (">", Comparison::Gt),
            ("<", Comparison::Lt),
        ];
        let (at, token, op) = ops
            .iter()
            .filter_map(|(t, op)| text.find(t).map(|i| (i, *t, *op)))
            .min_by_key(|(i, t, _)| (*i, std::cmp::Reverse(t.len())))
            .ok_or_else(|| format!("'{text}' has no comparison (=, !=, >=, >, <=, <)"))?;
        let name = text[..at].trim();
        let literal = text[at + token.len()..].trim();
        let metric = metrics
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| format!("'{text}': no metric '{name}' is declared in [[metrics]]"))?;
        let value = match (metric.kind, literal) {
            (MetricKind::Boolean, "true") => 1.0,
            (MetricKind::Boolean, "false") => 0.0,
            (MetricKind::Boolean, _) => {
                return Err(format!(
                    "'{text}': '{name}' is boolean; compare it with true or false"
                ))
            }
            (MetricKind::Float, v) => v
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("'{text}': '{v}' is not a number"))?,
        };
        if metric.kind == MetricKind::Boolean && !matches!(op, Comparison::Eq | Comparison::Ne) {
            return Err(format!("'{text}': a boolean metric takes = or != only"));
        }
        Ok(Self {
            metric: name.to_string(),
            op,
            value,
        })
    }

    pub fn passes(&self, v: f64) -> bool {
        match self.op {
            Comparison::Eq => v == self.value,
            Comparison::Ne => v != self.value,
            Comparison::Ge => v >= self.value,
            Comparison::Gt => v > self.value,
            Comparison::Le => v <= self.value,
            Comparison::Lt => v < self.value,
        }
    }
}

/// Whether `value` of `metric` is bad news: a boolean metric's worse value (false when
/// optimizing for max).
pub fn is_negative(metric: &MetricConfig, value: f64) -> bool {
    metric.kind == MetricKind::Boolean
        && match metric.optimize {
            Optimize::Max => value == 0.0,
            Optimize::Min => value != 0.0,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Vec<MetricConfig> {
        toml::from_str::<std::collections::HashMap<String, Vec<MetricConfig>>>(
            r#"metrics = [
                {name = "task_success", type = "boolean", level = "episode"},
                {name = "rating", type = "float"},
            ]"#,
        )
        .unwrap()
        .remove("metrics")
        .unwrap()
    }

    #[test]
    fn rules_read_and_compare_and_refuse_what_cannot_be_checked() {
        let m = metrics();
        let r = FeedbackRule::parse("rating >= 4", &m).unwrap();
        assert_eq!((r.op, r.value), (Comparison::Ge, 4.0));
        assert!(r.passes(4.0) && r.passes(5.0) && !r.passes(3.9));
        let b = FeedbackRule::parse("task_success = true", &m).unwrap();
        assert!(b.passes(1.0) && !b.passes(0.0));
        assert!(FeedbackRule::parse("rating!=2", &m).unwrap().passes(3.0));
        assert!(FeedbackRule::parse("rating < 2", &m).unwrap().passes(1.0));
        for bad in [
            "rating",
            "stars >= 4",
            "task_success >= 1",
            "task_success = yes",
            "rating > high",
        ] {
            assert!(FeedbackRule::parse(bad, &m).is_err(), "{bad}");
        }
        assert!(is_negative(&m[0], 0.0) && !is_negative(&m[0], 1.0));
        assert!(
            !is_negative(&m[1], 0.0),
            "a number is judged by rules, not by sign"
        );
    }
}
