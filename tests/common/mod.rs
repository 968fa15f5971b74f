//! Test harness: a mock OpenAI-compatible upstream (the only stand-in) and the real `flywheel`
//! binary started on an ephemeral port with a config written for the test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};

/// What the mock saw.
#[derive(Default)]
pub struct MockState {
    pub requests: Mutex<Vec<(HeaderMap, Value)>>,
    pub counts: Mutex<HashMap<String, usize>>,
    /// Streams whose body was dropped before it finished (the gateway hung up).
    pub cancelled: AtomicUsize,
    /// The HTTP version of each request.
    pub versions: Mutex<Vec<axum::http::Version>>,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
}

impl MockState {
    /// Counts and keeps a request; returns its model.
    fn record(&self, headers: HeaderMap, body: &Value) -> String {
        let model = body["model"].as_str().unwrap_or("").to_string();
        *self
            .counts
            .lock()
            .unwrap()
            .entry(model.clone())
            .or_insert(0) += 1;
        self.requests.lock().unwrap().push((headers, body.clone()));
        model
    }
}

impl MockUpstream {
    pub async fn start() -> Self {
        let state = Arc::new(MockState::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(mock_chat))
            .route("/v1/completions", post(mock_completion))
            .route("/v1/embeddings", post(mock_embeddings))
            .route("/v1/responses", post(mock_responses))
            .route("/v1/messages", post(mock_messages))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, state }
    }

    /// The same mock over TLS (HTTP/1.1 and HTTP/2 by ALPN), using the gateway's own listener code.
    pub async fn start_tls(cert: &Path, key: &Path) -> Self {
        let state = Arc::new(MockState::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(mock_chat))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = flywheel::api::server::tls_acceptor(cert, key).unwrap();
        tokio::spawn(flywheel::api::server::serve(
            listener,
            app,
            Some(acceptor),
            std::future::pending(),
            Duration::from_secs(1),
        ));
        Self { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn count(&self, model: &str) -> usize {
        self.state
            .counts
            .lock()
            .unwrap()
            .get(model)
            .copied()
            .unwrap_or(0)
    }

    pub fn requests_for(&self, model: &str) -> Vec<(HeaderMap, Value)> {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, b)| b["model"] == model)
            .cloned()
            .collect()
    }
}

fn completion(model: &str, message: Value, finish: &str) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    })
}

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    })
}

fn usage_chunk(model: &str) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    })
}

fn sse(events: &[Value], done: bool) -> String {
    let mut s = String::new();
    for e in events {
        s.push_str(&format!("data: {e}\n\n"));
    }
    if done {
        s.push_str("data: [DONE]\n\n");
    }
    s
}

fn sse_response(body: impl Into<Body>) -> Response {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body.into())
        .unwrap()
}

fn tool_calls(model: &str) -> Vec<(&'static str, &'static str)> {
    match model {
        "tools" => vec![("get_weather", r#"{"city": "Paris"}"#)],
        "tools-alt" => vec![("get_weather", r#"{"city": "Lyon"}"#)],
        "parallel" => vec![
            ("get_weather", r#"{"city": "Paris"}"#),
            ("get_time", r#"{"tz": "Europe/Paris"}"#),
        ],
        // A call that carries a payment card number in its arguments.
        "card-call" => vec![(
            "pay",
            r#"{"card": "4111 1111 1111 1111", "amount": 20, "memo": "for bob@example.com"}"#,
        )],
        _ => vec![],
    }
}

/// A stream chunk source that counts itself cancelled when dropped before its end.
struct DropWatch {
    state: Arc<MockState>,
    finished: bool,
}
impl Drop for DropWatch {
    fn drop(&mut self) {
        if !self.finished {
            self.state.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn mock_chat(
    State(state): State<Arc<MockState>>,
    version: axum::http::Version,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    state.versions.lock().unwrap().push(version);
    let model = body["model"].as_str().unwrap_or("").to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let n = {
        let mut counts = state.counts.lock().unwrap();
        let c = counts.entry(model.clone()).or_insert(0);
        *c += 1;
        *c
    };
    state.requests.lock().unwrap().push((headers, body.clone()));
    let last_user = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    match model.as_str() {
        "flaky" if n <= 2 => {
            return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": {"message": "busy", "type": "server_error", "param": null, "code": null}}))).into_response()
        }
        "always-500" => return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        "rate-limited" => {
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0")], Json(json!({"error": {"message": "slow down", "type": "rate_limit_error", "param": null, "code": null}}))).into_response()
        }
        "bad-request" => {
            return (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": "upstream says no", "type": "invalid_request_error", "param": "messages", "code": "upstream_specific"}}))).into_response()
        }
        "garbage" => return (StatusCode::OK, [("content-type", "application/json")], "<html>not json</html>").into_response(),
        "wrong-ctype" => return (StatusCode::OK, Json(completion(&model, json!({"role": "assistant", "content": "x"}), "stop"))).into_response(),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return (StatusCode::OK, "late").into_response();
        }
        "slow" => tokio::time::sleep(Duration::from_millis(300)).await,
        _ => {}
    }
    // "agent" calls get_weather until it is handed the tool's result, then answers with it.
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .unwrap_or(Value::Null);
    let (calls, reply) = if model == "agent" && last["role"] == "tool" {
        (
            vec![],
            format!("the weather is {}", last["content"].as_str().unwrap_or("")),
        )
    } else if model == "agent" {
        (vec![("get_weather", r#"{"city": "Paris"}"#)], String::new())
    } else {
        (tool_calls(&model), format!("echo: {last_user}"))
    };
    if !stream {
        let message = if calls.is_empty() {
            json!({"role": "assistant", "content": reply, "refusal": null})
        } else {
            let tc: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, (name, args))| json!({"id": format!("call_{i}"), "type": "function", "function": {"name": name, "arguments": args}}))
                .collect();
            json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": tc})
        };
        let finish = if calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        };
        return Json(completion(&model, message, finish)).into_response();
    }
    // Streaming.
    let mut events = vec![chunk(
        &model,
        json!({"role": "assistant", "content": if calls.is_empty() { json!("") } else { Value::Null }}),
        None,
    )];
    if calls.is_empty() {
        for word in reply.split_inclusive(' ') {
            events.push(chunk(&model, json!({"content": word}), None));
        }
    } else {
        for (i, (name, args)) in calls.iter().enumerate() {
            events.push(chunk(&model, json!({"tool_calls": [{"index": i, "id": format!("call_{i}"), "type": "function", "function": {"name": name, "arguments": ""}}]}), None));
            let (a, b) = args.split_at(args.len() / 2);
            for part in [a, b] {
                events.push(chunk(
                    &model,
                    json!({"tool_calls": [{"index": i, "function": {"arguments": part}}]}),
                    None,
                ));
            }
        }
    }
    match model.as_str() {
        "midstream-fail" => {
            let head = sse(&events[..2], false);
            // The head is flushed before the connection dies, so the stream has really begun.
            let body = futures_util::stream::unfold(0, move |i| {
                let head = head.clone();
                async move {
                    match i {
                        0 => Some((Ok::<Bytes, std::io::Error>(Bytes::from(head)), 1)),
                        1 => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Some((Err(std::io::Error::other("upstream died")), 2))
                        }
                        _ => None,
                    }
                }
            });
            return sse_response(Body::from_stream(body));
        }
        "truncated" => return sse_response(sse(&events, false)),
        "endless" => {
            let watch = DropWatch {
                state: state.clone(),
                finished: false,
            };
            let model = model.clone();
            let body = futures_util::stream::unfold((watch, 0u64), move |(w, i)| {
                let model = model.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let ev = chunk(&model, json!({"content": format!("t{i} ")}), None);
                    Some((
                        Ok::<Bytes, std::io::Error>(Bytes::from(format!("data: {ev}\n\n"))),
                        (w, i + 1),
                    ))
                }
            });
            return sse_response(Body::from_stream(body));
        }
        _ => {}
    }
    events.push(chunk(
        &model,
        json!({}),
        Some(if calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        }),
    ));
    if include_usage {
        events.push(usage_chunk(&model));
    }
    sse_response(sse(&events, true))
}

/// Legacy completions: the prompt echoed back, streamed as `text_completion` chunks on request.
async fn mock_completion(State(state): State<Arc<MockState>>, Json(body): Json<Value>) -> Response {
    let model = state.record(HeaderMap::new(), &body);
    let prompt = body["prompt"].as_str().unwrap_or("").to_string();
    let object = |text: &str, finish: Option<&str>| {
        json!({"id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}]})
    };
    let usage = json!({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7});
    if body["stream"].as_bool() != Some(true) {
        let mut v = object(&format!(" after {prompt}"), Some("stop"));
        v["usage"] = usage;
        return Json(v).into_response();
    }
    let mut events = vec![
        object(" after", None),
        object(&format!(" {prompt}"), None),
        object("", Some("stop")),
    ];
    if body["stream_options"]["include_usage"].as_bool() == Some(true) {
        let mut u = object("", None);
        u["choices"] = json!([]);
        u["usage"] = usage;
        events.push(u);
    }
    sse_response(sse(&events, true))
}

/// Embeddings: each input's vector is its length and three fixed numbers.
async fn mock_embeddings(State(state): State<Arc<MockState>>, Json(body): Json<Value>) -> Response {
    let model = state.record(HeaderMap::new(), &body);
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().unwrap_or("").to_string())
            .collect(),
        _ => vec![],
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": [t.len() as f64, 0.5, -0.25, 1.0]}))
        .collect();
    Json(json!({"object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": inputs.len() * 2, "total_tokens": inputs.len() * 2}}))
    .into_response()
}

/// The last user text of a Responses `input` or a Messages `messages` list.
fn last_user_text(list: &Value) -> String {
    if let Some(s) = list.as_str() {
        return s.to_string();
    }
    let Some(m) = list
        .as_array()
        .and_then(|a| a.iter().rev().find(|m| m["role"] == "user"))
    else {
        return String::new();
    };
    match &m["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// The Responses API, as an upstream that speaks it natively answers: `native: <last user text>`,
/// whole or streamed as typed events; model `native-fail` breaks its stream.
async fn mock_responses(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let model = state.record(headers, &body);
    let text = format!("native: {}", last_user_text(&body["input"]));
    let usage = json!({"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 8});
    let message = json!({"id": "msg_up", "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]});
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_upstream", "object": "response", "created_at": 1_700_000_000, "status": status,
            "model": model, "output": output, "usage": usage, "store": false, "error": null,
            "incomplete_details": null, "instructions": null, "tools": [], "tool_choice": "auto",
            "parallel_tool_calls": true, "metadata": {}, "temperature": 1.0, "top_p": 1.0})
    };
    if body["stream"].as_bool() != Some(true) {
        return Json(response("completed", json!([message]), usage)).into_response();
    }
    let mut events = vec![
        json!({"type": "response.created", "response": response("in_progress", json!([]), Value::Null)}),
        json!({"type": "response.output_item.added", "output_index": 0,
            "item": {"id": "msg_up", "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
        json!({"type": "response.output_text.delta", "item_id": "msg_up", "output_index": 0, "content_index": 0, "delta": "native: ", "logprobs": []}),
    ];
    if model == "native-fail" {
        events.push(json!({"type": "response.failed", "response": {"error": {"code": "server_error", "message": "upstream gave up"}}}));
    } else {
        let rest = &text["native: ".len()..];
        events.push(json!({"type": "response.output_text.delta", "item_id": "msg_up", "output_index": 0, "content_index": 0, "delta": rest, "logprobs": []}));
        events
            .push(json!({"type": "response.output_item.done", "output_index": 0, "item": message}));
        events.push(json!({"type": "response.completed", "response": response("completed", json!([message]), usage)}));
    }
    let mut s = String::new();
    for (i, mut e) in events.into_iter().enumerate() {
        e["sequence_number"] = json!(i);
        s.push_str(&format!(
            "event: {}\ndata: {e}\n\n",
            e["type"].as_str().unwrap()
        ));
    }
    sse_response(s)
}

/// Anthropic's Messages API, as an upstream that speaks it natively answers.
async fn mock_messages(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let model = state.record(headers, &body);
    let text = format!("native: {}", last_user_text(&body["messages"]));
    let message = json!({"id": "msg_upstream", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 5, "output_tokens": 3}});
    if body["stream"].as_bool() != Some(true) {
        return Json(message).into_response();
    }
    let events = [
        json!({"type": "message_start", "message": {"id": "msg_upstream", "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 5, "output_tokens": 0}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 3}}),
        json!({"type": "message_stop"}),
    ];
    let mut s = String::new();
    for e in events {
        s.push_str(&format!(
            "event: {}\ndata: {e}\n\n",
            e["type"].as_str().unwrap()
        ));
    }
    sse_response(s)
}

/// A running `flywheel serve` process.
pub struct GatewayProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub logs: Arc<Mutex<Vec<String>>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flywheel")
}

impl GatewayProcess {
    /// Starts the gateway on `config` (TOML; `data_dir` and `listen` are filled in).
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("flywheel.toml");
        let full = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{config}",
            dir.path().join("data").display()
        );
        std::fs::write(&config_path, full).unwrap();
        Self::spawn(dir, config_path, env)
    }

    /// Starts a gateway on `config` with its data in `data` (several replicas can share one).
    pub fn start_sharing(config: &str, data: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("flywheel.toml");
        let full = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{config}",
            data.display()
        );
        std::fs::write(&config_path, full).unwrap();
        Self::spawn(dir, config_path, &[])
    }

    /// Stops the gateway (SIGTERM) and starts it again on the same config and data directory.
    pub fn restart(mut self) -> Self {
        self.stop();
        let dir = tempfile::tempdir().unwrap();
        // Keep the original directory: swap it out of `self` before `self` drops.
        let old = std::mem::replace(&mut self.dir, dir);
        let config_path = self.config_path.clone();
        Self::spawn(old, config_path, &[])
    }

    fn spawn(dir: tempfile::TempDir, config_path: PathBuf, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin());
        cmd.arg("serve").arg("--config").arg(&config_path);
        cmd.env("RUST_LOG", "info,flywheel=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // The line goes into the log before the address is announced, so a test that
                // reads the log right after start sees the listening line.
                let addr = line.find("listening on http").and_then(|i| {
                    let a = line[i..].split("://").nth(1)?;
                    Some(a.split_whitespace().next().unwrap_or("").to_string())
                });
                sink.lock().unwrap().push(line);
                if let Some(a) = addr {
                    let _ = tx.send(a);
                }
            }
        });
        let addr: String = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "gateway did not start; its log:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        let addr = addr.parse().unwrap();
        Self {
            child,
            addr,
            dir,
            config_path,
            logs,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("data").join("flywheel.db")
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!(
            "gateway did not stop within 15 s; its log:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.db_path()).unwrap()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM files into `dir`.
pub fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// Reads an SSE body into its `data:` payloads (`[DONE]` included as a string).
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The client-visible text of an SSE chat stream, its finish reasons, and its tool calls' arguments.
pub fn stream_parts(body: &str) -> (String, Vec<String>, String) {
    let mut text = String::new();
    let mut finishes = Vec::new();
    let mut args = String::new();
    for e in sse_events(body) {
        if e == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            if let Some(t) = c["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finishes.push(f.to_string());
            }
            for tc in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                args.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
            }
        }
    }
    (text, finishes, args)
}

pub fn upstream_toml(name: &str, base_url: &str, extra: &str) -> String {
    format!("[[upstreams]]\nname = \"{name}\"\nbase_url = \"{base_url}\"\nbackoff_base_ms = 10\nbackoff_max_ms = 50\n{extra}\n")
}

/// An `[auth]` section that opens nothing without a key, with two keys: `sk-agent` (inference)
/// and `sk-admin` (inference and admin).
pub fn keyed_auth_toml() -> String {
    let inference_hash = flywheel::api::auth::hash_key("sk-agent");
    let admin_hash = flywheel::api::auth::hash_key("sk-admin");
    format!(
        "[auth]\nallow_loopback_without_key = false\n[[auth.keys]]\nname = \"agent\"\nsha256 = \"{inference_hash}\"\nscopes = [\"inference\"]\n[[auth.keys]]\nname = \"ops\"\nsha256 = \"{admin_hash}\"\nscopes = [\"inference\", \"admin\"]\n"
    )
}

pub fn route_toml(name: &str, upstream: &str, model: &str, extra: &str) -> String {
    format!("[[routes]]\nname = \"{name}\"\nchampion = {{ upstream = \"{upstream}\", model = \"{model}\" }}\n{extra}\n")
}

/// A gateway with the route `agent` on the mock's `echo` and a canary on its `tools` taking
/// `percent` of the traffic.
pub fn canary_gateway(mock: &MockUpstream, percent: f64) -> GatewayProcess {
    let mut config = upstream_toml("mock", &mock.base_url(), "");
    config.push_str(&route_toml(
        "agent",
        "mock",
        "echo",
        &format!("canary = {{ target = {{ upstream = \"mock\", model = \"tools\" }}, percent = {percent:.1} }}"),
    ));
    GatewayProcess::start(&config)
}

/// `flywheel logs export` of a stopped gateway's log, one JSON value per record.
pub fn export_records(gw: &GatewayProcess) -> Vec<Value> {
    let out = gw.dir.path().join("export.jsonl");
    let status = std::process::Command::new(bin())
        .args(["logs", "export", "--config"])
        .arg(&gw.config_path)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn user_request(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

pub fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
    ])
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A Python with the pinned client packages (tests/python/requirements.txt): `FLYWHEEL_TEST_PYTHON` if set, else a virtualenv
/// created (once) under target/.
pub fn python_with_openai() -> PathBuf {
    if let Ok(p) = std::env::var("FLYWHEEL_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    // The tests of this file share one virtualenv: one creates it while the others wait.
    static SETUP: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = SETUP.lock().unwrap_or_else(|p| p.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target").join("pyenv");
    let python = venv.join("bin").join("python");
    let requirements = root.join("tests/python/requirements.txt");
    let stamp = venv.join(".requirements");
    let wanted = std::fs::read_to_string(&requirements).unwrap();
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) && python.exists() {
        return python;
    }
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .unwrap()
        .success();
    assert!(ok, "python3 -m venv failed");
    let ok = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements)
        .status()
        .unwrap()
        .success();
    assert!(ok, "pip install -r {} failed", requirements.display());
    std::fs::write(&stamp, wanted).unwrap();
    python
}

/// Runs `tests/python/<script> <args...>`, asserts it succeeded, and returns its stdout.
pub async fn run_script(python: PathBuf, script: &str, args: &[String]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let args = args.to_vec();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(&path)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The default model, fetched by scripts/fetch-model.sh on first use.
pub fn default_model() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ok = std::process::Command::new("bash")
        .arg(root.join("scripts/fetch-model.sh"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "scripts/fetch-model.sh failed");
    root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}
