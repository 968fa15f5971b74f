//! Upstream OpenAI-compatible providers over a pooled keep-alive hyper client (HTTP/1.1 and HTTP/2,
//! https via rustls), with connect / first-byte / total timeouts and jittered retries on connect
//! errors, 429 and 5xx. Retries happen only before anything has been handed to the gateway, so never
//! after the first streamed byte reached a client.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER,
    USER_AGENT,
};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{Backend, BackendError, BackendReply, BackendRequest, ChunkStream};
use crate::config::UpstreamConfig;
use crate::wire::sse::{SseEvent, SseParser};
use crate::wire::Api;

/// Largest non-streamed response body accepted from a provider.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Largest error body read from a provider.
const MAX_ERROR_BYTES: usize = 64 * 1024;

pub struct Upstream {
    name: String,
    cfg: UpstreamConfig,
    /// The URL of each API under the base URL, in `Api::ALL`'s order.
    urls: [Uri; 5],
    headers: HeaderMap,
    /// The APIs besides chat completions this upstream serves itself.
    native: Vec<Api>,
    /// The key again as Anthropic's `x-api-key`, for natively forwarded Messages requests.
    anthropic_key: Option<HeaderValue>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, String> {
        let url = |api: Api| -> Result<Uri, String> {
            format!(
                "{}{}",
                cfg.base_url.trim_end_matches('/'),
                api.upstream_path()
            )
            .parse()
            .map_err(|e| format!("upstream '{}': bad base_url: {e}", cfg.name))
        };
        let urls = [
            url(Api::ALL[0])?,
            url(Api::ALL[1])?,
            url(Api::ALL[2])?,
            url(Api::ALL[3])?,
            url(Api::ALL[4])?,
        ];
        let mut anthropic_key = None;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("flywheel/", env!("CARGO_PKG_VERSION"))),
        );
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("upstream '{}': header {k}: {e}", cfg.name))?;
            let mut value = HeaderValue::from_str(v)
                .map_err(|e| format!("upstream '{}': header {k}: {e}", cfg.name))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        if let Some(var) = &cfg.api_key_env {
            match std::env::var(var) {
                Ok(key) if !key.is_empty() => {
                    let mut value =
                        HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                            format!(
                                "upstream '{}': the key in ${var} is not a valid header value",
                                cfg.name
                            )
                        })?;
                    value.set_sensitive(true);
                    headers.insert(AUTHORIZATION, value);
                    if let Ok(mut k) = HeaderValue::from_str(&key) {
                        k.set_sensitive(true);
                        anthropic_key = Some(k);
                    }
                }
                _ => tracing::warn!(
                    upstream = %cfg.name,
                    "environment variable {var} is not set; requests to this upstream go without an API key"
                ),
            }
        }

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(cfg)?)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_only(cfg.http2_prior_knowledge)
            .build(tls);
        Ok(Self {
            name: cfg.name.clone(),
            cfg: cfg.clone(),
            urls,
            headers,
            native: cfg
                .native_apis
                .iter()
                .filter_map(|a| Api::parse(a))
                .collect(),
            anthropic_key,
            client,
        })
    }

    async fn complete(&self, request: BackendRequest) -> Result<BackendReply, BackendError> {
        let mut body = request.body;
        if !self.cfg.supports_n && body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
            return Err(BackendError::Unsupported {
                backend: self.name.clone(),
                message: "this upstream serves only n = 1".into(),
                param: Some("n".into()),
            });
        }
        let mut usage_injected = false;
        let chunked = matches!(request.api, Api::Chat | Api::Completions);
        if chunked && request.stream && self.cfg.request_stream_usage {
            let client_asked = body
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                == Some(true);
            if !client_asked {
                match body.get_mut("stream_options") {
                    Some(Value::Object(o)) => {
                        o.insert("include_usage".into(), Value::Bool(true));
                    }
                    _ => {
                        body.insert("stream_options".into(), json!({"include_usage": true}));
                    }
                }
                usage_injected = true;
            }
        }
        let payload =
            Bytes::from(
                serde_json::to_vec(&body).map_err(|e| BackendError::Protocol {
                    backend: self.name.clone(),
                    message: format!("cannot encode request: {e}"),
                })?,
            );
        let deadline = Instant::now() + Duration::from_millis(self.cfg.total_timeout_ms);
        let mut attempt = 0u32;
        loop {
            match self
                .attempt(request.api, payload.clone(), request.stream, deadline)
                .await
            {
                Ok(Attempt::Full(v)) => return Ok(BackendReply::Full(v)),
                Ok(Attempt::Stream(chunks)) => {
                    return Ok(BackendReply::Stream {
                        chunks,
                        usage_injected,
                    })
                }
                Err(e) => {
                    let retryable = match &e {
                        BackendError::Connect { .. } => true,
                        BackendError::Status { status, .. } => *status == 429 || *status >= 500,
                        _ => false,
                    };
                    if !retryable || attempt >= self.cfg.max_retries {
                        return Err(e);
                    }
                    let retry_after = match &e {
                        BackendError::Status { retry_after_ms, .. } => *retry_after_ms,
                        _ => None,
                    };
                    let wait = self.backoff(attempt, retry_after);
                    if Instant::now() + wait >= deadline {
                        return Err(e);
                    }
                    metrics::counter!("flywheel_upstream_retries_total", "upstream" => self.name.clone()).increment(1);
                    tracing::debug!(upstream = %self.name, attempt, error = %e, wait_ms = wait.as_millis() as u64, "retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Exponential backoff with full jitter, honouring a provider's Retry-After up to the cap.
    fn backoff(&self, attempt: u32, retry_after_ms: Option<u64>) -> Duration {
        let cap = self.cfg.backoff_max_ms;
        if let Some(ra) = retry_after_ms {
            return Duration::from_millis(ra.min(cap));
        }
        let ceiling = self
            .cfg
            .backoff_base_ms
            .saturating_mul(1u64 << attempt.min(16))
            .min(cap)
            .max(1);
        Duration::from_millis(rand::rng().random_range(ceiling / 2..=ceiling))
    }

    async fn attempt(
        &self,
        api: Api,
        payload: Bytes,
        stream: bool,
        deadline: Instant,
    ) -> Result<Attempt, BackendError> {
        let attempt_started = Instant::now();
        let url = &self.urls[Api::ALL.iter().position(|a| *a == api).unwrap_or(0)];
        let mut builder = Request::builder().method(Method::POST).uri(url.clone());
        if let Some(h) = builder.headers_mut() {
            h.clone_from(&self.headers);
            if api == Api::Messages {
                if let Some(k) = &self.anthropic_key {
                    h.entry("x-api-key").or_insert_with(|| k.clone());
                }
                h.entry("anthropic-version")
                    .or_insert(HeaderValue::from_static("2023-06-01"));
            }
            h.insert(
                ACCEPT,
                HeaderValue::from_static(if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                }),
            );
        }
        let first_byte = Duration::from_millis(self.cfg.first_byte_timeout_ms);
        let first_byte_deadline = deadline.min(Instant::now() + first_byte);
        let resp = self
            .send(builder, payload, first_byte_deadline, attempt_started)
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after_ms = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<f64>().ok())
                .map(|s| (s * 1000.0) as u64);
            let body = read_body(resp.into_body(), MAX_ERROR_BYTES, deadline)
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .filter(|v| v.get("error").is_some_and(Value::is_object));
            return Err(BackendError::Status {
                backend: self.name.clone(),
                status: status.as_u16(),
                body,
                retry_after_ms,
            });
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if stream {
            if !content_type.starts_with("text/event-stream") {
                return Err(BackendError::Protocol {
                    backend: self.name.clone(),
                    message: format!(
                        "answered a streaming request with content-type '{content_type}' instead of text/event-stream"
                    ),
                });
            }
            let mut chunks = chunk_stream(
                self.name.clone(),
                api,
                resp.into_body(),
                deadline,
                first_byte,
            );
            match tokio::time::timeout_at(first_byte_deadline, chunks.next()).await {
                Err(_) => Err(self.timeout("waiting for the first stream event", attempt_started)),
                Ok(None) => Err(BackendError::Protocol {
                    backend: self.name.clone(),
                    message: "the stream ended before its first event".into(),
                }),
                Ok(Some(Err(e))) => Err(e),
                Ok(Some(Ok(first))) => Ok(Attempt::Stream(Box::pin(
                    futures_util::stream::once(async { Ok(first) }).chain(chunks),
                ))),
            }
        } else {
            let bytes = match read_body(resp.into_body(), MAX_RESPONSE_BYTES, deadline).await {
                Ok(b) => b,
                Err(ReadError::Timeout) => {
                    return Err(self.timeout("reading the response body", attempt_started))
                }
                Err(ReadError::Other(m)) => {
                    return Err(BackendError::Protocol {
                        backend: self.name.clone(),
                        message: m,
                    })
                }
            };
            let key = api.answer_key();
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) if v.get(key).is_some_and(Value::is_array) => Ok(Attempt::Full(v)),
                Ok(_) => Err(BackendError::Protocol {
                    backend: self.name.clone(),
                    message: format!(
                        "the response is JSON but not what {} answers (no '{key}' array)",
                        api.upstream_path()
                    ),
                }),
                Err(e) => Err(BackendError::Protocol {
                    backend: self.name.clone(),
                    message: format!(
                        "the response (content-type '{content_type}') is not valid JSON: {e}"
                    ),
                }),
            }
        }
    }

    /// One management call to a server of this upstream (`GET /v1/models`, vLLM's adapter
    /// endpoints), with the upstream's headers and key and no retry: the status and the body.
    pub async fn manage(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), BackendError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let uri: Uri = url.parse().map_err(|e| BackendError::Protocol {
            backend: self.name.clone(),
            message: format!("bad URL '{url}': {e}"),
        })?;
        let payload = match body {
            Some(b) => Bytes::from(b.to_string()),
            None => Bytes::new(),
        };
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(h) = builder.headers_mut() {
            h.clone_from(&self.headers);
            h.insert(ACCEPT, HeaderValue::from_static("application/json"));
        }
        let resp = self.send(builder, payload, deadline, started).await?;
        let status = resp.status().as_u16();
        match read_body(resp.into_body(), MAX_ERROR_BYTES * 16, deadline).await {
            Ok(b) => Ok((status, b)),
            Err(ReadError::Timeout) => Err(self.timeout("reading the response body", started)),
            Err(ReadError::Other(m)) => Err(BackendError::Protocol {
                backend: self.name.clone(),
                message: m,
            }),
        }
    }

    /// Sends a request and waits until `until` for its response headers.
    async fn send(
        &self,
        builder: http::request::Builder,
        payload: Bytes,
        until: Instant,
        started: Instant,
    ) -> Result<hyper::Response<Incoming>, BackendError> {
        let req = builder
            .body(Full::new(payload))
            .map_err(|e| BackendError::Protocol {
                backend: self.name.clone(),
                message: format!("cannot build request: {e}"),
            })?;
        match tokio::time::timeout_at(until, self.client.request(req)).await {
            Err(_) => Err(self.timeout("waiting for response headers", started)),
            Ok(Err(e)) => Err(BackendError::Connect {
                backend: self.name.clone(),
                message: describe_client_error(&e),
            }),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// A timeout, reported with the time actually waited in this attempt.
    fn timeout(&self, phase: &'static str, attempt_started: Instant) -> BackendError {
        BackendError::Timeout {
            backend: self.name.clone(),
            phase,
            after_ms: attempt_started.elapsed().as_millis() as u64,
        }
    }
}

/// Public web roots, plus the upstream's own CA certificates if it names a file of them.
fn tls_config(cfg: &UpstreamConfig) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = &cfg.ca_cert {
        let file = std::fs::File::open(path).map_err(|e| {
            format!(
                "upstream '{}': cannot open ca_cert '{}': {e}",
                cfg.name,
                path.display()
            )
        })?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
            let cert = cert.map_err(|e| {
                format!(
                    "upstream '{}': cannot read ca_cert '{}': {e}",
                    cfg.name,
                    path.display()
                )
            })?;
            roots.add(cert).map_err(|e| {
                format!(
                    "upstream '{}': ca_cert '{}' holds an unusable certificate: {e}",
                    cfg.name,
                    path.display()
                )
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "upstream '{}': ca_cert '{}' holds no PEM certificate",
                cfg.name,
                path.display()
            ));
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("upstream '{}': TLS set-up failed: {e}", cfg.name))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

enum Attempt {
    Full(Value),
    Stream(ChunkStream),
}

impl Backend for Upstream {
    fn name(&self) -> &str {
        &self.name
    }

    fn supports_n(&self) -> bool {
        self.cfg.supports_n
    }

    fn chat(&self, request: BackendRequest) -> BoxFuture<'_, Result<BackendReply, BackendError>> {
        Box::pin(self.complete(request))
    }

    fn speaks_natively(&self, api: Api) -> bool {
        self.native.contains(&api)
    }
}

fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

enum ReadError {
    Timeout,
    Other(String),
}

async fn read_body(body: Incoming, limit: usize, deadline: Instant) -> Result<Bytes, ReadError> {
    match tokio::time::timeout_at(deadline, Limited::new(body, limit).collect()).await {
        Err(_) => Err(ReadError::Timeout),
        Ok(Err(e)) => Err(ReadError::Other(format!("reading the body failed: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

struct StreamState {
    backend: String,
    /// The shape of the events: chat or completion chunks, or a native API's named events.
    api: Api,
    body: Incoming,
    parser: SseParser,
    deadline: Instant,
    idle: Duration,
    finished_choices: bool,
    done: bool,
}

/// Parses an SSE body into chunk objects (or a native API's events). A chunk stream ends at
/// `[DONE]`, a native one at its last event (`response.completed`, `message_stop`); a body that
/// ends early, stalls longer than the first-byte timeout, or carries something other than JSON
/// objects ends it with an error, as does a native failure event.
fn chunk_stream(
    backend: String,
    api: Api,
    body: Incoming,
    deadline: Instant,
    idle: Duration,
) -> ChunkStream {
    let state = StreamState {
        backend,
        api,
        body,
        parser: SseParser::default(),
        deadline,
        idle,
        finished_choices: false,
        done: false,
    };
    Box::pin(futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let item = next_chunk(&mut st).await;
        if !matches!(item, Some(Ok(_))) {
            st.done = true;
        }
        item.map(|i| (i, st))
    }))
}

async fn next_chunk(st: &mut StreamState) -> Option<Result<Value, BackendError>> {
    let protocol = |backend: &str, message: String| BackendError::Protocol {
        backend: backend.to_string(),
        message,
    };
    loop {
        match st.parser.next_event() {
            Err(e) => {
                return Some(Err(protocol(
                    &st.backend,
                    format!("unreadable stream event: {e:?}"),
                )))
            }
            Ok(Some(SseEvent::Done)) => return None,
            Ok(Some(SseEvent::Data(text))) => {
                let v: Value = match serde_json::from_str(&text) {
                    Ok(v) => v,
                    Err(e) => {
                        return Some(Err(protocol(
                            &st.backend,
                            format!("a stream event is not JSON ({e})"),
                        )));
                    }
                };
                if matches!(st.api, Api::Responses | Api::Messages) {
                    if crate::wire::native::is_failure(&v) {
                        // The message sits at `/error/message` (Anthropic, Responses' `error`
                        // event) or `/response/error/message` (`response.failed`).
                        let message = v
                            .pointer("/error/message")
                            .or_else(|| v.pointer("/response/error/message"))
                            .or_else(|| v.get("message"))
                            .cloned()
                            .unwrap_or(Value::Null);
                        return Some(Err(BackendError::StreamError {
                            backend: st.backend.clone(),
                            body: json!({"error": {"message": message}}),
                        }));
                    }
                    if crate::wire::native::is_last(&v) {
                        st.finished_choices = true;
                    }
                    return Some(Ok(v));
                }
                if v.get("error").is_some() && v.get("choices").is_none() {
                    return Some(Err(BackendError::StreamError {
                        backend: st.backend.clone(),
                        body: v,
                    }));
                }
                if !v.is_object() {
                    return Some(Err(protocol(
                        &st.backend,
                        "a stream event is not a JSON object".into(),
                    )));
                }
                if let Some(choices) = v.get("choices").and_then(Value::as_array) {
                    if !choices.is_empty()
                        && choices
                            .iter()
                            .all(|c| c.get("finish_reason").is_some_and(|f| !f.is_null()))
                    {
                        st.finished_choices = true;
                    }
                }
                return Some(Ok(v));
            }
            Ok(None) => {}
        }
        let wait_until = st.deadline.min(Instant::now() + st.idle);
        match tokio::time::timeout_at(wait_until, st.body.frame()).await {
            Err(_) => {
                return Some(Err(BackendError::Timeout {
                    backend: st.backend.clone(),
                    phase: "waiting for the next stream event",
                    after_ms: st.idle.as_millis() as u64,
                }))
            }
            Ok(None) => {
                let leftover = st.parser.pending() > 0;
                if st.finished_choices && !leftover {
                    return None;
                }
                return Some(Err(protocol(
                    &st.backend,
                    "the stream was cut off before [DONE]".into(),
                )));
            }
            Ok(Some(Err(e))) => {
                return Some(Err(protocol(
                    &st.backend,
                    format!("the connection failed mid-stream: {e}"),
                )))
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    st.parser.push(&data);
                }
            }
        }
    }
}
