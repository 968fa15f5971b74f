//! Adapters served by an upstream fleet (a vLLM or NIM deployment of the student's base model).
//! A rollout target `{ upstream, adapter }` is an adapter from Flywheel's adapter store that the
//! upstream's servers serve under the adapter's name. Before a rollout that needs one is installed,
//! the leader loads it on every server (`POST /v1/load_lora_adapter`) and checks that
//! `GET /v1/models` lists it there; a server that refuses undoes the push. When no rollout needs an
//! adapter any more it is unloaded (`POST /v1/unload_lora_adapter`). Every call is returned, so the
//! transition it belongs to records it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use http::Method;
use serde::Serialize;
use serde_json::{json, Value};

use super::{fstore, lock, FlywheelController, FlywheelError, RouteState};
use crate::backend::upstream::Upstream;
use crate::config::RolloutConfig;
use crate::engine::lora::store_path;

/// Time allowed for a load call unless `[upstreams.lora] load_timeout_ms` says otherwise.
const DEFAULT_LOAD_TIMEOUT_MS: u64 = 60_000;
/// Time allowed for listing a server's models and for an unload.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest server message kept in a call's record.
const DETAIL_CHARS: usize = 300;

/// One call to one server, as the transition log records it.
#[derive(Debug, Clone, Serialize)]
pub struct FleetCall {
    pub endpoint: String,
    /// `models`, `load_lora_adapter` or `unload_lora_adapter`.
    pub call: &'static str,
    pub adapter: String,
    /// The HTTP status, absent when the server could not be reached.
    pub status: Option<u16>,
    pub ok: bool,
    pub detail: String,
    pub ms: u64,
}

/// A push that did not complete: why, and every call made (the undoing included).
#[derive(Debug)]
pub struct FleetFailure {
    pub message: String,
    pub calls: Vec<FleetCall>,
}

/// An upstream's servers and how to reach them.
pub(super) struct Fleet {
    upstream: String,
    client: Upstream,
    endpoints: Vec<String>,
    /// The adapter store as the servers see it.
    adapter_dir: String,
    load_timeout: Duration,
}

/// What one server said about one adapter.
enum Presence {
    Listed,
    Missing,
}

impl Fleet {
    fn url(endpoint: &str, path: &str) -> String {
        format!("{}/{path}", endpoint.trim_end_matches('/'))
    }

    async fn call(
        &self,
        endpoint: &str,
        call: &'static str,
        adapter: &str,
        method: Method,
        body: Option<Value>,
        timeout: Duration,
    ) -> (FleetCall, Option<bytes::Bytes>) {
        let started = Instant::now();
        let url = Self::url(endpoint, call);
        let reply = self
            .client
            .manage(method, &url, body.as_ref(), timeout)
            .await;
        let mut record = FleetCall {
            endpoint: endpoint.to_string(),
            call,
            adapter: adapter.to_string(),
            status: None,
            ok: false,
            detail: String::new(),
            ms: started.elapsed().as_millis() as u64,
        };
        match reply {
            Ok((status, body)) => {
                record.status = Some(status);
                record.ok = (200..300).contains(&status);
                record.detail = server_message(&body);
                (record, Some(body))
            }
            Err(e) => {
                record.detail = e.to_string();
                (record, None)
            }
        }
    }

    /// Whether `GET /v1/models` on `endpoint` lists `adapter`.
    async fn presence(&self, endpoint: &str, adapter: &str) -> (FleetCall, Option<Presence>) {
        let (mut record, body) = self
            .call(endpoint, "models", adapter, Method::GET, None, CALL_TIMEOUT)
            .await;
        if !record.ok {
            return (record, None);
        }
        let listed = body
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| {
                v.get("data").and_then(Value::as_array).map(|d| {
                    d.iter()
                        .any(|m| m.get("id").and_then(Value::as_str) == Some(adapter))
                })
            });
        match listed {
            Some(true) => {
                record.detail = "listed".into();
                (record, Some(Presence::Listed))
            }
            Some(false) => {
                record.detail = "not listed".into();
                (record, Some(Presence::Missing))
            }
            None => {
                record.ok = false;
                record.detail = "the answer is not a model list".into();
                (record, None)
            }
        }
    }

    /// Makes `adapter` present on one server. Returns the calls and whether this call loaded it.
    async fn ensure_on(
        &self,
        endpoint: &str,
        adapter: &str,
    ) -> (Vec<FleetCall>, Result<bool, String>) {
        let mut calls = Vec::new();
        let (c, presence) = self.presence(endpoint, adapter).await;
        let fail = |c: &FleetCall, what: &str| Err(format!("{endpoint}: {what}: {}", c.detail));
        calls.push(c);
        match presence {
            Some(Presence::Listed) => return (calls, Ok(false)),
            Some(Presence::Missing) => {}
            None => {
                let r = fail(&calls[0], "cannot list its models");
                return (calls, r);
            }
        }
        let body = json!({"lora_name": adapter, "lora_path": self.lora_path(adapter)});
        let (mut c, _) = self
            .call(
                endpoint,
                "load_lora_adapter",
                adapter,
                Method::POST,
                Some(body),
                self.load_timeout,
            )
            .await;
        // Another push (a follower's reconcile, an operator) got there first.
        if c.status == Some(400) && c.detail.contains("already been loaded") {
            c.ok = true;
        }
        if c.status == Some(404) && c.detail == "Not Found" {
            c.detail = "the server has no /v1/load_lora_adapter (vLLM offers it when started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)".into();
        }
        let loaded = c.ok;
        let refused = (!loaded).then(|| fail(&c, "refused the adapter"));
        calls.push(c);
        if let Some(r) = refused {
            return (calls, r);
        }
        let (c, presence) = self.presence(endpoint, adapter).await;
        let outcome = match presence {
            Some(Presence::Listed) => Ok(true),
            Some(Presence::Missing) => Err(format!(
                "{endpoint}: accepted the adapter but GET /v1/models does not list it"
            )),
            None => fail(&c, "cannot list its models after the load"),
        };
        calls.push(c);
        (calls, outcome)
    }

    /// Loads `adapter` on every server that lacks it; when one cannot, unloads it again from the
    /// servers this call loaded it on. Returns the calls and the servers it was loaded on.
    async fn ensure(&self, adapter: &str) -> Result<(Vec<FleetCall>, Vec<String>), FleetFailure> {
        let results = join_all(self.endpoints.iter().map(|e| self.ensure_on(e, adapter))).await;
        let mut calls = Vec::new();
        let mut loaded = Vec::new();
        let mut errors = Vec::new();
        for (endpoint, (c, outcome)) in self.endpoints.iter().zip(results) {
            calls.extend(c);
            match outcome {
                Ok(true) => loaded.push(endpoint.clone()),
                Ok(false) => {}
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            return Ok((calls, loaded));
        }
        calls.extend(self.unload(&loaded, adapter).await);
        Err(FleetFailure {
            message: format!(
                "adapter '{adapter}' could not be loaded on every server of upstream '{}' ({})",
                self.upstream,
                errors.join("; ")
            ),
            calls,
        })
    }

    /// Unloads `adapter` from `endpoints`; a server that does not hold it counts as done.
    async fn unload(&self, endpoints: &[String], adapter: &str) -> Vec<FleetCall> {
        let body = json!({"lora_name": adapter});
        let calls = join_all(endpoints.iter().map(|e| {
            self.call(
                e,
                "unload_lora_adapter",
                adapter,
                Method::POST,
                Some(body.clone()),
                CALL_TIMEOUT,
            )
        }))
        .await;
        calls
            .into_iter()
            .map(|(mut c, _)| {
                if c.status == Some(404) && c.detail.contains("cannot be found") {
                    c.ok = true;
                }
                if !c.ok {
                    tracing::warn!(upstream = %self.upstream, endpoint = %c.endpoint, adapter, detail = %c.detail, "the adapter could not be unloaded");
                }
                c
            })
            .collect()
    }

    fn lora_path(&self, adapter: &str) -> String {
        store_path(std::path::Path::new(&self.adapter_dir), adapter)
            .to_string_lossy()
            .into_owned()
    }
}

/// The text a server gave: an error envelope's message (OpenAI's, vLLM's or FastAPI's), or the
/// body itself, shortened.
fn server_message(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(v) => [
            v.pointer("/error/message"),
            v.get("message"),
            v.get("detail"),
        ]
        .into_iter()
        .flatten()
        .find_map(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string()),
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    };
    text.chars().take(DETAIL_CHARS).collect()
}

/// The fleets built so far, by upstream.
#[derive(Default)]
pub(super) struct Fleets(std::sync::Mutex<HashMap<String, Arc<Fleet>>>);

impl FlywheelController {
    fn fleet(&self, upstream: &str) -> Result<Arc<Fleet>, String> {
        if let Some(f) = lock(&self.fleets.0).get(upstream) {
            return Ok(f.clone());
        }
        let cfg = self
            .config
            .upstreams
            .iter()
            .find(|u| u.name == upstream)
            .ok_or_else(|| format!("upstream '{upstream}' is not defined"))?;
        let store = self.data_dir.join("adapters");
        let adapter_dir = match &cfg.lora.adapter_dir {
            Some(d) => d.clone(),
            None => std::path::absolute(&store)
                .unwrap_or(store)
                .to_string_lossy()
                .into_owned(),
        };
        let fleet = Arc::new(Fleet {
            upstream: upstream.to_string(),
            client: Upstream::new(cfg)?,
            endpoints: cfg.lora_endpoints(),
            adapter_dir,
            load_timeout: Duration::from_millis(
                cfg.lora.load_timeout_ms.unwrap_or(DEFAULT_LOAD_TIMEOUT_MS),
            ),
        });
        lock(&self.fleets.0).insert(upstream.to_string(), fleet.clone());
        Ok(fleet)
    }

    /// Makes every fleet adapter `rollout` names present on each server of its upstream. On
    /// failure nothing this call loaded stays loaded.
    pub(super) fn push(&self, rollout: &RolloutConfig) -> Result<Vec<FleetCall>, FleetFailure> {
        let wanted = rollout.fleet_adapters();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        crate::store::sql::wait(&self.rt, async {
            let mut calls = Vec::new();
            let mut done: Vec<(Arc<Fleet>, String, Vec<String>)> = Vec::new();
            let mut failure = None;
            for (upstream, adapter) in &wanted {
                let pushed = match self.in_store(adapter).and_then(|()| self.fleet(upstream)) {
                    Err(message) => Err(FleetFailure {
                        message,
                        calls: Vec::new(),
                    }),
                    Ok(fleet) => fleet
                        .ensure(adapter)
                        .await
                        .map(|(c, loaded)| (fleet, c, loaded)),
                };
                match pushed {
                    Ok((fleet, c, loaded)) => {
                        calls.extend(c);
                        done.push((fleet, adapter.clone(), loaded));
                    }
                    Err(f) => {
                        calls.extend(f.calls);
                        failure = Some(f.message);
                        break;
                    }
                }
            }
            let Some(message) = failure else {
                return Ok(calls);
            };
            for (fleet, adapter, loaded) in &done {
                calls.extend(fleet.unload(loaded, adapter).await);
            }
            Err(FleetFailure { message, calls })
        })
    }

    /// Unloads the fleet adapters `old` names and `new` does not, from every server of their
    /// upstream. Failures are logged and recorded, never fatal: the rollout no longer sends
    /// traffic to them.
    pub(super) fn retire(&self, old: &RolloutConfig, new: &RolloutConfig) -> Vec<FleetCall> {
        let keep = new.fleet_adapters();
        let gone: Vec<(String, String)> = old
            .fleet_adapters()
            .into_iter()
            .filter(|a| !keep.contains(a))
            .collect();
        if gone.is_empty() {
            return Vec::new();
        }
        crate::store::sql::wait(&self.rt, async {
            let mut calls = Vec::new();
            for (upstream, adapter) in &gone {
                match self.fleet(upstream) {
                    Ok(fleet) => calls.extend(fleet.unload(&fleet.endpoints, adapter).await),
                    Err(e) => {
                        tracing::warn!(upstream = %upstream, adapter = %adapter, error = %e, "cannot unload the adapter")
                    }
                }
            }
            calls
        })
    }

    /// An operator's rollout (`PUT /admin/routes/...`): its fleet adapters are loaded before it is
    /// installed.
    pub fn push_rollout(&self, rollout: &RolloutConfig) -> Result<(), FlywheelError> {
        for (_, adapter) in rollout.fleet_adapters() {
            self.in_store(&adapter).map_err(FlywheelError::Invalid)?;
        }
        self.push(rollout).map(|_| ()).map_err(|f| {
            tracing::warn!(error = %f.message, calls = %json!(f.calls), "an operator's rollout was refused by the fleet");
            FlywheelError::Fleet(f.message)
        })
    }

    /// After an operator's rollout replaced `old`: unloads the fleet adapters it no longer needs.
    pub fn retire_rollout(&self, old: &RolloutConfig, new: &RolloutConfig) {
        let calls = self.retire(old, new);
        if !calls.is_empty() {
            tracing::info!(calls = %json!(calls), "fleet adapters the new rollout does not serve were unloaded");
        }
    }

    /// Loads the installed rollout's fleet adapters again where a server lost them (a restarted
    /// vLLM forgets the adapters it was given at run time), recording a `reload` transition when
    /// it did. A server that cannot be reached is logged and tried again on the next check.
    pub(super) fn reconcile_fleet(
        &self,
        conn: &crate::store::Conn,
        state: &RouteState,
    ) -> Result<(), FlywheelError> {
        match self.push(&state.installed) {
            Ok(calls) => {
                let reloaded: BTreeSet<&str> = calls
                    .iter()
                    .filter(|c| c.call == "load_lora_adapter")
                    .map(|c| c.endpoint.as_str())
                    .collect();
                if reloaded.is_empty() {
                    return Ok(());
                }
                let why = format!(
                    "{} server(s) no longer held an adapter the rollout serves (restarted?); loaded again on {}",
                    reloaded.len(),
                    reloaded.into_iter().collect::<Vec<_>>().join(", ")
                );
                tracing::warn!(route = %state.route, reason = %why, "fleet adapter reloaded");
                let e = super::event(state, state.stage, "reload", &why, json!({"fleet": calls}));
                fstore::insert_event(conn, &e)?;
            }
            Err(f) => {
                tracing::warn!(route = %state.route, error = %f.message, "an adapter of the route's rollout is missing on its upstream's servers and cannot be loaded")
            }
        }
        Ok(())
    }

    /// The same for routes without a flywheel (an operator's fleet target in the config or through
    /// the admin API): logged, since they have no transition log.
    pub(super) fn reconcile_other_routes(&self) {
        let routes = self.gateway.routes();
        for name in routes.names() {
            let Some(live) = routes.get(&name) else {
                continue;
            };
            if self
                .config
                .routes
                .iter()
                .any(|r| r.name == name && r.flywheel.is_some())
            {
                continue;
            }
            match self.push(&live) {
                Ok(calls) if calls.iter().any(|c| c.call == "load_lora_adapter") => {
                    tracing::info!(route = %name, calls = %json!(calls), "fleet adapters of the route's rollout loaded");
                }
                Ok(_) => {}
                Err(f) => {
                    tracing::warn!(route = %name, error = %f.message, "an adapter of the route's rollout cannot be loaded on its upstream's servers")
                }
            }
        }
    }

    /// The adapter is a complete PEFT directory in the adapter store (what the servers will read).
    fn in_store(&self, adapter: &str) -> Result<(), String> {
        let dir = store_path(&self.data_dir.join("adapters"), adapter);
        let complete = ["adapter_config.json", "adapter_model.safetensors"]
            .iter()
            .all(|f| dir.join(f).is_file());
        if complete {
            Ok(())
        } else {
            Err(format!(
                "adapter '{adapter}' is not in the adapter store ({} lacks adapter_config.json or adapter_model.safetensors)",
                dir.display()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TargetConfig;

    #[test]
    fn a_server_message_is_read_from_each_envelope() {
        let m = |s: &str| server_message(s.as_bytes());
        assert_eq!(
            m(r#"{"error": {"message": "no such adapter"}}"#),
            "no such adapter"
        );
        assert_eq!(
            m(
                r#"{"object": "error", "message": "The lora adapter 'x' has already been loaded.", "code": 400}"#
            ),
            "The lora adapter 'x' has already been loaded."
        );
        assert_eq!(m(r#"{"detail": "Not Found"}"#), "Not Found");
        assert_eq!(
            m("Success: LoRA adapter 'x' added successfully."),
            "Success: LoRA adapter 'x' added successfully."
        );
        assert_eq!(m(&"y".repeat(1000)).len(), DETAIL_CHARS);
    }

    #[test]
    fn fleet_adapters_are_those_on_upstreams() {
        let pushed = TargetConfig {
            adapter: Some("flywheel/a".into()),
            ..TargetConfig::upstream("vllm", "x")
        };
        let r = RolloutConfig {
            champion: TargetConfig::upstream("big", "gpt"),
            canary: Some(crate::config::CanaryConfig {
                target: pushed,
                percent: 5.0,
            }),
            shadow: Some(crate::config::ShadowTargetConfig {
                target: TargetConfig::local_adapter("tiny", "flywheel/b"),
                sample_rate: 1.0,
            }),
            fallbacks: vec![],
        };
        let got: Vec<(String, String)> = r.fleet_adapters().into_iter().collect();
        assert_eq!(got, vec![("vllm".to_string(), "flywheel/a".to_string())]);
    }
}
