//! The cost of constrained tool calls on the default model's 49k-token vocabulary: compiling a
//! request's grammar, and masking the logits for one token inside a string argument, without a
//! pattern and under a few patterns.
//!
//! `cargo bench --bench grammar`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use flywheel::engine::grammar::{Grammar, GrammarState, Vocab};
use serde_json::json;

const ROUNDS: usize = 200;

fn main() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "run `bash scripts/fetch-model.sh` first");
    let mut f = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let info = flywheel::engine::tokenizer::from_gguf(&content).unwrap();
    let vocab = Vocab::from_tokenizer(&info.tokenizer, &info.eos);
    let n = info.tokenizer.get_vocab_size(true);
    println!("grammar benchmark: SmolLM2-135M-Instruct vocabulary ({n} tokens), {ROUNDS} rounds");
    println!(
        "| string schema | compile µs (median) | mask µs per token (median) | tokens allowed |"
    );
    println!("|---|---|---|---|");
    let cases = [
        ("no pattern", None),
        (
            "pattern `^[0-9]{5}(-[0-9]{4})?$`",
            Some("^[0-9]{5}(-[0-9]{4})?$"),
        ),
        ("pattern `^\\w+@\\w+\\.com$`", Some("^\\w+@\\w+\\.com$")),
        ("pattern `ab` (anywhere)", Some("ab")),
    ];
    for (label, pattern) in cases {
        let mut schema = json!({"type": "string"});
        if let Some(p) = pattern {
            schema["pattern"] = json!(p);
        }
        let tools = vec![
            json!({"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"s": schema}}}}),
        ];
        let mut compile = Vec::new();
        let mut mask = Vec::new();
        let mut allowed = 0;
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let g = Grammar::for_tools(&tools, Some(&json!("required")), true).unwrap();
            compile.push(t.elapsed().as_secs_f64() * 1e6);
            let mut s = GrammarState::new(&g);
            s.advance(
                &g,
                b"<tool_call>{\"name\": \"f\", \"arguments\": {\"s\": \"12",
            );
            let mut logits = vec![0f32; n];
            let t = Instant::now();
            s.mask(&g, &vocab, &mut logits);
            mask.push(t.elapsed().as_secs_f64() * 1e6);
            allowed = logits.iter().filter(|l| l.is_finite()).count();
        }
        println!(
            "| {label} | {:.0} | {:.0} | {allowed} |",
            median(&mut compile),
            median(&mut mask)
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
