//! The CPU cost of the doors' translation, per request, without HTTP: a Responses request parsed
//! and turned into a chat body, a chat completion turned into a `response` object and serialized,
//! and the same for Anthropic's Messages, beside serializing the chat completion alone.
//! `gateway_overhead` measures the same doors end to end.
//!
//! `cargo bench --bench translate -- [--iterations N]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use flywheel::wire::answer::{feed_completion, EventBuilder};
use flywheel::wire::messages::{parse_request as parse_messages, MessageBuilder};
use flywheel::wire::responses::{parse_request as parse_responses, ResponseBuilder};
use serde_json::Value;

const RESPONSES: &str = r#"{"model":"bench","instructions":"You are a helpful assistant.","input":"What is the weather in Paris today?","temperature":0,"store":false}"#;
const MESSAGES: &str = r#"{"model":"bench","max_tokens":64,"system":"You are a helpful assistant.","messages":[{"role":"user","content":"What is the weather in Paris today?"}],"temperature":0}"#;
const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"The weather in Paris is sunny.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":8,"total_tokens":32}}"#;

fn time(name: &str, n: usize, mut f: impl FnMut()) {
    for _ in 0..n / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    println!(
        "| {name:<50} | {:>8.2} |",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = args
        .iter()
        .position(|a| a == "--iterations")
        .and_then(|i| args.get(i + 1))
        .map_or(200_000, |s| s.parse().unwrap());
    let responses: Value = serde_json::from_str(RESPONSES).unwrap();
    let messages: Value = serde_json::from_str(MESSAGES).unwrap();
    let completion: Value = serde_json::from_str(COMPLETION).unwrap();
    let parsed = parse_responses(responses.as_object().unwrap()).unwrap();
    println!("| step (per request)                                 | µs       |");
    println!("|----------------------------------------------------|----------|");
    time("chat completion serialized (the chat door)", n, || {
        std::hint::black_box(serde_json::to_vec(&completion).unwrap());
    });
    time("Responses request parsed, chat body built", n, || {
        let r = parse_responses(responses.as_object().unwrap()).unwrap();
        std::hint::black_box(r.to_chat(&[]).unwrap());
    });
    time("Responses response built and serialized", n, || {
        let mut b = ResponseBuilder::new("resp_x".into(), "bench".into(), 1, parsed.echo.clone());
        feed_completion(&completion, &mut b);
        std::hint::black_box(serde_json::to_vec(&b.complete()).unwrap());
    });
    time(
        "Messages request parsed, message built, serialized",
        n,
        || {
            let r = parse_messages(messages.as_object().unwrap()).unwrap();
            let mut b = MessageBuilder::new("msg_x".into(), r.model.clone());
            feed_completion(&completion, &mut b);
            std::hint::black_box(serde_json::to_vec(&b.complete()).unwrap());
        },
    );
}
