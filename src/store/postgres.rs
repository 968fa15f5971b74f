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

/// PostgreSQL's form of SQLite's migration `version` (`super::MIGRATIONS`), so both engines run
/// the same migrations, numbered alike: the same tables, columns and indexes, with PostgreSQL's
/// types (64-bit integers as SQLite's are, doubles for reals; booleans stay 0 and 1, JSON stays
/// text). Migration 8 is PostgreSQL's own: SQLite's row ids become the `seq` column, its FTS5
/// index a table searched with ILIKE.
fn migration(version: usize) -> Option<std::borrow::Cow<'static, str>> {
    if version == 8 {
        return Some(TEXT_AND_HOURS.into());
    }
    let sqlite = super::MIGRATIONS.get(version.checked_sub(1)?)?;
    let sql = sqlite.replace(
        " INTEGER PRIMARY KEY AUTOINCREMENT",
        " BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    );
    let words = |w: &str, by: &str, s: &str| -> String {
        regex::Regex::new(&format!(r"\b{w}\b"))
            .map(|re| re.replace_all(s, by).into_owned())
            .unwrap_or_else(|_| s.to_string())
    };
    let sql = words("INTEGER", "BIGINT", &sql);
    Some(words("REAL", "DOUBLE PRECISION", &sql).into())
}

/// Migration 8 on PostgreSQL: the time-ordered `seq` column (SQLite's row ids), hourly rollups,
/// and the text index as a table, served by a trigram index where the server has pg_trgm.
const TEXT_AND_HOURS: &str = r#"
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
"#;

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
    let known = super::MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            path: "the PostgreSQL store".into(),
            found: version,
            known,
        });
    }
    for v in version + 1..=known {
        let Some(sql) = migration(v as usize) else {
            return Err(StoreError::Connect(format!(
                "no PostgreSQL form of migration {v}"
            )));
        };
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
    fn each_sqlite_migration_has_a_postgres_form_in_its_types() {
        let n = super::super::MIGRATIONS.len();
        for v in 1..=n {
            let sql = migration(v).unwrap();
            assert!(
                !sql.contains(" INTEGER") && !sql.contains(" REAL"),
                "{v}: {sql}"
            );
        }
        assert!(migration(1)
            .unwrap()
            .contains("attempts BIGINT NOT NULL DEFAULT 1"));
        assert!(migration(1)
            .unwrap()
            .contains("latency_ms DOUBLE PRECISION NOT NULL"));
        assert!(migration(3)
            .unwrap()
            .contains("id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"));
        assert!(migration(n + 1).is_none() && migration(0).is_none());
    }
}
