//! `flywheel serve`: wires config, store, backends, gateway and HTTP together, and shuts them down
//! in order (stop accepting → finish requests and streams → finish shadows → drain the log).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::sync::Semaphore;

use crate::api::auth::Authenticator;
use crate::api::{self, AppState};
use crate::backend::local::LocalBackend;
use crate::backend::upstream::Upstream;
use crate::backend::Backend;
use crate::config::{BackendKey, Config};
use crate::engine::Engine;
use crate::flywheel::controller::FlywheelController;
use crate::flywheel::jobs::{JobContext, JobRunner};
use crate::gateway::Gateway;
use crate::store::traffic::{TrafficLog, TrafficWriter};
use crate::store::Db;

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];

pub fn run(
    config_path: &Path,
    listen: Option<SocketAddr>,
    data_dir: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let mut config = Config::load(config_path)?;
    if let Some(l) = listen {
        config.listen = l;
    }
    if let Some(d) = data_dir {
        config.data_dir = d;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("flywheel")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let db = Db::from_config(&config)
        .await
        .context("cannot open the store")?;
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .context("invalid metric buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let writer = open_traffic_log(&config, &db)?;
    let log = writer
        .as_ref()
        .map_or_else(TrafficLog::disabled, |w| w.log());
    let (backends, engines) = start_backends(&config).await?;
    let jobs = start_jobs(&config, &engines, &db);
    let gateway = Arc::new(Gateway::new(config.clone(), backends, log));
    install_stored_guardrails(&config, &gateway, jobs.is_some(), &db).await?;
    if let Some(j) = &jobs {
        if let Err(e) = crate::flywheel::evaluation::resume_unfinished(&gateway, j) {
            tracing::warn!(error = %e, "cannot resume interrupted evaluation jobs");
        }
    }
    let flywheel = start_flywheel(&config, &gateway, jobs.as_ref(), &engines, &db).await?;
    let responses = match crate::store::responses::ResponseStore::open(&db, !config.log.enabled) {
        Ok(s) => Some(Arc::new(s)),
        Err(e) => {
            tracing::warn!(error = %e, "stored responses are unavailable");
            None
        }
    };
    let state = Arc::new(AppState {
        gateway: gateway.clone(),
        auth: Authenticator::new(&config.auth),
        metrics: Some(metrics),
        inflight: Arc::new(Semaphore::new(config.server.max_inflight_requests)),
        body_limit: config.server.body_limit_bytes,
        max_inflight: config.server.max_inflight_requests,
        ready: AtomicBool::new(false),
        adapter_dirs: config.adapter_dirs(),
        engines,
        db: (jobs.is_some() || config.log.enabled).then(|| db.clone()),
        jobs,
        flywheel: flywheel.clone(),
        responses,
    });
    listen(&config, state).await?;
    drain(&config, flywheel, &gateway, writer).await;
    tracing::info!("flywheel stopped");
    Ok(())
}

/// The traffic log's writer, unless the config turns logging off.
fn open_traffic_log(config: &Config, db: &Db) -> anyhow::Result<Option<TrafficWriter>> {
    if !config.log.enabled {
        tracing::warn!("traffic logging is disabled in the config");
        return Ok(None);
    }
    let w = TrafficLog::start(
        db,
        config.log.queue_capacity,
        config.log.batch_size(db.dialect()),
        Duration::from_millis(config.log.flush_interval_ms),
    )
    .with_context(|| format!("cannot open the traffic log at {}", db.describe()))?;
    tracing::info!(store = %db.describe(), "traffic log open");
    Ok(Some(w))
}

type Backends = HashMap<BackendKey, Arc<dyn Backend>>;

/// Every upstream, and every local model loaded into an engine (off the async threads).
async fn start_backends(config: &Config) -> anyhow::Result<(Backends, Vec<Arc<Engine>>)> {
    let mut backends: Backends = HashMap::new();
    for u in &config.upstreams {
        let up = Upstream::new(u).map_err(anyhow::Error::msg)?;
        backends.insert(BackendKey::Upstream(u.name.clone()), Arc::new(up));
    }
    let mut engines = Vec::new();
    for m in &config.models {
        let cfg = m.clone();
        let engine = tokio::task::spawn_blocking(move || Engine::load(&cfg)).await??;
        backends.insert(
            BackendKey::Local(m.name.clone()),
            Arc::new(LocalBackend::new(engine.clone())),
        );
        engines.push(engine);
    }
    if !config.models.is_empty() {
        for d in &config.adapter_dirs() {
            if let Err(e) = std::fs::create_dir_all(d) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot create the adapter directory");
            }
        }
    }
    Ok((backends, engines))
}

/// The customization job runner; without it (no usable data directory) the entity, job and
/// flywheel endpoints answer 503.
fn start_jobs(config: &Config, engines: &[Arc<Engine>], db: &Db) -> Option<Arc<JobRunner>> {
    match JobRunner::start(JobContext {
        db: db.clone(),
        data_dir: config.data_dir.clone(),
        models: config.models.clone(),
        engines: engines.to_vec(),
        max_yield: Duration::from_millis(config.flywheel.max_yield_ms),
    }) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "customization jobs are unavailable");
            None
        }
    }
}

/// Guardrail configs created through the API in an earlier life of the gateway.
async fn install_stored_guardrails(
    config: &Config,
    gateway: &Gateway,
    has_store: bool,
    db: &Db,
) -> anyhow::Result<()> {
    let stored = if config.log.enabled || has_store {
        db.call(crate::store::guardrails::list).await?
    } else {
        Vec::new()
    };
    gateway
        .install_guardrails(&stored)
        .map_err(anyhow::Error::msg)
}

/// The flywheel, when there is a traffic log to learn from and a job runner to train with.
async fn start_flywheel(
    config: &Arc<Config>,
    gateway: &Arc<Gateway>,
    jobs: Option<&Arc<JobRunner>>,
    engines: &[Arc<Engine>],
    db: &Db,
) -> anyhow::Result<Option<Arc<FlywheelController>>> {
    match (jobs, config.log.enabled) {
        (Some(j), true) => Ok(Some(
            FlywheelController::start(
                config.clone(),
                gateway.clone(),
                j.clone(),
                engines.to_vec(),
                db.clone(),
            )
            .await
            .context("cannot start the flywheel")?,
        )),
        _ => {
            if config.routes.iter().any(|r| r.flywheel.is_some()) {
                tracing::warn!("routes have a flywheel section, but the flywheel needs the traffic log and the job runner; it is off");
            }
            Ok(None)
        }
    }
}

/// Serves HTTP(S) until a shutdown signal, then until in-flight requests finish or the grace
/// period ends.
async fn listen(config: &Config, state: Arc<AppState>) -> anyhow::Result<()> {
    let tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(c), Some(k)) => Some(api::server::tls_acceptor(c, k).map_err(anyhow::Error::msg)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    if config.auth.keys.is_empty() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "no API keys are configured and the gateway listens beyond loopback: every non-loopback request will be refused");
    }
    tracing::info!(
        %addr,
        tls = tls.is_some(),
        routes = config.routes.len(),
        upstreams = config.upstreams.len(),
        cpu = %crate::ops::cpu::features().describe(),
        "flywheel listening on {}://{addr}",
        if tls.is_some() { "https" } else { "http" }
    );
    state.ready.store(true, Ordering::Relaxed);
    let shutdown_state = state.clone();
    let shutdown = async move {
        wait_for_signal().await;
        shutdown_state.ready.store(false, Ordering::Relaxed);
        tracing::info!("shutdown requested");
    };
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    api::server::serve(listener, api::router(state), tls, shutdown, grace).await;
    Ok(())
}

/// After the listener closed: stop the flywheel, let streams and shadows finish (they write their
/// own log records), then drain the traffic log.
async fn drain(
    config: &Config,
    flywheel: Option<Arc<FlywheelController>>,
    gateway: &Gateway,
    writer: Option<TrafficWriter>,
) {
    if let Some(f) = &flywheel {
        f.shutdown().await;
    }
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    gateway.tasks().close();
    if tokio::time::timeout(grace, gateway.tasks().wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks still running after the grace period");
    }
    if let Some(w) = writer {
        let queued = gateway.log().depth();
        w.close().await;
        tracing::info!(queued, "traffic log drained");
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
