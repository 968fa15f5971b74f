//! Anthropic's Messages API: `POST /v1/messages`, whole or streamed as Anthropic's events. Every
//! error on this door, authentication included, is in Anthropic's envelope. Translation lives in
//! `wire::messages`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

use super::extract::caller;
use super::{event_stream, read_json_object, tagged, translated_stream, AppState};
use crate::gateway::{Exchange, Reply, StreamItem};
use crate::wire::answer::{feed_completion, EventBuilder};
use crate::wire::error::{anthropic_body, anthropic_response, ApiError};
use crate::wire::messages::{parse_request, MessageBuilder};
use crate::wire::{sse, Api};

pub async fn create(State(state): State<Arc<AppState>>, request: Request) -> Response {
    match serve(state, request).await {
        Ok(r) => r,
        Err(e) => anthropic_response(&e),
    }
}

async fn serve(state: Arc<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let ctx = caller(&state, &parts)?.ctx;
    let raw = read_json_object(&parts, body, state.body_limit).await?;
    let req = match parse_request(&raw) {
        Ok(r) => r,
        Err(e) => return Err(state.gateway.reject(Api::Messages, raw, &ctx, e)),
    };
    let native = state
        .gateway
        .forwards_natively(Api::Messages)
        .then(|| raw.clone());
    let exchange = Exchange {
        api: Api::Messages,
        body: req.chat,
        wire: Some(Value::Object(raw)),
        native,
    };
    let message_id = |id: uuid::Uuid| format!("msg_{}", id.simple());
    match state.gateway.serve(exchange, ctx).await? {
        // An upstream that speaks Messages answered in Messages already.
        Reply::Full {
            tags,
            body,
            native: true,
        } => Ok(tagged(Json(body).into_response(), &tags)),
        Reply::Full { tags, body, .. } => {
            let mut builder = MessageBuilder::new(message_id(tags.id), req.model);
            feed_completion(&body, &mut builder);
            Ok(tagged(Json(builder.complete()).into_response(), &tags))
        }
        Reply::Stream {
            tags,
            items,
            native: true,
        } => Ok(tagged(event_stream(pass_through(items)), &tags)),
        Reply::Stream { tags, items, .. } => {
            let builder = MessageBuilder::new(message_id(tags.id), req.model);
            // `message_start` and `ping`, the content blocks' events, `message_delta` and
            // `message_stop` (or an `error` event if the answer broke off).
            let frames = translated_stream(builder, items, |_| async {});
            Ok(tagged(event_stream(frames), &tags))
        }
    }
}

/// A native upstream's events, framed again as they came (each names itself in `type`); a
/// failure becomes an `error` event.
fn pass_through(
    items: mpsc::Receiver<StreamItem>,
) -> impl futures_util::Stream<Item = Bytes> + Send {
    futures_util::stream::unfold(Some(items), |items| async move {
        let mut items = items?;
        match items.recv().await {
            Some(StreamItem::Chunk(event)) => {
                let kind = event
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message");
                Some((sse::event_frame(kind, &event), Some(items)))
            }
            Some(StreamItem::Failed(e)) => {
                Some((sse::event_frame("error", &anthropic_body(&e)), None))
            }
            None => None,
        }
    })
}
