//! The SQLite store: schema and migrations, the traffic log, entities, flywheel state and the
//! Responses API's stored responses. Nothing else opens the database.

pub mod entities;
pub mod feedback;
pub mod guardrails;
pub mod postgres;
pub mod responses;
pub mod rollup;
pub mod runs;
pub mod search;
pub mod sql;
pub mod traffic;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

pub use sql::{Conn, Dialect};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot create data directory '{path}': {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("the database at '{path}' has schema version {found}, newer than this binary knows ({known}); upgrade flywheel")]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("a database task failed: {0}")]
    Task(String),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Connect(String),
    #[error("database column: {0}")]
    Column(String),
}

impl StoreError {
    /// Whether a unique index refused the row (in either engine).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            }
            StoreError::Postgres(e) => e.code().is_some_and(|c| c.code() == "23505"),
            _ => false,
        }
    }

    /// Whether the store could not be reached (a PostgreSQL server gone away or restarting), as
    /// opposed to a statement that failed: the same work may succeed once it is back.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Connect(_) => true,
            StoreError::Postgres(e) => {
                let code = e.code().map(|c| c.code()).unwrap_or_default();
                e.is_closed()
                    || code.starts_with("08")
                    || ["57P01", "57P02", "57P03"].contains(&code)
                    || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
            }
            _ => false,
        }
    }
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many have run.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE traffic (
    id TEXT PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
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
    attempts INTEGER NOT NULL DEFAULT 1,
    stream INTEGER NOT NULL,
    status INTEGER NOT NULL,
    error TEXT,
    latency_ms REAL NOT NULL,
    ttft_ms REAL,
    upstream_ms REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    total_tokens INTEGER,
    finish_reason TEXT,
    rails TEXT,
    tool_name_agreement INTEGER,
    tool_args_agreement INTEGER,
    request TEXT NOT NULL,
    response TEXT
);
CREATE INDEX traffic_ts ON traffic(ts_ms);
CREATE INDEX traffic_route_ts ON traffic(route, ts_ms);
CREATE INDEX traffic_workload_ts ON traffic(workload_id, ts_ms);
CREATE INDEX traffic_shadow_of ON traffic(shadow_of) WHERE shadow_of IS NOT NULL;
CREATE TABLE tool_calls (
    traffic_id TEXT NOT NULL REFERENCES traffic(id) ON DELETE CASCADE,
    choice_index INTEGER NOT NULL,
    call_index INTEGER NOT NULL,
    call_id TEXT,
    name TEXT NOT NULL,
    arguments TEXT NOT NULL,
    arguments_valid_json INTEGER NOT NULL,
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
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE INDEX flywheel_runs_route ON flywheel_runs(route, created_ms);
CREATE TABLE flywheel_routes (
    route TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE rollout_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    route TEXT NOT NULL,
    run_id TEXT,
    at_ms INTEGER NOT NULL,
    from_stage TEXT NOT NULL,
    to_stage TEXT NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    numbers TEXT NOT NULL
);
CREATE INDEX rollout_events_route ON rollout_events(route, at_ms);
CREATE INDEX traffic_route_arm_ts ON traffic(route, arm, ts_ms);
"#,
    // 4: guardrail configs created through the API (those declared in the config file are not stored).
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
    // 5: the door each request came through, the client's own body where the door translated it,
    // and the Responses API's stored responses (written whole in one statement, so never half).
    r#"
ALTER TABLE traffic ADD COLUMN api TEXT NOT NULL DEFAULT 'chat';
ALTER TABLE traffic ADD COLUMN wire_request TEXT;
CREATE TABLE responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
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
    ts_ms INTEGER NOT NULL,
    key_name TEXT NOT NULL,
    request_id TEXT,
    episode_id TEXT,
    metric TEXT,
    value REAL,
    comment TEXT,
    demonstration TEXT
);
CREATE INDEX feedback_request ON feedback (request_id, ts_ms) WHERE request_id IS NOT NULL;
CREATE INDEX feedback_episode ON feedback (episode_id, ts_ms) WHERE episode_id IS NOT NULL;
"#,
    // 7: per-minute rollups of the traffic, kept by the writer with the rows (see store::rollup).
    r#"
CREATE TABLE traffic_minutes (
    minute_ms INTEGER NOT NULL,
    route TEXT NOT NULL,
    arm TEXT NOT NULL,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    blocked INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    compared INTEGER NOT NULL,
    agreed_names INTEGER NOT NULL,
    agreed_args INTEGER NOT NULL,
    parse_failures INTEGER NOT NULL,
    latency TEXT NOT NULL,
    ttft TEXT NOT NULL,
    overhead TEXT NOT NULL,
    rails TEXT NOT NULL,
    PRIMARY KEY (minute_ms, route, arm)
);
CREATE INDEX traffic_errors_ts ON traffic (ts_ms) WHERE status >= 400;
"#,
    // 8: traffic row ids that follow time (see traffic::ROWS_PER_MS), the full-text index of
    // what each exchange added (see store::search) and hourly rollups; `after_migration` fills
    // both from what is already there, and rolls up rows older than 7.
    r#"
UPDATE traffic SET rowid = -rowid;
UPDATE traffic SET rowid = k.new
FROM (SELECT rowid AS old,
             ts_ms * 1048576 + row_number() OVER (PARTITION BY ts_ms ORDER BY rowid DESC) - 1 AS new
      FROM traffic) AS k
WHERE traffic.rowid = k.old;
CREATE TABLE traffic_hours (
    hour_ms INTEGER NOT NULL,
    route TEXT NOT NULL,
    arm TEXT NOT NULL,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    blocked INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    compared INTEGER NOT NULL,
    agreed_names INTEGER NOT NULL,
    agreed_args INTEGER NOT NULL,
    parse_failures INTEGER NOT NULL,
    latency TEXT NOT NULL,
    ttft TEXT NOT NULL,
    overhead TEXT NOT NULL,
    rails TEXT NOT NULL,
    PRIMARY KEY (hour_ms, route, arm)
);
CREATE INDEX traffic_errors_route_ts ON traffic (route, ts_ms) WHERE status >= 400;
CREATE VIRTUAL TABLE traffic_text USING fts5(
    body, content = '', contentless_delete = 1, tokenize = 'trigram'
);
CREATE TRIGGER traffic_text_forget AFTER DELETE ON traffic BEGIN
    DELETE FROM traffic_text WHERE rowid = old.rowid;
END;
"#,
    // 9: the rollout each route serves, as replicas on one store share it (see
    // flywheel::controller::replicas), and at most one running flywheel run per route.
    r#"
CREATE TABLE route_rollouts (
    route TEXT PRIMARY KEY,
    rollout TEXT NOT NULL,
    origin TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX flywheel_runs_one_running ON flywheel_runs (route) WHERE status = 'running';
"#,
];

/// Work a migration needs beyond its SQL, run in its transaction: filling what it created from
/// the rows already there.
fn after_migration(version: usize, tx: &Conn) -> Result<(), StoreError> {
    if version == 8 {
        // Hours from the minutes first: the rows rolled up next add to both.
        rollup::hours_from_minutes(tx)?;
        let rolled = rollup::roll_up_existing(tx)?;
        let indexed = search::index_existing(tx)?;
        if rolled + indexed > 0 {
            tracing::info!(
                rolled_up = rolled,
                indexed,
                "rolled up and indexed the traffic logged before this version"
            );
        }
    }
    Ok(())
}

/// A connection for a command-line tool (which runs no async runtime of its own) to the store a
/// config names; on PostgreSQL it brings a small runtime for the connection.
pub struct ToolConn {
    pub conn: Conn,
    // Dropped after the connection.
    _runtime: Option<tokio::runtime::Runtime>,
}

impl ToolConn {
    pub fn open(config: &crate::config::Config) -> Result<Self, StoreError> {
        let url = config
            .store
            .postgres_url()
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        let Some(url) = url else {
            return Ok(Self {
                conn: open(&config.db_path())?,
                _runtime: None,
            });
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let db = runtime.block_on(Db::postgres(&url, 2))?;
        Ok(Self {
            conn: db.open()?,
            _runtime: Some(runtime),
        })
    }
}

/// A claim taken with [`Db::try_claim`]; given back when dropped.
pub struct Claim(Option<postgres::PgClaim>);

impl Claim {
    /// Whether the claim is still held (its connection alive).
    pub async fn held(&self) -> bool {
        match &self.0 {
            None => true,
            Some(c) => c.held().await,
        }
    }
}

/// Opens (creating if needed) an SQLite database and brings its schema up to date.
pub fn open(path: &Path) -> Result<Conn, StoreError> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
    }
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let conn = Conn::sqlite(conn);
    migrate(&conn, path)?;
    Ok(conn)
}

/// SQLite connections kept open between calls by a [`Db`]; more run at once when needed.
const IDLE_CONNECTIONS: usize = 4;

/// The store as the gateway uses it: an SQLite file (the default) or a PostgreSQL database, and
/// the connections to it. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    engine: Arc<Engine>,
}

enum Engine {
    Sqlite {
        path: PathBuf,
        idle: Mutex<Vec<Conn>>,
    },
    Postgres(Box<postgres::Postgres>),
}

impl Db {
    /// The SQLite database at `path`, opened (and its schema brought up to date) on first use.
    pub fn new(path: PathBuf) -> Self {
        Self {
            engine: Arc::new(Engine::Sqlite {
                path,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The PostgreSQL database at `url`: connects once (so a bad URL or an unreachable server is
    /// an error here, naming it) and brings the schema up to date.
    pub async fn postgres(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        let pg = postgres::Postgres::connect(url, pool_size).await?;
        Ok(Self {
            engine: Arc::new(Engine::Postgres(Box::new(pg))),
        })
    }

    /// The store a config names: `[store] url`, else `flywheel.db` in the data directory.
    pub async fn from_config(config: &crate::config::Config) -> Result<Self, StoreError> {
        let url = config
            .store
            .postgres_url()
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        match url {
            Some(url) => Self::postgres(&url, config.store.pool_size).await,
            None => Ok(Self::new(config.db_path())),
        }
    }

    pub fn dialect(&self) -> Dialect {
        match &*self.engine {
            Engine::Sqlite { .. } => Dialect::Sqlite,
            Engine::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Where the store is, for logs and errors (a PostgreSQL URL without its password).
    pub fn describe(&self) -> String {
        match &*self.engine {
            Engine::Sqlite { path, .. } => path.display().to_string(),
            Engine::Postgres(pg) => pg.describe(),
        }
    }

    /// The SQLite file, if the store is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &*self.engine {
            Engine::Sqlite { path, .. } => Some(path),
            Engine::Postgres(_) => None,
        }
    }

    /// The PostgreSQL side, if the store is one (for what only it has: notifications, locks).
    pub fn as_postgres(&self) -> Option<&postgres::Postgres> {
        match &*self.engine {
            Engine::Sqlite { .. } => None,
            Engine::Postgres(pg) => Some(pg),
        }
    }

    /// Takes the named claim (a PostgreSQL advisory lock held on a connection of its own) if no
    /// one holds it; None if another replica does. On SQLite (one process) it is always granted.
    /// Dropping the claim gives it back; so does the death of the process holding it.
    pub async fn try_claim(&self, name: &str) -> Result<Option<Claim>, StoreError> {
        match &*self.engine {
            Engine::Sqlite { .. } => Ok(Some(Claim(None))),
            Engine::Postgres(pg) => Ok(pg.try_claim(name).await?.map(|c| Claim(Some(c)))),
        }
    }

    /// `try_claim` from blocking code.
    pub fn try_claim_blocking(&self, name: &str) -> Result<Option<Claim>, StoreError> {
        match &*self.engine {
            Engine::Sqlite { .. } => Ok(Some(Claim(None))),
            Engine::Postgres(pg) => Ok(pg.try_claim_blocking(name)?.map(|c| Claim(Some(c)))),
        }
    }

    /// A connection, for a blocking thread (never an async worker: on PostgreSQL this waits for
    /// the pool).
    pub fn open(&self) -> Result<Conn, StoreError> {
        match &*self.engine {
            Engine::Sqlite { path, idle } => {
                let kept = idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
                match kept {
                    Some(c) => Ok(c),
                    None => open(path),
                }
            }
            Engine::Postgres(pg) => pg.get(),
        }
    }

    /// Hands a connection back for the next call.
    fn keep(&self, conn: Conn) {
        if let Engine::Sqlite { idle, .. } = &*self.engine {
            let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < IDLE_CONNECTIONS {
                idle.push(conn);
            }
        }
        // A PostgreSQL connection goes back to its pool when dropped.
    }

    /// Runs `work` on a connection, off the async threads. A connection that was in use when
    /// `work` panicked is closed, not reused.
    pub async fn call<T, E>(
        &self,
        work: impl FnOnce(&Conn) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let db = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let conn = db.open()?;
            let out = work(&conn);
            db.keep(conn);
            out
        });
        match task.await {
            Ok(out) => out,
            Err(e) => Err(StoreError::Task(e.to_string()).into()),
        }
    }
}

/// Stores for tests: the store test suite runs each test on SQLite and on PostgreSQL.
#[cfg(any(test, feature = "testing"))]
#[allow(clippy::panic)]
pub mod testing {
    use super::{Conn, Db};

    /// The environment variable naming a PostgreSQL server for tests (`postgres://...`); the
    /// test script starts one and sets it.
    pub const POSTGRES_ENV: &str = "FLYWHEEL_TEST_POSTGRES";

    /// The runtime the test databases' connections live on (one for the process, never dropped
    /// inside a test's own runtime).
    fn runtime() -> &'static tokio::runtime::Runtime {
        static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        RT.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .thread_name("test-postgres")
                .build()
                .unwrap_or_else(|e| panic!("test runtime: {e}"))
        })
    }

    /// The server's URL, or None after saying (once per test) that the PostgreSQL half is skipped.
    pub fn postgres_url(test: &str) -> Option<String> {
        match std::env::var(POSTGRES_ENV) {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                println!("{test}: skipped on PostgreSQL ({POSTGRES_ENV} is not set; scripts/test.sh starts a server and sets it)");
                None
            }
        }
    }

    /// A new, empty database on the test server, migrated, and its URL. Callable from any
    /// thread, async or not.
    pub fn fresh_postgres(test: &str) -> Option<(Db, String)> {
        let url = postgres_url(test)?;
        let db_url = create_database(&url, &format!("t_{}", uuid::Uuid::now_v7().simple()));
        let opened = db_url.clone();
        let made = std::thread::spawn(move || runtime().block_on(Db::postgres(&opened, 4)));
        let db = made
            .join()
            .unwrap_or_else(|_| panic!("opening a test database failed"))
            .unwrap_or_else(|e| panic!("{e}"));
        Some((db, db_url))
    }

    /// Creates the database `name` on the server at `server_url` (a URL naming any database of
    /// it) and returns its URL. Callable from any thread, async or not.
    pub fn create_database(server_url: &str, name: &str) -> String {
        let (url, name) = (server_url.to_string(), name.to_string());
        let made = std::thread::spawn(move || {
            runtime().block_on(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL at {url}: {e}"));
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
                let (base, _) = url.rsplit_once('/').unwrap_or((url.as_str(), ""));
                format!("{base}/{name}")
            })
        });
        made.join()
            .unwrap_or_else(|_| panic!("creating a test database failed"))
    }

    /// Runs `test` on a connection to a new SQLite database, then to a new PostgreSQL database
    /// (when a server is given). Blocking: call from a plain `#[test]`.
    pub fn each_engine(name: &str, test: impl Fn(&Conn)) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let sqlite = super::open(&dir.path().join("t.db")).unwrap_or_else(|e| panic!("{e}"));
        test(&sqlite);
        if let Some((db, _)) = fresh_postgres(name) {
            let conn = db.open().unwrap_or_else(|e| panic!("{e}"));
            test(&conn);
        }
    }

    /// The stores a test of the writer or the API runs on: a new SQLite file (kept in `dir`) and
    /// a new PostgreSQL database when a server is given.
    pub fn each_db(name: &str, dir: &std::path::Path) -> Vec<Db> {
        let mut dbs = vec![Db::new(dir.join("t.db"))];
        dbs.extend(fresh_postgres(name).map(|(db, _)| db));
        dbs
    }
}

fn migrate(conn: &Conn, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn.value("PRAGMA user_version", &[])?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            path: path.display().to_string(),
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        conn.transaction(|tx| {
            tx.batch(sql)?;
            after_migration(i + 1, tx)?;
            tx.batch(&format!("PRAGMA user_version = {}", i + 1))?;
            Ok::<_, StoreError>(())
        })?;
        tracing::info!(version = i + 1, "applied database migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("f.db");
        drop(open(&path).unwrap());
        let conn = open(&path).unwrap();
        let v: i64 = conn.value("PRAGMA user_version", &[]).unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        let mode: String = conn.value("PRAGMA journal_mode", &[]).unwrap();
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn a_handle_reuses_its_connections_and_survives_a_failed_call() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::new(dir.path().join("f.db"));
        db.call(|c| {
            c.batch("CREATE TEMP TABLE marker (x INTEGER); INSERT INTO marker VALUES (7);")
        })
        .await
        .unwrap();
        // A temporary table lives on its connection only: seeing it proves the reuse.
        let seen: i64 = db
            .call(|c| c.value("SELECT x FROM marker", &[]))
            .await
            .unwrap();
        assert_eq!(seen, 7);
        let failed = db
            .call(|c| c.execute("INSERT INTO no_such_table VALUES (1)", &[]))
            .await;
        assert!(failed.is_err());
        let version: i64 = db
            .call(|c| c.value("PRAGMA user_version", &[]))
            .await
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[test]
    fn traffic_logged_before_the_index_and_rollups_is_indexed_and_rolled_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..7] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 7).unwrap();
            // A minute rolled up since version 7, after the rows below were logged.
            conn.execute(
                "INSERT INTO traffic_minutes VALUES (120000, 'r', 'champion', 4, 0, 0, 0, 0, 0, 0, 0, 0,
                    '{}', '{}', '{}', '{\"checked\": 0, \"cached\": 0, \"blocked_by_category\": {}, \"flow_latency\": {}}')",
                [],
            )
            .unwrap();
            let request =
                serde_json::json!({"messages": [{"role": "user", "content": "an old question"}]});
            for (i, status) in [200, 200, 502].into_iter().enumerate() {
                conn.execute(
                    "INSERT INTO traffic (id, ts_ms, route, arm, stream, status, latency_ms, request, api,
                        prompt_tokens, completion_tokens)
                     VALUES (?1, ?2, 'r', 'champion', 0, ?3, 5.0, ?4, 'chat', 7, 3)",
                    rusqlite::params![format!("t{i}"), 60_000 + i as i64, status, request.to_string()],
                )
                .unwrap();
            }
        }
        let conn = open(&path).unwrap();
        // The rows were renumbered to follow time.
        let ids: Vec<(i64, String)> = conn
            .query("SELECT rowid, id FROM traffic ORDER BY rowid", &[], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        let per_ms = traffic::ROWS_PER_MS;
        assert_eq!(
            ids,
            [
                (60_000 * per_ms, "t0".to_string()),
                (60_001 * per_ms, "t1".into()),
                (60_002 * per_ms, "t2".into())
            ]
        );
        let minutes = rollup::minutes(&conn, 0, i64::MAX, None).unwrap();
        assert_eq!(minutes.len(), 2);
        let (minute, _, _, m) = &minutes[0];
        assert_eq!(*minute, 60_000);
        assert_eq!(
            (m.requests, m.errors, m.prompt_tokens, m.completion_tokens),
            (3, 1, 21, 9)
        );
        assert_eq!(m.latency.count(), 3);
        assert_eq!((minutes[1].0, minutes[1].3.requests), (120_000, 4));
        // The hour holds both: the stored minute and the rows rolled up now.
        let hours = rollup::rollups(&conn, rollup::Grain::Hour, 0, i64::MAX, None).unwrap();
        assert_eq!(hours.len(), 1);
        assert_eq!(
            (hours[0].0, hours[0].3.requests, hours[0].3.errors),
            (0, 7, 1)
        );
        let found = search::search(
            &conn,
            &search::TrafficQuery {
                text: Some("OLD QUESTION".into()),
                limit: 10,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(found.rows.len(), 3);
    }

    #[test]
    fn a_newer_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = open(&path).unwrap_err().to_string();
        assert!(err.contains("newer"), "{err}");
    }
}
