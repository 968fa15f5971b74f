//! Engine throughput on the default model: prefill and single-stream decode tokens/s, and aggregate
//! decode tokens/s with 1, 4, 8 and 16 sequences in each batched step.
//!
//! `cargo bench --bench engine -- [--weights q8_0|native|f32] [--decode N] [--streams N]
//! [--prefill [--rounds N]] [--plain-only]`
//! (`benches/engine.sh` runs it beside llama.cpp on the same GGUF.) Runs that are compared with each
//! other (stream counts; adapter mixes) take their decode steps in alternating rounds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use flywheel::engine::lora::{AdapterBits, LoraAdapter};
use flywheel::engine::model::{KvCache, LlamaConfig, LlamaModel, WeightFormat};
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
    // `--streams N` runs only the N-stream decode (for profiling).
    let only_streams: Option<usize> = arg("--streams").map(|s| s.parse().unwrap());
    // `--adapters-only` runs only the adapter load and mixed-adapter decode (for profiling), and
    // with `--mix none|shared|distinct` only that one batch.
    let adapters_only = args.iter().any(|a| a == "--adapters-only");
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
    if args.iter().any(|a| a == "--prefill") {
        // `--prefill [--rounds N]`: only the prefill (for profiling and A/B runs).
        prefill(
            &model,
            &prompt,
            arg("--rounds").map_or(3, |s| s.parse().unwrap()),
        );
        return;
    }
    if let Some(n) = only_streams {
        let set = vec![None; n];
        let ms = Run::new(&model, &prompt, &set).steps(decode);
        print_row(n, "none", ms);
        return;
    }
    if !adapters_only {
        plain_runs(&model, &prompt, decode);
        // `--plain-only`: no adapter runs (for A/B runs of the kernels).
        if args.iter().any(|a| a == "--plain-only") {
            return;
        }
    }
    // Rank-16 adapters on all seven projections: load time, then 8 streams with none, one shared
    // adapter, and 8 distinct adapters in the same batch; on a Q8_0 base, the 8 distinct also
    // with 4-bit factors (`adapter_bits = 4`).
    let dir = tempfile::tempdir().unwrap();
    let mut adapters = Vec::new();
    let mut four_bit = Vec::new();
    let mut load_ms = Vec::new();
    let mut load_q4_ms = Vec::new();
    for i in 0..8 {
        let d = dir.path().join(format!("a{i}"));
        write_adapter(&d, &model.cfg, 16, i as u64);
        let t = Instant::now();
        // As the engine loads them: quantized when the base is Q8_0.
        let id = format!("bench/a{i}");
        let a = if weights == WeightFormat::Q8_0 {
            LoraAdapter::load_q8(&id, "smollm2", &d, &model.cfg, true).unwrap()
        } else {
            LoraAdapter::load(&id, "smollm2", &d, &model.cfg, true).unwrap()
        };
        load_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        adapters.push(a);
        if weights == WeightFormat::Q8_0 {
            let t = Instant::now();
            let bits = Some(AdapterBits::Four);
            let a = LoraAdapter::load_as(&id, "smollm2", &d, &model.cfg, true, bits).unwrap();
            load_q4_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            four_bit.push(a);
        }
    }
    // On a Q8_0 base the first set is held in int8 (`adapter_bits = 8`), the second in 4 bits
    // (the default); on other bases both sets would be f32, so only the first is loaded.
    let q8 = weights == WeightFormat::Q8_0;
    let int8 = if q8 { ", int8" } else { "" };
    for (label, ms) in [(int8, &mut load_ms), (", 4-bit", &mut load_q4_ms)] {
        if ms.len() == 8 {
            ms.sort_by(f64::total_cmp);
            println!(
                "rank-16 adapter load{label} (all 7 projections, 30 layers): median {:.1} ms, \
                 max {:.1} ms",
                ms[4], ms[7]
            );
        }
    }
    let none: Vec<Option<&LoraAdapter>> = vec![None; 8];
    let one: Vec<Option<&LoraAdapter>> = vec![Some(&adapters[0]); 8];
    let eight: Vec<Option<&LoraAdapter>> = adapters.iter().map(Some).collect();
    let eight_q4: Vec<Option<&LoraAdapter>> = four_bit.iter().map(Some).collect();
    let mut mixes = vec![
        ("none".to_string(), &none),
        (format!("1 shared (rank 16{int8})"), &one),
        (format!("8 distinct (rank 16{int8})"), &eight),
    ];
    if !four_bit.is_empty() {
        mixes.push(("8 distinct (rank 16, 4-bit)".to_string(), &eight_q4));
    }
    // `--mix none|shared|distinct|distinct4` runs only that batch (for profiling).
    if let Some(mix) = arg("--mix") {
        let names = ["none", "shared", "distinct", "distinct4"];
        let Some((label, set)) = names
            .iter()
            .position(|n| *n == mix)
            .and_then(|i| mixes.get(i))
        else {
            panic!("--mix takes one of {names:?} (distinct4 on a q8_0 base), not '{mix}'");
        };
        print_row(8, label, Run::new(&model, &prompt, set).steps(decode));
        return;
    }
    let runs = mixes.iter().map(|(_, s)| Run::new(&model, &prompt, s));
    for ((label, _), ms) in mixes.iter().zip(alternate(runs.collect(), decode)) {
        print_row(8, label, ms);
    }
}

/// The prompt's prefill, best of `rounds`.
fn prefill(model: &LlamaModel, prompt: &[u32], rounds: usize) {
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let mut c = model.new_cache();
        let t = Instant::now();
        model.forward(&[prompt], &mut [&mut c]).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "prefill {} tokens: {:.1} tok/s",
        prompt.len(),
        prompt.len() as f64 / best
    );
}

/// Prefill, then decode at 1, 4, 8 and 16 streams without adapters, the four run in alternation.
fn plain_runs(model: &LlamaModel, prompt: &[u32], decode: usize) {
    prefill(model, prompt, 3);

    println!(
        "| streams | adapters in the batch | aggregate decode tok/s | per-stream tok/s | ms/step |"
    );
    println!("|---|---|---|---|---|");
    let counts = [1usize, 4, 8, 16];
    let sets: Vec<Vec<Option<&LoraAdapter>>> = counts.iter().map(|&n| vec![None; n]).collect();
    let runs: Vec<Run<'_>> = sets.iter().map(|s| Run::new(model, prompt, s)).collect();
    for (n, ms) in counts.iter().zip(alternate(runs, decode)) {
        print_row(*n, "none", ms);
    }
}

fn print_row(streams: usize, label: &str, ms: f64) {
    let agg = streams as f64 * 1000.0 / ms;
    println!(
        "| {streams} | {label} | {agg:.1} | {:.1} | {ms:.2} |",
        agg / streams as f64
    );
}

/// Rounds of decode steps taken by each run in turn, so that drift in the machine's speed (a
/// shared VM's neighbours) falls on all of them alike; every run's contexts grow the same way.
/// Returns each run's median ms/step over the rounds.
fn alternate(mut runs: Vec<Run<'_>>, steps: usize) -> Vec<f64> {
    const ROUNDS: usize = 8;
    let per_round = steps.div_ceil(ROUNDS).max(1);
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    for _ in 0..ROUNDS {
        for (run, t) in runs.iter_mut().zip(times.iter_mut()) {
            t.push(run.steps(per_round));
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            (t[ROUNDS / 2 - 1] + t[ROUNDS / 2]) / 2.0
        })
        .collect()
}

/// Sequences decoded in lockstep, each on its adapter (or none), after a 32-token prompt each.
struct Run<'a> {
    model: &'a LlamaModel,
    adapters: &'a [Option<&'a LoraAdapter>],
    caches: Vec<KvCache>,
    last: Vec<u32>,
}

impl<'a> Run<'a> {
    fn new(model: &'a LlamaModel, prompt: &[u32], adapters: &'a [Option<&'a LoraAdapter>]) -> Self {
        let mut caches = Vec::new();
        let mut last = Vec::new();
        for (s, a) in adapters.iter().enumerate() {
            let p: Vec<u32> = prompt[..32].iter().map(|t| t + s as u32).collect();
            let mut c = model.new_cache();
            let l = model
                .forward_with(&[&p], &mut [&mut c], &[*a])
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            last.push(argmax(&l[0]));
            caches.push(c);
        }
        Run {
            model,
            adapters,
            caches,
            last,
        }
    }

    /// Decodes `n` steps; returns ms per step.
    fn steps(&mut self, n: usize) -> f64 {
        let t = Instant::now();
        for _ in 0..n {
            let toks: Vec<[u32; 1]> = self.last.iter().map(|t| [*t]).collect();
            let refs: Vec<&[u32]> = toks.iter().map(|t| &t[..]).collect();
            let mut crefs: Vec<&mut KvCache> = self.caches.iter_mut().collect();
            let rows = self
                .model
                .forward_with(&refs, &mut crefs, self.adapters)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            self.last = rows.iter().map(|r| argmax(r)).collect();
        }
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    }
}

/// A random rank-`r` PEFT adapter on all seven projections for a model of shape `cfg`.
fn write_adapter(dir: &std::path::Path, cfg: &LlamaConfig, r: usize, seed: u64) {
    use candle_core::Tensor;
    std::fs::create_dir_all(dir).unwrap();
    let modules = flywheel::engine::lora::MODULES;
    let config = serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": modules});
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let (h, kv, f) = (
        cfg.heads * cfg.head_dim,
        cfg.kv_heads * cfg.head_dim,
        cfg.ffn,
    );
    let mut tensors = std::collections::HashMap::new();
    for layer in 0..cfg.n_layers {
        for m in modules {
            let (inp, out, block) = match m {
                "q_proj" => (cfg.hidden, h, "self_attn"),
                "k_proj" | "v_proj" => (cfg.hidden, kv, "self_attn"),
                "o_proj" => (h, cfg.hidden, "self_attn"),
                "gate_proj" | "up_proj" => (cfg.hidden, f, "mlp"),
                _ => (f, cfg.hidden, "mlp"),
            };
            let p = format!("base_model.model.model.layers.{layer}.{block}.{m}");
            let a = (Tensor::randn(0f32, 0.02, (r, inp), &Device::Cpu).unwrap()
                + seed as f64 * 1e-4)
                .unwrap();
            let b = Tensor::randn(0f32, 0.02, (out, r), &Device::Cpu).unwrap();
            tensors.insert(format!("{p}.lora_A.weight"), a);
            tensors.insert(format!("{p}.lora_B.weight"), b);
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
}
