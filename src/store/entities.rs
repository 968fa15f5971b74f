//! Entities of the customize/evaluate steps, in NeMo Entity Store's shapes: namespaces, datasets
//! (metadata here, files under `<data_dir>/datasets/<namespace>/<name>/`), and jobs (customization
//! and evaluation) with their status and details.

use super::sql::{args, Conn, Row};
use super::StoreError;
use crate::names::Name;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum EntityError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Db(#[from] StoreError),
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

pub fn create_namespace(conn: &Conn, id: &str, description: Option<&str>) -> Result<Value> {
    check_name("namespace", id)?;
    let ts = now();
    let n = conn.execute(
        "INSERT INTO namespaces (id, description, created_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        args![id, description, &ts],
    )?;
    if n == 0 {
        return Err(EntityError::Conflict(format!(
            "namespace '{id}' already exists"
        )));
    }
    get_namespace(conn, id)
}

pub fn get_namespace(conn: &Conn, id: &str) -> Result<Value> {
    conn.query_opt(
        "SELECT id, description, created_at FROM namespaces WHERE id = ?1",
        args![id],
        |r| {
            Ok(
                json!({"id": r.get::<String>(0)?, "description": r.get::<Option<String>>(1)?,
                "created_at": r.get::<String>(2)?, "updated_at": r.get::<String>(2)?}),
            )
        },
    )?
    .ok_or_else(|| EntityError::NotFound(format!("namespace '{id}' does not exist")))
}

pub fn list_namespaces(conn: &Conn) -> Result<Vec<Value>> {
    let ids: Vec<String> =
        conn.query("SELECT id FROM namespaces ORDER BY id", &[], |r| r.get(0))?;
    ids.iter().map(|id| get_namespace(conn, id)).collect()
}

fn dataset_row(r: &Row<'_>) -> std::result::Result<Value, StoreError> {
    Ok(json!({
        "namespace": r.get::<String>(0)?,
        "name": r.get::<String>(1)?,
        "description": r.get::<Option<String>>(2)?,
        "files_url": r.get::<String>(3)?,
        "project": r.get::<Option<String>>(4)?,
        "format": r.get::<Option<String>>(5)?,
        "created_at": r.get::<String>(6)?,
        "updated_at": r.get::<String>(7)?,
    }))
}

const DATASET_COLUMNS: &str =
    "namespace, name, description, files_url, project, format, created_at, updated_at";

pub fn create_dataset(conn: &Conn, body: &Value) -> Result<Value> {
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
        "INSERT INTO datasets (namespace, name, description, files_url, project, format, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7) ON CONFLICT DO NOTHING",
        args![ns, name, s("description"), &files_url, s("project"), s("format"), &ts],
    )?;
    if n == 0 {
        return Err(EntityError::Conflict(format!(
            "dataset '{ns}/{name}' already exists"
        )));
    }
    get_dataset(conn, ns, name)
}

pub fn get_dataset(conn: &Conn, ns: &str, name: &str) -> Result<Value> {
    conn.query_opt(
        &format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE namespace = ?1 AND name = ?2"),
        args![ns, name],
        dataset_row,
    )?
    .ok_or_else(|| EntityError::NotFound(format!("dataset '{ns}/{name}' does not exist")))
}

pub fn list_datasets(conn: &Conn, ns: Option<&str>) -> Result<Vec<Value>> {
    Ok(conn.query(
        &format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE (?1 IS NULL OR namespace = ?1) ORDER BY namespace, name"),
        args![ns],
        dataset_row,
    )?)
}

/// Updates `description`, `files_url`, `project` and `format` where the body gives them.
pub fn patch_dataset(conn: &Conn, ns: &str, name: &str, body: &Value) -> Result<Value> {
    get_dataset(conn, ns, name)?;
    for field in ["description", "files_url", "project", "format"] {
        if let Some(v) = body.get(field) {
            let v = v
                .as_str()
                .ok_or_else(|| EntityError::Invalid(format!("'{field}' must be a string")))?;
            conn.execute(
                &format!("UPDATE datasets SET {field} = ?1, updated_at = ?2 WHERE namespace = ?3 AND name = ?4"),
                args![v, now(), ns, name],
            )?;
        }
    }
    get_dataset(conn, ns, name)
}

pub fn delete_dataset(conn: &Conn, ns: &str, name: &str) -> Result<()> {
    let n = conn.execute(
        "DELETE FROM datasets WHERE namespace = ?1 AND name = ?2",
        args![ns, name],
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

pub fn insert_job(conn: &Conn, id: &str, kind: &str, spec: &Value) -> Result<()> {
    let ts = now();
    conn.execute(
        "INSERT INTO jobs (id, kind, status, spec, status_details, created_at, updated_at) VALUES (?1, ?2, 'created', ?3, '{}', ?4, ?4)",
        args![id, kind, spec.to_string(), &ts],
    )?;
    Ok(())
}

pub fn update_job(
    conn: &Conn,
    id: &str,
    status: &str,
    details: &Value,
    result: Option<&Value>,
) -> Result<()> {
    conn.execute(
        "UPDATE jobs SET status = ?1, status_details = ?2, result = COALESCE(?3, result), updated_at = ?4 WHERE id = ?5",
        args![status, details.to_string(), result.map(Value::to_string), now(), id],
    )?;
    Ok(())
}

fn job_row(r: &Row<'_>) -> std::result::Result<Job, StoreError> {
    let parse = |s: String| serde_json::from_str(&s).unwrap_or(Value::Null);
    Ok(Job {
        id: r.get(0)?,
        kind: r.get(1)?,
        status: r.get(2)?,
        spec: parse(r.get(3)?),
        status_details: parse(r.get(4)?),
        result: r.get::<Option<String>>(5)?.map(parse),
        created_at: r.get(6)?,
        updated_at: r.get(7)?,
    })
}

const JOB_COLUMNS: &str = "id, kind, status, spec, status_details, result, created_at, updated_at";

pub fn get_job(conn: &Conn, kind: &str, id: &str) -> Result<Job> {
    conn.query_opt(
        &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1 AND kind = ?2"),
        args![id, kind],
        job_row,
    )?
    .ok_or_else(|| EntityError::NotFound(format!("{kind} job '{id}' does not exist")))
}

pub fn list_jobs(conn: &Conn, kind: &str) -> Result<Vec<Job>> {
    Ok(conn.query(
        &format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE kind = ?1 ORDER BY created_at DESC, id DESC"
        ),
        args![kind],
        job_row,
    )?)
}

/// Jobs of `kind` that were accepted or running when the process stopped.
pub fn unfinished_jobs(conn: &Conn, kind: &str) -> Result<Vec<Job>> {
    Ok(conn.query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE kind = ?1 AND status IN ('created', 'pending', 'running') ORDER BY created_at, id"), args![kind], job_row)?)
}
