//! `POST /v1/chat/completions`, streaming and not.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::extract::{Caller, JsonObject};
use super::{data_stream, tagged, AppState};
use crate::gateway::{Exchange, Reply};
use crate::wire::error::ApiError;

pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    Ok(
        match state
            .gateway
            .serve(Exchange::chat(body), caller.ctx)
            .await?
        {
            Reply::Full { tags, body, .. } => tagged(axum::Json(body).into_response(), &tags),
            Reply::Stream { tags, items, .. } => tagged(data_stream(items), &tags),
        },
    )
}
