//! The one OpenAI error envelope. Every error that leaves the gateway over HTTP is built here:
//! `{"error":{"message","type","param","code"}}` with the matching status.

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
        resp
    }
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

impl From<&crate::backend::BackendError> for ApiError {
    fn from(e: &crate::backend::BackendError) -> Self {
        use crate::backend::BackendError as B;
        match e {
            B::Connect { .. } => Self::new(StatusCode::BAD_GATEWAY, "upstream_error", e.to_string()).with_code("upstream_unreachable"),
            B::Timeout { .. } => Self::new(StatusCode::GATEWAY_TIMEOUT, "upstream_error", e.to_string()).with_code("upstream_timeout"),
            B::Protocol { .. } => {
                Self::new(StatusCode::BAD_GATEWAY, "upstream_error", e.to_string()).with_code("upstream_invalid_response")
            }
            B::StreamError { backend, body } => {
                let detail = body.pointer("/error/message").and_then(Value::as_str).unwrap_or("no message");
                Self::new(StatusCode::BAD_GATEWAY, "upstream_error", format!("upstream '{backend}' reported an error: {detail}"))
                    .with_code("upstream_error")
            }
            B::Internal { .. } => Self::internal(e.to_string()),
            B::UnknownModel { message, .. } => Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message.clone())
                .with_param("model")
                .with_code("model_not_found"),
            B::Unsupported { message, param, .. } => {
                let mut err = Self::invalid(message.clone());
                err.param = param.clone();
                err
            }
            B::Status { backend, status, body, .. } => match *status {
                429 => Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    format!("upstream '{backend}' is rate limiting this gateway; retry later"),
                )
                .with_code("upstream_rate_limited"),
                401 | 403 => Self::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    format!("upstream '{backend}' rejected the gateway's credentials (status {status}); check its api_key_env"),
                )
                .with_code("upstream_auth_failed"),
                s if (400..500).contains(&s) => {
                    // The provider refused the request itself: the client should see the provider's words.
                    let code = StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_REQUEST);
                    let mut err = Self::new(code, "invalid_request_error", format!("upstream '{backend}' refused the request (status {s})"));
                    err.passthrough = body.clone().map(Box::new);
                    err
                }
                s => Self::new(StatusCode::BAD_GATEWAY, "upstream_error", format!("upstream '{backend}' failed with status {s}"))
                    .with_code("upstream_error"),
            },
        }
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
    fn model_not_found_names_the_alternatives() {
        let e = ApiError::model_not_found("gpt-x", &["a".into(), "b".into()]);
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.message.contains("available: a, b"));
        assert_eq!(e.code.as_deref(), Some("model_not_found"));
    }
}
