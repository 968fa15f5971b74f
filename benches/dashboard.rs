//! The dashboard's data API on a big log: writes 1,000,000 traffic rows (two routes, a week of
//! timestamps, tool calls, errors, rails blocks, shadow copies) through the real traffic writer
//! (so the per-minute rollups are kept as they would be), starts the gateway on that data
//! directory, and times each dashboard call.
//!
//! Searches name no `since_ms` (the API's default: the last day) unless marked with a week. The
//! texts: `needle` is in 10 requests, `city 499` in 2,000, `city 42` in 22,000 (more than the
//! search lists, so it is checked row by row), `weather` in nearly all.
//!
//! `cargo bench --bench dashboard -- [--rows N] [--calls N] [--data DIR]`: with `--data`, the log
//! is written to (and kept in) DIR, or read from it when DIR already holds one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use flywheel::store::traffic::{TrafficLog, TrafficRecord};
use flywheel::wire::Api;
use serde_json::{json, Map, Value};

const WEEK_MS: i64 = 7 * 24 * 3_600_000;

fn record(i: usize, now: i64, rows: usize) -> TrafficRecord {
    let route = if i % 10 < 7 { "agent" } else { "plain" };
    let text = if i % 100_000 == 7 {
        format!("needle-{i} where is my parcel")
    } else {
        format!("question {i}: what is the weather in city {}", i % 500)
    };
    let mut body = Map::new();
    body.insert("model".into(), json!(route));
    body.insert(
        "messages".into(),
        json!([{"role": "user", "content": text}]),
    );
    let ts = now - WEEK_MS + (i as i64 * WEEK_MS) / rows as i64;
    let mut r = TrafficRecord::begin(Api::Chat, &body, None, ts);
    r.request = Value::Object(body);
    r.arm = match i % 20 {
        0 | 1 => "canary",
        2 | 3 => "shadow",
        _ => "champion",
    }
    .into();
    r.target_kind = Some("upstream".into());
    r.target = Some("big".into());
    r.target_model = Some("big-model".into());
    r.attempts = 1;
    r.latency_ms = 20.0 + (i % 97) as f64;
    r.upstream_ms = Some(r.latency_ms - 0.3);
    r.ttft_ms = Some(r.latency_ms);
    if i.is_multiple_of(50) {
        r.status = 502;
        r.error = Some(json!({"error": {"message": "upstream failed"}}));
    } else {
        let tool = if i.is_multiple_of(2) {
            "get_weather"
        } else {
            "get_time"
        };
        r.response = Some(json!({
            "id": "chatcmpl-x", "object": "chat.completion", "created": ts / 1000, "model": "big-model",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": tool, "arguments": "{\"city\": \"x\"}"}}]}}],
            "usage": {"prompt_tokens": 60, "completion_tokens": 12, "total_tokens": 72}
        }));
    }
    if i.is_multiple_of(100) {
        r.rails = Some(json!({"status": "blocked"}));
    }
    if r.arm == "shadow" {
        r.tool_name_agreement = Some(!i.is_multiple_of(7));
        r.tool_args_agreement = Some(!i.is_multiple_of(5));
    }
    r
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let rows = arg("--rows", 1_000_000);
    let calls = arg("--calls", 10);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = args
        .iter()
        .position(|a| a == "--data")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| dir.path().join("data"), std::path::PathBuf::from);
    let kept = data.join("flywheel.db").exists();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let started = Instant::now();
    let now = flywheel::store::runs::now_ms();
    rt.block_on(async {
        if kept {
            return;
        }
        let writer = TrafficLog::start(
            &flywheel::store::Db::new(data.join("flywheel.db")),
            100_000,
            4096,
            Duration::ZERO,
        )
        .expect("traffic log");
        let log = writer.log();
        for i in 0..rows {
            assert!(log.record(record(i, now, rows)), "a record was dropped");
            if i % 50_000 == 49_999 {
                log.caught_up().await.expect("the writer keeps up");
            }
        }
        writer.close().await;
    });
    if kept {
        println!("reading the log kept in {}", data.display());
    } else {
        println!(
            "wrote {rows} traffic rows (rollups and text index included) in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    let config = dir.path().join("flywheel.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[upstreams]]\nname = \"big\"\nbase_url = \"http://127.0.0.1:9/v1\"\n[[routes]]\nname = \"agent\"\nchampion = {{ upstream = \"big\", model = \"big-model\" }}\n[[routes]]\nname = \"plain\"\nchampion = {{ upstream = \"big\", model = \"big-model\" }}\n",
            data.display()
        ),
    )
    .expect("config");
    // A log from an earlier version is brought up to date before the gateway listens.
    let (_gateway, addr) = common::serve(&config, Duration::from_secs(1800));
    let addr = format!("http://{addr}");

    let some_id = rt.block_on(async {
        let v: Value = reqwest::get(format!("{addr}/v1/dashboard/traffic?limit=1"))
            .await
            .expect("search")
            .json()
            .await
            .expect("json");
        v["data"][0]["id"].as_str().unwrap_or("").to_string()
    });
    let week_ago = now - WEEK_MS;
    let paths = [
        "/v1/dashboard/overview?window=1h".to_string(),
        "/v1/dashboard/overview?window=1d".to_string(),
        "/v1/dashboard/overview?window=1w".to_string(),
        "/v1/dashboard/overview?window=1w&route=agent".to_string(),
        "/v1/dashboard/traffic".to_string(),
        "/v1/dashboard/traffic?route=plain&status=error".to_string(),
        "/v1/dashboard/traffic?tool=get_time&arm=canary".to_string(),
        "/v1/dashboard/traffic?verdict=blocked".to_string(),
        "/v1/dashboard/traffic?q=needle".to_string(),
        "/v1/dashboard/traffic?workload=nobody".to_string(),
        format!("/v1/dashboard/traffic?route=plain&status=error&since_ms={week_ago}"),
        format!("/v1/dashboard/traffic?tool=get_time&arm=canary&since_ms={week_ago}"),
        format!("/v1/dashboard/traffic?q=needle&since_ms={week_ago}"),
        format!("/v1/dashboard/traffic?q=NEEDLE&route=plain&since_ms={week_ago}"),
        format!("/v1/dashboard/traffic?q=city%20499&since_ms={week_ago}"),
        format!("/v1/dashboard/traffic?q=city%2042&since_ms={week_ago}"),
        format!("/v1/dashboard/traffic?q=weather&since_ms={week_ago}"),
        format!("/v1/dashboard/traffic?q=weather&route=plain&status=error&since_ms={week_ago}"),
        format!("/v1/dashboard/traffic?workload=nobody&since_ms={week_ago}"),
        format!("/v1/dashboard/traffic/{some_id}"),
    ];
    println!(
        "dashboard API on {rows} rows, {calls} calls each, machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| call | rows answered | p50 ms | max ms |");
    println!("|---|---|---|---|");
    rt.block_on(async {
        let client = reqwest::Client::new();
        for p in &paths {
            let mut times = Vec::new();
            let mut answered = 0;
            for _ in 0..calls {
                let t = Instant::now();
                let r = client.get(format!("{addr}{p}")).send().await.expect("call");
                assert!(r.status().is_success(), "{p}: {}", r.status());
                let v: Value = r.json().await.expect("json");
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                answered = v["data"]
                    .as_array()
                    .map(Vec::len)
                    .or_else(|| v["routes"].as_array().map(Vec::len))
                    .unwrap_or(1);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "| `{p}` | {answered} | {:.1} | {:.1} |",
                times[times.len() / 2],
                times[times.len() - 1]
            );
        }
    });
}
