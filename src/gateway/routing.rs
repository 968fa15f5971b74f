//! Route resolution: a request's `model` becomes a target and a rollout arm. Rollouts can be replaced
//! at runtime; a request keeps the snapshot it resolved against, so a change never disturbs in-flight work.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use crate::config::{RolloutConfig, RouteConfig, ShadowTargetConfig, TargetConfig};

/// Which side of a rollout served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    Champion,
    Canary,
    Shadow,
    /// A target's own model name was asked for, bypassing the route's rollout.
    Direct,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Champion => "champion",
            Arm::Canary => "canary",
            Arm::Shadow => "shadow",
            Arm::Direct => "direct",
        }
    }
}

/// The outcome of resolving a model name.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub route: String,
    pub arm: Arm,
    /// Tried in order: the serving target first, then its fallbacks.
    pub targets: Vec<TargetConfig>,
    pub shadow: Option<ShadowTargetConfig>,
    /// The route has a canary: its shadow then measures the canary against the champion, and
    /// requests the champion answered itself are not mirrored to it.
    pub has_canary: bool,
}

/// The live route table.
pub struct RouteTable {
    routes: RwLock<Arc<HashMap<String, Arc<RolloutConfig>>>>,
    order: RwLock<Vec<String>>,
}

/// A stable bucket in [0, 10000) for a sticky key on a route: the same key always lands on the same arm
/// for a given percentage, and raising the percentage only moves keys from champion to canary.
pub fn sticky_bucket(route: &str, key: &str) -> u32 {
    let mut h = Sha256::new();
    h.update(route.as_bytes());
    h.update([0u8]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let x = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    (x % 10_000) as u32
}

impl RouteTable {
    pub fn new(routes: &[RouteConfig]) -> Self {
        let map = routes
            .iter()
            .map(|r| (r.name.clone(), Arc::new(r.rollout.clone())))
            .collect();
        Self {
            routes: RwLock::new(Arc::new(map)),
            order: RwLock::new(routes.iter().map(|r| r.name.clone()).collect()),
        }
    }

    fn snapshot(&self) -> Arc<HashMap<String, Arc<RolloutConfig>>> {
        match self.routes.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The route names in config order, then routes added at runtime.
    pub fn names(&self) -> Vec<String> {
        match self.order.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<RolloutConfig>> {
        self.snapshot().get(name).cloned()
    }

    /// Replaces (or adds) a route's rollout atomically. The caller has validated it.
    pub fn set(&self, name: &str, rollout: RolloutConfig) {
        let mut guard = match self.routes.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut next: HashMap<_, _> = (**guard).clone();
        let added = next.insert(name.to_string(), Arc::new(rollout)).is_none();
        *guard = Arc::new(next);
        drop(guard);
        if added {
            match self.order.write() {
                Ok(mut o) => o.push(name.to_string()),
                Err(p) => p.into_inner().push(name.to_string()),
            }
        }
    }

    /// Every name that resolves: route names, then the models of their targets.
    pub fn model_ids(&self) -> Vec<(String, Option<String>)> {
        let snap = self.snapshot();
        let mut out: Vec<(String, Option<String>)> = Vec::new();
        for name in self.names() {
            out.push((name.clone(), None));
        }
        for name in self.names() {
            let Some(r) = snap.get(&name) else { continue };
            for t in targets_of(r) {
                if !out.iter().any(|(m, _)| m == t.model_name()) {
                    out.push((t.model_name().to_string(), Some(name.clone())));
                }
            }
        }
        out
    }

    /// Resolves `model`. `sticky_key` keeps one episode, session or user on one arm; without one the
    /// split is random per request.
    pub fn resolve(&self, model: &str, sticky_key: Option<&str>) -> Option<Resolution> {
        self.resolve_with(model, sticky_key, true)
    }

    /// Resolves `model` to its champion, never the canary (evaluation compares named targets).
    pub fn champion_of(&self, model: &str) -> Option<Resolution> {
        self.resolve_with(model, None, false)
    }

    fn resolve_with(
        &self,
        model: &str,
        sticky_key: Option<&str>,
        canary_allowed: bool,
    ) -> Option<Resolution> {
        let snap = self.snapshot();
        if let Some(r) = snap.get(model) {
            let canary = r
                .canary
                .as_ref()
                .filter(|c| canary_allowed && c.percent > 0.0);
            let on_canary = canary.is_some_and(|c| {
                let bucket = match sticky_key {
                    Some(k) => sticky_bucket(model, k),
                    None => rand::random_range(0..10_000),
                };
                f64::from(bucket) < c.percent * 100.0
            });
            let mut targets = Vec::with_capacity(2 + r.fallbacks.len());
            let arm = match (on_canary, canary) {
                (true, Some(c)) => {
                    // A failing canary falls back to the champion, then the route's fallbacks.
                    targets.push(c.target.clone());
                    targets.push(r.champion.clone());
                    Arm::Canary
                }
                _ => {
                    targets.push(r.champion.clone());
                    Arm::Champion
                }
            };
            for f in &r.fallbacks {
                if !targets.contains(f) {
                    targets.push(f.clone());
                }
            }
            return Some(Resolution {
                route: model.to_string(),
                arm,
                targets,
                shadow: r.shadow.clone().filter(|s| s.sample_rate > 0.0),
                has_canary: canary.is_some(),
            });
        }
        for name in self.names() {
            let Some(r) = snap.get(&name) else { continue };
            if let Some(t) = targets_of(r).into_iter().find(|t| t.model_name() == model) {
                return Some(Resolution {
                    route: name,
                    arm: Arm::Direct,
                    targets: vec![t.clone()],
                    shadow: None,
                    has_canary: false,
                });
            }
        }
        None
    }
}

fn targets_of(r: &RolloutConfig) -> Vec<&TargetConfig> {
    let mut v = vec![&r.champion];
    if let Some(c) = &r.canary {
        v.push(&c.target);
    }
    v.extend(r.fallbacks.iter());
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CanaryConfig;

    fn t(m: &str) -> TargetConfig {
        TargetConfig::upstream("u", m)
    }

    fn table(percent: f64) -> RouteTable {
        RouteTable::new(&[RouteConfig {
            name: "agent".into(),
            guardrails: None,
            rollout: RolloutConfig {
                champion: t("big"),
                canary: Some(CanaryConfig {
                    target: t("small"),
                    percent,
                }),
                shadow: None,
                fallbacks: vec![t("backup")],
            },
            flywheel: None,
        }])
    }

    #[test]
    fn canary_split_is_sticky_and_near_its_percentage() {
        let table = table(20.0);
        let mut canary = 0;
        for i in 0..5000 {
            let key = format!("user-{i}");
            let first = table.resolve("agent", Some(&key)).unwrap().arm;
            for _ in 0..3 {
                assert_eq!(table.resolve("agent", Some(&key)).unwrap().arm, first);
            }
            if first == Arm::Canary {
                canary += 1;
            }
        }
        let share = canary as f64 / 5000.0;
        assert!((0.17..0.23).contains(&share), "canary share {share}");
    }

    #[test]
    fn canary_falls_back_to_champion_then_fallbacks() {
        let table = table(100.0);
        let r = table.resolve("agent", Some("k")).unwrap();
        assert_eq!(r.arm, Arm::Canary);
        let models: Vec<_> = r.targets.iter().map(|t| t.model_name()).collect();
        assert_eq!(models, ["small", "big", "backup"]);
    }

    #[test]
    fn a_target_model_resolves_directly_and_unknown_names_do_not() {
        let table = table(0.0);
        let r = table.resolve("backup", None).unwrap();
        assert_eq!(r.arm, Arm::Direct);
        assert_eq!(r.targets.len(), 1);
        assert!(table.resolve("nope", None).is_none());
        let ids: Vec<_> = table.model_ids().into_iter().map(|(m, _)| m).collect();
        assert_eq!(ids, ["agent", "big", "small", "backup"]);
    }

    #[test]
    fn set_replaces_atomically_and_old_snapshots_survive() {
        let table = table(0.0);
        let before = table.get("agent").unwrap();
        table.set(
            "agent",
            RolloutConfig {
                champion: t("small"),
                canary: None,
                shadow: None,
                fallbacks: vec![],
            },
        );
        assert_eq!(before.champion.model_name(), "big");
        assert_eq!(
            table.resolve("agent", None).unwrap().targets[0].model_name(),
            "small"
        );
    }
}
