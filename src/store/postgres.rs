//! The store on PostgreSQL (14 or newer): a pool of connections (deadpool over tokio-postgres),
//! the schema's migrations in PostgreSQL's dialect (numbered as SQLite's, the same tables and
//! columns), and what only a shared server gives replicas: notifications and advisory locks.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::sql::Conn;
use super::StoreError;

/// How long a connection attempt may take before the server counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a caller waits for a free connection.
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Migrations in PostgreSQL's dialect, one per SQLite migration (`super::MIGRATIONS`), applied in
/// order; `flywheel_schema.version` records how many have run. Integers are BIGINT (SQLite's are
/// 64-bit), booleans 0 and 1 as in SQLite, JSON text.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE traffic (
    id TEXT PRIMARY KEY,
    ts_ms BIGINT NOT NULL,
    workload_id TEXT,
    client_id TEXT,
    session_id TEXT,
    route TEXT NOT NULL,
    target_kind TEXT,
    target TEXT,
    target_model TEXT,
    adapter TEXT,
    arm TEXT NOT NULL,
    shadow_of TEXT,
    attempts BIGINT NOT NULL DEFAULT 1,
    stream BIGINT NOT NULL,
    status BIGINT NOT NULL,
    error TEXT,
    latency_ms DOUBLE PRECISION NOT NULL,
    ttft_ms DOUBLE PRECISION,
    upstream_ms DOUBLE PRECISION,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    total_tokens BIGINT,
    finish_reason TEXT,
    rails TEXT,
    tool_name_agreement BIGINT,
    tool_args_agreement BIGINT,
    request TEXT NOT NULL,
    response TEXT
);
CREATE INDEX traffic_ts ON traffic(ts_ms);
CREATE INDEX traffic_route_ts ON traffic(route, ts_ms);
CREATE INDEX traffic_workload_ts ON traffic(workload_id, ts_ms);
CREATE INDEX traffic_shadow_of ON traffic(shadow_of) WHERE shadow_of IS NOT NULL;
CREATE TABLE tool_calls (
    traffic_id TEXT NOT NULL REFERENCES traffic(id) ON DELETE CASCADE,
    choice_index BIGINT NOT NULL,
    call_index BIGINT NOT NULL,
    call_id TEXT,
    name TEXT NOT NULL,
    arguments TEXT NOT NULL,
    arguments_valid_json BIGINT NOT NULL,
    PRIMARY KEY (traffic_id, choice_index, call_index)
);
CREATE INDEX tool_calls_name ON tool_calls(name);
"#,
    r#"
CREATE TABLE namespaces (
    id TEXT PRIMARY KEY,
    description TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE datasets (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT,
    files_url TEXT NOT NULL,
    project TEXT,
    format TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    status_details TEXT NOT NULL,
    result TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX jobs_kind ON jobs(kind, created_at);
"#,
    r#"
CREATE TABLE flywheel_runs (
    id TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    trigger TEXT NOT NULL,
    status TEXT NOT NULL,
    stage TEXT NOT NULL,
    details TEXT NOT NULL,
    decision TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    finished_ms BIGINT
);
CREATE INDEX flywheel_runs_route ON flywheel_runs(route, created_ms);
CREATE TABLE flywheel_routes (
    route TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE TABLE rollout_events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    route TEXT NOT NULL,
    run_id TEXT,
    at_ms BIGINT NOT NULL,
    from_stage TEXT NOT NULL,
    to_stage TEXT NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    numbers TEXT NOT NULL
);
CREATE INDEX rollout_events_route ON rollout_events(route, at_ms);
CREATE INDEX traffic_route_arm_ts ON traffic(route, arm, ts_ms);
"#,
    r#"
CREATE TABLE guardrail_configs (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT,
    data TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);
"#,
    r#"
ALTER TABLE traffic ADD COLUMN api TEXT NOT NULL DEFAULT 'chat';
ALTER TABLE traffic ADD COLUMN wire_request TEXT;
CREATE TABLE responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    model TEXT NOT NULL,
    traffic_id TEXT,
    previous_id TEXT,
    input_items TEXT NOT NULL,
    conversation TEXT NOT NULL,
    response TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE traffic ADD COLUMN episode_id TEXT;
CREATE INDEX traffic_episode ON traffic (episode_id);
CREATE TABLE feedback (
    id TEXT PRIMARY KEY,
    ts_ms BIGINT NOT NULL,
    key_name TEXT NOT NULL,
    request_id TEXT,
    episode_id TEXT,
    metric TEXT,
    value DOUBLE PRECISION,
    comment TEXT,
    demonstration TEXT
);
CREATE INDEX feedback_request ON feedback (request_id, ts_ms) WHERE request_id IS NOT NULL;
CREATE INDEX feedback_episode ON feedback (episode_id, ts_ms) WHERE episode_id IS NOT NULL;
"#,
    r#"
CREATE TABLE traffic_minutes (
    minute_ms BIGINT NOT NULL,
    route TEXT NOT NULL,
    arm TEXT NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    blocked BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    compared BIGINT NOT NULL,
    agreed_names BIGINT NOT NULL,
    agreed_args BIGINT NOT NULL,
    parse_failures BIGINT NOT NULL,
    latency TEXT NOT NULL,
    ttft TEXT NOT NULL,
    overhead TEXT NOT NULL,
    rails TEXT NOT NULL,
    PRIMARY KEY (minute_ms, route, arm)
);
CREATE INDEX traffic_errors_ts ON traffic (ts_ms) WHERE status >= 400;
"#,
    // SQLite's row ids become the `seq` column (time-ordered the same way); the text index is a
    // table searched with ILIKE, served by a trigram index where the server has pg_trgm.
    r#"
ALTER TABLE traffic ADD COLUMN seq BIGINT;
UPDATE traffic SET seq = k.new
FROM (SELECT id, ts_ms * 1048576 + row_number() OVER (PARTITION BY ts_ms ORDER BY id) - 1 AS new
      FROM traffic) AS k
WHERE traffic.id = k.id;
ALTER TABLE traffic ALTER COLUMN seq SET NOT NULL;
ALTER TABLE traffic ADD CONSTRAINT traffic_seq_unique UNIQUE (seq);
CREATE SEQUENCE traffic_in_ms;
CREATE TABLE traffic_hours (
    hour_ms BIGINT NOT NULL,
    route TEXT NOT NULL,
    arm TEXT NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    blocked BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    compared BIGINT NOT NULL,
    agreed_names BIGINT NOT NULL,
    agreed_args BIGINT NOT NULL,
    parse_failures BIGINT NOT NULL,
    latency TEXT NOT NULL,
    ttft TEXT NOT NULL,
    overhead TEXT NOT NULL,
    rails TEXT NOT NULL,
    PRIMARY KEY (hour_ms, route, arm)
);
CREATE INDEX traffic_errors_route_ts ON traffic (route, ts_ms) WHERE status >= 400;
CREATE TABLE traffic_text (
    seq BIGINT PRIMARY KEY REFERENCES traffic(seq) ON DELETE CASCADE,
    body TEXT NOT NULL
);
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE INDEX traffic_text_trigrams ON traffic_text USING gin (body gin_trgm_ops)
        WITH (fastupdate = on, gin_pending_list_limit = 65536);
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'pg_trgm is not available: text searches scan the index table';
END
$$;
"#,
    r#"
CREATE TABLE route_rollouts (
    route TEXT PRIMARY KEY,
    rollout TEXT NOT NULL,
    origin TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE UNIQUE INDEX flywheel_runs_one_running ON flywheel_runs (route) WHERE status = 'running';
"#,
];

/// The store's PostgreSQL server: a pool, and the runtime its connections live on.
pub struct Postgres {
    pool: Pool,
    config: tokio_postgres::Config,
    rt: tokio::runtime::Handle,
    shown: String,
}

impl Postgres {
    /// Connects (once, to fail early with the cause), and brings the schema up to date.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Connect(format!(
                "the store URL '{}' is not a valid PostgreSQL URL: {e}",
                redact(url)
            ))
        })?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("flywheel");
        let shown = redact(url);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Connect(format!("PostgreSQL pool for {shown}: {e}")))?;
        let me = Self {
            pool,
            config,
            rt: tokio::runtime::Handle::current(),
            shown,
        };
        let client = me.pool.get().await.map_err(|e| me.unreachable(e))?;
        migrate(&client).await?;
        Ok(me)
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Connect(format!("cannot reach PostgreSQL at {}: {e}", self.shown))
    }

    /// The URL without its password.
    pub fn describe(&self) -> String {
        self.shown.clone()
    }

    /// A pooled connection, for a blocking thread.
    pub fn get(&self) -> Result<Conn, StoreError> {
        let client =
            super::sql::wait(&self.rt, self.pool.get()).map_err(|e| self.unreachable(e))?;
        Ok(Conn::postgres(client, self.rt.clone()))
    }

    /// A connection of its own, outside the pool (for LISTEN, and for session advisory locks,
    /// which must stay on one connection for as long as they are held). Its driver task runs on
    /// the runtime; `notices` receives what the server sends unasked (notifications).
    pub async fn dedicated(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
        ),
        StoreError,
    > {
        let (client, mut connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(|e| self.unreachable(e))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.rt.spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
                match m {
                    Ok(m) => {
                        if tx.send(m).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "a dedicated PostgreSQL connection ended");
                        break;
                    }
                }
            }
        });
        Ok((client, rx))
    }
}

/// A session advisory lock held on a connection of its own: the server gives it back when the
/// connection ends (this dropped, or the process gone).
pub struct PgClaim {
    client: tokio_postgres::Client,
}

impl PgClaim {
    pub async fn held(&self) -> bool {
        !self.client.is_closed() && self.client.simple_query("SELECT 1").await.is_ok()
    }
}

/// The advisory lock key of a claim's name.
fn claim_key(name: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(name.as_bytes());
    i64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

impl Postgres {
    pub async fn try_claim(&self, name: &str) -> Result<Option<PgClaim>, StoreError> {
        let (client, _) = self.dedicated().await?;
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&claim_key(name)])
            .await?
            .get(0);
        Ok(got.then_some(PgClaim { client }))
    }

    pub fn try_claim_blocking(&self, name: &str) -> Result<Option<PgClaim>, StoreError> {
        super::sql::wait(&self.rt, self.try_claim(name))
    }
}

/// `url` with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    // postgres://user:password@host/db: the password sits between the first ':' after the
    // scheme and the last '@' of the authority.
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Whether the URL carries a password.
pub fn has_password(url: &str) -> bool {
    redact(url) != url
}

/// Applies the migrations not applied yet, in one transaction each, under an advisory lock so
/// replicas starting together migrate once.
async fn migrate(client: &deadpool_postgres::Object) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS flywheel_schema (version BIGINT NOT NULL);
             SELECT pg_advisory_lock(7201);",
        )
        .await?;
    let result = migrate_locked(client).await;
    let unlocked = client
        .batch_execute("SELECT pg_advisory_unlock(7201)")
        .await;
    result?;
    unlocked?;
    Ok(())
}

async fn migrate_locked(client: &deadpool_postgres::Object) -> Result<(), StoreError> {
    let found: Option<i64> = client
        .query_opt("SELECT max(version) FROM flywheel_schema", &[])
        .await?
        .and_then(|r| r.get(0));
    let version = found.unwrap_or(0);
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            path: "the PostgreSQL store".into(),
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let v = i as i64 + 1;
        let applied = client
            .batch_execute(&format!(
                "BEGIN; {sql}; DELETE FROM flywheel_schema; INSERT INTO flywheel_schema VALUES ({v}); COMMIT;"
            ))
            .await;
        if let Err(e) = applied {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(StoreError::Connect(format!(
                "PostgreSQL migration {v} failed: {e}"
            )));
        }
        tracing::info!(version = v, "applied PostgreSQL migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("postgres://fly:s3cret@db.internal:5432/flywheel"),
            "postgres://fly:***@db.internal:5432/flywheel"
        );
        assert_eq!(
            redact("postgres://fly@db:5432/flywheel"),
            "postgres://fly@db:5432/flywheel"
        );
        assert!(has_password("postgresql://a:b@h/d"));
        assert!(!has_password("host=localhost user=x"));
    }

    #[test]
    fn there_is_a_postgres_migration_for_each_sqlite_one() {
        assert_eq!(MIGRATIONS.len(), super::super::MIGRATIONS.len());
    }
}
