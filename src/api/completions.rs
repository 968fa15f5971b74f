//! `POST /v1/completions` (legacy text completions) and `POST /v1/embeddings`: bodies the pipeline
//! keeps in their own shape, answered in OpenAI's.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::extract::{Caller, JsonObject};
use super::{data_stream, tagged, AppState};
use crate::gateway::{Exchange, Reply};
use crate::wire::error::ApiError;
use crate::wire::Api;

pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    serve(&state, caller, body, Api::Completions).await
}

pub async fn embed(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    serve(&state, caller, body, Api::Embeddings).await
}

async fn serve(
    state: &AppState,
    caller: Caller,
    body: serde_json::Map<String, serde_json::Value>,
    api: Api,
) -> Result<Response, ApiError> {
    let exchange = Exchange {
        api,
        body,
        wire: None,
        native: None,
    };
    Ok(match state.gateway.serve(exchange, caller.ctx).await? {
        Reply::Full { tags, body, .. } => tagged(axum::Json(body).into_response(), &tags),
        Reply::Stream { tags, items, .. } => tagged(data_stream(items), &tags),
    })
}
