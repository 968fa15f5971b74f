//! The batched int8 product alone (`ops::qgemm::Q8Matrix::product`) at SmolLM2-135M's shapes,
//! for 1, 4, 8, 16, 24 and 32 activation rows (and 16, 24, 32, 64 and 256 for prefill), timed in
//! alternating rounds:
//! - *streamed*: one decode step's matrices as the engine holds them on a Q8_0 base (30 layers of
//!   the fused q/k/v, o, gate/up and down projections, then the tied 49152-row output head; 151 MB,
//!   far more than the caches, so every step reads the weights from memory as decoding does);
//! - *cached*: the 3072 × 576 gate/up matrix (1.8 MB, half of it in each core's 2 MB L2) forty
//!   times over, which shows what the kernels compute when memory is not in the way;
//! - *prefill*: one layer's four matrices against a prompt's rows.
//!
//! Each line gives the median ms per pass, the weight bytes read per ms, and int8 multiply-adds
//! per ns. `cargo bench --bench qgemm [-- streamed|cached|prefill]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use flywheel::ops::qgemm::{Q8Matrix, QuantRows};

mod common;
use common::values;

const LAYERS: usize = 30;
const ROUNDS: usize = 7;
/// Decode batches; prefill-sized batches for the layer's matrices (on AMX hosts, from
/// `qgemm_amx::MIN_ROWS` = 24 rows on, the products run on the tiles).
const BATCHES: [usize; 6] = [1, 4, 8, 16, 24, 32];
const PREFILL: [usize; 5] = [16, 24, 32, 64, 256];

/// Runs `mats` (in order, `repeat` times) against each batch of rows, in alternating rounds.
fn report(name: &str, mats: &[&Q8Matrix], repeat: usize, passes: usize, batches: &[usize]) {
    // `cargo bench --bench qgemm -- WORD` runs only the reports whose name has WORD.
    if let Some(only) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        if !name.contains(&only) {
            return;
        }
    }
    let bytes: usize = mats.iter().map(|m| m.bytes()).sum::<usize>() * repeat;
    let macs: usize = mats.iter().map(|m| m.rows * m.cols).sum::<usize>() * repeat;
    let inputs: Vec<Vec<QuantRows>> = batches
        .iter()
        .map(|&m| {
            [576usize, 1536]
                .iter()
                .map(|&cols| QuantRows::new(&values(m * cols, (m + cols) as u64, 1.0), m, cols))
                .collect()
        })
        .collect();
    let pass = |b: usize| {
        let mut sink = 0f32;
        for _ in 0..repeat {
            for mat in mats {
                let x = &inputs[b][usize::from(mat.input() != 576)];
                sink += mat.product(x).unwrap()[0];
            }
        }
        sink
    };
    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); batches.len()];
    for b in 0..batches.len() {
        std::hint::black_box(pass(b));
    }
    for _ in 0..ROUNDS {
        for (b, times) in ms.iter_mut().enumerate() {
            let t = Instant::now();
            for _ in 0..passes {
                std::hint::black_box(pass(b));
            }
            times.push(t.elapsed().as_secs_f64() * 1000.0 / passes as f64);
        }
    }
    println!(
        "{name}: {:.1} MB of weights per pass, {ROUNDS} rounds of {passes} passes",
        bytes as f64 / 1e6
    );
    println!("| rows | ms/pass (median) | min | weight GB/s | int8 MAC/ns |");
    println!("|---|---|---|---|---|");
    for (b, times) in ms.iter_mut().enumerate() {
        times.sort_by(f64::total_cmp);
        let med = times[ROUNDS / 2];
        println!(
            "| {} | {med:.2} | {:.2} | {:.1} | {:.1} |",
            batches[b],
            times[0],
            bytes as f64 / med / 1e6,
            (macs * batches[b]) as f64 / med / 1e6,
        );
    }
}

fn main() {
    // (outputs, inputs) of each layer's fused projections.
    let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let mut mats: Vec<Q8Matrix> = Vec::new();
    for layer in 0..LAYERS {
        for (i, &(rows, cols)) in shapes.iter().enumerate() {
            let w = values(rows * cols, (layer * 4 + i) as u64, 1.0);
            mats.push(Q8Matrix::from_f32(&w, rows, cols).unwrap());
        }
    }
    mats.push(Q8Matrix::from_f32(&values(49152 * 576, 999, 1.0), 49152, 576).unwrap());
    report(
        "streamed (one decode step)",
        &mats.iter().collect::<Vec<_>>(),
        1,
        10,
        &BATCHES,
    );
    report("cached (gate/up, 40 times)", &[&mats[2]], 40, 10, &BATCHES);
    report(
        "prefill (one layer's four matrices, 4 times)",
        &mats[..4].iter().collect::<Vec<_>>(),
        4,
        3,
        &PREFILL,
    );
}
