//! Entities of the customize/evaluate steps, in NeMo Entity Store's shapes: namespaces, datasets
//! (metadata here, files under `<data_dir>/datasets/<namespace>/<name>/`), and jobs (customization
//! and evaluation) with their status and details.

use crate::names::Name;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum EntityError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
}

type Result<T> = std::result::Result<T, EntityError>;

pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Names of namespaces and datasets follow the one name rule (`crate::names`).
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    match Name::parse(name) {
        Some(_) => Ok(()),
        None => Err(EntityError::Invalid(format!(
            "{kind} '{name}' must be {}",
            crate::names::RULE
        ))),
    }
}

pub fn create_namespace(conn: &Connection, id: &str, description: Option<&str>) -> Result<Value> {
    check_name("namespace", id)?;
    let ts = now();
    let n = conn.execute(
        "INSERT OR IGNORE INTO namespaces (id, description, created_at) VALUES (?1, ?2, ?3)",
        params![id, description, ts],
    )?;
    if n == 0 {
        return Err(EntityError::Conflict(format!(
            "namespace '{id}' already exists"
        )));
    }
    get_namespace(conn, id)
}

pub fn get_namespace(conn: &Connection, id: &str) -> Result<Value> {
    conn.query_row(
        "SELECT id, description, created_at FROM namespaces WHERE id = ?1",
        [id],
        |r| {
            Ok(
                json!({"id": r.get::<_, String>(0)?, "description": r.get::<_, Option<String>>(1)?,
                "created_at": r.get::<_, String>(2)?, "updated_at": r.get::<_, String>(2)?}),
            )
        },
    )
    .optional()?
    .ok_or_else(|| EntityError::NotFound(format!("namespace '{id}' does not exist")))
}

pub fn list_namespaces(conn: &Connection) -> Result<Vec<Value>> {
    let mut st = conn.prepare("SELECT id FROM namespaces ORDER BY id")?;
    let ids: Vec<String> = st
        .query_map([], |r| r.get(0))?
        .collect::<std::result::Result<_, _>>()?;
    ids.iter().map(|id| get_namespace(conn, id)).collect()
}

fn dataset_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Value> {
    Ok(json!({
        "namespace": r.get::<_, String>(0)?,
        "name": r.get::<_, String>(1)?,
        "description": r.get::<_, Option<String>>(2)?,
        "files_url": r.get::<_, String>(3)?,
        "project": r.get::<_, Option<String>>(4)?,
        "format": r.get::<_, Option<String>>(5)?,
        "created_at": r.get::<_, String>(6)?,
        "updated_at": r.get::<_, String>(7)?,
    }))
}

const DATASET_COLUMNS: &str =
    "namespace, name, description, files_url, project, format, created_at, updated_at";

pub fn create_dataset(conn: &Connection, body: &Value) -> Result<Value> {
    let s = |k: &str| body.get(k).and_then(Value::as_str);
    let ns = s("namespace").unwrap_or("default");
    let name = s("name").ok_or_else(|| EntityError::Invalid("'name' is required".into()))?;
    check_name("namespace", ns)?;
    check_name("dataset", name)?;
    if ns != "default" {
        get_namespace(conn, ns)?;
    }
    let files_url = s("files_url")
        .map(str::to_string)
        .unwrap_or_else(|| format!("hf://datasets/{ns}/{name}"));
    let ts = now();
    let n = conn.execute(
        "INSERT OR IGNORE INTO datasets (namespace, name, description, files_url, project, format, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
        params![ns, name, s("description"), files_url, s("project"), s("format"), ts],
    )?;
    if n == 0 {
        return Err(EntityError::Conflict(format!(
            "dataset '{ns}/{name}' already exists"
        )));
    }
    get_dataset(conn, ns, name)
}

pub fn get_dataset(conn: &Connection, ns: &str, name: &str) -> Result<Value> {
    conn.query_row(
        &format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE namespace = ?1 AND name = ?2"),
        [ns, name],
        dataset_row,
    )
    .optional()?
    .ok_or_else(|| EntityError::NotFound(format!("dataset '{ns}/{name}' does not exist")))
}

pub fn list_datasets(conn: &Connection, ns: Option<&str>) -> Result<Vec<Value>> {
    let mut st = conn.prepare(&format!(
        "SELECT {DATASET_COLUMNS} FROM datasets WHERE (?1 IS NULL OR namespace = ?1) ORDER BY namespace, name"
    ))?;
    let rows = st
        .query_map([ns], dataset_row)?
        .collect::<std::result::Result<_, _>>()?;
    Ok(rows)
}

/// Updates `description`, `files_url`, `project` and `format` where the body gives them.
pub fn patch_dataset(conn: &Connection, ns: &str, name: &str, body: &Value) -> Result<Value> {
    get_dataset(conn, ns, name)?;
    for field in ["description", "files_url", "project", "format"] {
        if let Some(v) = body.get(field) {
            let v = v
                .as_str()
                .ok_or_else(|| EntityError::Invalid(format!("'{field}' must be a string")))?;
            conn.execute(
                &format!("UPDATE datasets SET {field} = ?1, updated_at = ?2 WHERE namespace = ?3 AND name = ?4"),
                params![v, now(), ns, name],
            )?;
        }
    }
    get_dataset(conn, ns, name)
}

pub fn delete_dataset(conn: &Connection, ns: &str, name: &str) -> Result<()> {
    let n = conn.execute(
        "DELETE FROM datasets WHERE namespace = ?1 AND name = ?2",
        [ns, name],
    )?;
    if n == 0 {
        return Err(EntityError::NotFound(format!(
            "dataset '{ns}/{name}' does not exist"
        )));
    }
    Ok(())
}

/// A job: `kind` is "customization" or "evaluation"; `spec` is the request as accepted.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub kind: String,
    pub status: String,
    pub spec: Value,
    pub status_details: Value,
    pub result: Option<Value>,
    pub created_at: String,
    pub updated_at: String,
}

pub fn insert_job(conn: &Connection, id: &str, kind: &str, spec: &Value) -> Result<()> {
    let ts = now();
    conn.execute(
        "INSERT INTO jobs (id, kind, status, spec, status_details, created_at, updated_at) VALUES (?1, ?2, 'created', ?3, '{}', ?4, ?4)",
        params![id, kind, spec.to_string(), ts],
    )?;
    Ok(())
}

pub fn update_job(
    conn: &Connection,
    id: &str,
    status: &str,
    details: &Value,
    result: Option<&Value>,
) -> Result<()> {
    conn.execute(
        "UPDATE jobs SET status = ?1, status_details = ?2, result = COALESCE(?3, result), updated_at = ?4 WHERE id = ?5",
        params![status, details.to_string(), result.map(Value::to_string), now(), id],
    )?;
    Ok(())
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let parse = |s: String| serde_json::from_str(&s).unwrap_or(Value::Null);
    Ok(Job {
        id: r.get(0)?,
        kind: r.get(1)?,
        status: r.get(2)?,
        spec: parse(r.get(3)?),
        status_details: parse(r.get(4)?),
        result: r.get::<_, Option<String>>(5)?.map(parse),
        created_at: r.get(6)?,
        updated_at: r.get(7)?,
    })
}

const JOB_COLUMNS: &str = "id, kind, status, spec, status_details, result, created_at, updated_at";

pub fn get_job(conn: &Connection, kind: &str, id: &str) -> Result<Job> {
    conn.query_row(
        &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1 AND kind = ?2"),
        [id, kind],
        job_row,
    )
    .optional()?
    .ok_or_else(|| EntityError::NotFound(format!("{kind} job '{id}' does not exist")))
}

pub fn list_jobs(conn: &Connection, kind: &str) -> Result<Vec<Job>> {
    let mut st = conn.prepare(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE kind = ?1 ORDER BY created_at DESC, id DESC"
    ))?;
    let rows = st
        .query_map([kind], job_row)?
        .collect::<std::result::Result<_, _>>()?;
    Ok(rows)
}

/// Jobs of `kind` that were accepted or running when the process stopped.
pub fn unfinished_jobs(conn: &Connection, kind: &str) -> Result<Vec<Job>> {
    let mut st = conn.prepare(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE kind = ?1 AND status IN ('created', 'pending', 'running') ORDER BY created_at, id"
    ))?;
    let rows = st
        .query_map([kind], job_row)?
        .collect::<std::result::Result<_, _>>()?;
    Ok(rows)
}
