//! Finding exchanges in the traffic log: filters on route, workload, arm, status, tool name, rails
//! verdict, time and text, newest first, a page at a time. Only the filters given go into the
//! query, so SQLite can use the (route, ts) and (workload, ts) indexes.
//!
//! Text is found through a trigram full-text index (`traffic_text`, FTS5) of what each exchange
//! added to its conversation: the messages after the request's last assistant turn (or its
//! prompt or input), and the answer's text and tool calls. A conversation's history is sent again
//! with every turn; indexing only the new part keeps the index proportional to the traffic, and a
//! text is found in the exchange that brought it in.

use serde_json::{json, Value};

use super::sql::{args, Arg, Conn, Dialect};
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
    /// Text the exchange brought in (see the module's note), at least [`MIN_TEXT_CHARS`]
    /// characters, matched case-insensitively.
    pub text: Option<String>,
    /// Where the previous page stopped: rows strictly older than this one.
    pub before: Option<Cursor>,
    pub limit: usize,
}

/// A position in the newest-first order: a row's time and its place in the log, so rows logged
/// in the same millisecond are neither skipped nor shown twice across pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub ts_ms: i64,
    pub seq: i64,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.ts_ms, self.seq)
    }
}

impl std::str::FromStr for Cursor {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (ts, seq) = s.split_once('.').ok_or(())?;
        Ok(Self {
            ts_ms: ts.parse().map_err(|_| ())?,
            seq: seq.parse().map_err(|_| ())?,
        })
    }
}

/// The trigram index cannot look for less.
pub const MIN_TEXT_CHARS: usize = 3;
/// How much of an exchange's new text is indexed.
const INDEXED_CHARS: usize = 32 * 1024;

/// One page of a search and where the next one starts (None on the last page).
pub struct Page {
    pub rows: Vec<Value>,
    pub next: Option<Cursor>,
}

/// Exchanges matching every filter, newest first, a page at a time.
pub fn search(conn: &Conn, q: &TrafficQuery) -> Result<Page, StoreError> {
    search_in_chunks(conn, q, TEXT_CHUNK, TEXT_BUDGET)
}

/// Text matches are read from the index this many at a time, newest first ...
const TEXT_CHUNK: usize = 4096;
/// ... for about this long a page: a text common in the index but rare among the rows the other
/// filters keep answers with what it found so far and a cursor to search on from.
const TEXT_BUDGET: std::time::Duration = std::time::Duration::from_millis(100);

fn search_in_chunks(
    conn: &Conn,
    q: &TrafficQuery,
    chunk: usize,
    budget: std::time::Duration,
) -> Result<Page, StoreError> {
    let started = std::time::Instant::now();
    let Some(text) = &q.text else {
        let rows = select(conn, q, None, q.limit)?;
        let next = rows
            .last()
            .map(|(_, c)| *c)
            .filter(|_| rows.len() == q.limit);
        return Ok(Page {
            rows: rows.into_iter().map(|(v, _)| v).collect(),
            next,
        });
    };
    // Row ids follow time (see `traffic::ROWS_PER_MS`), so the index's matches come newest
    // first and the time filters bound them.
    let dialect = conn.dialect();
    let pattern = match dialect {
        Dialect::Sqlite => format!("\"{}\"", text.replace('"', "\"\"")),
        Dialect::Postgres => format!(
            "%{}%",
            text.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        ),
    };
    let per_ms = super::traffic::ROWS_PER_MS;
    let low = q.since_ms.map_or(i64::MIN, |t| t.saturating_mul(per_ms));
    let mut high = q.until_ms.map_or(i64::MAX, |t| t.saturating_mul(per_ms));
    if let Some(c) = q.before {
        high = high.min(c.seq);
    }
    let matches = match dialect {
        Dialect::Sqlite => {
            "SELECT rowid FROM traffic_text WHERE traffic_text MATCH ?1 AND rowid >= ?2 AND rowid < ?3
             ORDER BY rowid DESC LIMIT ?4"
        }
        Dialect::Postgres => {
            "SELECT seq FROM traffic_text WHERE body ILIKE ?1 AND seq >= ?2 AND seq < ?3
             ORDER BY seq DESC LIMIT ?4"
        }
    };
    let mut rows = Vec::new();
    let mut read_all = false;
    loop {
        let ids: Vec<i64> = conn.query(matches, args![pattern, low, high, chunk], |r| r.get(0))?;
        let Some(&oldest) = ids.last() else {
            read_all = true;
            break;
        };
        rows.extend(select(conn, q, Some(&ids), q.limit - rows.len())?);
        if rows.len() == q.limit {
            let next = rows.last().map(|(_, c)| *c);
            return Ok(Page {
                rows: rows.into_iter().map(|(v, _)| v).collect(),
                next,
            });
        }
        high = oldest;
        if ids.len() < chunk {
            read_all = true;
            break;
        }
        if started.elapsed() >= budget {
            break;
        }
    }
    // The page's share of the index was read before every match was: the next page searches on
    // from the oldest match read, if there is another.
    if !read_all {
        read_all = conn
            .query_opt(matches, args![pattern, low, high, 1], |r| r.get::<i64>(0))?
            .is_none();
    }
    Ok(Page {
        rows: rows.into_iter().map(|(v, _)| v).collect(),
        next: (!read_all).then_some(Cursor {
            ts_ms: high.div_euclid(per_ms),
            seq: high,
        }),
    })
}

/// The rows matching the filters (all but the text), newest first, at most `limit`, and only
/// among `ids` when given.
fn select(
    conn: &Conn,
    q: &TrafficQuery,
    ids: Option<&[i64]>,
    limit: usize,
) -> Result<Vec<(Value, Cursor)>, StoreError> {
    let dialect = conn.dialect();
    let seq = dialect.seq();
    let mut clauses: Vec<String> = Vec::new();
    let mut args: Vec<Arg<'_>> = Vec::new();
    // The text's matches name the rows: each is looked up by its id.
    if let Some(ids) = ids {
        args.push(Arg::Text(Some(match dialect {
            Dialect::Sqlite => serde_json::to_string(ids)?.into(),
            Dialect::Postgres => format!(
                "{{{}}}",
                ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
            )
            .into(),
        })));
    }
    let mut push = |clause: &str, v: Arg<'static>| {
        args.push(v);
        clauses.push(clause.replace('?', &format!("?{}", args.len())));
    };
    if let Some(t) = q.since_ms {
        push("t.ts_ms >= ?", Arg::Int(Some(t)));
    }
    if let Some(t) = q.until_ms {
        push("t.ts_ms < ?", Arg::Int(Some(t)));
    }
    if let Some(r) = &q.route {
        push("t.route = ?", Arg::Text(Some(r.clone().into())));
    }
    if let Some(w) = &q.workload {
        push("t.workload_id = ?", Arg::Text(Some(w.clone().into())));
    }
    if let Some(a) = &q.arm {
        push("t.arm = ?", Arg::Text(Some(a.clone().into())));
    }
    if let Some(tool) = &q.tool {
        // SQLite's `+c.name`: each row's calls are found by the primary key, not by scanning
        // every call of that name.
        let name = match dialect {
            Dialect::Sqlite => "+c.name",
            Dialect::Postgres => "c.name",
        };
        push(
            &format!(
                "EXISTS (SELECT 1 FROM tool_calls c WHERE c.traffic_id = t.id AND {name} = ?)"
            ),
            Arg::Text(Some(tool.clone().into())),
        );
    }
    let verdict = dialect.json_text("t.rails", "status");
    match q.verdict.as_deref() {
        Some("none") => clauses.push("t.rails IS NULL".into()),
        Some(v) => push(
            &format!("{verdict} = ?"),
            Arg::Text(Some(v.to_string().into())),
        ),
        None => {}
    }
    if let Some(c) = q.before {
        args.push(Arg::Int(Some(c.ts_ms)));
        args.push(Arg::Int(Some(c.seq)));
        clauses.push(format!(
            "(t.ts_ms, t.{seq}) < (?{}, ?{})",
            args.len() - 1,
            args.len()
        ));
    }
    // Literal bounds, so the partial index on failed requests can serve `error`.
    match q.status {
        Some(StatusFilter::Ok) => clauses.push("t.status < 400".into()),
        Some(StatusFilter::Error) => clauses.push("t.status >= 400".into()),
        Some(StatusFilter::Exactly(s)) => {
            args.push(Arg::Int(Some(s.into())));
            clauses.push(format!("t.status = ?{}", args.len()));
        }
        None => {}
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    args.push(Arg::Int(Some(limit as i64)));
    let limit_at = args.len();
    let from = match (dialect, ids) {
        // CROSS JOIN keeps SQLite from walking an index of the other filters instead.
        (Dialect::Sqlite, Some(_)) => {
            "json_each(?1) AS m CROSS JOIN traffic t ON t.rowid = m.value"
        }
        (Dialect::Postgres, Some(_)) => {
            "unnest(CAST(?1 AS BIGINT[])) AS m(value) JOIN traffic t ON t.seq = m.value"
        }
        // Failures are few: walking their partial indexes beats walking a route's every request.
        (Dialect::Sqlite, None) if q.status == Some(StatusFilter::Error) && q.route.is_some() => {
            "traffic t INDEXED BY traffic_errors_route_ts"
        }
        (Dialect::Sqlite, None) if q.status == Some(StatusFilter::Error) => {
            "traffic t INDEXED BY traffic_errors_ts"
        }
        _ => "traffic t",
    };
    let names = match dialect {
        Dialect::Sqlite => "group_concat(c.name, ',')",
        Dialect::Postgres => "string_agg(c.name, ',')",
    };
    let sql = format!(
        "SELECT t.id, t.ts_ms, t.route, t.arm, t.status, t.latency_ms, t.target, t.adapter, t.api,
                t.workload_id, t.episode_id, {verdict},
                (SELECT {names} FROM tool_calls c WHERE c.traffic_id = t.id),
                t.request, t.{seq}
         FROM {from} {filter} ORDER BY t.ts_ms DESC, t.{seq} DESC LIMIT ?{limit_at}"
    );
    conn.query(&sql, &args, |r| {
        let request: String = r.get(13)?;
        let tools: Option<String> = r.get(12)?;
        let cursor = Cursor {
            ts_ms: r.get(1)?,
            seq: r.get(14)?,
        };
        Ok((
            json!({
                "id": r.get::<String>(0)?,
                "ts_ms": cursor.ts_ms,
                "route": r.get::<String>(2)?,
                "arm": r.get::<String>(3)?,
                "status": r.get::<i64>(4)?,
                "latency_ms": r.get::<f64>(5)?,
                "target": r.get::<Option<String>>(6)?,
                "adapter": r.get::<Option<String>>(7)?,
                "api": r.get::<String>(8)?,
                "workload_id": r.get::<Option<String>>(9)?,
                "episode_id": r.get::<Option<String>>(10)?,
                "rails": r.get::<Option<String>>(11)?,
                "tools": tools.map(|t| t.split(',').map(str::to_string).collect::<Vec<_>>()).unwrap_or_default(),
                "prompt": last_user_text(&request),
            }),
            cursor,
        ))
    })
}

/// Adds a stored row's new text to the search index, in the writer's transaction.
pub fn index(
    tx: &Conn,
    rowid: i64,
    request: &Value,
    response: Option<&Value>,
) -> Result<(), StoreError> {
    let text = new_text(request, response);
    if !text.is_empty() {
        let sql = match tx.dialect() {
            Dialect::Sqlite => "INSERT INTO traffic_text (rowid, body) VALUES (?1, ?2)",
            Dialect::Postgres => "INSERT INTO traffic_text (seq, body) VALUES (?1, ?2)",
        };
        tx.execute(sql, args![rowid, text])?;
    }
    Ok(())
}

/// What an exchange added to its conversation, as the index holds it: the request's messages
/// after its last assistant turn (system prompts left out), its prompt or input for the doors
/// that have no messages, and the answer's text and tool calls; the first [`INDEXED_CHARS`].
pub fn new_text(request: &Value, response: Option<&Value>) -> String {
    let mut parts: Vec<&str> = Vec::new();
    if let Some(messages) = request.get("messages").and_then(Value::as_array) {
        let start = messages
            .iter()
            .rposition(|m| m["role"] == "assistant")
            .map_or(0, |i| i + 1);
        for m in &messages[start..] {
            if m["role"] == "system" || m["role"] == "developer" {
                continue;
            }
            content_text(&m["content"], &mut parts);
        }
    }
    for key in ["prompt", "input"] {
        match request.get(key) {
            Some(Value::String(s)) => parts.push(s),
            Some(Value::Array(items)) => parts.extend(items.iter().filter_map(Value::as_str)),
            _ => {}
        }
    }
    for choice in response
        .and_then(|r| r.get("choices"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(text) = choice["text"].as_str() {
            parts.push(text);
        }
        content_text(&choice["message"]["content"], &mut parts);
        for call in choice["message"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for field in ["name", "arguments"] {
                if let Some(s) = call["function"][field].as_str() {
                    parts.push(s);
                }
            }
        }
    }
    let mut text = String::new();
    for p in parts.into_iter().filter(|p| !p.is_empty()) {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(p);
        if text.len() >= INDEXED_CHARS {
            break;
        }
    }
    if text.len() > INDEXED_CHARS {
        let mut cut = INDEXED_CHARS;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

fn content_text<'a>(content: &'a Value, parts: &mut Vec<&'a str>) {
    match content {
        Value::String(s) => parts.push(s),
        Value::Array(items) => parts.extend(items.iter().filter_map(|p| p["text"].as_str())),
        _ => {}
    }
}

/// Indexes the rows stored before the index existed (run once, as it is created); returns how
/// many.
pub fn index_existing(tx: &Conn) -> Result<u64, StoreError> {
    let seq = tx.dialect().seq();
    let rows = tx.query(
        &format!("SELECT {seq}, request, response FROM traffic"),
        &[],
        |r| {
            Ok((
                r.get::<i64>(0)?,
                r.get::<String>(1)?,
                r.get::<Option<String>>(2)?,
            ))
        },
    )?;
    let mut n = 0;
    for (seq, request, response) in rows {
        let request: Value = serde_json::from_str(&request).unwrap_or(Value::Null);
        let response: Option<Value> = response.and_then(|s| serde_json::from_str(&s).ok());
        index(tx, seq, &request, response.as_ref())?;
        n += 1;
    }
    Ok(n)
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

    #[test]
    fn the_index_holds_what_an_exchange_added_and_its_answer() {
        let request = json!({"messages": [
            {"role": "system", "content": "you are terse"},
            {"role": "user", "content": "old question"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "tool said 42"},
            {"role": "user", "content": [{"type": "text", "text": "and now?"}]}
        ]});
        let response = json!({"choices": [{"index": 0, "message": {"role": "assistant",
            "content": "thinking", "tool_calls": [{"id": "d", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]}}]});
        let text = new_text(&request, Some(&response));
        assert_eq!(
            text,
            "tool said 42\nand now?\nthinking\nget_weather\n{\"city\": \"Oslo\"}"
        );
        // A first turn has no assistant message: all of it but the system prompt.
        let first = json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi there"}]});
        assert_eq!(new_text(&first, None), "hi there");
        // The doors without messages, and a cap that respects characters.
        assert_eq!(
            new_text(
                &json!({"prompt": ["a b", "c"]}),
                Some(&json!({"choices": [{"text": "d"}]}))
            ),
            "a b\nc\nd"
        );
        assert_eq!(new_text(&json!({"input": "embed me"}), None), "embed me");
        let big = new_text(&json!({"input": "é".repeat(INDEXED_CHARS)}), None);
        assert!(big.len() <= INDEXED_CHARS && big.len() > INDEXED_CHARS - 2);
    }

    #[test]
    fn text_is_found_by_substring_whatever_its_case_and_forgotten_with_its_row() {
        crate::store::testing::each_engine(
            "text_is_found_by_substring_whatever_its_case_and_forgotten_with_its_row",
            text_search_on,
        );
    }

    fn text_search_on(conn: &Conn) {
        let seq = match conn.dialect() {
            Dialect::Sqlite => {
                "(SELECT coalesce(max(rowid) + 1, ?2 * 1048576) FROM traffic
                  WHERE rowid >= ?2 * 1048576 AND rowid < (?2 + 1) * 1048576)"
            }
            Dialect::Postgres => "?2 * 1048576 + nextval('traffic_in_ms') % 1048576",
        };
        let insert = |id: &str, ts: i64, text: &str| {
            let request = json!({"messages": [{"role": "user", "content": text}]});
            let at: i64 = conn
                .value(
                    &format!(
                        "INSERT INTO traffic ({col}, id, ts_ms, route, arm, stream, status, latency_ms, request, api)
                         VALUES ({seq}, ?1, ?2, 'r', 'champion', 0, 200, 1.0, ?3, 'chat') RETURNING {col}",
                        col = conn.dialect().seq()
                    ),
                    args![id, ts, request.to_string()],
                )
                .unwrap();
            index(conn, at, &request, None).unwrap();
        };
        insert("a", 10, "Where is my Parcel, order 1234?");
        insert("b", 20, "what is the weather");
        insert("c", 20, "PARCEL again, same millisecond as b");
        let ids = |text: &str| {
            let q = TrafficQuery {
                text: Some(text.into()),
                limit: 10,
                ..Default::default()
            };
            let ids = |p: &Page| {
                p.rows
                    .iter()
                    .map(|r| r["id"].as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            };
            let whole = ids(&search(conn, &q).unwrap());
            // Read from the index one match a page, the pages add up to the same answer.
            let mut paged = Vec::new();
            let mut q = q.clone();
            loop {
                let page = search_in_chunks(conn, &q, 1, std::time::Duration::ZERO).unwrap();
                paged.extend(ids(&page));
                match page.next {
                    Some(c) => q.before = Some(c),
                    None => break,
                }
            }
            assert_eq!(whole, paged, "{text}");
            whole
        };
        // An unrelated row in between, so a page can hold no match.
        insert("x", 15, "nothing to see");
        assert_eq!(ids("parcel"), ["c", "a"]);
        assert_eq!(ids("der 12"), ["a"]);
        assert_eq!(ids("\"quoted\""), Vec::<String>::new());
        conn.execute("DELETE FROM traffic WHERE id = 'c'", &[])
            .unwrap();
        assert_eq!(ids("parcel"), ["a"]);
        // Two rows in one millisecond page apart without loss.
        insert("d", 20, "more weather");
        let mut q = TrafficQuery {
            text: Some("weather".into()),
            limit: 1,
            ..Default::default()
        };
        let first = search(conn, &q).unwrap();
        q.before = first.next;
        let second = search(conn, &q).unwrap();
        assert_eq!(first.rows[0]["id"], "d");
        assert_eq!(second.rows[0]["id"], "b");
        let cursor = first.next.unwrap();
        assert_eq!(cursor.to_string().parse::<Cursor>(), Ok(cursor));
    }
}
