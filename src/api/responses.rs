//! The Responses API: `POST /v1/responses` (whole or streamed as typed events),
//! `GET /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`, `DELETE /v1/responses/{id}`.
//! Translation lives in `wire::responses`; this file wires it to the pipeline and the store.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http::request::Parts;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::{
    event_stream, inference_context, read_json_object, tagged, translated_stream, AppState,
};
use crate::config::Scope;
use crate::gateway::{Exchange, Reply, StreamItem};
use crate::store::responses::{ResponseStore, StoredResponse};
use crate::wire::answer::{feed_completion, EventBuilder};
use crate::wire::error::ApiError;
use crate::wire::native::completion_from_response;
use crate::wire::responses::{items_from_chat, parse_request, ResponseBuilder, ResponsesRequest};
use crate::wire::{sse, Api};

pub async fn create(State(state): State<Arc<AppState>>, request: Request) -> Response {
    serve(state, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn store_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("the response store failed: {e}"))
}

fn store_of(state: &AppState) -> Result<Arc<ResponseStore>, ApiError> {
    state.responses.clone().ok_or_else(|| {
        ApiError::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "Stored responses are unavailable: the gateway could not open its database.",
        )
        .with_code("store_unavailable")
    })
}

/// Runs a store operation off the async runtime.
async fn blocking<T: Send + 'static>(
    store: Arc<ResponseStore>,
    op: impl FnOnce(&ResponseStore) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || op(&store))
        .await
        .map_err(store_error)?
        .map_err(store_error)
}

/// The stored response `id` of `owner`.
async fn load(
    store: Arc<ResponseStore>,
    id: String,
    owner: String,
) -> Result<Option<StoredResponse>, ApiError> {
    blocking(store, move |s| s.get(&id, &owner)).await
}

async fn save(store: Arc<ResponseStore>, record: StoredResponse) -> Result<(), ApiError> {
    blocking(store, move |s| s.insert(&record)).await
}

async fn serve(state: Arc<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let (principal, ctx) = inference_context(&state, &parts)?;
    let raw = read_json_object(&parts, body, state.body_limit).await?;
    let gateway = &state.gateway;
    let req = match parse_request(&raw) {
        Ok(r) => r,
        Err(e) => return Err(gateway.reject(Api::Responses, raw, &ctx, e)),
    };
    let history = match &req.previous_response_id {
        None => Vec::new(),
        Some(prev) => {
            let found = match store_of(&state) {
                Ok(store) => load(store, prev.clone(), principal.name.clone()).await,
                Err(e) => Err(e),
            };
            match found {
                Ok(Some(stored)) => stored.conversation,
                Ok(None) => {
                    let e = ApiError::invalid_param(
                        "previous_response_id",
                        format!("Previous response with id '{prev}' not found."),
                    )
                    .with_code("previous_response_not_found");
                    return Err(gateway.reject(Api::Responses, raw, &ctx, e));
                }
                Err(e) => return Err(gateway.reject(Api::Responses, raw, &ctx, e)),
            }
        }
    };
    let (chat, turn) = match req.to_chat(&history) {
        Ok(c) => c,
        Err(e) => return Err(gateway.reject(Api::Responses, raw, &ctx, e)),
    };
    let native = gateway
        .forwards_natively(Api::Responses)
        .then(|| native_request(&raw, &history));
    let exchange = Exchange {
        api: Api::Responses,
        body: chat,
        wire: Some(Value::Object(raw)),
        native,
    };
    let keep = Keeper {
        store: if req.store {
            state.responses.clone()
        } else {
            None
        },
        owner: principal.name,
        history,
        turn,
        request: req,
    };
    match gateway.serve(exchange, ctx).await? {
        // An upstream that speaks Responses answered in Responses already: it gets this
        // gateway's id, and is stored here (the upstream was asked not to store it).
        Reply::Full {
            id,
            arm,
            mut body,
            native: true,
        } => {
            keep.adopt(&mut body, id);
            keep.keep(&body, id).await;
            Ok(tagged(Json(body).into_response(), id, arm))
        }
        Reply::Full { id, arm, body, .. } => {
            let mut builder = keep.builder(id);
            feed_completion(&body, &mut builder);
            let response = builder.complete();
            keep.keep(&response, id).await;
            Ok(tagged(Json(response).into_response(), id, arm))
        }
        Reply::Stream {
            id,
            arm,
            items,
            native: true,
        } => Ok(tagged(event_stream(pass_through(keep, id, items)), id, arm)),
        Reply::Stream { id, arm, items, .. } => {
            // `response.created` first, `response.completed` last, stored before it is sent so
            // a continuation can follow at once.
            let builder = keep.builder(id);
            let keep = Arc::new(keep);
            let frames = translated_stream(builder, items, move |response| {
                let keep = keep.clone();
                async move { keep.keep(&response, id).await }
            });
            Ok(tagged(event_stream(frames), id, arm))
        }
    }
}

/// The request as a native upstream gets it: the conversation so far spelled out in `input`
/// (this gateway keeps the state, so any arm can continue it) and `store: false`.
fn native_request(raw: &Map<String, Value>, history: &[Value]) -> Map<String, Value> {
    let mut body = raw.clone();
    body.remove("previous_response_id");
    body.insert("store".into(), Value::Bool(false));
    if !history.is_empty() {
        let mut input = items_from_chat(history);
        match raw.get("input") {
            Some(Value::Array(items)) => input.extend(items.iter().cloned()),
            Some(text) => input.push(json!({"role": "user", "content": text})),
            None => {}
        }
        body.insert("input".into(), Value::Array(input));
    }
    body
}

/// Native events passed through with this gateway's response id; the response is stored when its
/// last event arrives, and a failure ends the stream with `response.failed`.
fn pass_through(
    keep: Keeper,
    traffic_id: uuid::Uuid,
    items: mpsc::Receiver<StreamItem>,
) -> impl futures_util::Stream<Item = Bytes> + Send {
    let state = Some((keep, items, 0u64));
    futures_util::stream::unfold(state, move |state| async move {
        let (keep, mut items, seen) = state?;
        match items.recv().await {
            Some(StreamItem::Chunk(mut event)) => {
                if let Some(r) = event.get_mut("response") {
                    keep.adopt(r, traffic_id);
                }
                let kind = event
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("response.in_progress")
                    .to_string();
                if matches!(kind.as_str(), "response.completed" | "response.incomplete") {
                    if let Some(r) = event.get("response") {
                        keep.keep(r, traffic_id).await;
                    }
                }
                Some((
                    sse::event_frame(&kind, &event),
                    Some((keep, items, seen + 1)),
                ))
            }
            Some(StreamItem::Failed(e)) => {
                let mut builder = keep.builder(traffic_id);
                let (kind, event) = builder.failure_event(&e, seen);
                Some((sse::event_frame(kind, &event), None))
            }
            None => None,
        }
    })
}

/// A response's id: its traffic record's, so the two are found from each other.
fn response_id(traffic_id: uuid::Uuid) -> String {
    format!("resp_{}", traffic_id.simple())
}

/// A response's answer as the assistant chat message a continuation replays.
fn assistant_message(response: &Value) -> Value {
    let completion = completion_from_response(response);
    let m = &completion["choices"][0]["message"];
    let mut out = json!({"role": "assistant", "content": m["content"]});
    if let Some(calls) = m.get("tool_calls") {
        out["tool_calls"] = calls.clone();
    }
    out
}

/// What it takes to store a response once its answer is complete.
struct Keeper {
    store: Option<Arc<ResponseStore>>,
    owner: String,
    /// The stored conversation this request continues, and this turn's input, as chat messages.
    history: Vec<Value>,
    turn: Vec<Value>,
    request: ResponsesRequest,
}

impl Keeper {
    fn builder(&self, traffic_id: uuid::Uuid) -> ResponseBuilder {
        ResponseBuilder::new(
            response_id(traffic_id),
            self.request.model.clone(),
            now_ms() / 1000,
            self.request.echo.clone(),
        )
    }

    /// Gives a native upstream's response this gateway's id and the client's own settings.
    fn adopt(&self, response: &mut Value, traffic_id: uuid::Uuid) {
        if let Some(r) = response.as_object_mut() {
            r.insert("id".into(), json!(response_id(traffic_id)));
            r.insert("store".into(), json!(self.request.store));
            r.insert(
                "previous_response_id".into(),
                json!(self.request.previous_response_id),
            );
        }
    }

    /// Stores the finished response (when the request asked for it). A store failure is logged,
    /// not turned into a failed answer: the client already has its answer.
    async fn keep(&self, response: &Value, traffic_id: uuid::Uuid) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let id = response_id(traffic_id);
        let mut conversation = Vec::with_capacity(self.history.len() + self.turn.len() + 1);
        conversation.extend(self.history.iter().chain(&self.turn).cloned());
        conversation.push(assistant_message(response));
        let record = StoredResponse {
            id: id.clone(),
            owner: self.owner.clone(),
            created_ms: now_ms(),
            model: self.request.model.clone(),
            traffic_id: Some(traffic_id.to_string()),
            previous_id: self.request.previous_response_id.clone(),
            input_items: self.request.input_items.clone(),
            conversation,
            response: response.clone(),
        };
        if let Err(e) = save(store, record).await {
            tracing::error!(response = %id, error = %e, "could not store a response");
        }
    }
}

/// The stored responses and the name of the key asking for them.
fn owner(state: &AppState, parts: &Parts) -> Result<(Arc<ResponseStore>, String), ApiError> {
    let principal = state
        .auth
        .authorize(&parts.headers, super::peer(parts), Scope::Inference)?;
    Ok((store_of(state)?, principal.name))
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("Response with id '{id}' not found."))
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    parts: Parts,
) -> Response {
    let run = async {
        let (store, owner) = owner(&state, &parts)?;
        match load(store, id.clone(), owner).await? {
            Some(r) => Ok(Json(r.response).into_response()),
            None => Err(not_found(&id)),
        }
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// The request's input items, newest first by default (`order=asc` for oldest first), paged with
/// `limit` (1–100, 20 by default) and `after`.
pub async fn input_items(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    axum::extract::Query(query): axum::extract::Query<Map<String, Value>>,
    parts: Parts,
) -> Response {
    let run = async {
        let (store, owner) = owner(&state, &parts)?;
        let Some(r) = load(store, id.clone(), owner).await? else {
            return Err(not_found(&id));
        };
        let mut items = r.input_items;
        let order = query.get("order").and_then(Value::as_str).unwrap_or("desc");
        if order != "asc" {
            items.reverse();
        }
        let limit = match query.get("limit").and_then(Value::as_str) {
            None => 20,
            Some(s) => match s.parse::<usize>() {
                Ok(n) if (1..=100).contains(&n) => n,
                _ => {
                    return Err(ApiError::invalid_param(
                        "limit",
                        "'limit' must be an integer between 1 and 100.",
                    ))
                }
            },
        };
        if let Some(after) = query.get("after").and_then(Value::as_str) {
            match items
                .iter()
                .position(|i| i.get("id").and_then(Value::as_str) == Some(after))
            {
                Some(k) => {
                    items.drain(..=k);
                }
                None => {
                    return Err(ApiError::invalid_param(
                        "after",
                        format!("No input item with id '{after}' in response '{id}'."),
                    ))
                }
            }
        }
        let has_more = items.len() > limit;
        items.truncate(limit);
        let first = items.first().and_then(|i| i.get("id")).cloned();
        let last = items.last().and_then(|i| i.get("id")).cloned();
        Ok(Json(json!({"object": "list", "data": items, "first_id": first, "last_id": last, "has_more": has_more}))
            .into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    parts: Parts,
) -> Response {
    let run = async {
        let (store, owner) = owner(&state, &parts)?;
        let target = id.clone();
        let deleted = blocking(store, move |s| s.delete(&target, &owner)).await?;
        if !deleted {
            return Err(not_found(&id));
        }
        Ok(Json(json!({"id": id, "object": "response", "deleted": true})).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}
