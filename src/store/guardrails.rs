//! Guardrail configs created through the API, as NeMo Guardrails' config entities.

use super::sql::{args, Conn, Row};
use super::StoreError;
use serde_json::{json, Value};

use super::entities::{now, EntityError};

type Result<T, E = EntityError> = std::result::Result<T, E>;

/// A stored config.
#[derive(Debug, Clone)]
pub struct StoredGuardrailConfig {
    pub namespace: String,
    pub name: String,
    pub description: Option<String>,
    pub data: Value,
    pub created_at: String,
    pub updated_at: String,
}

impl StoredGuardrailConfig {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The entity as NeMo's API returns it; `source` says whether the API or the config file owns it.
    pub fn to_json(&self, source: &str) -> Value {
        json!({
            "id": self.id(),
            "name": self.name,
            "namespace": self.namespace,
            "description": self.description,
            "data": self.data,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "files_url": null,
            "schema_version": "1.0",
            "project": null,
            "custom_fields": {},
            "ownership": null,
            "source": source,
        })
    }
}

fn row(r: &Row<'_>) -> Result<StoredGuardrailConfig, StoreError> {
    let data: String = r.get(3)?;
    Ok(StoredGuardrailConfig {
        namespace: r.get(0)?,
        name: r.get(1)?,
        description: r.get(2)?,
        data: serde_json::from_str(&data).unwrap_or(Value::Null),
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
    })
}

const COLUMNS: &str = "namespace, name, description, data, created_at, updated_at";

pub fn insert(
    conn: &Conn,
    ns: &str,
    name: &str,
    description: Option<&str>,
    data: &Value,
) -> Result<StoredGuardrailConfig> {
    let ts = now();
    let n = conn.execute(
        "INSERT INTO guardrail_configs (namespace, name, description, data, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
         ON CONFLICT DO NOTHING",
        args![ns, name, description, data.to_string(), ts],
    )?;
    if n == 0 {
        return Err(EntityError::Conflict(format!(
            "guardrail config '{ns}/{name}' already exists; PATCH it or DELETE it first"
        )));
    }
    get(conn, ns, name)
}

/// Replaces the data and/or description of a stored config.
pub fn update(
    conn: &Conn,
    ns: &str,
    name: &str,
    description: Option<&str>,
    data: Option<&Value>,
) -> Result<StoredGuardrailConfig> {
    let old = get(conn, ns, name)?;
    let data = data.unwrap_or(&old.data);
    let description = description.or(old.description.as_deref());
    conn.execute(
        "UPDATE guardrail_configs SET description = ?1, data = ?2, updated_at = ?3 WHERE namespace = ?4 AND name = ?5",
        args![description, data.to_string(), now(), ns, name],
    )?;
    get(conn, ns, name)
}

pub fn get(conn: &Conn, ns: &str, name: &str) -> Result<StoredGuardrailConfig> {
    conn.query_opt(
        &format!("SELECT {COLUMNS} FROM guardrail_configs WHERE namespace = ?1 AND name = ?2"),
        args![ns, name],
        row,
    )?
    .ok_or_else(|| EntityError::NotFound(format!("guardrail config '{ns}/{name}' does not exist")))
}

/// Every stored config, oldest first.
pub fn list(conn: &Conn) -> Result<Vec<StoredGuardrailConfig>> {
    Ok(conn.query(
        &format!("SELECT {COLUMNS} FROM guardrail_configs ORDER BY created_at, namespace, name"),
        &[],
        row,
    )?)
}

pub fn delete(conn: &Conn, ns: &str, name: &str) -> Result<()> {
    let n = conn.execute(
        "DELETE FROM guardrail_configs WHERE namespace = ?1 AND name = ?2",
        args![ns, name],
    )?;
    if n == 0 {
        return Err(EntityError::NotFound(format!(
            "guardrail config '{ns}/{name}' does not exist"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_read_update_delete() {
        crate::store::testing::each_engine("create_read_update_delete", |conn| {
            let data = json!({"rails": {"input": {"flows": ["regex check input"]}}});
            let c = insert(conn, "default", "r", Some("rules"), &data).unwrap();
            assert_eq!(c.id(), "default/r");
            assert!(matches!(
                insert(conn, "default", "r", None, &data),
                Err(EntityError::Conflict(_))
            ));
            let u = update(conn, "default", "r", None, Some(&json!({}))).unwrap();
            assert_eq!(u.data, json!({}));
            assert_eq!(u.description.as_deref(), Some("rules"));
            assert_eq!(list(conn).unwrap().len(), 1);
            assert_eq!(u.to_json("api")["namespace"], "default");
            delete(conn, "default", "r").unwrap();
            assert!(matches!(
                get(conn, "default", "r"),
                Err(EntityError::NotFound(_))
            ));
            assert!(matches!(
                delete(conn, "default", "r"),
                Err(EntityError::NotFound(_))
            ));
        });
    }
}
