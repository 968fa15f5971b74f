//! The cost of constrained decoding on the default model's 49k-token vocabulary: compiling a
//! request's grammar, and masking the logits for one token inside a string argument, without a
//! pattern and under a few patterns; then a structured answer to a nested pydantic schema, masked
//! at every token of a realistic answer.
//!
//! `cargo bench --bench grammar`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use flywheel::engine::grammar::{AnswerFormat, Grammar, GrammarState, Vocab};
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
    structured(&info, &vocab, n);
}

/// A pydantic model with a nested model (through `$ref`), an enum, a list, optional fields and a
/// bounded number, and an answer to it as the model would write it.
fn structured(info: &flywheel::engine::tokenizer::TokenizerInfo, vocab: &Vocab, n: usize) {
    let schema = json!({
        "$defs": {
            "Address": {"properties": {
                "city": {"type": "string"}, "country": {"type": "string"},
                "zip_code": {"anyOf": [{"type": "string"}, {"type": "null"}]}
            }, "required": ["city", "country", "zip_code"], "type": "object", "additionalProperties": false},
            "Kind": {"enum": ["person", "company"], "type": "string"}
        },
        "properties": {
            "name": {"type": "string"},
            "kind": {"$ref": "#/$defs/Kind"},
            "address": {"$ref": "#/$defs/Address"},
            "tags": {"items": {"type": "string"}, "type": "array", "maxItems": 3},
            "founded": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "rating": {"type": "number", "minimum": 0, "maximum": 5}
        },
        "required": ["name", "kind", "address", "tags", "founded", "rating"],
        "type": "object", "additionalProperties": false
    });
    let answer = "{\n  \"name\": \"Apple Inc.\",\n  \"kind\": \"company\",\n  \"address\": {\"city\": \"Cupertino\", \"country\": \"USA\", \"zip_code\": null},\n  \"tags\": [\"technology\", \"hardware\"],\n  \"founded\": 1976,\n  \"rating\": 4.5\n}";
    let ids = info
        .tokenizer
        .encode_fast(answer, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let format = AnswerFormat::JsonSchema(schema);
    let mut compile = Vec::new();
    let mut per_token = Vec::new();
    for _ in 0..ROUNDS / 10 {
        let t = Instant::now();
        let g = Grammar::new(None, Some(&format)).unwrap().unwrap();
        compile.push(t.elapsed().as_secs_f64() * 1e6);
        let mut s = GrammarState::new(&g);
        for &id in &ids {
            let mut logits = vec![0f32; n];
            let t = Instant::now();
            s.mask(&g, vocab, &mut logits);
            per_token.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(
                logits[id as usize].is_finite(),
                "the answer's token {id} was masked"
            );
            s.advance(&g, vocab.bytes(id));
        }
    }
    let mean = per_token.iter().sum::<f64>() / per_token.len() as f64;
    per_token.sort_by(f64::total_cmp);
    let p99 = per_token[per_token.len() * 99 / 100];
    println!("\nstructured answer to a nested pydantic schema ($ref, enum, list, nullable, bounded number), {} tokens, {} rounds:", ids.len(), ROUNDS / 10);
    println!("| compile µs (median) | mask µs per token: mean | median | p99 |");
    println!("|---|---|---|---|");
    println!(
        "| {:.0} | {mean:.0} | {:.0} | {p99:.0} |",
        median(&mut compile),
        median(&mut per_token)
    );
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
