//! The dashboard at `/ui`: one page of static HTML, CSS and JavaScript (and the uPlot charting
//! library), embedded in the binary at build time. Every path under `/ui/` that is not an asset
//! answers the same page, which reads its path (`/ui/runs/<id>`, `/ui/traffic?route=…`) and draws
//! itself from the admin JSON API, so each view is a URL that can be shared.
//!
//! The page itself holds no data and is served to anyone; the API calls it makes need the admin
//! scope. On loopback without keys they pass like any other call; elsewhere the page asks for an
//! API key and `POST /ui/login` keeps it in an HttpOnly, SameSite=Strict cookie.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde_json::Value;

use super::auth::{PeerAddr, SESSION_COOKIE};
use super::extract::JsonObject;
use super::AppState;
use crate::config::Scope;
use crate::wire::error::ApiError;

const INDEX: &str = include_str!("../../ui/index.html");

/// The assets: name, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/app.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/vendor/uplot/uPlot.min.css"),
    ),
    (
        "uPlot.LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../../ui/vendor/uplot/LICENSE"),
    ),
];

/// Headers every page and asset carries: nothing runs but our own scripts, and no other site
/// frames the page.
fn hardened(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

pub async fn root() -> Redirect {
    Redirect::permanent("/ui/")
}

/// The page, for `/ui/` and any view under it.
pub async fn page() -> Response {
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    hardened(r)
}

pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, bytes)) => hardened(
            (
                [
                    (header::CONTENT_TYPE, *kind),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                *bytes,
            )
                .into_response(),
        ),
        None => ApiError::not_found(format!("No dashboard asset '{name}'.")).into_response(),
    }
}

/// `POST /ui/login` `{"key"}`: checks that the key holds the admin scope and keeps it in the
/// session cookie (Secure when the gateway serves TLS).
pub async fn login(
    State(state): State<Arc<AppState>>,
    peer: Option<axum::Extension<PeerAddr>>,
    sent: HeaderMap,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    super::auth::check_csrf(&http::Method::POST, &sent, Scope::Admin)?;
    let key = body
        .get("key")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::invalid_param("key", "'key' (an API key) is required."))?;
    if !key
        .chars()
        .all(|c| c.is_ascii_graphic() && c != ';' && c != ',')
    {
        return Err(ApiError::invalid_param(
            "key",
            "An API key is printable ASCII without ';' or ','.",
        ));
    }
    let mut headers = HeaderMap::new();
    let bearer = HeaderValue::from_str(&format!("Bearer {key}"))
        .map_err(|_| ApiError::invalid_param("key", "The key is not a valid header value."))?;
    headers.insert(header::AUTHORIZATION, bearer);
    let principal = state
        .auth
        .authorize(&headers, peer.map(|p| p.0 .0), Scope::Admin)?;
    let secure = if state.gateway.config().server.tls_cert.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!("{SESSION_COOKIE}={key}; Path=/; HttpOnly; SameSite=Strict{secure}");
    let mut r = Json(serde_json::json!({"name": principal.name})).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|_| ApiError::internal("cookie"))?,
    );
    Ok(r)
}

/// `POST /ui/logout`: forgets the session cookie.
pub async fn logout() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("flywheel_key=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}
