//! What the engine's request options cost, through its scheduler on the default model:
//! - decode tokens/s of one stream with logprobs off, top 5 and top 20 (alternating rounds, the
//!   same seed, so every run samples the same tokens);
//! - `n = 4` in one request (one prefill, copied) against four separate requests submitted at
//!   once and four one after another, with the prefix cache off and on: aggregate completion
//!   tokens/s, prefill included.
//!
//! `cargo bench --bench choices -- [--weights q8_0|native|f32] [--decode N] [--rounds N]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Instant;

use flywheel::engine::sampling::SamplingParams;
use flywheel::engine::{Engine, GenEvent, GenerationRequest, LocalModelConfig};
use tokio::sync::mpsc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let weights = arg("--weights").unwrap_or_else(|| "q8_0".into());
    let decode: usize = arg("--decode").map_or(128, |s| s.parse().unwrap());
    let rounds: usize = arg("--rounds").map_or(3, |s| s.parse().unwrap());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "run `bash scripts/fetch-model.sh` first");
    let load = |prefix_cache_mb: usize| -> Arc<Engine> {
        let cfg: LocalModelConfig = toml::from_str(&format!(
            "name = \"smollm2\"\npath = \"{}\"\nweights = \"{weights}\"\nprefix_cache_mb = {prefix_cache_mb}\n",
            path.display()
        ))
        .unwrap();
        Engine::load(&cfg).unwrap()
    };
    let engine = load(0);
    println!("choices benchmark: SmolLM2-135M Q4_1 GGUF, weights {weights}, {decode} tokens, {rounds} rounds");

    // A prompt that keeps the model writing, behind a system prompt of an agent's length (about
    // 300 tokens): a chat turn asking for a long story.
    let rules = "Answer in plain English, keep to the facts you are given, say when you do not know, and never invent names, numbers or dates. ".repeat(10);
    let messages = [
        serde_json::json!({"role": "system", "content": format!("You are a careful storyteller. {rules}")}),
        serde_json::json!({"role": "user", "content": "Write a long story about a lighthouse keeper and a storm, with many details."}),
    ];
    let prompt = engine
        .chat
        .encode(&engine.chat.prompt(&messages, &[], None).unwrap())
        .unwrap();

    println!("\n| logprobs | decode tok/s, 1 stream (median of {rounds}) | vs off |");
    println!("|---|---|---|");
    let settings = [None, Some(5), Some(20)];
    let mut rates = vec![Vec::new(); settings.len()];
    for _ in 0..rounds {
        for (i, lp) in settings.iter().enumerate() {
            let (tokens, secs) = run(&engine, &prompt, decode, 1, 1, *lp, false);
            rates[i].push(tokens as f64 / secs);
        }
    }
    let medians: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    for (i, lp) in settings.iter().enumerate() {
        let label = lp.map_or("off".to_string(), |k| format!("top {k}"));
        println!(
            "| {label} | {:.1} | {:.3}x |",
            medians[i],
            medians[i] / medians[0]
        );
    }

    let short = decode.min(64);
    println!("\n| 4 choices of a {}-token prompt, {short} tokens each | prefix cache | aggregate tok/s (median of {rounds}) | vs n = 4 |", prompt.len());
    println!("|---|---|---|---|");
    for (mb, engine) in [(0, engine.clone()), (256, load(256))] {
        let cases = [
            ("n = 4, one request", 1, 4, false),
            ("4 requests at once", 4, 1, false),
            ("4 requests one after another", 4, 1, true),
        ];
        let mut rates = vec![Vec::new(); cases.len()];
        for _ in 0..rounds {
            for (i, &(_, requests, n, serial)) in cases.iter().enumerate() {
                let (tokens, secs) = run(&engine, &prompt, short, requests, n, None, serial);
                rates[i].push(tokens as f64 / secs);
            }
        }
        let medians: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
        for (i, (label, ..)) in cases.iter().enumerate() {
            let cache = if mb == 0 { "off" } else { "on" };
            println!(
                "| {label} | {cache} | {:.1} | {:.2}x |",
                medians[i],
                medians[i] / medians[0]
            );
        }
    }
}

/// Runs `requests` requests of `n` choices each (at once, or one after another when `serial`),
/// each choice `max_tokens` long; the completion tokens made and the seconds taken.
fn run(
    engine: &Engine,
    prompt: &[u32],
    max_tokens: usize,
    requests: usize,
    n: usize,
    logprobs: Option<usize>,
    serial: bool,
) -> (usize, f64) {
    let t = Instant::now();
    let mut tokens = 0;
    let mut pending = Vec::new();
    for r in 0..requests {
        let (tx, rx) = mpsc::unbounded_channel();
        engine
            .submit(GenerationRequest {
                prompt: prompt.to_vec(),
                max_tokens,
                stop: Vec::new(),
                sampling: SamplingParams {
                    temperature: 1.0,
                    top_p: 1.0,
                    top_k: 0,
                    seed: Some(11 + r as u64),
                },
                events: tx,
                adapter: None,
                grammar: None,
                logprobs,
                n,
            })
            .unwrap();
        pending.push((rx, n));
        if serial {
            tokens += drain(pending.pop().unwrap());
        }
    }
    for p in pending {
        tokens += drain(p);
    }
    (tokens, t.elapsed().as_secs_f64())
}

/// Waits for every choice of one request; its completion tokens.
fn drain((mut rx, n): (mpsc::UnboundedReceiver<GenEvent>, usize)) -> usize {
    let mut done = 0;
    let mut tokens = 0;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            GenEvent::Done {
                completion_tokens, ..
            } => {
                tokens += completion_tokens;
                done += 1;
                if done == n {
                    break;
                }
            }
            GenEvent::Error(e) => panic!("{e}"),
            GenEvent::Delta { .. } => {}
        }
    }
    tokens
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
