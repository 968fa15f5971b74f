//! Engine throughput on the default model: prefill and single-stream decode tokens/s, and aggregate
//! decode tokens/s with 1, 4, 8 and 16 sequences in each batched step.
//!
//! `cargo bench --bench engine -- [--weights q8_0|native|f32] [--decode N]`
//! (`benches/engine.sh` runs it beside llama.cpp on the same GGUF.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use flywheel::engine::model::{KvCache, LlamaModel, WeightFormat};
use flywheel::engine::sampling::argmax;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let weights: WeightFormat = arg("--weights").map_or(WeightFormat::Q8_0, |w| {
        serde_json::from_value(serde_json::json!(w)).unwrap()
    });
    let decode: usize = arg("--decode").map_or(128, |s| s.parse().unwrap());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "run `bash scripts/fetch-model.sh` first");
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let t0 = Instant::now();
    let model = LlamaModel::from_gguf(&content, &mut f, weights, 4096, &Device::Cpu).unwrap();
    println!(
        "engine benchmark: SmolLM2-135M Q4_1 GGUF, weights in memory {weights:?}, load {:.0} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );

    // Prefill: a 256-token prompt.
    let prompt: Vec<u32> = (0..256).map(|i| 100 + (i * 37 % 4000) as u32).collect();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut c = model.new_cache();
        let t = Instant::now();
        model.forward(&[&prompt], &mut [&mut c]).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("prefill 256 tokens: {:.1} tok/s", 256.0 / best);

    println!("| streams | aggregate decode tok/s | per-stream tok/s | ms/step |");
    println!("|---|---|---|---|");
    for streams in [1usize, 4, 8, 16] {
        let prompts: Vec<Vec<u32>> = (0..streams)
            .map(|s| prompt[..32].iter().map(|t| t + s as u32).collect())
            .collect();
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| model.new_cache()).collect();
        let mut last: Vec<u32> = Vec::new();
        for (p, c) in prompts.iter().zip(caches.iter_mut()) {
            let l = model
                .forward(&[p], &mut [c])
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            last.push(argmax(&l[0]));
        }
        let steps = decode;
        let t = Instant::now();
        for _ in 0..steps {
            let toks: Vec<[u32; 1]> = last.iter().map(|t| [*t]).collect();
            let refs: Vec<&[u32]> = toks.iter().map(|t| &t[..]).collect();
            let mut crefs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let rows = model
                .forward(&refs, &mut crefs)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            last = rows.iter().map(|r| argmax(r)).collect();
        }
        let secs = t.elapsed().as_secs_f64();
        let agg = (steps * streams) as f64 / secs;
        println!(
            "| {streams} | {agg:.1} | {:.1} | {:.2} |",
            agg / streams as f64,
            secs * 1000.0 / steps as f64
        );
    }
}
