//! Which logged answers teach a run: the teacher's (served, or logged as shadow copies), users'
//! demonstrations (which replace the request's logged answer), and answers from any arm, the
//! local champion's included, whose latest feedback passes one of the route's rules. A served
//! answer whose request or episode drew negative feedback teaches nothing.

use std::collections::{BTreeMap, HashSet};

use serde_json::{json, Value};

use crate::config::{is_negative, FeedbackRule, MetricConfig, Sources};
use crate::store::feedback::FeedbackIndex;
use crate::store::traffic::ServedExchange;

/// Where a record came from, as the curation report counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Demonstration,
    Teacher,
    Feedback,
    /// An answer from the log taken as it is (curation by hand, `flywheel data curate`).
    Logged,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Demonstration => "demonstration",
            Source::Teacher => "teacher",
            Source::Feedback => "feedback",
            Source::Logged => "logged",
        }
    }
}

/// An exchange that teaches, and why.
pub struct Taught {
    pub exchange: ServedExchange,
    pub source: Source,
}

/// What the sources give, best first (demonstrations, then the teacher, then answers kept for
/// their feedback), and the counts of answers left out, by reason.
pub struct Assembled {
    pub taught: Vec<Taught>,
    pub left_out: BTreeMap<String, usize>,
}

/// Assembles a run's records. `teacher` holds the teacher's answers, `served` every answer
/// clients were served in the window (any arm), `teacher_id` the teacher as `answered_by` names
/// it.
pub fn assemble(
    teacher: Vec<ServedExchange>,
    served: Vec<ServedExchange>,
    feedback: &FeedbackIndex,
    sources: &Sources,
    metrics: &[MetricConfig],
    teacher_id: &str,
) -> Assembled {
    let rules: Vec<FeedbackRule> = sources
        .feedback
        .iter()
        .filter_map(|r| FeedbackRule::parse(r, metrics).ok())
        .collect();
    let negative = |values: &BTreeMap<String, f64>| {
        values.iter().any(|(name, v)| {
            let declared = metrics.iter().find(|m| &m.name == name);
            declared.is_some_and(|m| is_negative(m, *v))
                || rules.iter().any(|r| &r.metric == name && !r.passes(*v))
        })
    };
    let mut left_out: BTreeMap<String, usize> = BTreeMap::new();
    let mut demonstrated = HashSet::new();
    let mut refused = HashSet::new();
    let (mut demos, mut by_feedback) = (Vec::new(), Vec::new());
    for x in served {
        let values = feedback.values(&x.id, x.episode_id.as_deref());
        let demo = sources
            .demonstrations
            .then(|| feedback.demonstrations.get(&x.id))
            .flatten();
        if let Some(d) = demo {
            demonstrated.insert(x.id.clone());
            demos.push(Taught {
                exchange: with_answer(x, d),
                source: Source::Demonstration,
            });
        } else if negative(&values) {
            *left_out.entry("negative feedback".into()).or_default() += 1;
            refused.insert(x.id.clone());
        } else if x.answered_by != teacher_id
            && rules
                .iter()
                .any(|r| values.get(&r.metric).is_some_and(|v| r.passes(*v)))
        {
            by_feedback.push(Taught {
                exchange: x,
                source: Source::Feedback,
            });
        }
    }
    let mut from_teacher = Vec::new();
    for t in teacher.into_iter().filter(|_| sources.teacher) {
        match &t.shadow_of {
            // The client's own answer: its feedback is about it.
            None if demonstrated.contains(&t.id) || refused.contains(&t.id) => {}
            // A copy beside another target's answer: only a demonstration of that request
            // replaces it (feedback judged the answer the client saw, not this one).
            Some(primary) if demonstrated.contains(primary) => {
                *left_out
                    .entry("replaced by a demonstration".into())
                    .or_default() += 1;
            }
            _ => from_teacher.push(Taught {
                exchange: t,
                source: Source::Teacher,
            }),
        }
    }
    let mut taught = demos;
    taught.extend(from_teacher);
    taught.extend(by_feedback);
    Assembled { taught, left_out }
}

/// `x` answered with the demonstration `message` instead.
fn with_answer(mut x: ServedExchange, message: &Value) -> ServedExchange {
    x.response = json!({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]});
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEACHER: &str = "upstream:big:teacher";
    const CHAMPION: &str = "local:tiny:fw/agent-1";

    fn x(id: &str, by: &str, shadow_of: Option<&str>, episode: Option<&str>) -> ServedExchange {
        ServedExchange {
            id: id.into(),
            ts_ms: 0,
            request: json!({"messages": [{"role": "user", "content": id}]}),
            response: json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": by}}]}),
            rails: None,
            shadow_of: shadow_of.map(str::to_string),
            episode_id: episode.map(str::to_string),
            answered_by: by.into(),
        }
    }

    fn metrics() -> Vec<MetricConfig> {
        serde_json::from_value(json!([
            {"name": "thumbs_up", "type": "boolean"},
            {"name": "task_success", "type": "boolean", "level": "episode"},
            {"name": "rating", "type": "float"},
        ]))
        .unwrap()
    }

    fn sources(rules: &[&str]) -> Sources {
        Sources {
            feedback: rules.iter().map(|r| r.to_string()).collect(),
            ..Sources::default()
        }
    }

    fn ids(a: &Assembled) -> Vec<(String, &'static str)> {
        a.taught
            .iter()
            .map(|t| (t.exchange.id.clone(), t.source.as_str()))
            .collect()
    }

    #[test]
    fn demonstrations_replace_negative_feedback_removes_and_rules_admit_any_arm() {
        // The teacher served t1..t3; the champion served c1..c3, each with a teacher shadow s*.
        let served = vec![
            x("t1", TEACHER, None, Some("e1")),
            x("t2", TEACHER, None, None),
            x("t3", TEACHER, None, None),
            x("c1", CHAMPION, None, Some("e2")),
            x("c2", CHAMPION, None, None),
            x("c3", CHAMPION, None, None),
        ];
        let teacher = vec![
            x("t1", TEACHER, None, Some("e1")),
            x("t2", TEACHER, None, None),
            x("t3", TEACHER, None, None),
            x("s1", TEACHER, Some("c1"), None),
            x("s2", TEACHER, Some("c2"), None),
        ];
        let mut fb = FeedbackIndex::default();
        // t2: thumbs down (the latest value counts), t3: a demonstration.
        fb.requests
            .insert("t2".into(), [("thumbs_up".to_string(), 0.0)].into());
        fb.demonstrations.insert(
            "t3".into(),
            json!({"role": "assistant", "content": "the right answer"}),
        );
        // The champion's c1 finished its task; c2 is demonstrated; c3 was rated low.
        fb.episodes
            .insert("e2".into(), [("task_success".to_string(), 1.0)].into());
        fb.demonstrations.insert(
            "c2".into(),
            json!({"role": "assistant", "content": "fixed"}),
        );
        fb.requests
            .insert("c3".into(), [("rating".to_string(), 2.0)].into());
        let a = assemble(
            teacher,
            served,
            &fb,
            &sources(&["task_success = true", "rating >= 4"]),
            &metrics(),
            TEACHER,
        );
        assert_eq!(
            ids(&a),
            vec![
                ("t3".to_string(), "demonstration"),
                ("c2".to_string(), "demonstration"),
                ("t1".to_string(), "teacher"),
                ("s1".to_string(), "teacher"),
                ("c1".to_string(), "feedback"),
            ]
        );
        let demo = &a.taught[0].exchange.response["choices"][0]["message"]["content"];
        assert_eq!(demo, "the right answer");
        assert_eq!(
            a.left_out["negative feedback"], 2,
            "t2 (thumbs down) and c3 (rating 2)"
        );
        assert_eq!(a.left_out["replaced by a demonstration"], 1, "s2");

        // Without rules, the champion's answers never teach; without the teacher, only the rest.
        let none = assemble(
            vec![x("t1", TEACHER, None, None)],
            vec![
                x("t1", TEACHER, None, None),
                x("c1", CHAMPION, None, Some("e2")),
            ],
            &fb,
            &Sources {
                teacher: false,
                ..sources(&[])
            },
            &metrics(),
            TEACHER,
        );
        assert!(ids(&none).is_empty(), "{:?}", ids(&none));
    }
}
