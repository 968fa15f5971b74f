//! API keys and scopes. Keys are compared by SHA-256 digest; the config holds digests, never keys.

use std::collections::HashMap;
use std::net::SocketAddr;

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::{AuthConfig, Scope};
use crate::wire::error::ApiError;

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
}
