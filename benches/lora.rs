//! The batched LoRA op alone (`ops::lora::lora_add`), at SmolLM2-135M's projection shapes: one
//! decode step's worth of calls (30 layers × the four fused projections) for 8 rows running 8
//! distinct or 1 shared rank-16 adapter on all seven projections, quantized as the engine serves
//! them on a Q8_0 base. Reports each mix's median ms per step over alternating rounds, the
//! adapter bytes a step reads, and the rate that makes against this machine's plain read
//! bandwidth (two threads summing a 256 MiB buffer), measured in the same run.
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
