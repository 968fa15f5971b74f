//! LoRA training throughput on the default model: SmolLM2-135M dequantized to f32, rank 16 on all
//! seven projections, batches of 8 sequences of 256 tokens with the loss on every token (the
//! setting shared/PERF-FACTS.md measured PyTorch + PEFT in: 182 tok/s on this machine).
//!
//! `cargo bench --bench train -- [--steps N] [--precision auto|f32|bf16]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use flywheel::flywheel::train::model::TrainBase;
use flywheel::flywheel::train::{self, Hyperparameters, TrainExample};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .map_or(3, |s| s.parse().unwrap());
    let precision = args
        .iter()
        .position(|a| a == "--precision")
        .and_then(|i| args.get(i + 1))
        .map_or(train::Precision::Auto, |s| {
            train::Precision::parse(s).expect("--precision auto|f32|bf16")
        });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "run `bash scripts/fetch-model.sh` first");
    let t = Instant::now();
    let base = TrainBase::load_with(&path, 2048, precision).unwrap();
    println!(
        "train benchmark: SmolLM2-135M Q4_1 GGUF dequantized, frozen products in {} ({}), load {:.0} ms",
        base.precision.as_str(),
        flywheel::ops::cpu::features().describe(),
        t.elapsed().as_secs_f64() * 1000.0
    );
    let examples: Vec<TrainExample> = (0..8 * steps)
        .map(|s| TrainExample {
            tokens: (0..256)
                .map(|i| 100 + ((i * 37 + s * 11) % 4000) as u32)
                .collect(),
            prompt_len: 1,
        })
        .collect();
    let hp = Hyperparameters {
        epochs: 1,
        batch_size: 8,
        micro_batch_size: 8,
        adapter_dim: 16,
        max_seq_len: 2048,
        precision,
        ..Hyperparameters::default()
    };
    let mut per_step = Vec::new();
    let mut last = Instant::now();
    let out = train::train(
        &base,
        &examples,
        &[],
        &hp,
        None,
        &AtomicBool::new(false),
        &mut |p| {
            let took = last.elapsed().as_secs_f64();
            per_step.push(took);
            last = Instant::now();
            println!(
                "step {}/{}: loss {:.3}, {:.2} s",
                p.step, p.total_steps, p.train_loss, took
            );
        },
    )
    .unwrap();
    let best = per_step.iter().copied().fold(f64::MAX, f64::min);
    println!(
        "rank-16 LoRA, 7 projections, 8 x 256 tokens per step: {:.1} tok/s overall, {:.1} tok/s best step",
        out.tokens_per_sec,
        2048.0 / best
    );
}
