//! Finding exchanges in the traffic log: filters on route, workload, arm, status, tool name, rails
//! verdict, time and text in the request, newest first, a page at a time. Only the filters given
//! go into the query, so SQLite can use the (route, ts) and (workload, ts) indexes.

use rusqlite::types::Value as Sql;
use rusqlite::Connection;
use serde_json::{json, Value};

use super::StoreError;

/// Which statuses a search keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// Below 400.
    Ok,
    /// 400 and above.
    Error,
    Exactly(u16),
}

#[derive(Debug, Clone, Default)]
pub struct TrafficQuery {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub route: Option<String>,
    pub workload: Option<String>,
    pub arm: Option<String>,
    pub status: Option<StatusFilter>,
    pub tool: Option<String>,
    /// The rails verdict (`blocked`, `allowed`, ...), or `none` for requests no rail checked.
    pub verdict: Option<String>,
    /// Text the request (the client's own body) contains, case-sensitively.
    pub text: Option<String>,
    pub limit: usize,
}

/// One exchange as a search lists it: what tells it apart at a glance.
pub fn search(conn: &Connection, q: &TrafficQuery) -> Result<Vec<Value>, StoreError> {
    let mut clauses: Vec<&str> = Vec::new();
    let mut args: Vec<Sql> = Vec::new();
    let mut push = |clause: &'static str, v: Sql| {
        clauses.push(clause);
        args.push(v);
    };
    if let Some(t) = q.since_ms {
        push("t.ts_ms >= ?", Sql::Integer(t));
    }
    if let Some(t) = q.until_ms {
        push("t.ts_ms < ?", Sql::Integer(t));
    }
    if let Some(r) = &q.route {
        push("t.route = ?", Sql::Text(r.clone()));
    }
    if let Some(w) = &q.workload {
        push("t.workload_id = ?", Sql::Text(w.clone()));
    }
    if let Some(a) = &q.arm {
        push("t.arm = ?", Sql::Text(a.clone()));
    }
    if let Some(tool) = &q.tool {
        // `+c.name`: each row's calls are found by the primary key, not by scanning every call
        // of that name.
        push(
            "EXISTS (SELECT 1 FROM tool_calls c WHERE c.traffic_id = t.id AND +c.name = ?)",
            Sql::Text(tool.clone()),
        );
    }
    match q.verdict.as_deref() {
        Some("none") => push("t.rails IS ?", Sql::Null),
        Some(v) => push(
            "json_extract(t.rails, '$.status') = ?",
            Sql::Text(v.to_string()),
        ),
        None => {}
    }
    if let Some(text) = &q.text {
        push(
            "instr(COALESCE(t.wire_request, t.request), ?) > 0",
            Sql::Text(text.clone()),
        );
    }
    // Literal bounds, so the partial index on failed requests can serve `error`.
    match q.status {
        Some(StatusFilter::Ok) => clauses.push("t.status < 400"),
        Some(StatusFilter::Error) => clauses.push("t.status >= 400"),
        Some(StatusFilter::Exactly(s)) => {
            clauses.push("t.status = ?");
            args.push(Sql::Integer(s.into()));
        }
        None => {}
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    args.push(Sql::Integer(q.limit as i64));
    // Failures are few: walking their partial index beats walking a route's every request.
    let index = if q.status == Some(StatusFilter::Error) {
        "INDEXED BY traffic_errors_ts"
    } else {
        ""
    };
    let sql = format!(
        "SELECT t.id, t.ts_ms, t.route, t.arm, t.status, t.latency_ms, t.target, t.adapter, t.api,
                t.workload_id, t.episode_id, json_extract(t.rails, '$.status'),
                (SELECT group_concat(c.name, ',') FROM tool_calls c WHERE c.traffic_id = t.id),
                t.request
         FROM traffic t {index} {filter} ORDER BY t.ts_ms DESC LIMIT ?"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| {
        let request: String = r.get(13)?;
        let tools: Option<String> = r.get(12)?;
        Ok(json!({
            "id": r.get::<_, String>(0)?,
            "ts_ms": r.get::<_, i64>(1)?,
            "route": r.get::<_, String>(2)?,
            "arm": r.get::<_, String>(3)?,
            "status": r.get::<_, i64>(4)?,
            "latency_ms": r.get::<_, f64>(5)?,
            "target": r.get::<_, Option<String>>(6)?,
            "adapter": r.get::<_, Option<String>>(7)?,
            "api": r.get::<_, String>(8)?,
            "workload_id": r.get::<_, Option<String>>(9)?,
            "episode_id": r.get::<_, Option<String>>(10)?,
            "rails": r.get::<_, Option<String>>(11)?,
            "tools": tools.map(|t| t.split(',').map(str::to_string).collect::<Vec<_>>()).unwrap_or_default(),
            "prompt": last_user_text(&request),
        }))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The last user message of a logged chat request, cut to 300 characters.
fn last_user_text(request: &str) -> String {
    let v: Value = serde_json::from_str(request).unwrap_or(Value::Null);
    let text = v["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        })
        .unwrap_or_default();
    text.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_shown_is_the_last_user_text() {
        let r = json!({"messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "part"}]}
        ]});
        assert_eq!(last_user_text(&r.to_string()), "second part");
        assert_eq!(last_user_text("not json"), "");
        let long = json!({"messages": [{"role": "user", "content": "é".repeat(500)}]});
        assert_eq!(last_user_text(&long.to_string()).chars().count(), 300);
    }
}
