//! What users and agents said about answers: metric values, comments and demonstrations, each
//! about one request or one episode, with when it came and which key sent it. Rows are written by
//! the traffic log's writer (in its batches, after the traffic rows queued before them) and never
//! changed; repeated feedback for the same request and metric is kept, and the latest counts.

use super::sql::{args, Conn, Row};
use serde::Serialize;
use serde_json::Value;

use super::StoreError;

/// One piece of feedback.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Feedback {
    pub id: String,
    pub ts_ms: i64,
    /// The API key that sent it (`loopback` without a key).
    pub key_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub episode_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Booleans as 1 and 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The assistant message that should have been given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demonstration: Option<Value>,
}

pub(super) fn insert(tx: &Conn, f: &Feedback) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO feedback (id, ts_ms, key_name, request_id, episode_id, metric, value, comment, demonstration)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        args![
        f.id,
        f.ts_ms,
        f.key_name,
        f.request_id,
        f.episode_id,
        f.metric,
        f.value,
        f.comment,
            f.demonstration.as_ref().map(Value::to_string),
        ],
    )?;
    Ok(())
}

const COLUMNS: &str =
    "id, ts_ms, key_name, request_id, episode_id, metric, value, comment, demonstration";

fn row(r: &Row<'_>) -> Result<Feedback, StoreError> {
    Ok(Feedback {
        id: r.get(0)?,
        ts_ms: r.get(1)?,
        key_name: r.get(2)?,
        request_id: r.get(3)?,
        episode_id: r.get(4)?,
        metric: r.get(5)?,
        value: r.get(6)?,
        comment: r.get(7)?,
        demonstration: r
            .get::<Option<String>>(8)?
            .and_then(|s| serde_json::from_str(&s).ok()),
    })
}

/// Every piece of feedback about the request `id`, oldest first.
pub fn for_request(conn: &Conn, id: &str) -> Result<Vec<Feedback>, StoreError> {
    conn.query(
        &format!("SELECT {COLUMNS} FROM feedback WHERE request_id = ?1 ORDER BY ts_ms, id"),
        args![id],
        row,
    )
}

/// Every piece of feedback about the episode `id` or any of its requests, oldest first.
pub fn for_episode(conn: &Conn, id: &str) -> Result<Vec<Feedback>, StoreError> {
    conn.query(
        &format!(
            "SELECT {COLUMNS} FROM feedback
             WHERE episode_id = ?1 OR request_id IN (SELECT id FROM traffic WHERE episode_id = ?1)
             ORDER BY ts_ms, id"
        ),
        args![id],
        row,
    )
}

/// What the traffic log knows of a request: its episode and the request body (for checking a
/// demonstration's tool calls), if it has been written.
pub fn request_of(conn: &Conn, id: &str) -> Result<Option<(Option<String>, Value)>, StoreError> {
    conn.query_opt(
        "SELECT episode_id, request FROM traffic WHERE id = ?1",
        args![id],
        |r| {
            let request: Option<String> = r.get(1)?;
            Ok((
                r.get::<Option<String>>(0)?,
                request
                    .and_then(|s| serde_json::from_str(&s).ok())
                    .unwrap_or(Value::Null),
            ))
        },
    )
}

/// Whether any request of the episode `id` has been written.
pub fn episode_exists(conn: &Conn, id: &str) -> Result<bool, StoreError> {
    Ok(conn
        .query_opt(
            "SELECT 1 FROM traffic WHERE episode_id = ?1 LIMIT 1",
            args![id],
            |_| Ok(()),
        )?
        .is_some())
}

/// The latest value of each metric, and the latest demonstration, said about the route's requests
/// of a time window (request-level) and about their episodes (episode-level): what curation reads.
#[derive(Debug, Default)]
pub struct FeedbackIndex {
    pub requests: std::collections::HashMap<String, std::collections::BTreeMap<String, f64>>,
    pub episodes: std::collections::HashMap<String, std::collections::BTreeMap<String, f64>>,
    pub demonstrations: std::collections::HashMap<String, Value>,
    /// When anything was last said about each request and each episode (its latest row).
    said_ms: std::collections::HashMap<(Level, String), i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Level {
    Request,
    Episode,
}

impl FeedbackIndex {
    pub fn load(
        conn: &Conn,
        route: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Self, StoreError> {
        let rows = conn.query(
            "SELECT request_id, episode_id, metric, value, demonstration, ts_ms FROM feedback
             WHERE request_id IN (SELECT id FROM traffic WHERE route = ?1 AND ts_ms >= ?2 AND ts_ms < ?3)
                OR episode_id IN (SELECT episode_id FROM traffic
                                  WHERE route = ?1 AND ts_ms >= ?2 AND ts_ms < ?3 AND episode_id IS NOT NULL)
             ORDER BY ts_ms, id",
            args![route, since_ms, until_ms],
            |r| {
                Ok((
                    r.get::<Option<String>>(0)?,
                    r.get::<Option<String>>(1)?,
                    r.get::<Option<String>>(2)?,
                    r.get::<Option<f64>>(3)?,
                    r.get::<Option<String>>(4)?,
                    r.get::<i64>(5)?,
                ))
            },
        )?;
        let mut index = Self::default();
        for (request, episode, metric, value, demo, said_ms) in rows {
            let (level, key) = match (request, episode) {
                (Some(q), _) => (Level::Request, q),
                (None, Some(e)) => (Level::Episode, e),
                (None, None) => continue,
            };
            // Later rows overwrite earlier ones: the latest counts.
            if let (Some(m), Some(v)) = (metric, value) {
                let about = match level {
                    Level::Request => &mut index.requests,
                    Level::Episode => &mut index.episodes,
                };
                about.entry(key.clone()).or_default().insert(m, v);
            }
            if let (Level::Request, Some(d)) =
                (level, demo.and_then(|d| serde_json::from_str(&d).ok()))
            {
                index.demonstrations.insert(key.clone(), d);
            }
            index.said_ms.insert((level, key), said_ms);
        }
        Ok(index)
    }

    /// Whether nothing was said about the window's requests or episodes.
    pub fn is_empty(&self) -> bool {
        self.said_ms.is_empty()
    }

    /// How many requests and episodes drew feedback after `ms`.
    pub fn judged_after(&self, ms: i64) -> usize {
        self.said_ms.values().filter(|&&t| t > ms).count()
    }

    /// Whether a request drew feedback after `ms`.
    pub fn request_judged_after(&self, request: &str, ms: i64) -> bool {
        self.said_ms
            .get(&(Level::Request, request.to_string()))
            .is_some_and(|&t| t > ms)
    }

    /// The latest values about a request: its own, over its episode's.
    pub fn values(
        &self,
        request: &str,
        episode: Option<&str>,
    ) -> std::collections::BTreeMap<String, f64> {
        let mut out = episode
            .and_then(|e| self.episodes.get(e))
            .cloned()
            .unwrap_or_default();
        if let Some(own) = self.requests.get(request) {
            out.extend(own.iter().map(|(k, v)| (k.clone(), *v)));
        }
        out
    }
}

/// The latest value of `metric` on each request (or, for an episode-level metric, each episode) a
/// route's clients sent since `since_ms`, by the arm that answered: `(arm, value)` pairs, one per
/// request or episode.
pub fn values_by_arm(
    conn: &Conn,
    route: &str,
    since_ms: i64,
    metric: &str,
    episode_level: bool,
) -> Result<Vec<(String, f64)>, StoreError> {
    // Later feedback replaces earlier feedback on the same request or episode.
    let sql = if episode_level {
        "SELECT a.arm, f.episode_id, f.value FROM feedback f
         JOIN (SELECT episode_id, MIN(arm) AS arm FROM traffic
               WHERE route = ?1 AND ts_ms >= ?2 AND arm != 'shadow' AND episode_id IS NOT NULL
               GROUP BY episode_id) a ON a.episode_id = f.episode_id
         WHERE f.metric = ?3 AND f.value IS NOT NULL ORDER BY f.ts_ms, f.id"
    } else {
        "SELECT t.arm, f.request_id, f.value FROM feedback f JOIN traffic t ON t.id = f.request_id
         WHERE t.route = ?1 AND t.ts_ms >= ?2 AND t.arm != 'shadow' AND f.metric = ?3
           AND f.value IS NOT NULL ORDER BY f.ts_ms, f.id"
    };
    let mut latest: std::collections::HashMap<String, (String, f64)> = Default::default();
    conn.query(sql, args![route, since_ms, metric], |r| {
        latest.insert(r.get(1)?, (r.get(0)?, r.get(2)?));
        Ok(())
    })?;
    Ok(latest.into_values().collect())
}
