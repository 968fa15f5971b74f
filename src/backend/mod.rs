//! Backends answer chat completions (and legacy completions and embeddings): upstream
//! OpenAI-compatible providers and the local engine. A backend neither logs nor applies rails;
//! the gateway pipeline does both around it.

pub mod local;
pub mod upstream;

use std::pin::Pin;

use futures_util::future::BoxFuture;
use futures_util::Stream;
use serde_json::{Map, Value};

use crate::wire::error::ApiError;
use crate::wire::Api;

/// One request, already validated, in the shape `api` names, with `model` set to the backend's own
/// model name.
#[derive(Debug, Clone)]
pub struct BackendRequest {
    /// Which shape `body` has: a chat completion (every chat-shaped door, translated), a legacy
    /// completion, an embeddings request, or a Responses or Messages request forwarded natively
    /// to an upstream that serves that API itself.
    pub api: Api,
    pub body: Map<String, Value>,
    pub stream: bool,
    /// A LoRA adapter to run with (local backends only).
    pub adapter: Option<String>,
}

/// A stream of `chat.completion.chunk` objects. An `Err` item ends the stream.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Value, BackendError>> + Send>>;

pub enum BackendReply {
    /// A whole `chat.completion`.
    Full(Value),
    /// Chunks; the first has already arrived when this is returned. `usage_injected` says the backend
    /// asked for a usage chunk the client did not ask for (the gateway strips it from the client's copy).
    Stream {
        chunks: ChunkStream,
        usage_injected: bool,
    },
}

/// Why a backend could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to upstream '{backend}': {message}")]
    Connect { backend: String, message: String },
    #[error("upstream '{backend}' did not answer within {after_ms} ms ({phase})")]
    Timeout {
        backend: String,
        phase: &'static str,
        after_ms: u64,
    },
    /// The provider answered with a non-success status; `body` is its error envelope if it sent one.
    #[error("upstream '{backend}' answered with status {status}")]
    Status {
        backend: String,
        status: u16,
        body: Option<Value>,
        retry_after_ms: Option<u64>,
    },
    /// The provider answered something that is not an OpenAI-compatible response.
    #[error("upstream '{backend}' sent an invalid response: {message}")]
    Protocol { backend: String, message: String },
    /// The provider reported an error inside a stream that had already begun.
    #[error("upstream '{backend}' reported an error mid-stream")]
    StreamError { backend: String, body: Value },
    #[error("{message}")]
    UnknownModel { backend: String, message: String },
    #[error("backend '{backend}' failed: {message}")]
    Internal { backend: String, message: String },
    #[error("backend '{backend}' cannot serve this request: {message}")]
    Unsupported {
        backend: String,
        message: String,
        param: Option<String>,
    },
}

impl BackendError {
    /// Failures worth trying the next fallback target for (the request itself was fine).
    pub fn is_target_failure(&self) -> bool {
        match self {
            BackendError::Connect { .. }
            | BackendError::Timeout { .. }
            | BackendError::Protocol { .. }
            | BackendError::StreamError { .. } => true,
            BackendError::Status { status, .. } => {
                *status == 429 || *status >= 500 || *status == 401 || *status == 403
            }
            BackendError::Unsupported { .. } => false,
            BackendError::Internal { .. } => true,
            BackendError::UnknownModel { .. } => true,
        }
    }
}

impl From<&BackendError> for ApiError {
    fn from(e: &crate::backend::BackendError) -> Self {
        use http::StatusCode;
        use BackendError as B;
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

/// Something that can answer chat completions (and, depending on the backend, legacy completions,
/// embeddings, or Responses and Messages requests in their own shape).
pub trait Backend: Send + Sync {
    fn name(&self) -> &str;
    /// Whether `n` > 1 can be served.
    fn supports_n(&self) -> bool;
    fn chat(&self, request: BackendRequest) -> BoxFuture<'_, Result<BackendReply, BackendError>>;
    /// Whether this backend has the LoRA adapter `id` loaded.
    fn serves_adapter(&self, _id: &str) -> bool {
        false
    }
    /// The adapters this backend has loaded.
    fn adapter_ids(&self) -> Vec<String> {
        Vec::new()
    }
    /// Whether this backend serves `api` (Responses or Messages) itself, so requests through
    /// that door are forwarded in their own shape.
    fn speaks_natively(&self, _api: Api) -> bool {
        false
    }
}
