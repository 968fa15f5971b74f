//! HTTP: every route in one place, the shared state, the JSON body reader whose rejections are
//! already OpenAI error envelopes, and the way handlers reach the database (off the async threads).
//! Handlers live one file per endpoint family and take what they need through `extract`.

pub mod adapters;
pub mod admin;
pub mod auth;
pub mod chat_completions;
pub mod completions;
pub mod customization;
pub mod dashboard;
pub mod evaluation;
pub mod extract;
pub mod feedback;
pub mod guardrails;
pub mod health;
pub mod hf;
pub mod messages;
pub mod models;
pub mod responses;
pub mod runs;
pub mod server;
pub mod ui;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::request::Parts;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use crate::gateway::{Gateway, StreamItem, Tags};
use crate::store::entities::EntityError;
use crate::store::{Db, StoreError};
use crate::wire::error::ApiError;
use auth::{Authenticator, PeerAddr};
use http::HeaderValue;

pub struct AppState {
    pub gateway: Arc<Gateway>,
    pub auth: Authenticator,
    pub metrics: Option<PrometheusHandle>,
    pub inflight: Arc<Semaphore>,
    pub body_limit: usize,
    pub max_inflight: usize,
    pub ready: AtomicBool,
    /// Local engines, for the adapter registry endpoints.
    pub engines: Vec<Arc<crate::engine::Engine>>,
    pub adapter_dirs: Vec<std::path::PathBuf>,
    /// The entity store (absent in gateways built without a data dir).
    pub db: Option<Db>,
    /// Customization jobs (absent in gateways built without a data dir).
    pub jobs: Option<Arc<crate::flywheel::jobs::JobRunner>>,
    /// Flywheel runs and rollouts (absent without jobs).
    pub flywheel: Option<Arc<crate::flywheel::controller::FlywheelController>>,
    /// The Responses API's stored responses (absent when the database cannot be opened).
    pub responses: Option<Arc<crate::store::responses::ResponseStore>>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions::create))
        .route("/v1/completions", post(completions::create))
        .route("/v1/embeddings", post(completions::embed))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items),
        )
        .route("/v1/messages", post(messages::create))
        .route(
            "/v1/guardrail/chat/completions",
            post(chat_completions::create),
        )
        .route(
            "/v1/guardrail/configs",
            get(guardrails::list).post(guardrails::create),
        )
        .route(
            "/v1/guardrail/configs/{ns}/{name}",
            get(guardrails::get)
                .patch(guardrails::patch)
                .delete(guardrails::delete),
        )
        .route("/v1/guardrail/checks", post(guardrails::check))
        .route("/v1/feedback", get(feedback::list).post(feedback::create))
        .route("/v1/hf/api/repos/create", post(hf::create_repo))
        .route(
            "/v1/hf/api/datasets/{ns}/{name}/preupload/{revision}",
            post(hf::preupload),
        )
        .route(
            "/v1/hf/api/datasets/{ns}/{name}/commit/{revision}",
            post(hf::commit),
        )
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::retrieve))
        .route("/v1/adapters", get(adapters::list).post(adapters::create))
        .route(
            "/v1/adapters/{ns}/{name}",
            axum::routing::delete(adapters::delete),
        )
        .route("/v1/load_lora_adapter", post(adapters::vllm_load))
        .route("/v1/unload_lora_adapter", post(adapters::vllm_unload))
        .route(
            "/v1/namespaces",
            get(customization::list_namespaces).post(customization::create_namespace),
        )
        .route(
            "/v1/datasets",
            get(customization::list_datasets).post(customization::create_dataset),
        )
        .route(
            "/v1/datasets/{ns}/{name}",
            get(customization::get_dataset)
                .patch(customization::patch_dataset)
                .delete(customization::delete_dataset),
        )
        .route(
            "/v1/datasets/{ns}/{name}/files/{*path}",
            axum::routing::put(customization::upload_file).get(customization::download_file),
        )
        .route(
            "/v1/customization/jobs",
            get(customization::list_jobs).post(customization::create_job),
        )
        .route("/v1/customization/jobs/{id}", get(customization::get_job))
        .route(
            "/v1/customization/jobs/{id}/status",
            get(customization::job_status),
        )
        .route(
            "/v1/customization/jobs/{id}/cancel",
            post(customization::cancel_job),
        )
        .route(
            "/v1/evaluation/jobs",
            get(evaluation::list).post(evaluation::create),
        )
        .route("/v1/evaluation/jobs/{id}", get(evaluation::get))
        .route("/v1/evaluation/jobs/{id}/results", get(evaluation::results))
        .route(
            "/v1/flywheel/runs",
            get(runs::list_runs).post(runs::create_run),
        )
        .route("/v1/flywheel/runs/{id}", get(runs::get_run))
        .route("/v1/flywheel/routes", get(runs::list_routes))
        .route("/v1/flywheel/routes/{route}", get(runs::get_route))
        .route(
            "/v1/flywheel/routes/{route}/{action}",
            post(runs::route_action),
        )
        .route("/v1/dashboard/overview", get(dashboard::overview))
        .route("/v1/dashboard/traffic", get(dashboard::traffic))
        .route("/v1/dashboard/traffic/{id}", get(dashboard::exchange))
        .route("/ui", get(ui::root))
        .route("/ui/", get(ui::page))
        .route("/ui/assets/{name}", get(ui::asset))
        .route("/ui/login", post(ui::login))
        .route("/ui/logout", post(ui::logout))
        .route("/ui/{*view}", get(ui::page))
        .route("/admin/routes", get(admin::list_routes))
        .route(
            "/admin/routes/{name}",
            get(admin::get_route).put(admin::put_route),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

async fn unknown_route(uri: http::Uri) -> axum::response::Response {
    ApiError::not_found(format!("Unknown request URL: {}.", uri.path()))
        .with_code("unknown_url")
        .into_response()
}

async fn wrong_method(method: http::Method, uri: http::Uri) -> axum::response::Response {
    ApiError::new(
        http::StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{method} is not allowed on {}.", uri.path()),
    )
    .with_code("method_not_allowed")
    .into_response()
}

/// Marks a response with its traffic record's id (what feedback names), the rollout arm that
/// served it and its episode.
pub fn tagged(mut response: Response, tags: &Tags) -> Response {
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&tags.id.to_string()) {
        h.insert("x-request-id", v);
    }
    h.insert(
        "x-flywheel-arm",
        HeaderValue::from_static(tags.arm.as_str()),
    );
    if let Ok(v) = HeaderValue::from_str(&tags.episode) {
        h.insert("x-episode-id", v);
    }
    response
}

/// A `text/event-stream` response over already framed events.
pub fn event_stream<S>(frames: S) -> Response
where
    S: futures_util::Stream<Item = bytes::Bytes> + Send + 'static,
{
    use futures_util::StreamExt;
    let mut r = Response::new(Body::from_stream(
        frames.map(Ok::<_, std::convert::Infallible>),
    ));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// The `data:`-framed stream the chat and completions doors send: each chunk, an error event if
/// the stream broke off, then `data: [DONE]`.
pub fn data_stream(items: tokio::sync::mpsc::Receiver<StreamItem>) -> Response {
    use crate::wire::sse;
    let frames = futures_util::stream::unfold(Some(items), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Some(StreamItem::Chunk(c)) => Some((sse::data_frame(&c), Some(rx))),
            Some(StreamItem::Failed(e)) => Some((sse::data_frame(&e.body()), Some(rx))),
            None => Some((bytes::Bytes::from_static(sse::DONE), None)),
        }
    });
    event_stream(frames)
}

/// A translated answer's event stream: the builder's opening events, then its events for each chunk
/// as it arrives, then the closing events (after `on_complete` has seen the whole answer) or the
/// failure event. The Responses and Messages doors both stream through here.
pub fn translated_stream<B, F, Fut>(
    mut builder: B,
    items: tokio::sync::mpsc::Receiver<StreamItem>,
    on_complete: F,
) -> impl futures_util::Stream<Item = bytes::Bytes> + Send
where
    B: crate::wire::answer::EventBuilder + Send + 'static,
    F: Fn(Value) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    use crate::wire::answer::feed_chunk;
    builder.start();
    let state = Some((builder, items, Vec::<u64>::new(), on_complete));
    let frames = futures_util::stream::unfold(state, |state| async move {
        let (mut builder, mut items, mut started, on_complete) = state?;
        let ended = match items.recv().await {
            Some(StreamItem::Chunk(chunk)) => {
                feed_chunk(&chunk, &mut started, &mut builder);
                false
            }
            Some(StreamItem::Failed(e)) => {
                builder.fail(&e);
                true
            }
            None => {
                let whole = builder.complete();
                on_complete(whole).await;
                true
            }
        };
        let frames: Vec<bytes::Bytes> = builder
            .take_events()
            .iter()
            .map(|(kind, event)| crate::wire::sse::event_frame(kind, event))
            .collect();
        Some((
            frames,
            (!ended).then_some((builder, items, started, on_complete)),
        ))
    });
    futures_util::StreamExt::flat_map(frames, futures_util::stream::iter)
}

pub fn peer(parts: &Parts) -> Option<SocketAddr> {
    parts.extensions.get::<PeerAddr>().map(|p| p.0)
}

pub fn header(parts: &Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The database, for handlers; absent when the gateway could not open its data directory and
/// logs nothing.
pub fn db(state: &AppState) -> Result<&Db, ApiError> {
    state.db.as_ref().ok_or_else(|| {
        ApiError::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "this endpoint is not available: the gateway has no database (see its data directory and [log] settings)",
        )
    })
}

/// Runs `work` on the database, off the async threads.
pub async fn with_db<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&crate::store::Conn) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    db(state)?.call(work).await
}

/// Runs blocking `work` (files, a controller that reads the database) off the async threads.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("a background task failed: {e}")))?
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal(e.to_string())
    }
}

impl From<EntityError> for ApiError {
    fn from(e: EntityError) -> Self {
        match e {
            EntityError::NotFound(m) => ApiError::not_found(m),
            EntityError::Conflict(m) => ApiError::conflict(m),
            EntityError::Invalid(m) => ApiError::invalid(m),
            EntityError::Db(e) => ApiError::internal(format!("database: {e}")),
        }
    }
}

/// Reads a JSON object body within `limit` bytes.
pub async fn read_json_object(
    parts: &Parts,
    body: Body,
    limit: usize,
) -> Result<Map<String, Value>, ApiError> {
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let bytes = read_limited(body, limit, declared.is_some_and(|n| n > limit)).await?;
    if bytes.is_empty() {
        return Err(
            ApiError::invalid("The request body is empty; send a JSON object.")
                .with_code("invalid_json"),
        );
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => {
            Err(ApiError::invalid("The request body must be a JSON object.")
                .with_code("invalid_json"))
        }
        Err(e) => Err(ApiError::invalid(format!(
            "We could not parse the JSON body of your request ({e}). The body must be valid JSON."
        ))
        .with_code("invalid_json")),
    }
}

/// Most bytes read and thrown away after a body turned out too large, so the client (still sending)
/// receives the 413 instead of a broken pipe. Past this the connection is simply closed.
const OVERSIZE_DRAIN_BYTES: usize = 64 * 1024 * 1024;

async fn read_limited(
    mut body: Body,
    limit: usize,
    known_too_large: bool,
) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    let mut too_large = known_too_large;
    let drain = async {
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| ApiError::invalid(format!("Could not read the request body: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            seen += data.len();
            if seen > limit {
                too_large = true;
                buf.clear();
            }
            if too_large {
                if seen > OVERSIZE_DRAIN_BYTES {
                    break;
                }
            } else {
                buf.extend_from_slice(&data);
            }
        }
        Ok::<(), ApiError>(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(60), drain).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(ApiError::new(
                http::StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "Timed out reading the request body.",
            ))
        }
    }
    if too_large {
        return Err(ApiError::too_large(limit));
    }
    Ok(buf.freeze())
}
