//! One layer's causal attention over an f16 cache (`ops::attention`), for a prompt's tokens, with
//! each way this CPU can compute the scores, timed in alternating rounds:
//! - *per key*: each query reads each cached key as stored and sums its products horizontally
//!   (what decode steps use);
//! - *16 keys to a vector* (AVX-512): the sequence's keys transposed once per call, and the
//!   scores of 16 keys at a time, with the same bits. Only for calls whose tokens are at least
//!   half the cache: the 64-token turn stays on the per-key path either way.
//!
//! Shapes: SmolLM2-135M (9 heads over 3 kv heads) and Llama-3.2-1B (32 over 8), head_dim 64; a
//! 256- and a 1024-token prompt, and a 64-token turn after 960 cached tokens. Each line gives the
//! median ms per call and the query-head × key dot products per ns.
//! `cargo bench --bench attention`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use flywheel::ops::attention::{attention_with, SeqAttention};
use half::f16;

mod common;
use common::values;

const ROUNDS: usize = 9;

struct Shape {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "SmolLM2-135M",
        heads: 9,
        kv_heads: 3,
    },
    Shape {
        name: "Llama-3.2-1B",
        heads: 32,
        kv_heads: 8,
    },
];
const HEAD_DIM: usize = 64;
/// (cached positions in all, of which this call's tokens).
const CALLS: [(usize, usize); 3] = [(256, 256), (1024, 1024), (1024, 64)];

fn main() {
    let features = flywheel::ops::cpu::features();
    println!("host: {}", features.describe());
    let mut ways = vec![("per key", false)];
    if features.avx512f {
        ways.push(("16 keys to a vector", true));
    } else {
        println!("SKIPPED: 16 keys to a vector (AVX-512F is not in use here: FLYWHEEL_NO_AVX512 or the CPU)");
    }
    println!("| model | cached / queried | scores | ms per call | dots per ns |");
    println!("|---|---|---|---|---|");
    for shape in &SHAPES {
        for (total, tokens) in CALLS {
            let width = shape.kv_heads * HEAD_DIM;
            let half = |x: Vec<f32>| -> Vec<f16> { x.into_iter().map(f16::from_f32).collect() };
            let k = half(values(total * width, 1, 2.0));
            let v = half(values(total * width, 2, 2.0));
            let q = values(tokens * shape.heads * HEAD_DIM, 3, 8.0);
            let seqs = [SeqAttention {
                k: &k,
                v: &v,
                row: 0,
                tokens,
            }];
            // Each query token t sees total - tokens + t + 1 keys.
            let dots: usize = (0..tokens)
                .map(|t| (total - tokens + t + 1) * shape.heads)
                .sum();
            let mut out = vec![0f32; q.len()];
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
            let mut first: Option<Vec<f32>> = None;
            for _ in 0..ROUNDS {
                for (i, (_, transposed)) in ways.iter().enumerate() {
                    let start = Instant::now();
                    attention_with(
                        &q,
                        &mut out,
                        &seqs,
                        (shape.heads, shape.kv_heads, HEAD_DIM),
                        *transposed,
                    );
                    times[i].push(start.elapsed().as_secs_f64());
                    // Every way gives the same bits.
                    match &first {
                        None => first = Some(out.clone()),
                        Some(f) => {
                            assert!(f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()))
                        }
                    }
                }
            }
            for ((name, _), t) in ways.iter().zip(&mut times) {
                t.sort_by(f64::total_cmp);
                let median = t[t.len() / 2];
                println!(
                    "| {} | {total} / {tokens} | {name} | {:.2} | {:.2} |",
                    shape.name,
                    median * 1e3,
                    dots as f64 / median / 1e9
                );
            }
        }
    }
}
