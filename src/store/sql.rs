//! One way to speak SQL to either engine. Statements are written once with SQLite's numbered
//! placeholders (`?1`, `?2`); on PostgreSQL they become `$1`, `$2` and every parameter is sent
//! with its type (so a parameter used only in `?1 IS NULL` is still typed). Where the engines'
//! SQL differs (full-text search, JSON functions, row ids), the caller asks [`Conn::dialect`]
//! and writes each form.
//!
//! Values cross as three kinds: integers (booleans are 0 and 1 in both engines' tables), reals and
//! text (JSON is stored as text in both).

use std::borrow::Cow;
use std::cell::Cell;

use postgres_types::{to_sql_checked, IsNull, ToSql, Type};

use super::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The traffic table's time-ordered row id (see `traffic::ROWS_PER_MS`).
    pub fn seq(self) -> &'static str {
        match self {
            Dialect::Sqlite => "rowid",
            Dialect::Postgres => "seq",
        }
    }

    /// The text of a JSON text column's top-level `key` (a string's value, or an object's or
    /// array's JSON), NULL where it is missing.
    pub fn json_text(self, column: &str, key: &str) -> String {
        match self {
            Dialect::Sqlite => format!("json_extract({column}, '$.{key}')"),
            Dialect::Postgres => format!("({column}::jsonb ->> '{key}')"),
        }
    }
}

/// A statement's parameter.
#[derive(Debug, Clone)]
pub enum Arg<'a> {
    Int(Option<i64>),
    Real(Option<f64>),
    Text(Option<Cow<'a, str>>),
}

impl Arg<'_> {
    fn pg_type(&self) -> Type {
        match self {
            Arg::Int(_) => Type::INT8,
            Arg::Real(_) => Type::FLOAT8,
            Arg::Text(_) => Type::TEXT,
        }
    }
}

/// A value that can be a statement's parameter.
pub trait ToArg {
    fn to_arg(&self) -> Arg<'_>;
    /// NULL of this value's kind.
    fn null() -> Arg<'static>;
}

macro_rules! int_args {
    ($($t:ty),*) => {$(
        impl ToArg for $t {
            fn to_arg(&self) -> Arg<'_> {
                Arg::Int(i64::try_from(*self).ok())
            }
            fn null() -> Arg<'static> {
                Arg::Int(None)
            }
        }
    )*};
}
int_args!(i64, i32, u32, u16, u64, usize);

impl ToArg for bool {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Int(Some(*self as i64))
    }
    fn null() -> Arg<'static> {
        Arg::Int(None)
    }
}
impl ToArg for f64 {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Real(Some(*self))
    }
    fn null() -> Arg<'static> {
        Arg::Real(None)
    }
}
impl ToArg for str {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Text(Some(Cow::Borrowed(self)))
    }
    fn null() -> Arg<'static> {
        Arg::Text(None)
    }
}
impl ToArg for String {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Text(Some(Cow::Borrowed(self)))
    }
    fn null() -> Arg<'static> {
        Arg::Text(None)
    }
}
impl<T: ToArg + ?Sized> ToArg for &T {
    fn to_arg(&self) -> Arg<'_> {
        (**self).to_arg()
    }
    fn null() -> Arg<'static> {
        T::null()
    }
}
impl<T: ToArg> ToArg for Option<T> {
    fn to_arg(&self) -> Arg<'_> {
        match self {
            Some(v) => v.to_arg(),
            None => T::null(),
        }
    }
    fn null() -> Arg<'static> {
        T::null()
    }
}

/// `v` as a parameter (what `args!` calls).
pub fn arg<T: ToArg + ?Sized>(v: &T) -> Arg<'_> {
    v.to_arg()
}

/// The parameters of a statement: `args![a, b, c]`, each borrowed.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$($crate::store::sql::arg(&$a)),*] as &[$crate::store::sql::Arg<'_>] };
}
pub use args;

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Arg::Int(Some(v)) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Arg::Real(Some(v)) => ToSqlOutput::Borrowed(ValueRef::Real(*v)),
            Arg::Text(Some(v)) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Arg::Int(None) | Arg::Real(None) | Arg::Text(None) => {
                ToSqlOutput::Borrowed(ValueRef::Null)
            }
        })
    }
}

impl ToSql for Arg<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Arg::Int(Some(v)) => v.to_sql(ty, out),
            Arg::Real(Some(v)) => v.to_sql(ty, out),
            Arg::Text(Some(v)) => v.as_ref().to_sql(ty, out),
            Arg::Int(None) | Arg::Real(None) | Arg::Text(None) => Ok(IsNull::Yes),
        }
    }

    fn accepts(ty: &Type) -> bool {
        [Type::INT8, Type::FLOAT8, Type::TEXT].contains(ty)
    }

    to_sql_checked!();
}

/// A result row of either engine.
pub enum Row<'r> {
    Sqlite(&'r rusqlite::Row<'r>),
    Postgres(&'r tokio_postgres::Row),
}

impl Row<'_> {
    /// Column `i` (from 0) as `T`.
    pub fn get<T: Column>(&self, i: usize) -> Result<T, StoreError> {
        match self {
            Row::Sqlite(r) => T::sqlite(r, i),
            Row::Postgres(r) => T::postgres(r, i),
        }
    }
}

/// A type a column can be read as, from either engine.
pub trait Column: Sized {
    fn sqlite(r: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError>;
    fn postgres(r: &tokio_postgres::Row, i: usize) -> Result<Self, StoreError>;
}

fn pg_int(r: &tokio_postgres::Row, i: usize) -> Result<Option<i64>, StoreError> {
    let ty = r.columns().get(i).map(|c| c.type_().clone());
    Ok(match ty {
        Some(Type::INT4) => r.try_get::<_, Option<i32>>(i)?.map(i64::from),
        Some(Type::INT2) => r.try_get::<_, Option<i16>>(i)?.map(i64::from),
        Some(Type::BOOL) => r.try_get::<_, Option<bool>>(i)?.map(i64::from),
        _ => r.try_get::<_, Option<i64>>(i)?,
    })
}

fn pg_real(r: &tokio_postgres::Row, i: usize) -> Result<Option<f64>, StoreError> {
    let ty = r.columns().get(i).map(|c| c.type_().clone());
    Ok(match ty {
        Some(Type::FLOAT4) => r.try_get::<_, Option<f32>>(i)?.map(f64::from),
        Some(Type::INT8 | Type::INT4 | Type::INT2) => pg_int(r, i)?.map(|v| v as f64),
        _ => r.try_get::<_, Option<f64>>(i)?,
    })
}

fn null_in(i: usize) -> StoreError {
    StoreError::Column(format!("column {i} is NULL"))
}

impl Column for Option<i64> {
    fn sqlite(r: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(r.get(i)?)
    }
    fn postgres(r: &tokio_postgres::Row, i: usize) -> Result<Self, StoreError> {
        pg_int(r, i)
    }
}
impl Column for i64 {
    fn sqlite(r: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(r.get(i)?)
    }
    fn postgres(r: &tokio_postgres::Row, i: usize) -> Result<Self, StoreError> {
        pg_int(r, i)?.ok_or_else(|| null_in(i))
    }
}
impl Column for Option<bool> {
    fn sqlite(r: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(r.get(i)?)
    }
    fn postgres(r: &tokio_postgres::Row, i: usize) -> Result<Self, StoreError> {
        Ok(pg_int(r, i)?.map(|v| v != 0))
    }
}
impl Column for bool {
    fn sqlite(r: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(r.get(i)?)
    }
    fn postgres(r: &tokio_postgres::Row, i: usize) -> Result<Self, StoreError> {
        Ok(pg_int(r, i)?.ok_or_else(|| null_in(i))? != 0)
    }
}
impl Column for Option<f64> {
    fn sqlite(r: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(r.get(i)?)
    }
    fn postgres(r: &tokio_postgres::Row, i: usize) -> Result<Self, StoreError> {
        pg_real(r, i)
    }
}
impl Column for f64 {
    fn sqlite(r: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(r.get(i)?)
    }
    fn postgres(r: &tokio_postgres::Row, i: usize) -> Result<Self, StoreError> {
        pg_real(r, i)?.ok_or_else(|| null_in(i))
    }
}
impl Column for u16 {
    fn sqlite(r: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(r.get(i)?)
    }
    fn postgres(r: &tokio_postgres::Row, i: usize) -> Result<Self, StoreError> {
        let v = pg_int(r, i)?.ok_or_else(|| null_in(i))?;
        u16::try_from(v).map_err(|_| StoreError::Column(format!("column {i}: {v} is out of range")))
    }
}
impl Column for Option<String> {
    fn sqlite(r: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(r.get(i)?)
    }
    fn postgres(r: &tokio_postgres::Row, i: usize) -> Result<Self, StoreError> {
        Ok(r.try_get(i)?)
    }
}
impl Column for String {
    fn sqlite(r: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(r.get(i)?)
    }
    fn postgres(r: &tokio_postgres::Row, i: usize) -> Result<Self, StoreError> {
        Ok(r.try_get(i)?)
    }
}

/// Rewrites `?N` placeholders as `$N`, leaving quoted text alone.
pub fn to_postgres(sql: &str) -> Cow<'_, str> {
    if !sql.contains('?') {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                out.push(c);
            }
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) => out.push('$'),
            None => out.push(c),
        }
    }
    Cow::Owned(out)
}

enum Engine {
    Sqlite(rusqlite::Connection),
    Postgres {
        client: deadpool_postgres::Object,
        rt: tokio::runtime::Handle,
    },
}

/// A connection to the store. Blocking: used on the blocking thread pool or a thread of its own,
/// never on an async worker (on PostgreSQL each call waits on the runtime's client).
pub struct Conn {
    engine: Engine,
    /// Open transactions: the outermost is `BEGIN`, the ones inside it savepoints.
    depth: Cell<u32>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({:?})", self.dialect())
    }
}

impl Conn {
    pub fn sqlite(conn: rusqlite::Connection) -> Self {
        Self {
            engine: Engine::Sqlite(conn),
            depth: Cell::new(0),
        }
    }

    pub(super) fn postgres(client: deadpool_postgres::Object, rt: tokio::runtime::Handle) -> Self {
        Self {
            engine: Engine::Postgres { client, rt },
            depth: Cell::new(0),
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self.engine {
            Engine::Sqlite(_) => Dialect::Sqlite,
            Engine::Postgres { .. } => Dialect::Postgres,
        }
    }

    /// The SQLite connection underneath, for what only SQLite has (pragmas, its migrations).
    pub fn as_sqlite(&self) -> Option<&rusqlite::Connection> {
        match &self.engine {
            Engine::Sqlite(c) => Some(c),
            Engine::Postgres { .. } => None,
        }
    }

    /// Whether the connection can still be used (a PostgreSQL connection closes when its server
    /// goes away).
    pub fn is_broken(&self) -> bool {
        match &self.engine {
            Engine::Sqlite(_) => false,
            Engine::Postgres { client, .. } => client.is_closed(),
        }
    }

    /// Runs one statement; returns the rows it changed.
    pub fn execute(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        match &self.engine {
            Engine::Sqlite(c) => {
                Ok(c.prepare_cached(sql)?
                    .execute(rusqlite::params_from_iter(args.iter()))? as u64)
            }
            Engine::Postgres { client, rt } => {
                let sql = to_postgres(sql);
                let typed = pg_args(args);
                Ok(wait(rt, client.execute_typed(&sql, &typed))?)
            }
        }
    }

    /// Runs a query and reads each row with `f`.
    pub fn query<T>(
        &self,
        sql: &str,
        args: &[Arg<'_>],
        mut f: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        match &self.engine {
            Engine::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    out.push(f(&Row::Sqlite(r))?);
                }
                Ok(out)
            }
            Engine::Postgres { client, rt } => {
                let sql = to_postgres(sql);
                let typed = pg_args(args);
                let rows = wait(rt, client.query_typed(&sql, &typed))?;
                rows.iter().map(|r| f(&Row::Postgres(r))).collect()
            }
        }
    }

    /// The first row of a query, if any.
    pub fn query_opt<T>(
        &self,
        sql: &str,
        args: &[Arg<'_>],
        f: impl FnOnce(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        match &self.engine {
            Engine::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
                match rows.next()? {
                    Some(r) => Ok(Some(f(&Row::Sqlite(r))?)),
                    None => Ok(None),
                }
            }
            Engine::Postgres { client, rt } => {
                let sql = to_postgres(sql);
                let typed = pg_args(args);
                let rows = wait(rt, client.query_typed(&sql, &typed))?;
                rows.first().map(|r| f(&Row::Postgres(r))).transpose()
            }
        }
    }

    /// A query's one value (an aggregate, a count).
    pub fn value<T: Column>(&self, sql: &str, args: &[Arg<'_>]) -> Result<T, StoreError> {
        self.query_opt(sql, args, |r| r.get(0))?
            .ok_or_else(|| StoreError::Column(format!("no row from: {sql}")))
    }

    /// Loads rows into `into` ("table (columns)"): PostgreSQL's binary COPY, or one cached
    /// INSERT a row on SQLite. Every row has the same kinds of values in the same order.
    pub fn copy_rows<'a>(
        &self,
        into: &str,
        rows: impl IntoIterator<Item = Vec<Arg<'a>>>,
    ) -> Result<u64, StoreError> {
        let mut rows = rows.into_iter().peekable();
        let Some(first) = rows.peek() else {
            return Ok(0);
        };
        let width = first.len();
        match &self.engine {
            Engine::Sqlite(_) => {
                let placeholders: Vec<String> = (1..=width).map(|i| format!("?{i}")).collect();
                let sql = format!("INSERT INTO {into} VALUES ({})", placeholders.join(", "));
                let mut n = 0;
                for row in rows {
                    n += self.execute(&sql, &row)?;
                }
                Ok(n)
            }
            Engine::Postgres { client, rt } => {
                let types: Vec<Type> = first.iter().map(Arg::pg_type).collect();
                wait(rt, async {
                    let sink = client
                        .copy_in(&format!("COPY {into} FROM STDIN (FORMAT binary)"))
                        .await?;
                    let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(sink, &types);
                    futures_util::pin_mut!(writer);
                    for row in rows {
                        let values: Vec<&(dyn ToSql + Sync)> =
                            row.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                        writer.as_mut().write(&values).await?;
                    }
                    Ok(writer.finish().await?)
                })
            }
        }
    }

    /// Runs statements without parameters, separated by semicolons.
    pub fn batch(&self, sql: &str) -> Result<(), StoreError> {
        match &self.engine {
            Engine::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Engine::Postgres { client, rt } => Ok(wait(rt, client.batch_execute(sql))?),
        }
    }

    /// Runs `work` in a transaction (a savepoint inside another): committed when it returns
    /// `Ok`, rolled back when it returns an error.
    pub fn transaction<T, E: From<StoreError>>(
        &self,
        work: impl FnOnce(&Conn) -> Result<T, E>,
    ) -> Result<T, E> {
        let depth = self.depth.get();
        let (begin, commit, rollback) = if depth == 0 {
            (
                "BEGIN".to_string(),
                "COMMIT".to_string(),
                "ROLLBACK".to_string(),
            )
        } else {
            (
                format!("SAVEPOINT s{depth}"),
                format!("RELEASE SAVEPOINT s{depth}"),
                format!("ROLLBACK TO SAVEPOINT s{depth}; RELEASE SAVEPOINT s{depth}"),
            )
        };
        self.batch(&begin)?;
        self.depth.set(depth + 1);
        let out = work(self);
        self.depth.set(depth);
        match out {
            Ok(v) => match self.batch(&commit) {
                Ok(()) => Ok(v),
                Err(e) => {
                    // A failed COMMIT leaves SQLite's transaction open; PostgreSQL has ended it.
                    let _ = self.batch(&rollback);
                    Err(e.into())
                }
            },
            Err(e) => {
                if let Err(undo) = self.batch(&rollback) {
                    tracing::warn!(error = %undo, "rolling back a failed transaction failed");
                }
                Err(e)
            }
        }
    }
}

/// Waits for `work` on the store's runtime from blocking code: a thread of its own, the blocking
/// pool, or (moved off the worker for the wait) an async worker of a multi-thread runtime.
pub(crate) fn wait<F: std::future::Future>(rt: &tokio::runtime::Handle, work: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| rt.block_on(work))
        }
        _ => rt.block_on(work),
    }
}

fn pg_args<'a>(args: &'a [Arg<'_>]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    args.iter()
        .map(|a| (a as &(dyn ToSql + Sync), a.pg_type()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_quotes() {
        assert_eq!(
            to_postgres("SELECT '?1', x FROM t WHERE a = ?1 AND b = ?12 AND c = \"?2\" AND d = ?"),
            "SELECT '?1', x FROM t WHERE a = $1 AND b = $12 AND c = \"?2\" AND d = ?"
        );
        assert!(matches!(to_postgres("SELECT 1"), Cow::Borrowed(_)));
    }

    #[test]
    fn a_failed_inner_transaction_rolls_back_only_its_own_work() {
        let conn = Conn::sqlite(rusqlite::Connection::open_in_memory().unwrap());
        conn.batch("CREATE TABLE t (x INTEGER)").unwrap();
        conn.transaction(|c| {
            c.execute("INSERT INTO t VALUES (?1)", args![1])?;
            let inner: Result<(), StoreError> = c.transaction(|c| {
                c.execute("INSERT INTO t VALUES (?1)", args![2])?;
                Err(StoreError::Column("no".into()))
            });
            assert!(inner.is_err());
            Ok::<_, StoreError>(())
        })
        .unwrap();
        let xs: Vec<i64> = conn.query("SELECT x FROM t", &[], |r| r.get(0)).unwrap();
        assert_eq!(xs, [1]);
    }
}
