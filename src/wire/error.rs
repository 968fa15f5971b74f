//! The error envelopes. Every error that leaves the gateway over HTTP is an [`ApiError`], sent in
//! OpenAI's envelope `{"error":{"message","type","param","code"}}` with the matching status, or,
//! on Anthropic's Messages door, in Anthropic's `{"type":"error","error":{"type","message"}}`.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{json, Value};

/// An error as the client will see it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
    /// A body to send verbatim instead of ours (an upstream's own well-formed error envelope).
    pub passthrough: Option<Box<Value>>,
    /// The traffic record the failed request was logged as, and its episode: sent back as
    /// `x-request-id` and `x-episode-id`, so feedback can name a failure too.
    pub logged: Option<Box<Logged>>,
}

/// Where a failed request was logged.
#[derive(Debug, Clone)]
pub struct Logged {
    pub request_id: String,
    pub episode_id: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            passthrough: None,
            logged: None,
        }
    }

    /// Names the traffic record (and the episode) the failed request was logged as.
    pub fn logged_as(mut self, request_id: String, episode_id: Option<String>) -> Self {
        self.logged = Some(Box::new(Logged {
            request_id,
            episode_id,
        }));
        self
    }

    /// Adds the `x-request-id` and `x-episode-id` headers of a logged failure.
    fn tag(&self, response: &mut Response) {
        let Some(logged) = self.logged.as_deref() else {
            return;
        };
        let h = response.headers_mut();
        if let Ok(v) = http::HeaderValue::from_str(&logged.request_id) {
            h.insert("x-request-id", v);
        }
        if let Some(Ok(v)) = logged
            .episode_id
            .as_deref()
            .map(http::HeaderValue::from_str)
        {
            h.insert("x-episode-id", v);
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message)
            .with_param(param)
            .with_code("invalid_value")
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .with_code("invalid_api_key")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
            .with_code("insufficient_scope")
    }

    /// 409: the thing exists already, or is in a state that does not allow the change.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message).with_code("conflict")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).with_code("not_found")
    }

    pub fn model_not_found(model: &str, known: &[String]) -> Self {
        let list = if known.is_empty() {
            "none are configured".to_string()
        } else {
            format!("available: {}", known.join(", "))
        };
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model '{model}' does not exist on this gateway ({list})."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("Request body is larger than the gateway's limit of {limit} bytes."),
        )
        .with_code("request_too_large")
    }

    pub fn overloaded() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "The gateway is serving as many requests as it is configured for; retry shortly.",
        )
        .with_code("gateway_overloaded")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The envelope's JSON.
    pub fn body(&self) -> Value {
        if let Some(v) = &self.passthrough {
            return (**v).clone();
        }
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        self.tag(&mut resp);
        resp
    }
}

/// Anthropic's error type for a status, as its API documents them.
fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

/// The error in Anthropic's envelope. An upstream's own (OpenAI-shaped) error keeps its message.
pub fn anthropic_body(e: &ApiError) -> Value {
    let message = e
        .passthrough
        .as_ref()
        .and_then(|p| p.pointer("/error/message"))
        .and_then(Value::as_str)
        .unwrap_or(&e.message);
    json!({"type": "error", "error": {"type": anthropic_type(e.status), "message": message}})
}

/// The error as a response on Anthropic's Messages door.
pub fn anthropic_response(e: &ApiError) -> Response {
    let mut resp = (e.status, axum::Json(anthropic_body(e))).into_response();
    e.tag(&mut resp);
    resp
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.kind,
            self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_all_four_fields_even_when_empty() {
        let body = ApiError::invalid("bad").body();
        let err = body["error"].as_object().unwrap();
        for k in ["message", "type", "param", "code"] {
            assert!(err.contains_key(k), "missing {k}");
        }
        assert_eq!(err["param"], Value::Null);
    }

    #[test]
    fn anthropic_errors_have_anthropic_types_and_keep_an_upstream_message() {
        let b = anthropic_body(&ApiError::invalid("bad"));
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(
            anthropic_body(&ApiError::unauthorized("x"))["error"]["type"],
            "authentication_error"
        );
        assert_eq!(
            anthropic_body(&ApiError::overloaded())["error"]["type"],
            "rate_limit_error"
        );
        let mut up = ApiError::invalid("upstream refused");
        up.passthrough = Some(Box::new(json!({"error": {"message": "their words"}})));
        assert_eq!(anthropic_body(&up)["error"]["message"], "their words");
    }

    #[test]
    fn model_not_found_names_the_alternatives() {
        let e = ApiError::model_not_found("gpt-x", &["a".into(), "b".into()]);
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.message.contains("available: a, b"));
        assert_eq!(e.code.as_deref(), Some("model_not_found"));
    }
}
