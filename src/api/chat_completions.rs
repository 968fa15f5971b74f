//! `POST /v1/chat/completions`, streaming and not.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

use super::{data_stream, inference_context, read_json_object, tagged, AppState};
use crate::gateway::{Exchange, Reply};
use crate::wire::error::ApiError;

pub async fn create(State(state): State<Arc<AppState>>, request: Request) -> Response {
    match serve(state, request).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn serve(state: Arc<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let (_, ctx) = inference_context(&state, &parts)?;
    let body = read_json_object(&parts, body, state.body_limit).await?;
    Ok(
        match state.gateway.serve(Exchange::chat(body), ctx).await? {
            Reply::Full { id, arm, body, .. } => tagged(axum::Json(body).into_response(), id, arm),
            Reply::Stream { id, arm, items, .. } => tagged(data_stream(items), id, arm),
        },
    )
}
