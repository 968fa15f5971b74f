//! `POST /v1/completions` (legacy text completions) and `POST /v1/embeddings`: bodies the pipeline
//! keeps in their own shape, answered in OpenAI's.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

use super::{data_stream, inference_context, read_json_object, tagged, AppState};
use crate::gateway::{Exchange, Reply};
use crate::wire::error::ApiError;
use crate::wire::Api;

pub async fn create(State(state): State<Arc<AppState>>, request: Request) -> Response {
    serve(state, request, Api::Completions)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn embed(State(state): State<Arc<AppState>>, request: Request) -> Response {
    serve(state, request, Api::Embeddings)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn serve(state: Arc<AppState>, request: Request, api: Api) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let (_, ctx) = inference_context(&state, &parts)?;
    let body = read_json_object(&parts, body, state.body_limit).await?;
    let exchange = Exchange {
        api,
        body,
        wire: None,
        native: None,
    };
    Ok(match state.gateway.serve(exchange, ctx).await? {
        Reply::Full { id, arm, body, .. } => tagged(axum::Json(body).into_response(), id, arm),
        Reply::Stream { id, arm, items, .. } => tagged(data_stream(items), id, arm),
    })
}
