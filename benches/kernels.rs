//! The CUDA kernels at serving shapes: bytes moved, FLOPs and the roofline bound of each kernel on
//! an H100 (3.35 TB/s HBM, ~990 TFLOP/s dense bf16), for SmolLM2-135M and Llama-3.2-1B at batch 1,
//! 8 and 64 (rank-16 adapters, a distinct adapter per row: the worst case for LoRA traffic;
//! attention over 1,024 cached tokens per sequence). Per layer, per launch.
//!
//! With `--features cuda` on a machine with a GPU it also times some kernels (LoRA shrink and
//! expand, RMS norm) and prints achieved bandwidth beside the bound, then times the whole device
//! forward pass on SmolLM2-135M Q4_1 (`models/`, fetched by scripts/fetch-model.sh): decode steps
//! at batch 1, 8 and 64 and a 128-token prefill. Without a GPU it says so and prints the model
//! only.
//!
//! `cargo bench --bench kernels [--features cuda]`

struct Model {
    name: &'static str,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
}

const MODELS: [Model; 2] = [
    Model {
        name: "SmolLM2-135M",
        hidden: 576,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        ffn: 1536,
        vocab: 49152,
    },
    Model {
        name: "Llama-3.2-1B",
        hidden: 2048,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        ffn: 8192,
        vocab: 128256,
    },
];

const HBM_BYTES_PER_S: f64 = 3.35e12;
const FLOPS_PER_S: f64 = 990e12;
const RANK: usize = 16;
const CONTEXT: usize = 1024;
/// Bytes of one stored value (f16/bf16).
const E: usize = 2;

/// (kernel, bytes moved, FLOPs) for one launch at batch `b`.
fn costs(m: &Model, b: usize) -> Vec<(&'static str, f64, f64)> {
    let (h, d, kv, ffn) = (m.hidden, m.head_dim, m.kv_heads, m.ffn);
    let adapters = b; // one distinct adapter per row
    let qkv = (m.heads + 2 * kv) * d;
    let mut out = vec![
        (
            "lora_shrink (qkv input, r=16)",
            (b * h * E + adapters * RANK * h * E + b * RANK * 4) as f64,
            (2 * b * h * RANK) as f64,
        ),
        (
            "lora_expand_add (q slice)",
            (b * RANK * 4 + adapters * h * RANK * E + 2 * b * h * E) as f64,
            (2 * b * RANK * h) as f64,
        ),
        (
            "rms_norm + residual",
            (5 * b * h * E + h * E) as f64,
            (5 * b * h) as f64,
        ),
        (
            "qkv_rope_cache (rope q and k, k and v into the cache)",
            (2 * b * qkv * E) as f64,
            (3 * b * (m.heads + kv) * d) as f64,
        ),
        ("silu_mul", (3 * b * ffn * E) as f64, (6 * b * ffn) as f64),
        (
            "paged_decode_attention (1,024 tokens)",
            (b * CONTEXT * kv * d * E * 2 + 2 * b * m.heads * d * E) as f64,
            (4 * b * m.heads * CONTEXT * d) as f64,
        ),
    ];
    // The matvec kernels read the whole matrix once per 8 rows of the batch (FW_QMV_ROWS).
    let passes = b.div_ceil(8);
    out.push((
        "q8_0_matvec (qkv)",
        (passes * qkv * h / 32 * 34 + b * (h * E + qkv * E)) as f64,
        (2 * b * qkv * h) as f64,
    ));
    out.push((
        "q4_1_matvec (gate+up)",
        (passes * 2 * ffn * h / 32 * 20 + b * (h * E + 2 * ffn * E)) as f64,
        (2 * b * 2 * ffn * h) as f64,
    ));
    out.push((
        "q8_0_logits (tied head, once per step)",
        (passes * m.vocab * h / 32 * 34 + b * (h * E + m.vocab * 4)) as f64,
        (2 * b * m.vocab * h) as f64,
    ));
    out
}

fn main() {
    println!(
        "CUDA kernels: roofline on an H100 (3.35 TB/s, 990 TFLOP/s bf16), per layer and launch"
    );
    println!("| model | batch | kernel | bytes | FLOPs | FLOP/byte | bound µs | bound by |");
    println!("|---|---|---|---|---|---|---|---|");
    for m in &MODELS {
        for b in [1usize, 8, 64] {
            for (k, bytes, flops) in costs(m, b) {
                let t_mem = bytes / HBM_BYTES_PER_S;
                let t_flop = flops / FLOPS_PER_S;
                println!(
                    "| {} | {b} | {k} | {:.0} | {:.0} | {:.2} | {:.3} | {} |",
                    m.name,
                    bytes,
                    flops,
                    flops / bytes,
                    t_mem.max(t_flop) * 1e6,
                    if t_mem >= t_flop { "memory" } else { "compute" }
                );
            }
        }
    }
    gpu::time_kernels();
    gpu::time_forward();
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    pub fn time_kernels() {
        println!("built without the `cuda` feature: no GPU timings (cargo bench --bench kernels --features cuda)");
    }
    pub fn time_forward() {}
}

#[cfg(feature = "cuda")]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod gpu {
    use std::time::Instant;

    use flywheel::ops::cuda::CudaDevice;
    use flywheel::ops::device::{Buffer, Dtype, Indices, Kernels, LoraShape};

    pub fn time_kernels() {
        let dev = match CudaDevice::open(0) {
            Ok(d) => d,
            Err(e) => {
                println!("no GPU timings: {e}");
                return;
            }
        };
        let k = Kernels::new(&dev, Dtype::Bf16);
        let s = dev.stream().clone();
        println!("| model | batch | kernel | µs per launch | GB/s achieved |");
        println!("|---|---|---|---|---|");
        for m in &super::MODELS {
            for b in [1usize, 8, 64] {
                let h = m.hidden;
                let shape = LoraShape {
                    rows: b,
                    input: h,
                    rank: super::RANK,
                    output: h,
                    y_stride: h,
                    y_offset: 0,
                    slots: b,
                };
                let slot: Vec<i32> = (0..b as i32).collect();
                let zeros = |n: usize| Buffer::<_, u16>::zeros(&dev, n).unwrap();
                let x = zeros(b * h);
                let a = zeros(b * super::RANK * h);
                let bw = zeros(b * h * super::RANK);
                let ds = Buffer::from_host(&dev, &slot).unwrap();
                let scale = Buffer::from_host(&dev, &vec![1.0f32; b]).unwrap();
                let mut v = Buffer::<_, f32>::zeros(&dev, b * super::RANK).unwrap();
                let mut y = zeros(b * h);
                let w = zeros(h);
                let mut out = zeros(b * h);
                let ix = || Indices {
                    dev: &ds,
                    host: &slot,
                };
                let costs = super::costs(m, b);
                let time = |name: &str, bytes: f64, f: &mut dyn FnMut()| {
                    for _ in 0..10 {
                        f();
                    }
                    s.synchronize().unwrap();
                    let n = 200;
                    let t = Instant::now();
                    for _ in 0..n {
                        f();
                    }
                    s.synchronize().unwrap();
                    let per = t.elapsed().as_secs_f64() / n as f64;
                    println!(
                        "| {} | {b} | {name} | {:.2} | {:.0} |",
                        m.name,
                        per * 1e6,
                        bytes / per / 1e9
                    );
                };
                time("lora_shrink", costs[0].1, &mut || {
                    k.lora_shrink_bgmv(shape, &x, &a, ix(), &mut v).unwrap()
                });
                time("lora_expand_add", costs[1].1, &mut || {
                    k.lora_expand_add(shape, &v, &bw, ix(), &scale, &mut y)
                        .unwrap()
                });
                time("rms_norm", costs[2].1, &mut || {
                    k.rms_norm(b, h, 1e-5, &x, None, &w, &mut out).unwrap()
                });
            }
        }
    }

    /// The device forward pass on SmolLM2-135M Q4_1: decode steps at batch 1, 8 and 64 over a
    /// 64-token prompt each, and a 128-token prefill.
    pub fn time_forward() {
        use candle_core::quantized::gguf_file;
        use flywheel::engine::gpu::{GpuModel, GpuOptions};
        use flywheel::engine::model::ModelSource;

        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let dev = match CudaDevice::open(0) {
            Ok(d) => d,
            Err(e) => {
                println!("no GPU forward timings: {e}");
                return;
            }
        };
        let Ok(mut file) = std::fs::File::open(&path) else {
            println!(
                "no GPU forward timings: {} is missing (bash scripts/fetch-model.sh)",
                path.display()
            );
            return;
        };
        let content = gguf_file::Content::read(&mut file).unwrap();
        let src = ModelSource::gguf(&content, &mut file, 1024, &candle_core::Device::Cpu).unwrap();
        let shape = src.config(0);
        let mut model = GpuModel::load(dev, src, GpuOptions::for_serving(&shape, 64)).unwrap();
        println!("| SmolLM2-135M Q4_1 on the GPU | tokens/s |");
        println!("|---|---|");
        let prompt: Vec<u32> = (0..128).map(|i| 100 + i).collect();
        let mut seq = model.new_seq();
        let t = Instant::now();
        model.forward(&[&prompt], &mut [&mut seq], &[-1]).unwrap();
        println!(
            "| prefill 128 tokens | {:.0} |",
            128.0 / t.elapsed().as_secs_f64()
        );
        drop(seq);
        for batch in [1usize, 8, 64] {
            let mut seqs: Vec<_> = (0..batch).map(|_| model.new_seq()).collect();
            for s in &mut seqs {
                model.forward(&[&prompt[..64]], &mut [s], &[-1]).unwrap();
            }
            let steps = 32;
            let tok = [42u32];
            let tokens: Vec<&[u32]> = vec![&tok; batch];
            let slots = vec![-1; batch];
            let t = Instant::now();
            for _ in 0..steps {
                let mut refs: Vec<_> = seqs.iter_mut().collect();
                model.forward(&tokens, &mut refs, &slots).unwrap();
            }
            let rate = (steps * batch) as f64 / t.elapsed().as_secs_f64();
            println!("| decode, batch {batch} | {rate:.0} |");
        }
    }
}
