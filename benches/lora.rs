//! The batched LoRA op alone (`ops::lora::lora_add`), at SmolLM2-135M's projection shapes: one
//! decode step's worth of calls (30 layers × the four fused projections) for 8 rows running 8
//! distinct or 1 shared rank-16 adapter on all seven projections, quantized as the engine serves
//! them on a Q8_0 base, in int8 and in 4 bits (`adapter_bits = 4`). Reports each mix's median ms
//! per step over alternating rounds, the adapter bytes a step reads, and the rate that makes
//! against this machine's plain read bandwidth (two threads summing a 256 MiB buffer), measured
//! in the same run; then each format's error in the modules' deltas against f32.
//!
//! `cargo bench --bench lora`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use flywheel::ops::lora::{lora_add, LowRank, Module, ModuleSlot};
use flywheel::ops::qgemm::QuantRows;

mod common;
use common::values;

const LAYERS: usize = 30;
const ROWS: usize = 8;
const RANK: usize = 16;
const ROUNDS: usize = 7;
const STEPS_PER_ROUND: usize = 40;

/// (input width, module output widths) of SmolLM2-135M's fused projections: q/k/v, o, gate/up,
/// down.
fn projections() -> [(usize, Vec<usize>); 4] {
    [
        (576, vec![576, 192, 192]),
        (576, vec![576]),
        (576, vec![1536, 1536]),
        (1536, vec![576]),
    ]
}

fn main() {
    let projs = projections();
    // modules[layer][projection][adapter][module]
    let mut seed = 0;
    let mut bytes_per_adapter = 0;
    let mut bytes_q4 = 0;
    let modules: Vec<Vec<Vec<Vec<[Module; 2]>>>> = (0..LAYERS)
        .map(|_| {
            projs
                .iter()
                .map(|(input, widths)| {
                    (0..ROWS)
                        .map(|_| {
                            widths
                                .iter()
                                .map(|&output| {
                                    seed += 2;
                                    let f = Module::F32(LowRank {
                                        rank: RANK,
                                        input: *input,
                                        output,
                                        a_t: values(input * RANK, seed, 0.1),
                                        b_t: values(RANK * output, seed + 1, 0.1),
                                    });
                                    let (q8, q4) = (f.to_q8().unwrap(), f.to_q4().unwrap());
                                    bytes_per_adapter += q8.bytes();
                                    bytes_q4 += q4.bytes();
                                    [q8, q4]
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let bytes_per_adapter = [bytes_per_adapter / ROWS, bytes_q4 / ROWS];
    let inputs: Vec<(Vec<f32>, QuantRows)> = projs
        .iter()
        .map(|(input, _)| {
            let x = values(ROWS * input, 7, 1.0);
            let q = QuantRows::new(&x, ROWS, *input);
            (x, q)
        })
        .collect();
    let mut outputs: Vec<Vec<f32>> = projs
        .iter()
        .map(|(_, widths)| vec![0f32; ROWS * widths.iter().sum::<usize>()])
        .collect();
    let mut step = |distinct: bool, bits: usize| {
        for layer in &modules {
            for (p, (input, widths)) in projs.iter().enumerate() {
                let rows: Vec<Vec<ModuleSlot<'_>>> = (0..ROWS)
                    .map(|t| {
                        let adapter = if distinct { t } else { 0 };
                        let mut offset = 0;
                        layer[p][adapter]
                            .iter()
                            .zip(widths)
                            .map(|(module, w)| {
                                offset += w;
                                ModuleSlot {
                                    module: &module[bits],
                                    scale: 2.0,
                                    offset: offset - w,
                                }
                            })
                            .collect()
                    })
                    .collect();
                let out: usize = widths.iter().sum();
                let (x, xq) = &inputs[p];
                lora_add(&mut outputs[p], out, x, Some(xq), *input, &rows).unwrap();
            }
        }
    };
    // (label, distinct, 0: int8 / 1: 4-bit)
    let mixes = [
        ("8 distinct, int8", true, 0),
        ("8 distinct, 4-bit", true, 1),
        ("1 shared, int8", false, 0),
        ("1 shared, 4-bit", false, 1),
    ];
    let mut times = vec![Vec::new(); mixes.len()];
    for _ in 0..ROUNDS {
        for (&(_, distinct, bits), t) in mixes.iter().zip(times.iter_mut()) {
            let start = Instant::now();
            for _ in 0..STEPS_PER_ROUND {
                step(distinct, bits);
            }
            t.push(start.elapsed().as_secs_f64() * 1000.0 / STEPS_PER_ROUND as f64);
        }
    }
    let bandwidth = read_bandwidth();
    println!(
        "LoRA op alone, SmolLM2-135M shapes, {ROWS} rows, rank {RANK}, all seven projections:"
    );
    println!("| adapters | ms/step | adapter MB read per step | GB/s |");
    println!("|---|---|---|---|");
    for (&(label, distinct, bits), t) in mixes.iter().zip(&mut times) {
        t.sort_by(f64::total_cmp);
        let ms = t[ROUNDS / 2];
        let adapters = if distinct { ROWS } else { 1 };
        let mb = (adapters * bytes_per_adapter[bits]) as f64 / 1e6;
        println!("| {label} | {ms:.3} | {mb:.1} | {:.1} |", mb / ms);
    }
    println!("plain read bandwidth, 2 threads: {bandwidth:.1} GB/s");
    factor_error();
}

/// How far the quantized modules' deltas are from the f32 module's, at these shapes: RMS of the
/// difference over RMS of the f32 delta, for uniform factors (as A is initialized) and normal
/// ones (std 0.02), on 8 uniform input rows and on the same rows with two channels 40x larger
/// (the outliers a real model's activations carry).
fn factor_error() {
    println!("| factors | inputs | int8 error of the delta | 4-bit error |");
    println!("|---|---|---|---|");
    let normal = |n: usize, seed: u64| -> Vec<f32> {
        // Sum of 12 uniforms on [-0.5, 0.5): mean 0, variance 1.
        let u = values(12 * n, seed, 1.0);
        u.chunks_exact(12)
            .map(|c| 0.02 * c.iter().sum::<f32>())
            .collect()
    };
    for (label, gaussian) in [("uniform ±0.05", false), ("normal, std 0.02", true)] {
        for outliers in [false, true] {
            let (mut err, mut size) = ([0f64; 2], 0f64);
            for (p, (input, widths)) in projections().iter().enumerate() {
                let mut x = values(ROWS * input, 40 + p as u64, 1.0);
                if outliers {
                    for row in x.chunks_mut(*input) {
                        row[5] *= 40.0;
                        row[input / 2] *= 40.0;
                    }
                }
                let xq = QuantRows::new(&x, ROWS, *input);
                for (k, &output) in widths.iter().enumerate() {
                    let seed = 1000 + 10 * (p * 4 + k) as u64;
                    let (a_t, b_t) = if gaussian {
                        (normal(input * RANK, seed), normal(RANK * output, seed + 1))
                    } else {
                        (
                            values(input * RANK, seed, 0.1),
                            values(RANK * output, seed + 1, 0.1),
                        )
                    };
                    let f = Module::F32(LowRank {
                        rank: RANK,
                        input: *input,
                        output,
                        a_t,
                        b_t,
                    });
                    let run = |m: &Module| {
                        let mut y = vec![0f32; ROWS * output];
                        let slot = || ModuleSlot {
                            module: m,
                            scale: 2.0,
                            offset: 0,
                        };
                        let rows: Vec<Vec<ModuleSlot<'_>>> =
                            (0..ROWS).map(|_| vec![slot()]).collect();
                        lora_add(&mut y, output, &x, Some(&xq), *input, &rows).unwrap();
                        y
                    };
                    let want = run(&f);
                    size += want.iter().map(|v| f64::from(v * v)).sum::<f64>();
                    for (e, m) in err.iter_mut().zip([f.to_q8().unwrap(), f.to_q4().unwrap()]) {
                        *e += run(&m)
                            .iter()
                            .zip(&want)
                            .map(|(g, w)| f64::from((g - w) * (g - w)))
                            .sum::<f64>();
                    }
                }
            }
            let inputs = if outliers {
                "two outlier channels"
            } else {
                "uniform"
            };
            println!(
                "| {label} | {inputs} | {:.2}% | {:.2}% |",
                100.0 * (err[0] / size).sqrt(),
                100.0 * (err[1] / size).sqrt()
            );
        }
    }
}

/// GB/s two threads (candle's pool) reach summing a 256 MiB buffer, best of 3.
fn read_bandwidth() -> f64 {
    const CHUNK: usize = 4 << 20;
    let big: Vec<u8> = (0..64 * CHUNK).map(|i| i as u8).collect();
    let pool = candle_core::utils::barrier_pool();
    let sums: Vec<std::sync::atomic::AtomicU64> = (0..64).map(|_| Default::default()).collect();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        pool.execute_chunked(64, |range| {
            for i in range {
                let s: u64 = big[i * CHUNK..(i + 1) * CHUNK]
                    .chunks_exact(64)
                    .map(|line| u64::from(line[0]) + u64::from(line[32]))
                    .sum();
                sums[i].fetch_add(s, std::sync::atomic::Ordering::Relaxed);
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    big.len() as f64 / 1e9 / best
}
