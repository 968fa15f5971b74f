//! The traffic log: one row per request, one row per tool call. Writers on the serving path hand
//! records to a bounded queue and never wait; a dedicated thread writes them in batched transactions.
//! A full queue drops the record (counted in metrics and logged), it never stalls a response.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::sql::{args, Arg, Conn, Dialect, Row, ToArg};
use super::Db;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::feedback::Feedback;
use super::StoreError;
use crate::wire::Api;

/// Everything recorded about one request (or one shadow request).
#[derive(Debug, Clone)]
pub struct TrafficRecord {
    pub id: uuid::Uuid,
    pub ts_ms: i64,
    pub workload_id: Option<String>,
    pub client_id: Option<String>,
    pub session_id: Option<String>,
    /// The agent task this request belongs to (the client's id, or one minted for the request).
    pub episode_id: Option<String>,
    pub route: String,
    /// `upstream` (or `local` once the engine lands).
    pub target_kind: Option<String>,
    /// The upstream's name.
    pub target: Option<String>,
    pub target_model: Option<String>,
    pub adapter: Option<String>,
    /// `champion`, `canary`, `shadow`, or `direct` (a target's model asked for by name).
    pub arm: String,
    pub shadow_of: Option<uuid::Uuid>,
    /// Targets tried, counting fallbacks.
    pub attempts: u32,
    pub stream: bool,
    pub status: u16,
    pub error: Option<Value>,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub upstream_ms: Option<f64>,
    pub rails: Option<Value>,
    pub tool_name_agreement: Option<bool>,
    pub tool_args_agreement: Option<bool>,
    /// The door the request came through.
    pub api: Api,
    /// The request in the pipeline's internal shape (a chat-completions body for the chat-shaped
    /// doors), as forwarded apart from `model`.
    pub request: Value,
    /// The client's own body when its door translated it (Responses, Messages).
    pub wire_request: Option<Value>,
    /// The full response in the internal shape; for streams, reassembled into one
    /// `chat.completion`; embedding vectors are not kept.
    pub response: Option<Value>,
}

impl TrafficRecord {
    /// A record for a request that has just arrived, before validation.
    pub fn begin(
        api: Api,
        body: &serde_json::Map<String, Value>,
        wire_request: Option<Value>,
        ts_ms: i64,
    ) -> Self {
        Self {
            id: uuid::Uuid::now_v7(),
            ts_ms,
            workload_id: None,
            client_id: None,
            session_id: None,
            episode_id: None,
            route: body
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            target_kind: None,
            target: None,
            target_model: None,
            adapter: None,
            arm: "none".into(),
            shadow_of: None,
            attempts: 0,
            stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
            status: 200,
            error: None,
            latency_ms: 0.0,
            ttft_ms: None,
            upstream_ms: None,
            rails: None,
            tool_name_agreement: None,
            tool_args_agreement: None,
            api,
            request: Value::Null,
            wire_request,
            response: None,
        }
    }
}

fn lock(recent: &Mutex<Recent>) -> MutexGuard<'_, Recent> {
    // A panic while remembering an id leaves nothing half-done that matters: take it back.
    recent.lock().unwrap_or_else(|p| p.into_inner())
}

enum Message {
    Entry(Entry),
    /// Answered once everything queued before it is committed.
    Barrier(oneshot::Sender<()>),
    Close,
}

/// A row the writer commits.
enum Entry {
    Traffic(Box<TrafficRecord>),
    Feedback(Box<Feedback>),
}

/// Why feedback could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the traffic log is disabled, so feedback cannot be recorded")]
    Disabled,
    #[error("the traffic log's queue stayed full; try again")]
    Full,
    #[error("the traffic log writer has stopped")]
    Stopped,
}

/// Longest a piece of feedback waits for room in a full queue before it is refused (never
/// dropped).
const FEEDBACK_WAIT: Duration = Duration::from_secs(5);

/// The serving path's handle on the log. Cheap to clone.
#[derive(Clone)]
pub struct TrafficLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: mpsc::Sender<Message>,
    capacity: usize,
    dropped: AtomicU64,
    recent: Mutex<Recent>,
}

/// How many of the latest queued requests the log remembers by id.
const RECENT_REQUESTS: usize = 200_000;

/// The ids of the latest queued requests and their episodes, so feedback on them is checked in
/// memory (no database read, and no wait for the writer's batch).
#[derive(Default)]
struct Recent {
    requests: HashSet<uuid::Uuid>,
    episodes: HashMap<String, usize>,
    order: VecDeque<(uuid::Uuid, Option<String>)>,
}

impl Recent {
    fn remember(&mut self, id: uuid::Uuid, episode: Option<String>) {
        // A stream is remembered when it starts and again when its row is queued.
        if !self.requests.insert(id) {
            return;
        }
        if let Some(e) = &episode {
            *self.episodes.entry(e.clone()).or_default() += 1;
        }
        self.order.push_back((id, episode));
        if self.order.len() > RECENT_REQUESTS {
            if let Some((old, episode)) = self.order.pop_front() {
                self.requests.remove(&old);
                if let Some(e) = episode {
                    if let Some(n) = self.episodes.get_mut(&e) {
                        *n -= 1;
                        if *n == 0 {
                            self.episodes.remove(&e);
                        }
                    }
                }
            }
        }
    }
}

/// Owns the writer thread; `close` drains the queue and waits for the last commit.
pub struct TrafficWriter {
    thread: Option<JoinHandle<()>>,
    log: TrafficLog,
}

impl TrafficLog {
    /// A log that records nothing (logging disabled in the config).
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Starts the writer thread on `db`.
    pub fn start(
        db: &Db,
        capacity: usize,
        batch_size: usize,
        flush_interval: Duration,
    ) -> Result<TrafficWriter, StoreError> {
        // An SQLite file is opened now, so a bad path fails the start; a PostgreSQL connection is
        // taken by the thread (the server was reached when the store was opened).
        let conn = match db.dialect() {
            Dialect::Sqlite => Some(db.open()?),
            Dialect::Postgres => None,
        };
        let db = db.clone();
        let (tx, rx) = mpsc::channel(capacity);
        let thread = std::thread::Builder::new()
            .name("traffic-writer".into())
            .spawn(move || {
                let mut writer = Writer { db, conn };
                write_loop(&mut writer, rx, batch_size, flush_interval)
            })?;
        let log = TrafficLog {
            inner: Some(Arc::new(Inner {
                tx,
                capacity,
                dropped: AtomicU64::new(0),
                recent: Mutex::new(Recent::default()),
            })),
        };
        Ok(TrafficWriter {
            thread: Some(thread),
            log,
        })
    }

    /// Queues a record without waiting. Returns false if it was dropped.
    pub fn record(&self, record: TrafficRecord) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        let (id, episode) = (record.id, record.episode_id.clone());
        match inner
            .tx
            .try_send(Message::Entry(Entry::Traffic(Box::new(record))))
        {
            Ok(()) => {
                lock(&inner.recent).remember(id, episode);
                metrics::gauge!("flywheel_log_queue_depth").set(self.depth() as f64);
                true
            }
            Err(e) => {
                let n = inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                metrics::counter!("flywheel_log_dropped_total").increment(1);
                let why = match e {
                    mpsc::error::TrySendError::Full(_) => "queue full",
                    mpsc::error::TrySendError::Closed(_) => "writer stopped",
                };
                tracing::warn!(dropped_total = n, "traffic record dropped: {why}");
                false
            }
        }
    }

    /// Remembers a request whose row is queued later (a stream, logged when it ends), so feedback
    /// on it is taken while it is still running.
    pub fn expect(&self, id: uuid::Uuid, episode: Option<String>) {
        if let Some(inner) = &self.inner {
            lock(&inner.recent).remember(id, episode);
        }
    }

    /// Whether records are written at all (logging is on).
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether a request with this id was queued lately (its row is written or about to be).
    pub fn knows_request(&self, id: &uuid::Uuid) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| lock(&i.recent).requests.contains(id))
    }

    /// Whether a request of this episode was queued lately.
    pub fn knows_episode(&self, id: &str) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| lock(&i.recent).episodes.contains_key(id))
    }

    /// Queues feedback behind every record queued before it, waiting for room if the queue is
    /// full: feedback is refused, never dropped.
    pub async fn feedback(&self, feedback: Feedback) -> Result<(), QueueError> {
        let inner = self.inner.as_ref().ok_or(QueueError::Disabled)?;
        let message = Message::Entry(Entry::Feedback(Box::new(feedback)));
        // Room in the queue is the usual case: no timer for it.
        let message = match inner.tx.try_send(message) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(QueueError::Stopped),
            Err(mpsc::error::TrySendError::Full(m)) => m,
        };
        match tokio::time::timeout(FEEDBACK_WAIT, inner.tx.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(QueueError::Stopped),
            Err(_) => Err(QueueError::Full),
        }
    }

    /// Waits until every record queued before this call is committed (at once for a disabled
    /// log).
    pub async fn caught_up(&self) -> Result<(), QueueError> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        match tokio::time::timeout(FEEDBACK_WAIT, inner.tx.send(Message::Barrier(tx))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(QueueError::Stopped),
            Err(_) => return Err(QueueError::Full),
        }
        rx.await.map_err(|_| QueueError::Stopped)
    }

    /// Records waiting to be written.
    pub fn depth(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |i| i.capacity - i.tx.capacity())
    }

    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.dropped.load(Ordering::Relaxed))
    }
}

impl TrafficWriter {
    pub fn log(&self) -> TrafficLog {
        self.log.clone()
    }

    /// Writes everything queued so far, then stops the writer thread.
    pub async fn close(mut self) {
        if let Some(inner) = &self.log.inner {
            // Waits for room rather than dropping: at shutdown nothing else is queuing.
            if inner.tx.send(Message::Close).await.is_err() {
                tracing::error!(
                    "the traffic log writer had already stopped; queued records are lost"
                );
            }
        }
        if let Some(thread) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the traffic log writer thread panicked");
            }
        }
    }
}

/// The writer thread's store and its connection (taken again after it breaks).
struct Writer {
    db: Db,
    conn: Option<Conn>,
}

/// How long the writer waits before trying an unreachable store again ...
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// ... and, when the gateway is stopping, for how long at most.
const RETRY_AT_CLOSE: Duration = Duration::from_secs(10);

fn write_loop(
    writer: &mut Writer,
    mut rx: mpsc::Receiver<Message>,
    batch_size: usize,
    flush_interval: Duration,
) {
    // Its batch bursts would otherwise show up in the serving path's tail latency on a small machine.
    crate::background::lower_thread_priority();
    let mut batch: Vec<Entry> = Vec::with_capacity(batch_size);
    let mut barriers: Vec<oneshot::Sender<()>> = Vec::new();
    let mut closing = false;
    while !closing {
        match rx.blocking_recv() {
            None => closing = true,
            Some(m @ Message::Entry(_)) => {
                closing |= take(m, &mut batch, &mut barriers);
                // Let a batch gather: one transaction per interval instead of one per request.
                if rx.len() + 1 < batch_size && !flush_interval.is_zero() {
                    std::thread::sleep(flush_interval);
                }
            }
            Some(m) => closing |= take(m, &mut batch, &mut barriers),
        }
        // Take what else is already waiting, up to a batch, without blocking.
        while batch.len() < batch_size {
            match rx.try_recv() {
                Ok(m) => closing |= take(m, &mut batch, &mut barriers),
                Err(_) => break,
            }
        }
        if closing {
            rx.close();
            while let Ok(m) = rx.try_recv() {
                take(m, &mut batch, &mut barriers);
            }
        }
        if !batch.is_empty() {
            writer.commit(&batch, closing);
            metrics::gauge!("flywheel_log_queue_depth").set(rx.len() as f64);
            batch.clear();
        }
        for b in barriers.drain(..) {
            // The caller may have given up waiting.
            let _ = b.send(());
        }
    }
    tracing::debug!("traffic writer stopped");
}

/// Sorts a message into the batch or the barriers; true for `Close`.
fn take(m: Message, batch: &mut Vec<Entry>, barriers: &mut Vec<oneshot::Sender<()>>) -> bool {
    match m {
        Message::Entry(e) => batch.push(e),
        Message::Barrier(b) => barriers.push(b),
        Message::Close => return true,
    }
    false
}

impl Writer {
    /// Commits a batch in one transaction. While the store cannot be reached (a PostgreSQL server
    /// gone away) the batch is kept and tried again every second, and the queue behind it fills
    /// up to its bound (then drops, counted); at shutdown it is tried for a while, then given up,
    /// counted as lost. Any other failure is tried row by row, so one bad row does not take its
    /// batch-mates with it.
    fn commit(&mut self, batch: &[Entry], closing: bool) {
        let n = batch.len();
        let started = std::time::Instant::now();
        let mut warned = false;
        let failed = loop {
            match self.write(batch) {
                Ok(()) => {
                    if warned {
                        tracing::info!(rows = n, "the store is back; the held batch is written");
                    }
                    metrics::counter!("flywheel_log_written_total").increment(n as u64);
                    return;
                }
                Err(e) if e.is_unavailable() => {
                    self.conn = None;
                    if closing && started.elapsed() >= RETRY_AT_CLOSE {
                        break e;
                    }
                    if !warned {
                        tracing::error!(rows = n, error = %e, "the store is unreachable; holding the batch and trying again every second");
                        warned = true;
                    }
                    metrics::counter!("flywheel_log_retries_total").increment(1);
                    std::thread::sleep(RETRY_EVERY);
                }
                Err(e) => {
                    tracing::error!(rows = n, error = %e, "writing traffic and feedback rows failed; retrying one by one");
                    break e;
                }
            }
        };
        let mut written = 0;
        for entry in batch {
            let result = if failed.is_unavailable() {
                Err(StoreError::Connect("the store stayed unreachable".into()))
            } else {
                self.write(std::slice::from_ref(entry))
            };
            match result {
                Ok(()) => written += 1,
                Err(e) => {
                    metrics::counter!("flywheel_log_dropped_total").increment(1);
                    match entry {
                        Entry::Traffic(r) => {
                            tracing::error!(id = %r.id, error = %e, "traffic record lost")
                        }
                        Entry::Feedback(f) => {
                            tracing::error!(id = %f.id, error = %e, "feedback lost")
                        }
                    }
                }
            }
        }
        metrics::counter!("flywheel_log_written_total").increment(written);
    }

    fn write(&mut self, batch: &[Entry]) -> Result<(), StoreError> {
        let conn = match self.conn.take() {
            Some(c) if !c.is_broken() => c,
            _ => self.db.open()?,
        };
        let result = write_batch(&conn, batch);
        self.conn = Some(conn);
        result
    }
}

fn write_batch(conn: &Conn, batch: &[Entry]) -> Result<(), StoreError> {
    conn.transaction(|tx| {
        if tx.dialect() == Dialect::Postgres {
            // The commit returns once the server has the rows, before its disk does (as SQLite's
            // synchronous=NORMAL): a server crash may lose the last fraction of a second of
            // rows, never corrupt them; the gateway's own crash loses nothing committed.
            tx.batch("SET LOCAL synchronous_commit = off")?;
        }
        let mut rollup = super::rollup::Rollup::default();
        let records: Vec<&TrafficRecord> = batch
            .iter()
            .filter_map(|e| match e {
                Entry::Traffic(r) => Some(&**r),
                Entry::Feedback(_) => None,
            })
            .collect();
        let unparsable = insert(tx, &records)?;
        for (r, bad) in records.iter().zip(unparsable) {
            rollup.add(&super::rollup::Counted::of(r, bad));
        }
        // Feedback after the traffic rows queued with it, which it may be about.
        for entry in batch {
            if let Entry::Feedback(f) = entry {
                super::feedback::insert(tx, f)?;
            }
        }
        // The rollups are a view of the rows: if they cannot be written, the rows still are.
        let rolled: Result<(), StoreError> = tx.transaction(|sp| rollup.write(sp));
        if let Err(e) = rolled {
            if e.is_unavailable() {
                return Err(e);
            }
            metrics::counter!("flywheel_rollup_errors_total").increment(1);
            tracing::warn!(error = %e, "the traffic rollups of a batch were not written; its rows were");
        }
        Ok(())
    })
}

/// The traffic table's columns as the writer fills them (after the row id).
const INSERT_COLUMNS: &str =
    "id, ts_ms, workload_id, client_id, session_id, route, target_kind, target,
    target_model, adapter, arm, shadow_of, attempts, stream, status, error, latency_ms, ttft_ms,
    upstream_ms, prompt_tokens, completion_tokens, total_tokens, finish_reason, rails,
    tool_name_agreement, tool_args_agreement, request, response, api, wire_request, episode_id";
const INSERT_ARGS: usize = 31;

/// A record's values for `INSERT_COLUMNS`.
fn row_args(r: &TrafficRecord) -> Vec<Arg<'_>> {
    let usage = r.response.as_ref().and_then(|v| v.get("usage"));
    let tokens = |k: &str| Arg::Int(usage.and_then(|u| u.get(k)).and_then(Value::as_i64));
    let finish_reason = r
        .response
        .as_ref()
        .and_then(|v| v.pointer("/choices/0/finish_reason"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let json = |v: Option<&Value>| Arg::Text(v.map(|v| v.to_string().into()));
    vec![
        Arg::Text(Some(r.id.to_string().into())),
        Arg::Int(Some(r.ts_ms)),
        r.workload_id.to_arg(),
        r.client_id.to_arg(),
        r.session_id.to_arg(),
        Arg::Text(Some(r.route.as_str().into())),
        r.target_kind.to_arg(),
        r.target.to_arg(),
        r.target_model.to_arg(),
        r.adapter.to_arg(),
        Arg::Text(Some(r.arm.as_str().into())),
        Arg::Text(r.shadow_of.map(|u| u.to_string().into())),
        Arg::Int(Some(r.attempts.into())),
        Arg::Int(Some(r.stream.into())),
        Arg::Int(Some(r.status.into())),
        json(r.error.as_ref()),
        Arg::Real(Some(r.latency_ms)),
        Arg::Real(r.ttft_ms),
        Arg::Real(r.upstream_ms),
        tokens("prompt_tokens"),
        tokens("completion_tokens"),
        tokens("total_tokens"),
        Arg::Text(finish_reason.map(Into::into)),
        json(r.rails.as_ref()),
        Arg::Int(r.tool_name_agreement.map(i64::from)),
        Arg::Int(r.tool_args_agreement.map(i64::from)),
        Arg::Text(Some(r.request.to_string().into())),
        json(r.response.as_ref()),
        Arg::Text(Some(r.api.as_str().into())),
        json(r.wire_request.as_ref()),
        r.episode_id.to_arg(),
    ]
}

/// Inserts records with their tool calls and text; returns, for each, whether any call's
/// arguments are not JSON.
fn insert(tx: &Conn, records: &[&TrafficRecord]) -> Result<Vec<bool>, StoreError> {
    let mut seqs = Vec::with_capacity(records.len());
    match tx.dialect() {
        Dialect::Sqlite => {
            // The row id is the request's millisecond times ROWS_PER_MS, plus one for each row
            // already logged in that millisecond.
            let sql = format!(
                "INSERT INTO traffic (rowid, {INSERT_COLUMNS})
                 VALUES ((SELECT coalesce(max(rowid) + 1, ?2 * 1048576) FROM traffic
                          WHERE rowid >= ?2 * 1048576 AND rowid < (?2 + 1) * 1048576),
                         {})
                 RETURNING rowid",
                placeholders(0, INSERT_ARGS)
            );
            for r in records {
                seqs.push(tx.value::<i64>(&sql, &row_args(r))?);
            }
        }
        Dialect::Postgres => {
            // Many writers share the table: the place within the millisecond comes from a
            // sequence (a block of values taken at once), so no two of them make the same id.
            let places: Vec<i64> = tx.query(
                "SELECT nextval('traffic_in_ms') FROM generate_series(1, ?1)",
                args![records.len()],
                |r| r.get(0),
            )?;
            seqs.extend(
                records
                    .iter()
                    .zip(&places)
                    .map(|(r, p)| r.ts_ms * ROWS_PER_MS + p.rem_euclid(ROWS_PER_MS)),
            );
            tx.copy_rows(
                &format!("traffic (seq, {INSERT_COLUMNS})"),
                records.iter().zip(&seqs).map(|(r, seq)| {
                    let mut row = vec![Arg::Int(Some(*seq))];
                    row.extend(row_args(r));
                    row
                }),
            )?;
        }
    }
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    let mut unparsable = Vec::with_capacity(records.len());
    for (r, seq) in records.iter().zip(&seqs) {
        let text = super::search::new_text(&r.request, r.response.as_ref());
        if !text.is_empty() {
            texts.push((*seq, text));
        }
        let mut bad = false;
        for call in crate::wire::tool_calls::in_completion(r.response.as_ref()) {
            let valid = serde_json::from_str::<Value>(&call.arguments).is_ok();
            bad |= !valid;
            calls.push((r.id.to_string(), call, valid));
        }
        unparsable.push(bad);
    }
    let seq = tx.dialect().seq();
    tx.copy_rows(
        &format!("traffic_text ({seq}, body)"),
        texts
            .iter()
            .map(|(s, t)| vec![Arg::Int(Some(*s)), Arg::Text(Some(t.as_str().into()))]),
    )?;
    tx.copy_rows(
        "tool_calls (traffic_id, choice_index, call_index, call_id, name, arguments, arguments_valid_json)",
        calls.iter().map(|(id, call, valid)| {
            vec![
                Arg::Text(Some(id.as_str().into())),
                Arg::Int(Some(call.choice_index)),
                Arg::Int(Some(call.call_index)),
                Arg::Text(call.id.as_deref().map(Into::into)),
                Arg::Text(Some(call.name.as_str().into())),
                Arg::Text(Some(call.arguments.as_str().into())),
                Arg::Int(Some((*valid).into())),
            ]
        }),
    )?;
    Ok(unparsable)
}

/// `?{from+1}, ..., ?{from+n}`.
fn placeholders(from: usize, n: usize) -> String {
    (from + 1..=from + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Traffic row ids follow time: a row's id is its request's millisecond times this, plus the
/// number of rows logged before it in that millisecond. The newest rows have the highest ids, so
/// the text index (keyed by row id) yields its matches newest first and a time range bounds them.
/// The SQL that assigns ids spells the number out (1048576).
pub const ROWS_PER_MS: i64 = 1 << 20;

/// Filters for an export.
#[derive(Debug, Default, Clone)]
pub struct ExportFilter {
    pub workload_id: Option<String>,
    pub route: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Include shadow rows (off by default: they are not what clients were served).
    pub include_shadow: bool,
}

/// The columns `record_json` reads, in its order.
const RECORD_COLUMNS: &str =
    "id, ts_ms, workload_id, client_id, session_id, route, target_kind, target,
    target_model, adapter, arm, shadow_of, attempts, stream, status, error, latency_ms, ttft_ms,
    upstream_ms, prompt_tokens, completion_tokens, total_tokens, finish_reason, rails,
    tool_name_agreement, tool_args_agreement, request, response, api, wire_request, episode_id";

/// Writes the log as JSONL in the NVIDIA Data Flywheel Blueprint record schema (`timestamp`,
/// `workload_id`, `client_id`, `request`, `response`) plus Flywheel's own fields. Returns the count.
pub fn export_jsonl(
    conn: &Conn,
    filter: &ExportFilter,
    out: &mut dyn Write,
) -> Result<u64, StoreError> {
    // A page at a time: a big export neither sits in memory whole nor holds one long read.
    let mut after = (i64::MIN, String::new());
    let mut n = 0u64;
    loop {
        let rows = conn.query(
            &format!(
                "SELECT {RECORD_COLUMNS}
                 FROM traffic
                 WHERE (?1 IS NULL OR workload_id = ?1) AND (?2 IS NULL OR route = ?2)
                   AND (?3 IS NULL OR ts_ms >= ?3) AND (?4 IS NULL OR ts_ms < ?4)
                   AND (?5 = 1 OR arm != 'shadow') AND (ts_ms, id) > (?6, ?7)
                 ORDER BY ts_ms, id LIMIT ?8"
            ),
            args![
                filter.workload_id,
                filter.route,
                filter.since_ms,
                filter.until_ms,
                filter.include_shadow,
                after.0,
                after.1,
                EXPORT_PAGE
            ],
            RecordRow::read,
        )?;
        let Some(last) = rows.last() else { break };
        after = (last.ts_ms, last.id.clone());
        for row in &rows {
            serde_json::to_writer(&mut *out, &row.to_json(conn)?)?;
            out.write_all(b"\n")?;
            n += 1;
        }
    }
    Ok(n)
}

/// One logged exchange in full, and the shadow answers given beside it (oldest first).
pub fn exchange(conn: &Conn, id: &str) -> Result<Option<(Value, Vec<Value>)>, StoreError> {
    let Some(row) = conn.query_opt(
        &format!("SELECT {RECORD_COLUMNS} FROM traffic WHERE id = ?1"),
        args![id],
        RecordRow::read,
    )?
    else {
        return Ok(None);
    };
    let record = row.to_json(conn)?;
    let shadows = conn
        .query(
            &format!("SELECT {RECORD_COLUMNS} FROM traffic WHERE shadow_of = ?1 ORDER BY ts_ms"),
            args![id],
            RecordRow::read,
        )?
        .iter()
        .map(|r| r.to_json(conn))
        .collect::<Result<_, _>>()?;
    Ok(Some((record, shadows)))
}

/// Rows an export reads at a time.
const EXPORT_PAGE: i64 = 1_000;

/// A row of `RECORD_COLUMNS`, read as its export record's fields.
struct RecordRow {
    id: String,
    ts_ms: i64,
    fields: Value,
}

impl RecordRow {
    fn read(row: &Row<'_>) -> Result<Self, StoreError> {
        let json_col = |i: usize| -> Result<Value, StoreError> {
            let s: Option<String> = row.get(i)?;
            Ok(s.and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or(Value::Null))
        };
        let id: String = row.get(0)?;
        let ts_ms: i64 = row.get(1)?;
        let fields = json!({
            "timestamp": ts_ms / 1000,
            "workload_id": row.get::<Option<String>>(2)?,
            "client_id": row.get::<Option<String>>(3)?,
            "request": json_col(26)?,
            "response": json_col(27)?,
            "id": id,
            "timestamp_ms": ts_ms,
            "session_id": row.get::<Option<String>>(4)?,
            "route": row.get::<String>(5)?,
            "target_kind": row.get::<Option<String>>(6)?,
            "target": row.get::<Option<String>>(7)?,
            "target_model": row.get::<Option<String>>(8)?,
            "adapter": row.get::<Option<String>>(9)?,
            "arm": row.get::<String>(10)?,
            "shadow_of": row.get::<Option<String>>(11)?,
            "attempts": row.get::<i64>(12)?,
            "stream": row.get::<bool>(13)?,
            "status": row.get::<i64>(14)?,
            "error": json_col(15)?,
            "latency_ms": row.get::<f64>(16)?,
            "ttft_ms": row.get::<Option<f64>>(17)?,
            "upstream_ms": row.get::<Option<f64>>(18)?,
            "usage": {
                "prompt_tokens": row.get::<Option<i64>>(19)?,
                "completion_tokens": row.get::<Option<i64>>(20)?,
                "total_tokens": row.get::<Option<i64>>(21)?,
            },
            "finish_reason": row.get::<Option<String>>(22)?,
            "rails": json_col(23)?,
            "tool_name_agreement": row.get::<Option<bool>>(24)?,
            "tool_args_agreement": row.get::<Option<bool>>(25)?,
            "api": row.get::<String>(28)?,
            "wire_request": json_col(29)?,
            "episode_id": row.get::<Option<String>>(30)?,
        });
        Ok(Self { id, ts_ms, fields })
    }

    /// The export record, with the row's tool calls and feedback.
    fn to_json(&self, conn: &Conn) -> Result<Value, StoreError> {
        let calls: Vec<Value> = conn.query(
            "SELECT choice_index, call_index, call_id, name, arguments, arguments_valid_json
             FROM tool_calls WHERE traffic_id = ?1 ORDER BY choice_index, call_index",
            args![self.id],
            |c| {
                Ok(json!({
                    "choice_index": c.get::<i64>(0)?,
                    "index": c.get::<i64>(1)?,
                    "id": c.get::<Option<String>>(2)?,
                    "name": c.get::<String>(3)?,
                    "arguments": c.get::<String>(4)?,
                    "arguments_valid_json": c.get::<bool>(5)?,
                }))
            },
        )?;
        let mut record = self.fields.clone();
        if let Some(m) = record.as_object_mut() {
            m.insert("tool_calls".into(), Value::Array(calls));
            m.insert(
                "feedback".into(),
                serde_json::to_value(super::feedback::for_request(conn, &self.id)?)?,
            );
        }
        Ok(record)
    }
}

/// The number of rows in the traffic table (used by tests and the CLI summary).
pub fn count(conn: &Conn) -> Result<i64, StoreError> {
    conn.value("SELECT COUNT(*) FROM traffic", &[])
}

/// One served request, as curation reads it.
pub struct ServedExchange {
    pub id: String,
    pub ts_ms: i64,
    /// The request a shadow copy mirrored (feedback and demonstrations name that one).
    pub shadow_of: Option<String>,
    pub episode_id: Option<String>,
    /// Which target answered, as `kind:backend:model`.
    pub answered_by: String,
    pub request: Value,
    pub response: Value,
    /// The rails verdict as recorded (JSON), if rails ran.
    pub rails: Option<Value>,
}

/// Which model answered: a target's kind, backend and model name as the log records them.
pub struct AnsweredBy<'a> {
    pub kind: &'a str,
    pub backend: &'a str,
    pub model: &'a str,
}

/// The answered (status 200) chat-shaped requests (from the chat, Responses and Messages doors,
/// all logged as chat completions) matching `filter`, oldest first. Without `by`, the answers
/// clients were served (no shadow copies); with `by`, the answers that target gave, as the client's
/// answer or as a shadow copy: a teacher's answers are ground truth wherever they were logged.
pub fn served_exchanges(
    conn: &Conn,
    filter: &ExportFilter,
    by: Option<&AnsweredBy<'_>>,
) -> Result<Vec<ServedExchange>, StoreError> {
    let parse = |s: Option<String>| s.and_then(|s| serde_json::from_str::<Value>(&s).ok());
    conn.query(
        "SELECT id, ts_ms, request, response, rails, shadow_of, episode_id,
                COALESCE(target_kind, '') || ':' || COALESCE(target, '') || ':' || COALESCE(target_model, '')
         FROM traffic
         WHERE status = 200 AND response IS NOT NULL AND api IN ('chat', 'responses', 'messages')
           AND (?1 IS NULL OR workload_id = ?1) AND (?2 IS NULL OR route = ?2)
           AND (?3 IS NULL OR ts_ms >= ?3) AND (?4 IS NULL OR ts_ms < ?4)
           AND CASE WHEN ?5 IS NULL THEN arm != 'shadow'
                    ELSE target_kind = ?5 AND target = ?6 AND target_model = ?7 END
         ORDER BY ts_ms, id",
        args![
            filter.workload_id,
            filter.route,
            filter.since_ms,
            filter.until_ms,
            by.map(|b| b.kind),
            by.map(|b| b.backend),
            by.map(|b| b.model)
        ],
        |r| {
            Ok(ServedExchange {
                id: r.get(0)?,
                ts_ms: r.get(1)?,
                request: parse(r.get(2)?).unwrap_or(Value::Null),
                response: parse(r.get(3)?).unwrap_or(Value::Null),
                rails: parse(r.get(4)?),
                shadow_of: r.get(5)?,
                episode_id: r.get(6)?,
                answered_by: r.get(7)?,
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_remembers_the_latest_requests_and_their_episodes_and_forgets_the_oldest() {
        let mut r = Recent::default();
        let first = uuid::Uuid::now_v7();
        r.remember(first, Some("task".into()));
        let second = uuid::Uuid::now_v7();
        r.remember(second, Some("task".into()));
        // A stream is remembered when it starts and when its row is queued: once.
        r.remember(second, Some("task".into()));
        for _ in 0..RECENT_REQUESTS - 1 {
            r.remember(uuid::Uuid::now_v7(), None);
        }
        // The first is gone; the episode is still known through the second.
        assert!(!r.requests.contains(&first) && r.requests.contains(&second));
        assert_eq!(r.episodes.get("task"), Some(&1));
        r.remember(uuid::Uuid::now_v7(), None);
        assert!(!r.requests.contains(&second));
        assert!(!r.episodes.contains_key("task"));
        assert_eq!(r.order.len(), RECENT_REQUESTS);
    }

    fn record(i: u32, response: Option<Value>) -> TrafficRecord {
        TrafficRecord {
            id: uuid::Uuid::now_v7(),
            ts_ms: 1_700_000_000_000 + i as i64,
            workload_id: Some("w".into()),
            client_id: Some("c".into()),
            session_id: None,
            episode_id: None,
            route: "r".into(),
            target_kind: Some("upstream".into()),
            target: Some("u".into()),
            target_model: Some("m".into()),
            adapter: None,
            arm: "champion".into(),
            shadow_of: None,
            attempts: 1,
            stream: false,
            status: 200,
            error: None,
            latency_ms: 1.0,
            ttft_ms: None,
            upstream_ms: Some(0.5),
            rails: None,
            tool_name_agreement: None,
            tool_args_agreement: None,
            api: Api::Chat,
            wire_request: None,
            request: json!({"model": "r", "messages": [{"role": "user", "content": "hi"}]}),
            response,
        }
    }

    use crate::store::testing::each_db;
    use crate::store::Db;

    /// Runs `f` on a connection of `db`, off the test's async thread.
    async fn on<T: Send + 'static>(
        db: &Db,
        f: impl FnOnce(&Conn) -> Result<T, StoreError> + Send + 'static,
    ) -> T {
        db.call(f).await.unwrap()
    }

    #[tokio::test]
    async fn rows_are_written_even_when_their_rollups_cannot_be() {
        let dir = tempfile::tempdir().unwrap();
        for db in each_db(
            "rows_are_written_even_when_their_rollups_cannot_be",
            dir.path(),
        ) {
            let rec = record(1, None);
            let other = record(70_000, None);
            let minute = super::super::rollup::minute_of(rec.ts_ms);
            let next_minute = minute + 60_000;
            assert_eq!(super::super::rollup::minute_of(other.ts_ms), next_minute);
            // A damaged rollup for the first record's minute.
            on(&db, move |conn| {
                conn.execute(
                    "INSERT INTO traffic_minutes (minute_ms, route, arm, requests, errors, blocked,
                        prompt_tokens, completion_tokens, compared, agreed_names, agreed_args,
                        parse_failures, latency, ttft, overhead, rails)
                     VALUES (?1, 'r', 'champion', 0, 0, 0, 0, 0, 0, 0, 0, 0, 'not json', '{}', '{}', '{}')",
                    args![minute],
                )
            })
            .await;
            let writer = TrafficLog::start(&db, 16, 8, Duration::ZERO).unwrap();
            assert!(writer.log().record(rec));
            writer.log().caught_up().await.unwrap();
            assert!(writer.log().record(other));
            writer.close().await;
            let (n, minutes) = on(&db, move |conn| {
                Ok((
                    count(conn)?,
                    super::super::rollup::minutes(conn, next_minute, i64::MAX, None)?,
                ))
            })
            .await;
            assert_eq!(n, 2, "both rows are kept ({:?})", db.dialect());
            assert_eq!(minutes.len(), 1, "the next minute is rolled up as usual");
            assert_eq!(minutes[0].3.requests, 1);
        }
    }

    #[tokio::test]
    async fn records_and_their_tool_calls_are_written_and_exported() {
        let dir = tempfile::tempdir().unwrap();
        for db in each_db(
            "records_and_their_tool_calls_are_written_and_exported",
            dir.path(),
        ) {
            let writer = TrafficLog::start(&db, 16, 4, Duration::from_millis(1)).unwrap();
            let log = writer.log();
            let response = json!({
                "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                    {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{oops"}}
                ]}, "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
            });
            for i in 0..10 {
                assert!(log.record(record(i, Some(response.clone()))));
            }
            writer.close().await;
            let (n, invalid, rolled, exported, out) = on(&db, |conn| {
                let invalid: i64 = conn.value(
                    "SELECT COUNT(*) FROM tool_calls WHERE arguments_valid_json = 0",
                    &[],
                )?;
                let minutes = super::super::rollup::minutes(conn, 0, i64::MAX, None)?;
                let rolled: u64 = minutes.iter().map(|m| m.3.parse_failures).sum();
                let mut out = Vec::new();
                let exported = export_jsonl(conn, &ExportFilter::default(), &mut out)?;
                Ok((count(conn)?, invalid, rolled, exported, out))
            })
            .await;
            assert_eq!((n, invalid), (10, 10), "{:?}", db.dialect());
            // The minute's rollup counts the same ten answers with an unparsable call.
            assert_eq!(rolled, 10);
            assert_eq!(exported, 10);
            let lines: Vec<Value> = out
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).unwrap())
                .collect();
            assert_eq!(lines.len(), 10);
            let first = &lines[0];
            assert_eq!(first["timestamp"], 1_700_000_000);
            assert_eq!(first["workload_id"], "w");
            assert_eq!(first["tool_calls"][1]["name"], "g");
            assert_eq!(first["tool_calls"][1]["arguments_valid_json"], false);
            assert_eq!(first["usage"]["total_tokens"], 7);
            assert_eq!(first["stream"], false);
            assert_eq!(lines[9]["timestamp_ms"], 1_700_000_000_009i64);
        }
    }

    #[tokio::test]
    async fn an_export_longer_than_a_page_comes_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for db in each_db(
            "an_export_longer_than_a_page_comes_whole_and_in_order",
            dir.path(),
        ) {
            let writer = TrafficLog::start(&db, 4096, 512, Duration::ZERO).unwrap();
            let rows = EXPORT_PAGE as u32 * 2 + 7;
            for i in 0..rows {
                // Two rows a millisecond: the page boundary falls inside one.
                assert!(writer.log().record(record(i / 2, None)));
            }
            writer.close().await;
            let out = on(&db, |conn| {
                let mut out = Vec::new();
                export_jsonl(conn, &ExportFilter::default(), &mut out)?;
                Ok(out)
            })
            .await;
            let ids: Vec<Value> = out
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice::<Value>(l).unwrap())
                .collect();
            assert_eq!(ids.len(), rows as usize, "{:?}", db.dialect());
            let unique: HashSet<&str> = ids.iter().map(|v| v["id"].as_str().unwrap()).collect();
            assert_eq!(unique.len(), rows as usize);
            assert!(ids
                .windows(2)
                .all(|w| w[0]["timestamp_ms"].as_i64() <= w[1]["timestamp_ms"].as_i64()));
        }
    }

    #[tokio::test]
    async fn curation_reads_only_answered_primary_requests_in_the_window() {
        let dir = tempfile::tempdir().unwrap();
        for db in each_db(
            "curation_reads_only_answered_primary_requests_in_the_window",
            dir.path(),
        ) {
            let writer = TrafficLog::start(&db, 16, 4, Duration::from_millis(1)).unwrap();
            let log = writer.log();
            let ok = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}]});
            for i in 0..6 {
                let mut r = record(i, Some(ok.clone()));
                match i {
                    1 => r.status = 502,
                    2 => r.arm = "shadow".into(),
                    3 => r.route = "other".into(),
                    4 => r.rails = Some(json!({"status": "blocked"})),
                    _ => {}
                }
                assert!(log.record(r));
            }
            writer.close().await;
            on(&db, |conn| {
                let f = ExportFilter {
                    route: Some("r".into()),
                    ..ExportFilter::default()
                };
                let xs = served_exchanges(conn, &f, None)?;
                // 0, 4 (blocked: curation drops it by its verdict) and 5 remain.
                assert_eq!(xs.len(), 3);
                assert_eq!(xs[1].rails.as_ref().unwrap()["status"], "blocked");
                let window = ExportFilter {
                    since_ms: Some(1_700_000_000_005),
                    ..f.clone()
                };
                assert_eq!(served_exchanges(conn, &window, None)?.len(), 1);
                // Answers by one target include its shadow copies (row 2) and nothing another
                // target said.
                let teacher = AnsweredBy {
                    kind: "upstream",
                    backend: "u",
                    model: "m",
                };
                let by = served_exchanges(conn, &f, Some(&teacher))?;
                assert_eq!(by.len(), 4);
                assert!(by.iter().any(|x| x.ts_ms == 1_700_000_000_002));
                assert_eq!(by[0].answered_by, "upstream:u:m");
                let other = AnsweredBy {
                    model: "other",
                    ..teacher
                };
                assert!(served_exchanges(conn, &f, Some(&other))?.is_empty());
                Ok(())
            })
            .await;
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        for db in each_db(
            "a_full_queue_drops_and_counts_instead_of_blocking",
            dir.path(),
        ) {
            // Hold the traffic table's write lock so the writer cannot drain the queue.
            let blocker = {
                let db = db.clone();
                tokio::task::spawn_blocking(move || {
                    let c = db.open()?;
                    c.batch(match c.dialect() {
                        Dialect::Sqlite => "BEGIN IMMEDIATE",
                        Dialect::Postgres => "BEGIN; LOCK TABLE traffic IN ACCESS EXCLUSIVE MODE",
                    })?;
                    Ok::<_, StoreError>(c)
                })
                .await
                .unwrap()
                .unwrap()
            };
            let writer = TrafficLog::start(&db, 2, 1, Duration::ZERO).unwrap();
            let log = writer.log();
            let mut accepted = 0;
            for i in 0..50 {
                if log.record(record(i, None)) {
                    accepted += 1;
                }
            }
            assert!(accepted < 50);
            assert_eq!(log.dropped(), 50 - accepted);
            tokio::task::spawn_blocking(move || blocker.batch("COMMIT"))
                .await
                .unwrap()
                .unwrap();
            writer.close().await;
            let n = on(&db, count).await;
            assert_eq!(n, accepted as i64, "{:?}", db.dialect());
        }
    }

    /// A TCP relay to the test PostgreSQL server that can be cut and restored, as a server that
    /// goes away and comes back.
    struct Relay {
        addr: std::net::SocketAddr,
        to: String,
        stop: Option<tokio::sync::watch::Sender<bool>>,
    }

    impl Relay {
        async fn start(to: String, at: Option<std::net::SocketAddr>) -> Self {
            let listener = tokio::net::TcpListener::bind(at.unwrap_or(([127, 0, 0, 1], 0).into()))
                .await
                .unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, watch) = tokio::sync::watch::channel(false);
            let target = to.clone();
            tokio::spawn(async move {
                loop {
                    let mut cut = watch.clone();
                    tokio::select! {
                        _ = cut.changed() => return,
                        accepted = listener.accept() => {
                            let Ok((mut inbound, _)) = accepted else { return };
                            let target = target.clone();
                            let mut cut = watch.clone();
                            tokio::spawn(async move {
                                let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                                tokio::select! {
                                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                                    _ = cut.changed() => {}
                                }
                            });
                        }
                    }
                }
            });
            Self {
                addr,
                to,
                stop: Some(stop),
            }
        }

        fn cut(&mut self) {
            if let Some(s) = self.stop.take() {
                let _ = s.send(true);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_wait_for_a_postgres_server_that_went_away_and_are_written_when_it_returns() {
        let name = "records_wait_for_a_postgres_server_that_went_away";
        let Some((_, url)) = crate::store::testing::fresh_postgres(name) else {
            return;
        };
        // postgres://user@host:port/db → the same through the relay.
        let (head, rest) = url.split_once('@').unwrap();
        let (server, database) = rest.split_once('/').unwrap();
        let mut relay = Relay::start(server.to_string(), None).await;
        let via = format!("{head}@{}/{database}", relay.addr);
        let db = Db::postgres(&via, 2).await.unwrap();
        let writer = TrafficLog::start(&db, 64, 8, Duration::ZERO).unwrap();
        let log = writer.log();
        for i in 0..5 {
            assert!(log.record(record(i, None)));
        }
        log.caught_up().await.unwrap();
        relay.cut();
        // While the server is away, records queue up to the bound, then drop (counted).
        for i in 5..100 {
            log.record(record(i, None));
        }
        let dropped = log.dropped();
        assert!(dropped > 0 && dropped < 95, "dropped {dropped}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let relay = Relay::start(relay.to.clone(), Some(relay.addr)).await;
        tokio::time::timeout(Duration::from_secs(30), log.caught_up())
            .await
            .expect("the held records were written once the server was back")
            .unwrap();
        writer.close().await;
        let direct = Db::postgres(&url, 2).await.unwrap();
        let n = on(&direct, count).await;
        assert_eq!(n as u64, 100 - dropped, "every queued record was written");
        drop(relay);
    }
}
