//! What each family's extra parts cost in decode: the same SmolLM2-135M weights served as a Llama
//! model, as a Qwen2 model (plus q/k/v biases) and as a Qwen3 model (plus per-head q/k RMSNorm),
//! single-stream and 8-stream decode, the three in alternating rounds.
//!
//! `cargo bench --bench families -- [--decode N] [--rounds N]`
//! The Qwen-shaped files are written from the Llama one into a temporary directory: same tensors,
//! same quantization, the family's extra tensors added at random.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use flywheel::engine::model::{KvCache, LlamaModel, WeightFormat};
use flywheel::engine::sampling::argmax;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|s| s.parse::<usize>().ok())
    };
    let decode = arg("--decode").unwrap_or(64);
    let rounds = arg("--rounds").unwrap_or(3);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(src.exists(), "run `bash scripts/fetch-model.sh` first");
    let dir = tempfile::tempdir().unwrap();
    let families = ["llama", "qwen2", "qwen3"];
    let models: Vec<LlamaModel> = families
        .iter()
        .map(|arch| {
            let path = dir.path().join(format!("{arch}.gguf"));
            rewrite_as(&src, &path, arch);
            let mut f = std::fs::File::open(&path).unwrap();
            let c = gguf_file::Content::read(&mut f).unwrap();
            LlamaModel::from_gguf(&c, &mut f, WeightFormat::Q8_0, 2048, &Device::Cpu).unwrap()
        })
        .collect();
    println!(
        "families benchmark: SmolLM2-135M (Q4_1 file, Q8_0 in memory) as llama / qwen2 (+ q/k/v biases) / qwen3 (+ q/k norms); {decode} decode steps after a 64-token prompt, {rounds} alternating rounds, median"
    );
    let prompt: Vec<u32> = (0..64).map(|i| 100 + (i * 37 % 4000) as u32).collect();
    for streams in [1usize, 8] {
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); models.len()];
        for _ in 0..rounds {
            for (m, s) in models.iter().zip(samples.iter_mut()) {
                s.push(decode_rate(m, &prompt, streams, decode));
            }
        }
        let medians: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
        let line: Vec<String> = families
            .iter()
            .zip(&medians)
            .map(|(f, r)| format!("{f} {r:.1}"))
            .collect();
        println!(
            "  {streams} stream(s), aggregate decode tok/s: {} | qwen2 / llama {:.3}, qwen3 / llama {:.3}",
            line.join(", "),
            medians[1] / medians[0],
            medians[2] / medians[0]
        );
    }
}

/// Aggregate tokens per second of `streams` sequences decoding together after the prompt.
fn decode_rate(m: &LlamaModel, prompt: &[u32], streams: usize, steps: usize) -> f64 {
    let mut caches: Vec<KvCache> = (0..streams).map(|_| m.new_cache()).collect();
    let mut last = Vec::with_capacity(streams);
    for c in caches.iter_mut() {
        let logits = m.forward(&[prompt], &mut [c]).unwrap();
        last.push(argmax(
            &logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        ));
    }
    let t0 = Instant::now();
    for _ in 0..steps {
        let toks: Vec<[u32; 1]> = last.iter().map(|t| [*t]).collect();
        let seqs: Vec<&[u32]> = toks.iter().map(|t| t.as_slice()).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let logits = m
            .forward(&seqs, &mut refs)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        last = logits.iter().map(|row| argmax(row)).collect();
    }
    (steps * streams) as f64 / t0.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Writes `src` (a Llama GGUF) as `arch`: metadata keys renamed, every tensor copied, and the
/// family's extra tensors added (small random biases for qwen2, norm weights near one for qwen3).
fn rewrite_as(src: &Path, dst: &Path, arch: &str) {
    let mut f = std::fs::File::open(src).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut metadata: Vec<(String, Value)> = c
        .metadata
        .iter()
        .map(|(k, v)| match k.strip_prefix("llama.") {
            Some(rest) => (format!("{arch}.{rest}"), v.clone()),
            None => (k.clone(), v.clone()),
        })
        .collect();
    for (k, v) in metadata.iter_mut() {
        if k == "general.architecture" {
            *v = Value::String(arch.to_string());
        }
    }
    let get_u32 = |key: &str| c.metadata[key].to_u32().unwrap() as usize;
    let (layers, hidden, heads, kv_heads) = (
        get_u32("llama.block_count"),
        get_u32("llama.embedding_length"),
        get_u32("llama.attention.head_count"),
        get_u32("llama.attention.head_count_kv"),
    );
    let hd = hidden / heads;
    let mut tensors: Vec<(String, QTensor)> = c
        .tensor_infos
        .keys()
        .map(|name| (name.clone(), c.tensor(&mut f, name, &Device::Cpu).unwrap()))
        .collect();
    let vector = |n: usize, around: f32, seed: u64| {
        let v: Vec<f32> = (0..n)
            .map(|i| around + 0.01 * (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0 - 1.0))
            .collect();
        QTensor::quantize(
            &Tensor::from_vec(v, n, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap()
    };
    for i in 0..layers {
        let i64_ = i as u64;
        match arch {
            "qwen2" => {
                tensors.push((
                    format!("blk.{i}.attn_q.bias"),
                    vector(heads * hd, 0.0, i64_),
                ));
                tensors.push((
                    format!("blk.{i}.attn_k.bias"),
                    vector(kv_heads * hd, 0.0, i64_ + 1),
                ));
                tensors.push((
                    format!("blk.{i}.attn_v.bias"),
                    vector(kv_heads * hd, 0.0, i64_ + 2),
                ));
            }
            "qwen3" => {
                tensors.push((format!("blk.{i}.attn_q_norm.weight"), vector(hd, 1.0, i64_)));
                tensors.push((
                    format!("blk.{i}.attn_k_norm.weight"),
                    vector(hd, 1.0, i64_ + 1),
                ));
            }
            _ => {}
        }
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &md, &ts).unwrap();
}
