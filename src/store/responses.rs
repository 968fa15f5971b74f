//! The Responses API's stored responses: what `previous_response_id` continues and
//! `GET /v1/responses/{id}` returns. Each is one row written by one statement (never half-written),
//! owned by the API key that created it; another key's id is treated as unknown.

use std::sync::Mutex;

use super::sql::{args, Conn};
use super::Db;
use serde_json::Value;

use super::StoreError;

/// One stored response.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub id: String,
    /// The name of the API key that created it (`loopback` without a key).
    pub owner: String,
    pub created_ms: i64,
    pub model: String,
    /// The traffic record of the request that produced it.
    pub traffic_id: Option<String>,
    pub previous_id: Option<String>,
    /// The request's input items, with ids, as `input_items` lists them.
    pub input_items: Vec<Value>,
    /// The whole conversation as chat messages, this answer included (instructions excluded: they
    /// never carry over to a continuation).
    pub conversation: Vec<Value>,
    /// The `response` object as it was returned.
    pub response: Value,
}

/// The stored responses, on the gateway's store.
pub struct ResponseStore {
    source: Source,
}

enum Source {
    /// SQLite: a connection of its own (see `open`).
    Own(Box<Mutex<Conn>>),
    /// PostgreSQL: the pool's connections.
    Pool(Db),
}

fn parse_list(s: &str) -> Vec<Value> {
    serde_json::from_str(s).unwrap_or_default()
}

impl ResponseStore {
    /// Opens the store. With `checkpoints` off, this connection never runs WAL checkpoints and
    /// leaves them to the traffic writer, which commits all the time anyway: a checkpoint run by
    /// the commit of a stored response made that client wait (p99 at 1,000 req/s went from
    /// 4.2–8.8 ms to 1.7 ms without them; BENCHMARKS.md). Keep them on when no traffic writer runs.
    pub fn open(db: &Db, checkpoints: bool) -> Result<Self, StoreError> {
        let source = match db.sqlite_path() {
            Some(path) => {
                let conn = super::open(path)?;
                if !checkpoints {
                    conn.batch("PRAGMA wal_autocheckpoint = 0")?;
                }
                Source::Own(Box::new(Mutex::new(conn)))
            }
            None => Source::Pool(db.clone()),
        };
        Ok(Self { source })
    }

    /// Runs `work` on the store's connection (blocking).
    fn with<T>(&self, work: impl FnOnce(&Conn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &self.source {
            // A panic while holding the lock cannot leave a half-done statement behind: take it
            // back.
            Source::Own(conn) => work(&conn.lock().unwrap_or_else(|p| p.into_inner())),
            Source::Pool(db) => work(&db.open()?),
        }
    }

    pub fn insert(&self, r: &StoredResponse) -> Result<(), StoreError> {
        let (items, conversation) = (
            serde_json::to_string(&r.input_items)?,
            serde_json::to_string(&r.conversation)?,
        );
        self.with(|c| c.execute(
            "INSERT INTO responses (id, owner, created_ms, model, traffic_id, previous_id, input_items, conversation, response)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            args![
                r.id,
                r.owner,
                r.created_ms,
                r.model,
                r.traffic_id,
                r.previous_id,
                items,
                conversation,
                r.response.to_string(),
            ],
        ))?;
        Ok(())
    }

    /// The response `id` if `owner` created it.
    pub fn get(&self, id: &str, owner: &str) -> Result<Option<StoredResponse>, StoreError> {
        self.with(|c| c.query_opt(
                "SELECT id, owner, created_ms, model, traffic_id, previous_id, input_items, conversation, response
                 FROM responses WHERE id = ?1 AND owner = ?2",
                args![id, owner],
                |r| {
                    Ok(StoredResponse {
                        id: r.get(0)?,
                        owner: r.get(1)?,
                        created_ms: r.get(2)?,
                        model: r.get(3)?,
                        traffic_id: r.get(4)?,
                        previous_id: r.get(5)?,
                        input_items: parse_list(&r.get::<String>(6)?),
                        conversation: parse_list(&r.get::<String>(7)?),
                        response: serde_json::from_str(&r.get::<String>(8)?)
                            .unwrap_or(Value::Null),
                    })
                },
            ))
    }

    /// Deletes the response `id` if `owner` created it; false if there was none.
    pub fn delete(&self, id: &str, owner: &str) -> Result<bool, StoreError> {
        let n = self.with(|c| {
            c.execute(
                "DELETE FROM responses WHERE id = ?1 AND owner = ?2",
                args![id, owner],
            )
        })?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_response_is_visible_only_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        for db in
            crate::store::testing::each_db("a_response_is_visible_only_to_its_owner", dir.path())
        {
            let store = ResponseStore::open(&db, true).unwrap();
            let r = StoredResponse {
                id: "resp_1".into(),
                owner: "alice".into(),
                created_ms: 1,
                model: "m".into(),
                traffic_id: None,
                previous_id: None,
                input_items: vec![json!({"type": "message"})],
                conversation: vec![json!({"role": "user", "content": "hi"})],
                response: json!({"id": "resp_1"}),
            };
            store.insert(&r).unwrap();
            assert!(store.get("resp_1", "bob").unwrap().is_none());
            let back = store.get("resp_1", "alice").unwrap().unwrap();
            assert_eq!(back.conversation, r.conversation);
            assert_eq!(back.input_items, r.input_items);
            assert!(!store.delete("resp_1", "bob").unwrap());
            assert!(store.delete("resp_1", "alice").unwrap());
            assert!(store.get("resp_1", "alice").unwrap().is_none());
            // The same id twice is refused whole.
            store.insert(&r).unwrap();
            assert!(store.insert(&r).is_err());
        }
    }
}
