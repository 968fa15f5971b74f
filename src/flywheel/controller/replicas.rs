//! Replicas on one PostgreSQL store. Every replica serves, logs and answers the API; one of them
//! leads the flywheel (restores and resumes runs, checks rollouts and drift, starts scheduled
//! runs, adopts the jobs of a replica that stopped), chosen by a PostgreSQL advisory lock that
//! the server frees when the leader's connection ends. The rollout each route serves is kept in
//! `route_rollouts`: whoever changes it (the leader's flywheel, or an operator through any
//! replica's admin API) writes it there and notifies; every replica listens and follows, and
//! reads the whole table again every few seconds in case a notification was missed. Guardrail
//! configs created, changed or deleted through any replica's API are followed the same way.
//!
//! On SQLite (one process) the replica leads and nothing is published.

use std::sync::atomic::Ordering;

use super::*;
use crate::store::sql::args;
use crate::store::Dialect;

/// The channel rollout changes are announced on.
const CHANNEL: &str = "flywheel_rollouts";
/// The claim the leader holds.
const LEADER: &str = "flywheel-leader";
/// How often a follower tries for the lead, and the leader checks that it still holds it.
const LEAD_CHECK: Duration = Duration::from_secs(1);
/// How often every replica reads the stored rollouts whatever the notifications said.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

impl FlywheelController {
    /// Whether the store is shared by replicas (PostgreSQL).
    pub(super) fn replicated(&self) -> bool {
        self.db.dialect() == Dialect::Postgres
    }

    /// Whether this replica leads the flywheel (always, on SQLite).
    pub fn leads(&self) -> bool {
        !self.replicated() || self.leading.load(Ordering::Relaxed)
    }

    /// Records `rollout` as what `route` serves, for every replica (nothing on SQLite).
    pub fn publish(
        &self,
        conn: &crate::store::Conn,
        route: &str,
        rollout: &RolloutConfig,
        origin: &str,
    ) -> Result<(), FlywheelError> {
        if conn.dialect() != Dialect::Postgres {
            return Ok(());
        }
        let text = serde_json::to_string(rollout).map_err(|e| FlywheelError::Store(e.into()))?;
        conn.transaction(|tx| {
            tx.execute(
                "INSERT INTO route_rollouts (route, rollout, origin, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (route) DO UPDATE SET rollout = excluded.rollout,
                     origin = excluded.origin, updated_ms = excluded.updated_ms",
                args![route, text, origin, now_ms()],
            )?;
            // Delivered to every listener when the transaction commits.
            tx.execute(&format!("SELECT pg_notify('{CHANNEL}', ?1)"), args![route])?;
            Ok::<_, StoreError>(())
        })?;
        Ok(())
    }

    /// Tells the other replicas that the guardrail configs changed in the store (they follow at
    /// once, as they do rollouts; nothing on SQLite).
    pub async fn announce_guardrails(self: &Arc<Self>) -> Result<(), FlywheelError> {
        if !self.replicated() {
            return Ok(());
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            me.conn()?.execute(
                &format!("SELECT pg_notify('{CHANNEL}', ?1)"),
                args!["guardrails"],
            )?;
            Ok::<_, FlywheelError>(())
        })
        .await
        .map_err(|e| FlywheelError::Invalid(format!("internal error: {e}")))?
    }

    /// Shares an operator's change of a route's rollout (made on this replica) with the others.
    pub async fn share_rollout(
        self: &Arc<Self>,
        route: &str,
        rollout: &RolloutConfig,
    ) -> Result<(), FlywheelError> {
        if !self.replicated() {
            return Ok(());
        }
        let (me, route, rollout) = (self.clone(), route.to_string(), rollout.clone());
        tokio::task::spawn_blocking(move || me.publish(&me.conn()?, &route, &rollout, "admin"))
            .await
            .map_err(|e| FlywheelError::Invalid(format!("internal error: {e}")))?
    }

    /// Starts following the stored rollouts and competing for the lead (PostgreSQL only).
    pub(super) fn start_replication(self: &Arc<Self>) {
        metrics::gauge!("flywheel_leader").set(0.0);
        let follower = self.clone();
        self.tasks.spawn(async move { follower.follow().await });
        let contender = self.clone();
        self.tasks.spawn(async move { contender.contend().await });
    }

    /// Listens for rollout changes and applies them; reconciles on a timer as a safety net.
    async fn follow(self: Arc<Self>) {
        let Some(pg) = self.db.as_postgres() else {
            return;
        };
        loop {
            let listening = match pg.dedicated().await {
                Ok((client, rx)) => {
                    match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                        Ok(()) => Some((client, rx)),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot listen for rollout changes");
                            None
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for rollout changes; reconciling on a timer");
                    None
                }
            };
            // Catch up on what changed while not listening.
            self.reconcile_soon().await;
            let Some((_client, mut rx)) = listening else {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(RECONCILE_EVERY) => continue,
                }
            };
            loop {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    m = rx.recv() => match m {
                        Some(tokio_postgres::AsyncMessage::Notification(_)) => self.reconcile_soon().await,
                        Some(_) => {}
                        None => {
                            tracing::warn!("the rollout listener's connection ended; listening again");
                            break;
                        }
                    },
                    _ = tokio::time::sleep(RECONCILE_EVERY) => self.reconcile_soon().await,
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(LEAD_CHECK) => {}
            }
        }
    }

    async fn reconcile_soon(self: &Arc<Self>) {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.reconcile()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the stored rollouts"),
            Err(e) => tracing::error!(error = %e, "reading the stored rollouts panicked"),
        }
    }

    /// Serves what the store says each route serves, where that differs from what is installed,
    /// and checks with the guardrail configs the store holds.
    fn reconcile(&self) -> Result<(), FlywheelError> {
        let conn = self.conn()?;
        match crate::store::guardrails::list(&conn) {
            Ok(configs) => self.gateway.follow_guardrails(&configs),
            Err(e) => tracing::warn!(error = %e, "cannot read the stored guardrail configs"),
        }
        let stored: Vec<(String, String, String)> = conn.query(
            "SELECT route, rollout, origin FROM route_rollouts ORDER BY route",
            &[],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        for (route, text, origin) in stored {
            let Ok(rollout) = serde_json::from_str::<RolloutConfig>(&text) else {
                tracing::warn!(route = %route, "the stored rollout is not readable; ignored");
                continue;
            };
            let Some(live) = self.gateway.routes().get(&route) else {
                tracing::warn!(route = %route, "the store names a route this replica's config does not have");
                continue;
            };
            if *live == rollout {
                continue;
            }
            let _t = lock(&self.transitions);
            for t in targets(&rollout) {
                self.ensure_adapter(t).map_err(FlywheelError::Invalid)?;
            }
            self.gateway
                .set_rollout(&route, rollout.clone())
                .map_err(|e| FlywheelError::Invalid(e.to_string()))?;
            let configured = self
                .config
                .routes
                .iter()
                .find(|r| r.name == route)
                .map(|r| &r.rollout);
            if configured.is_some_and(|c| c.champion != rollout.champion) {
                tracing::warn!(
                    route = %route,
                    configured = %configured.map(|c| c.champion.to_string()).unwrap_or_default(),
                    stored = %rollout.champion,
                    "this replica's config names another champion than the shared store; following the store"
                );
            }
            tracing::info!(route = %route, origin = %origin, champion = %rollout.champion, "rollout followed from the shared store");
        }
        Ok(())
    }

    /// Competes for the lead; the winner takes over the flywheel's work until it loses its claim.
    async fn contend(self: Arc<Self>) {
        loop {
            let claim = tokio::select! {
                _ = self.stop.cancelled() => return,
                c = self.db.try_claim(LEADER) => c,
            };
            match claim {
                Ok(Some(claim)) => {
                    self.leading.store(true, Ordering::Relaxed);
                    metrics::gauge!("flywheel_leader").set(1.0);
                    tracing::info!("this replica leads the flywheel");
                    let me = self.clone();
                    match tokio::task::spawn_blocking(move || me.take_over()).await {
                        Ok(Ok(runs)) => {
                            for run in runs {
                                self.spawn_run(run);
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "taking over the flywheel failed")
                        }
                        Err(e) => tracing::error!(error = %e, "taking over the flywheel panicked"),
                    }
                    loop {
                        tokio::select! {
                            _ = self.stop.cancelled() => return,
                            _ = tokio::time::sleep(LEAD_CHECK) => {}
                        }
                        if !claim.held().await {
                            self.leading.store(false, Ordering::Relaxed);
                            metrics::gauge!("flywheel_leader").set(0.0);
                            tracing::error!("this replica lost the flywheel's lead (its store connection ended); another may take it");
                            break;
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot compete for the flywheel's lead"),
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(LEAD_CHECK) => {}
            }
        }
    }

    /// What a new leader does first: the restore a single gateway does at start (the config's
    /// changes applied, rollouts installed and published, unfinished runs resumed), and the
    /// jobs of replicas that stopped adopted.
    fn take_over(&self) -> Result<Vec<fstore::Run>, FlywheelError> {
        let runs = self.restore()?;
        let conn = self.conn()?;
        for route in self.flywheel_routes() {
            let state = self.state(&conn, &route.name)?;
            self.publish(&conn, &route.name, &state.installed, "flywheel")?;
        }
        self.adopt_jobs(&conn);
        Ok(runs)
    }

    /// Queues the unfinished customization jobs no live replica runs.
    pub(super) fn adopt_jobs(&self, conn: &crate::store::Conn) {
        if !self.replicated() {
            return;
        }
        match self.jobs.adopt_unfinished(conn) {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "queued unfinished jobs of other replicas"),
            Err(e) => tracing::warn!(error = %e, "cannot adopt unfinished jobs"),
        }
    }

    /// The running runs no task of this replica executes (a stopped leader's, or queued by a
    /// follower's trigger).
    pub(super) fn orphaned_runs(
        &self,
        conn: &crate::store::Conn,
    ) -> Result<Vec<fstore::Run>, FlywheelError> {
        let running = lock(&self.running).clone();
        Ok(fstore::running_runs(conn)?
            .into_iter()
            .filter(|r| !running.contains(&r.route) && self.route(&r.route).is_ok())
            .collect())
    }
}
