//! API keys and scopes. Keys are compared by SHA-256 digest; the config holds digests, never keys.

use std::collections::HashMap;
use std::net::SocketAddr;

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::{AuthConfig, Scope};
use crate::wire::error::ApiError;

/// The cookie the dashboard's login keeps an API key in (HttpOnly, SameSite=Strict).
pub const SESSION_COOKIE: &str = "flywheel_key";

/// The header a browser page adds to the changes it sends with the session cookie: another site's
/// page cannot set it.
pub const CSRF_HEADER: &str = "x-flywheel-csrf";

/// The key in the session cookie, if the request carries one.
pub fn session_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, key)| key.trim())
        .filter(|k| !k.is_empty())
}

/// Refuses a change (a method other than GET, HEAD, OPTIONS) sent with the session cookie but
/// without the page's CSRF header, and an admin change a browser sends from another site's page
/// (which, on loopback without keys, would need no credentials at all).
pub fn check_csrf(
    method: &http::Method,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<(), ApiError> {
    if matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    ) {
        return Ok(());
    }
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if scope == Scope::Admin && matches!(site, Some("cross-site" | "same-site")) {
        return Err(
            ApiError::forbidden("A change sent by another site's page is refused.")
                .with_code("csrf"),
        );
    }
    let bearer =
        headers.contains_key(http::header::AUTHORIZATION) || headers.contains_key("x-api-key");
    if !bearer && session_key(headers).is_some() && !headers.contains_key(CSRF_HEADER) {
        return Err(ApiError::forbidden(format!(
            "A change sent with the dashboard's session cookie needs the '{CSRF_HEADER}' header."
        ))
        .with_code("csrf"));
    }
    Ok(())
}

/// The peer address of a connection, put on each request by the server loop.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Who a request is from, once authenticated.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub scopes: Vec<Scope>,
}

pub struct Authenticator {
    keys: HashMap<[u8; 32], Principal>,
    allow_loopback_without_key: bool,
}

pub fn hash_key(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Authenticator {
    pub fn new(cfg: &AuthConfig) -> Self {
        let keys = cfg
            .keys
            .iter()
            .filter_map(|k| {
                unhex(&k.sha256.to_ascii_lowercase()).map(|d| {
                    (
                        d,
                        Principal {
                            name: k.name.clone(),
                            scopes: k.scopes.clone(),
                        },
                    )
                })
            })
            .collect();
        Self {
            keys,
            allow_loopback_without_key: cfg.allow_loopback_without_key,
        }
    }

    /// Checks that the request may use `scope`.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
        scope: Scope,
    ) -> Result<Principal, ApiError> {
        // Anthropic's clients send the key as `x-api-key`; it is taken like a bearer key.
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .or_else(|| session_key(headers))
            .map(str::trim)
            .filter(|k| !k.is_empty());
        let principal = match presented {
            Some(key) => {
                let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
                match self.keys.get(&digest) {
                    Some(p) => p.clone(),
                    None if self.keys.is_empty() && self.loopback(peer) => Principal {
                        // No keys configured: on loopback a client's placeholder key is fine.
                        name: "loopback".into(),
                        scopes: vec![Scope::Inference, Scope::Admin],
                    },
                    None => return Err(ApiError::unauthorized("Incorrect API key provided.")),
                }
            }
            None if self.loopback(peer) => Principal {
                name: "loopback".into(),
                scopes: vec![Scope::Inference, Scope::Admin],
            },
            None => {
                return Err(ApiError::unauthorized(
                    "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                ))
            }
        };
        if !principal.scopes.contains(&scope) {
            let needed = match scope {
                Scope::Inference => "inference",
                Scope::Admin => "admin",
            };
            return Err(ApiError::forbidden(format!(
                "The API key '{}' lacks the '{needed}' scope this endpoint needs.",
                principal.name
            )));
        }
        Ok(principal)
    }

    fn loopback(&self, peer: Option<SocketAddr>) -> bool {
        self.allow_loopback_without_key && peer.is_some_and(|p| p.ip().is_loopback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKeyConfig;

    fn auth(allow_loopback: bool) -> Authenticator {
        Authenticator::new(&AuthConfig {
            allow_loopback_without_key: allow_loopback,
            keys: vec![ApiKeyConfig {
                name: "app".into(),
                sha256: hash_key("sk-app"),
                scopes: vec![Scope::Inference],
            }],
        })
    }

    fn bearer(k: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {k}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn scopes_are_enforced() {
        let a = auth(false);
        let peer = Some("10.0.0.1:5".parse().unwrap());
        assert!(a
            .authorize(&bearer("sk-app"), peer, Scope::Inference)
            .is_ok());
        assert_eq!(
            a.authorize(&bearer("sk-app"), peer, Scope::Admin)
                .unwrap_err()
                .status
                .as_u16(),
            403
        );
        assert_eq!(
            a.authorize(&bearer("sk-bad"), peer, Scope::Inference)
                .unwrap_err()
                .status
                .as_u16(),
            401
        );
        assert_eq!(
            a.authorize(&HeaderMap::new(), peer, Scope::Inference)
                .unwrap_err()
                .status
                .as_u16(),
            401
        );
    }

    #[test]
    fn loopback_without_key_only_when_allowed() {
        let lo = Some("127.0.0.1:5".parse().unwrap());
        assert!(auth(true)
            .authorize(&HeaderMap::new(), lo, Scope::Admin)
            .is_ok());
        assert!(auth(false)
            .authorize(&HeaderMap::new(), lo, Scope::Inference)
            .is_err());
        // A wrong key is wrong even on loopback when keys are configured.
        assert!(auth(true)
            .authorize(&bearer("sk-bad"), lo, Scope::Inference)
            .is_err());
    }

    #[test]
    fn hash_round_trips() {
        assert_eq!(unhex(&hash_key("x")).map(|d| hex(&d)), Some(hash_key("x")));
    }

    #[test]
    fn the_session_cookie_authenticates_and_changes_need_the_page_header() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            "theme=dark; flywheel_key=sk-app".parse().unwrap(),
        );
        assert_eq!(session_key(&h), Some("sk-app"));
        let far = Some("10.0.0.9:5".parse().unwrap());
        assert!(auth(false).authorize(&h, far, Scope::Inference).is_ok());
        let post = http::Method::POST;
        assert!(check_csrf(&http::Method::GET, &h, Scope::Admin).is_ok());
        assert_eq!(
            check_csrf(&post, &h, Scope::Inference).unwrap_err().status,
            http::StatusCode::FORBIDDEN
        );
        h.insert(CSRF_HEADER, "1".parse().unwrap());
        assert!(check_csrf(&post, &h, Scope::Admin).is_ok());
        // Another site's page may not change anything through an admin endpoint, key or not.
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(check_csrf(&post, &h, Scope::Admin).is_err());
        assert!(check_csrf(&post, &bearer("sk-app"), Scope::Admin).is_ok());
    }
}
