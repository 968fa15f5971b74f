//! `POST /v1/feedback` (scope `inference`): a declared metric's value, a comment, or a
//! demonstration (the answer that should have been given) about one request (`request_id`: the
//! `x-request-id` of its response) or one episode (`episode_id`: the `x-episode-id`).
//! `GET /v1/feedback?request_id=…` or `?episode_id=…` lists what was said, oldest first (an
//! episode's list includes the feedback on each of its requests).
//!
//! Feedback is queued on the traffic log's writer, behind the traffic rows queued before it. A
//! request whose row is not written yet (the writer is batched) is waited for, not refused: an
//! unknown id is a 404 only once the log has caught up.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::extract::{Inference, JsonObject, Query};
use super::{with_db, AppState};
use crate::config::{Config, MetricKind, MetricLevel};
use crate::store::feedback::{self, Feedback};
use crate::store::traffic::QueueError;
use crate::wire::error::ApiError;

/// The longest comment kept.
const MAX_COMMENT_CHARS: usize = 65_536;

/// What a piece of feedback is about.
enum About {
    Request(uuid::Uuid),
    Episode(String),
}

impl About {
    fn read(body: &Map<String, Value>) -> Result<Self, ApiError> {
        let text = |k: &str| match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
            Some(_) => Err(ApiError::invalid_param(
                k,
                format!("'{k}' must be a non-empty string."),
            )),
        };
        match (text("request_id")?, text("episode_id")?) {
            (Some(r), None) => {
                let id = uuid::Uuid::parse_str(&r).map_err(|_| {
                    ApiError::invalid_param(
                        "request_id",
                        format!("'{r}' is not a request id (the x-request-id header of a response)."),
                    )
                })?;
                Ok(About::Request(id))
            }
            (None, Some(e)) => Ok(About::Episode(crate::wire::chat::episode_id(&e, "episode_id")?)),
            (Some(_), Some(_)) => Err(ApiError::invalid_param(
                "episode_id",
                "Name either 'request_id' or 'episode_id', not both.",
            )),
            (None, None) => Err(ApiError::invalid_param(
                "request_id",
                "Name what the feedback is about: 'request_id' (a response's x-request-id) or 'episode_id'.",
            )),
        }
    }

    fn level(&self) -> MetricLevel {
        match self {
            About::Request(_) => MetricLevel::Request,
            About::Episode(_) => MetricLevel::Episode,
        }
    }
}

const FIELDS: &[&str] = &[
    "request_id",
    "episode_id",
    "metric",
    "value",
    "comment",
    "demonstration",
];

/// The metric and its value (booleans as 1 and 0), checked against the config.
fn metric_value(
    config: &Config,
    body: &Map<String, Value>,
    about: &About,
) -> Result<Option<(String, f64)>, ApiError> {
    let name = match body.get("metric") {
        None | Some(Value::Null) => {
            if body.get("value").is_some_and(|v| !v.is_null()) {
                return Err(ApiError::invalid_param(
                    "metric",
                    "A 'value' needs its 'metric'.",
                ));
            }
            return Ok(None);
        }
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(ApiError::invalid_param(
                "metric",
                "'metric' must be a string.",
            ))
        }
    };
    let Some(metric) = config.metric(name) else {
        let known: Vec<&str> = config.metrics.iter().map(|m| m.name.as_str()).collect();
        let known = if known.is_empty() {
            "none are declared ([[metrics]] in the config)".to_string()
        } else {
            known.join(", ")
        };
        return Err(ApiError::invalid_param(
            "metric",
            format!("Unknown metric '{name}' (declared: {known})."),
        )
        .with_code("unknown_metric"));
    };
    if metric.level != about.level() {
        return Err(ApiError::invalid_param(
            metric.level.key(),
            format!(
                "Metric '{name}' is about one {}; name it with '{}'.",
                if metric.level == MetricLevel::Request {
                    "request"
                } else {
                    "episode"
                },
                metric.level.key()
            ),
        ));
    }
    let value = match (metric.kind, body.get("value")) {
        (MetricKind::Boolean, Some(Value::Bool(b))) => f64::from(u8::from(*b)),
        (MetricKind::Float, Some(Value::Number(n))) => match n.as_f64() {
            Some(f) if f.is_finite() => f,
            _ => {
                return Err(ApiError::invalid_param(
                    "value",
                    "'value' must be a finite number.",
                ))
            }
        },
        (MetricKind::Boolean, _) => {
            return Err(ApiError::invalid_param(
                "value",
                format!("Metric '{name}' is boolean: 'value' must be true or false."),
            ))
        }
        (MetricKind::Float, _) => {
            return Err(ApiError::invalid_param(
                "value",
                format!("Metric '{name}' is a number: 'value' must be a number."),
            ))
        }
    };
    Ok(Some((name.to_string(), value)))
}

/// A demonstration as stored: an assistant message whose content is text and whose tool calls
/// name the request's tools with JSON-object arguments (kept as a JSON string, as OpenAI sends
/// them).
fn demonstration(value: &Value, request: &Value) -> Result<Value, ApiError> {
    let param = "demonstration";
    let Value::Object(m) = value else {
        return Err(ApiError::invalid_param(
            param,
            "'demonstration' must be an assistant message: {\"content\": ..., \"tool_calls\": [...]}.",
        ));
    };
    match m.get("role") {
        None | Some(Value::Null) => {}
        Some(Value::String(r)) if r == "assistant" => {}
        Some(_) => {
            return Err(ApiError::invalid_param(
                "demonstration.role",
                "A demonstration is the assistant's answer: 'role' must be 'assistant'.",
            ))
        }
    }
    let content = match m.get("content") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::invalid_param(
                "demonstration.content",
                "'content' must be a string.",
            ))
        }
    };
    let tools: Vec<&str> = request
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
        .collect();
    let mut calls = Vec::new();
    match m.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(_)) => {
            for (i, call) in crate::wire::tool_calls::in_message(value)
                .iter()
                .enumerate()
            {
                let at = |f: &str| format!("demonstration.tool_calls[{i}].function.{f}");
                if !tools.contains(&call.name.as_str()) {
                    let offered = if tools.is_empty() {
                        "the request offered no tools".to_string()
                    } else {
                        format!("the request's tools: {}", tools.join(", "))
                    };
                    return Err(ApiError::invalid_param(
                        &at("name"),
                        format!(
                            "'{}' is not one of the request's tools ({offered}).",
                            call.name
                        ),
                    ));
                }
                let Some(Value::Object(args)) = call.parsed_arguments() else {
                    return Err(ApiError::invalid_param(
                        &at("arguments"),
                        "The arguments must be a JSON object (or its JSON text).",
                    ));
                };
                calls.push(json!({
                    "id": call.id.clone().unwrap_or_else(|| format!("call_demo_{i}")),
                    "type": "function",
                    "function": {"name": call.name, "arguments": Value::Object(args).to_string()},
                }));
            }
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "demonstration.tool_calls",
                "'tool_calls' must be an array.",
            ))
        }
    }
    if content.as_deref().is_none_or(str::is_empty) && calls.is_empty() {
        return Err(ApiError::invalid_param(
            param,
            "A demonstration needs 'content' or 'tool_calls'.",
        ));
    }
    let mut message = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    Ok(message)
}

/// Checks that the log holds the request or episode: in memory for recent traffic, else in the
/// database (see [`locate`]).
async fn check_known(state: &AppState, about: &About) -> Result<(), ApiError> {
    let log = state.gateway.log();
    let recent = match about {
        About::Request(id) => log.knows_request(id),
        About::Episode(id) => log.knows_episode(id),
    };
    if recent {
        return Ok(());
    }
    locate(state, about).await.map(|_| ())
}

/// How long feedback about an unknown id waits for another replica's writer, on a store replicas
/// share (the request may have been answered by another replica a moment ago), and how often it
/// looks.
const OTHER_REPLICAS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const OTHER_REPLICAS_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// The request's body as logged, or that the episode exists; waits for the traffic log to catch
/// up once (and, on a store replicas share, for the others' writers a while) before calling an
/// id unknown.
async fn locate(state: &AppState, about: &About) -> Result<Value, ApiError> {
    let shared = state
        .db
        .as_ref()
        .is_some_and(|d| d.dialect() == crate::store::Dialect::Postgres);
    let attempts = if shared {
        2 + (OTHER_REPLICAS_WAIT.as_millis() / OTHER_REPLICAS_POLL.as_millis()) as usize
    } else {
        2
    };
    for attempt in 0..attempts {
        let found = match about {
            About::Request(id) => {
                let id = id.to_string();
                with_db(state, move |c| Ok(feedback::request_of(c, &id)?))
                    .await?
                    .map(|(_, r)| r)
            }
            About::Episode(id) => {
                let id = id.clone();
                with_db(state, move |c| Ok(feedback::episode_exists(c, &id)?))
                    .await?
                    .then_some(Value::Null)
            }
        };
        if let Some(request) = found {
            return Ok(request);
        }
        if attempt == 0 {
            state.gateway.log().caught_up().await.map_err(queue_error)?;
        } else if attempt + 1 < attempts {
            tokio::time::sleep(OTHER_REPLICAS_POLL).await;
        }
    }
    Err(match about {
        About::Request(id) => {
            ApiError::not_found(format!("No request '{id}' is in the traffic log."))
                .with_param("request_id")
        }
        About::Episode(id) => ApiError::not_found(format!(
            "No request of episode '{id}' is in the traffic log."
        ))
        .with_param("episode_id"),
    })
}

fn queue_error(e: QueueError) -> ApiError {
    let message = match e {
        QueueError::Disabled => format!("{e}: set [log] enabled = true."),
        QueueError::Full | QueueError::Stopped => e.to_string(),
    };
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        .with_code("feedback_unavailable")
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Inference,
    JsonObject(body): JsonObject,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !state.gateway.log().enabled() {
        return Err(queue_error(QueueError::Disabled));
    }
    if let Some(k) = body.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid_param(
            k,
            format!(
                "Unrecognized field '{k}' (feedback takes {}).",
                FIELDS.join(", ")
            ),
        ));
    }
    let about = About::read(&body)?;
    let metric = metric_value(state.gateway.config(), &body, &about)?;
    let comment = match body.get("comment") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_COMMENT_CHARS => {
            Some(s.clone())
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "comment",
                format!("'comment' must be a string of 1 to {MAX_COMMENT_CHARS} characters."),
            ))
        }
    };
    let demo = body.get("demonstration").filter(|d| !d.is_null());
    if demo.is_some() && metric.is_some() {
        return Err(ApiError::invalid_param(
            "demonstration",
            "Send a demonstration and a metric's value as two pieces of feedback.",
        ));
    }
    if demo.is_some() && matches!(about, About::Episode(_)) {
        return Err(ApiError::invalid_param(
            "demonstration",
            "A demonstration replaces one request's answer: name it with 'request_id'.",
        ));
    }
    if metric.is_none() && demo.is_none() && comment.is_none() {
        return Err(ApiError::invalid_param(
            "metric",
            "Feedback needs a 'metric' with its 'value', a 'comment' or a 'demonstration'.",
        ));
    }
    // A demonstration is checked against the request's tools, so it reads the logged request;
    // anything else only needs the request or episode to exist.
    let demonstration = match demo {
        Some(d) => Some(demonstration(d, &locate(&state, &about).await?)?),
        None => {
            check_known(&state, &about).await?;
            None
        }
    };
    let (request_id, episode_id) = match about {
        About::Request(r) => (Some(r.to_string()), None),
        About::Episode(e) => (None, Some(e)),
    };
    let kind = match (&metric, &demonstration) {
        (Some((name, _)), _) => name.clone(),
        (None, Some(_)) => "demonstration".to_string(),
        (None, None) => "comment".to_string(),
    };
    let (metric, value) = metric.unzip();
    let stored = Feedback {
        id: uuid::Uuid::now_v7().to_string(),
        ts_ms: crate::store::runs::now_ms(),
        key_name: caller.0.name,
        request_id,
        episode_id,
        metric,
        value,
        comment,
        demonstration,
    };
    state
        .gateway
        .log()
        .feedback(stored.clone())
        .await
        .map_err(queue_error)?;
    metrics::counter!("flywheel_feedback_total", "kind" => kind).increment(1);
    let mut out = serde_json::to_value(&stored).unwrap_or(Value::Null);
    out["object"] = json!("feedback");
    Ok((StatusCode::CREATED, Json(out)))
}

#[derive(Deserialize)]
pub struct FeedbackFilter {
    request_id: Option<String>,
    episode_id: Option<String>,
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    _: Inference,
    Query(filter): Query<FeedbackFilter>,
) -> Result<Json<Value>, ApiError> {
    // Feedback just accepted may still be queued: the list shows it.
    state.gateway.log().caught_up().await.map_err(queue_error)?;
    let data =
        match (filter.request_id, filter.episode_id) {
            (Some(r), None) => with_db(&state, move |c| Ok(feedback::for_request(c, &r)?)).await?,
            (None, Some(e)) => with_db(&state, move |c| Ok(feedback::for_episode(c, &e)?)).await?,
            _ => return Err(ApiError::invalid_param(
                "request_id",
                "List the feedback of one request (?request_id=) or one episode (?episode_id=).",
            )),
        };
    Ok(Json(json!({"object": "list", "data": data})))
}
