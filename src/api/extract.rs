//! What handlers take from a request, as axum extractors whose rejections are already error
//! envelopes: the caller's scope ([`Admin`], [`Inference`], [`Caller`] for an inference request with its slot of
//! the in-flight budget), the JSON object body ([`JsonObject`], [`OptionalJsonObject`]) and the
//! query string ([`Query`]). axum runs a handler's extractors in argument order, so the scope
//! extractor goes first: an unauthorized body is never read.
//!
//! The Messages door answers in Anthropic's envelope, so it calls [`caller`] and
//! [`read_json_object`] itself instead of taking these extractors.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::auth::Principal;
use super::{header, peer, read_json_object, AppState};
use crate::config::Scope;
use crate::gateway::RequestContext;
use crate::wire::error::ApiError;

/// A caller holding the `admin` scope.
pub struct Admin(pub Principal);

/// A caller holding the `inference` scope, without a slot of the in-flight budget (the inference
/// doors take [`Caller`]).
pub struct Inference(pub Principal);

/// A caller sending an inference request: authorized, holding a slot of the in-flight budget
/// (released when the request's context is dropped), with the labels its headers carry.
pub struct Caller {
    pub principal: Principal,
    pub ctx: RequestContext,
}

fn scoped(state: &AppState, parts: &Parts, scope: Scope) -> Result<Principal, ApiError> {
    super::auth::check_csrf(&parts.method, &parts.headers, scope)?;
    state.auth.authorize(&parts.headers, peer(parts), scope)
}

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        scoped(state, parts, Scope::Admin).map(Admin)
    }
}

impl FromRequestParts<Arc<AppState>> for Inference {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        scoped(state, parts, Scope::Inference).map(Inference)
    }
}

/// Authorizes an inference request, takes a slot of the in-flight budget and reads the caller's
/// labels from the headers.
pub fn caller(state: &AppState, parts: &Parts) -> Result<Caller, ApiError> {
    let principal = scoped(state, parts, Scope::Inference)?;
    let permit = state
        .inflight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::overloaded())?;
    let episode_id = header(parts, "x-episode-id")
        .map(|e| crate::wire::chat::episode_id(&e, "x-episode-id"))
        .transpose()?;
    let ctx = RequestContext {
        workload_id: header(parts, "x-workload-id"),
        client_id: header(parts, "x-client-id"),
        session_id: header(parts, "x-session-id"),
        episode_id,
        permit: Some(permit),
    };
    Ok(Caller { principal, ctx })
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        caller(state, parts)
    }
}

/// A JSON object body within the gateway's body limit; an empty body, another JSON value or bad
/// JSON is a 400 with code `invalid_json`, a body over the limit a 413.
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<Arc<AppState>> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let (parts, body) = request.into_parts();
        read_json_object(&parts, body, state.body_limit)
            .await
            .map(JsonObject)
    }
}

/// Like [`JsonObject`], but a request without a body (or with `Content-Length: 0`) is `{}`: for
/// actions whose fields are all optional.
pub struct OptionalJsonObject(pub Map<String, Value>);

impl FromRequest<Arc<AppState>> for OptionalJsonObject {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let headers = request.headers();
        let length = headers.get(http::header::CONTENT_LENGTH);
        let empty = length.is_some_and(|v| v.as_bytes() == b"0")
            || (length.is_none() && headers.get(http::header::TRANSFER_ENCODING).is_none());
        if empty {
            return Ok(OptionalJsonObject(Map::new()));
        }
        let JsonObject(body) = JsonObject::from_request(request, state).await?;
        Ok(OptionalJsonObject(body))
    }
}

/// The query string, deserialized by axum's `Query`; one that does not fit `T` is a 400 saying
/// which parameter and why.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| Query(q.0))
            .map_err(|e| {
                ApiError::invalid(format!("Invalid query string: {}", e.body_text()))
                    .with_code("invalid_query")
            })
    }
}
