//! `POST /v1/chat/completions`, streaming and not.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};

use super::error::ApiError;
use super::{header, peer, read_json_object, AppState};
use crate::config::Scope;
use crate::gateway::{ChatResponse, RequestContext};

pub async fn create(State(state): State<Arc<AppState>>, request: Request) -> Response {
    match serve(state, request).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn serve(state: Arc<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    state
        .auth
        .authorize(&parts.headers, peer(&parts), Scope::Inference)?;
    let permit = state
        .inflight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::overloaded())?;
    let body = read_json_object(&parts, body, state.body_limit).await?;
    let ctx = RequestContext {
        workload_id: header(&parts, "x-workload-id"),
        client_id: header(&parts, "x-client-id"),
        session_id: header(&parts, "x-session-id"),
        permit: Some(permit),
    };
    let (id, arm, mut response) = match state.gateway.chat(body, ctx).await? {
        ChatResponse::Full { id, arm, body } => {
            (id, arm, (StatusCode::OK, axum::Json(body)).into_response())
        }
        ChatResponse::Stream { id, arm, frames } => {
            let stream = futures_util::stream::unfold(frames, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
            });
            let mut r = Response::new(Body::from_stream(stream));
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
            (id, arm, r)
        }
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        h.insert("x-request-id", v);
    }
    h.insert("x-flywheel-arm", HeaderValue::from_static(arm.as_str()));
    Ok(response)
}
