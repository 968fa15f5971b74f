//! How fast this host's AMX unit runs int8 tile products, over time: nothing but `tdpbssd` on
//! tiles already loaded (two independent 16×16 results over 32 bytes of k, the shape the serving
//! path uses per Q8_0 block), timed in chunks of 100,000 pairs, with no memory traffic at all.
//!
//! On the 2-vCPU Xeon these benchmarks run on, the rate is bimodal: about 4.9 ns a product (16
//! cycles, the documented throughput) or about three times that, for whole runs, or switching from
//! the slow rate to the fast one after some tens of milliseconds. The code is the same; the host
//! decides. Every tile figure in BENCHMARKS.md (prefill, wide decode, bf16 training) carries that
//! variance, which this bench makes visible. Each chunk configures and releases the tiles, as each
//! of the serving path's products does.
//!
//! `cargo bench --bench amx_rate [-- RUNS]` (one core; default 4 runs of 60 chunks, 0.5 s apart).
#![allow(unsafe_code)]

use std::time::{Duration, Instant};

#[cfg(target_arch = "x86_64")]
fn main() {
    let f = flywheel::ops::cpu::features();
    if !(f.amx_int8 && f.amx_granted) {
        println!("SKIPPED: no usable AMX-INT8 here ({})", f.describe());
        return;
    }
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(4);
    println!("host: {}", f.describe());
    let mut runs_ns = Vec::new();
    for _ in 0..runs {
        runs_ns.push(
            (0..60)
                .map(|_| chunk_ns_per_product())
                .collect::<Vec<f64>>(),
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("| run | ns per tile product, chunk median | fastest chunk | slowest chunk | chunks at the full rate (under {FULL_RATE_NS} ns) |");
    println!("|---|---|---|---|---|");
    for (run, mut ns) in runs_ns.into_iter().enumerate() {
        let fast = ns.iter().filter(|&&t| t < FULL_RATE_NS).count();
        ns.sort_by(f64::total_cmp);
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {fast} of {} |",
            run + 1,
            ns[ns.len() / 2],
            ns[0],
            ns[ns.len() - 1],
            ns.len()
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("SKIPPED: AMX is x86-64 only");
}

/// Above the 16 cycles a product takes at full rate (about 5 ns at this host's clock) and well
/// below the slow rate (about 15 ns).
#[cfg(target_arch = "x86_64")]
const FULL_RATE_NS: f64 = 8.0;

/// Nanoseconds per tile product over one chunk of 100,000 pairs of independent products.
#[cfg(target_arch = "x86_64")]
fn chunk_ns_per_product() -> f64 {
    use std::arch::asm;
    const PAIRS: u32 = 100_000;
    // Palette 1; tmm0 and tmm3 16 rows × 64 bytes (int32 results), tmm1 and tmm4 16 × 32 (k = 32
    // bytes of 16 rows), tmm2 and tmm5 8 × 64 (the other side, four bytes of 16 columns a row).
    #[repr(C, align(64))]
    struct Config([u8; 64]);
    let mut cfg = Config([0; 64]);
    cfg.0[0] = 1;
    for (t, (bytes, rows)) in [
        (64u16, 16u8),
        (32, 16),
        (64, 8),
        (64, 16),
        (32, 16),
        (64, 8),
    ]
    .into_iter()
    .enumerate()
    {
        cfg.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&bytes.to_le_bytes());
        cfg.0[48 + t] = rows;
    }
    let start = Instant::now();
    // SAFETY: `main` checked that the CPU has AMX-INT8 and that Linux granted this process the
    // tile state (`cpu::features` asks for it); the configuration is valid for palette 1, and the
    // products read and write only tile registers, zeroed first.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        asm!(
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm4",
            "tilezero tmm5",
            options(nostack, nomem)
        );
        for _ in 0..PAIRS {
            asm!(
                "tilezero tmm0",
                "tdpbssd tmm0, tmm1, tmm2",
                "tilezero tmm3",
                "tdpbssd tmm3, tmm4, tmm5",
                options(nostack, nomem)
            );
        }
        asm!("tilerelease", options(nostack, nomem));
    }
    start.elapsed().as_nanos() as f64 / f64::from(2 * PAIRS)
}
