//! The Responses API: `POST /v1/responses` (whole or streamed as typed events),
//! `GET /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`, `DELETE /v1/responses/{id}`.
//! Translation lives in `wire::responses`; this file wires it to the pipeline and the store.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::extract::{Caller, Inference, JsonObject, Query};
use super::{event_stream, tagged, translated_stream, AppState};
use crate::gateway::{Exchange, Reply, StreamItem};
use crate::store::responses::{ResponseStore, StoredResponse};
use crate::wire::answer::{feed_completion, EventBuilder};
use crate::wire::error::ApiError;
use crate::wire::native::completion_from_response;
use crate::wire::responses::{items_from_chat, parse_request, ResponseBuilder, ResponsesRequest};
use crate::wire::{sse, Api};

pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    JsonObject(raw): JsonObject,
) -> Result<Response, ApiError> {
    serve(state, caller, raw).await
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

async fn serve(
    state: Arc<AppState>,
    Caller { principal, ctx }: Caller,
    raw: Map<String, Value>,
) -> Result<Response, ApiError> {
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
            tags,
            mut body,
            native: true,
        } => {
            keep.adopt(&mut body, tags.id);
            keep.keep(&body, tags.id).await;
            Ok(tagged(Json(body).into_response(), &tags))
        }
        Reply::Full { tags, body, .. } => {
            let mut builder = keep.builder(tags.id);
            feed_completion(&body, &mut builder);
            let response = builder.complete();
            keep.keep(&response, tags.id).await;
            Ok(tagged(Json(response).into_response(), &tags))
        }
        Reply::Stream {
            tags,
            items,
            native: true,
        } => Ok(tagged(
            event_stream(pass_through(keep, tags.id, items)),
            &tags,
        )),
        Reply::Stream { tags, items, .. } => {
            let id = tags.id;
            // `response.created` first, `response.completed` last, stored before it is sent so
            // a continuation can follow at once.
            let builder = keep.builder(id);
            let keep = Arc::new(keep);
            let frames = translated_stream(builder, items, move |response| {
                let keep = keep.clone();
                async move { keep.keep(&response, id).await }
            });
            Ok(tagged(event_stream(frames), &tags))
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

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("Response with id '{id}' not found."))
}

/// The stored response `id`, if the caller's key created it.
async fn owned(state: &AppState, caller: Inference, id: &str) -> Result<StoredResponse, ApiError> {
    load(store_of(state)?, id.to_string(), caller.0.name)
        .await?
        .ok_or_else(|| not_found(id))
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    caller: Inference,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(owned(&state, caller, &id).await?.response))
}

#[derive(Deserialize)]
pub struct ItemsPage {
    order: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

/// The request's input items, newest first by default (`order=asc` for oldest first), paged with
/// `limit` (1–100, 20 by default) and `after`.
pub async fn input_items(
    State(state): State<Arc<AppState>>,
    caller: Inference,
    Path(id): Path<String>,
    Query(page): Query<ItemsPage>,
) -> Result<Json<Value>, ApiError> {
    let mut items = owned(&state, caller, &id).await?.input_items;
    let limit = match page.limit {
        None => 20,
        Some(n) if (1..=100).contains(&n) => n,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "limit",
                "'limit' must be an integer between 1 and 100.",
            ))
        }
    };
    if page.order.as_deref() != Some("asc") {
        items.reverse();
    }
    if let Some(after) = &page.after {
        let Some(k) = items
            .iter()
            .position(|i| i.get("id").and_then(Value::as_str) == Some(after))
        else {
            return Err(ApiError::invalid_param(
                "after",
                format!("No input item with id '{after}' in response '{id}'."),
            ));
        };
        items.drain(..=k);
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    let first = items.first().and_then(|i| i.get("id")).cloned();
    let last = items.last().and_then(|i| i.get("id")).cloned();
    Ok(Json(
        json!({"object": "list", "data": items, "first_id": first, "last_id": last, "has_more": has_more}),
    ))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Inference,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (store, owner, target) = (store_of(&state)?, caller.0.name, id.clone());
    if !blocking(store, move |s| s.delete(&target, &owner)).await? {
        return Err(not_found(&id));
    }
    Ok(Json(
        json!({"id": id, "object": "response", "deleted": true}),
    ))
}
