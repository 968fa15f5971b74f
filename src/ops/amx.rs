//! Matrix products on AMX tiles in bf16 with f32 accumulation: `y = x · B` where B is a frozen
//! matrix packed once (training's base weights) and x is rounded to bf16 as it is packed.
//!
//! A tile product `tdpbf16ps` adds a 16×32 bf16 tile of x times a 32×16 tile of B into a 16×16
//! f32 tile, taking B in pairs along k ("VNNI" order: tile row r holds k = 2r and 2r + 1 of each of
//! the 16 columns). B is stored that way, tile after tile, so each tile is one contiguous kilobyte;
//! x is packed the same way per 16 rows. Each step keeps a 32×32 block of y in four accumulator
//! tiles and loads two tiles of x and two of B, the most the eight tile registers allow. Rows of x
//! are split between threads in blocks of 32; every output is summed by one thread in the same
//! order, so results do not depend on the thread count.
//!
//! Dimensions that are not multiples of 32 are padded with zeros. The tile instructions are written
//! in inline assembly (Rust's AMX intrinsics are not stable); they run only where
//! `cpu::features()` says the CPU has them and Linux granted the tile state.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use half::bf16;

use super::cpu;

/// Rows (of x and of B's columns) and bf16 values along k per tile.
const TILE_ROWS: usize = 16;
const TILE_K: usize = 32;
/// bf16 values in one tile (16 rows × 64 bytes).
const TILE_LEN: usize = TILE_ROWS * TILE_K;
/// The block of y one step computes: 2×2 tiles.
const BLOCK: usize = 32;

/// A frozen matrix B (k × n) in bf16, packed in tiles for `matmul`.
pub struct PackedB {
    pub k: usize,
    pub n: usize,
    kp: usize,
    np: usize,
    /// For each 16-column block j and 32-row block kk: tile (j · kp/32 + kk).
    tiles: Vec<bf16>,
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

impl PackedB {
    /// B = Wᵀ for a row-major W of `n` rows × `k` columns (a projection's (outputs, inputs)
    /// weight): `matmul(x, ·)` is then `x · Wᵀ`.
    pub fn transposed(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack(k, n, |kk, j| w[j * k + kk])
    }

    /// B = W for a row-major W of `k` rows × `n` columns: `matmul(x, ·)` is `x · W`.
    pub fn plain(w: &[f32], k: usize, n: usize) -> Self {
        Self::pack(k, n, |kk, j| w[kk * n + j])
    }

    fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let (kp, np) = (round_up(k, BLOCK), round_up(n, BLOCK));
        let kb = kp / TILE_K;
        let mut tiles = vec![bf16::ZERO; kp * np];
        for j in 0..np / TILE_ROWS {
            for kk in 0..kb {
                let tile = &mut tiles[(j * kb + kk) * TILE_LEN..][..TILE_LEN];
                for r in 0..TILE_ROWS {
                    for c in 0..TILE_ROWS {
                        for p in 0..2 {
                            let (row, col) = (kk * TILE_K + 2 * r + p, j * TILE_ROWS + c);
                            if row < k && col < n {
                                tile[r * TILE_K + c * 2 + p] = bf16::from_f32(at(row, col));
                            }
                        }
                    }
                }
            }
        }
        Self {
            k,
            n,
            kp,
            np,
            tiles,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.tiles.len() * 2
    }

    /// B's value at (row, col) as stored (bf16), for references.
    pub fn get(&self, row: usize, col: usize) -> f32 {
        let kb = self.kp / TILE_K;
        let (j, c) = (col / TILE_ROWS, col % TILE_ROWS);
        let (kk, rr) = (row / TILE_K, row % TILE_K);
        self.tiles[(j * kb + kk) * TILE_LEN + (rr / 2) * TILE_K + c * 2 + rr % 2].to_f32()
    }
}

/// Whether `matmul` runs here.
pub fn available() -> bool {
    cfg!(target_arch = "x86_64") && cpu::features().amx_bf16_usable()
}

/// `x · B` for a row-major x of `m` rows × `b.k` columns: m × b.n, row-major. `None` where AMX
/// cannot run (see `available`).
pub fn matmul(x: &[f32], m: usize, b: &PackedB) -> Option<Vec<f32>> {
    if !available() || x.len() != m * b.k {
        return None;
    }
    if m == 0 || b.n == 0 {
        return Some(Vec::new());
    }
    // Each thread takes whole 32-row blocks; every value of y is written by one of them.
    let blocks = m.div_ceil(BLOCK);
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(blocks);
    let rows_per = blocks.div_ceil(threads) * BLOCK;
    let mut y: Vec<f32> = Vec::with_capacity(m * b.n);
    std::thread::scope(|s| {
        let out = y.spare_capacity_mut()[..m * b.n].chunks_mut(rows_per * b.n);
        for (xc, yc) in x.chunks(rows_per * b.k).zip(out) {
            let rows = xc.len() / b.k;
            if threads > 1 {
                s.spawn(move || one(xc, rows, b, yc));
            } else {
                one(xc, rows, b, yc);
            }
        }
    });
    // SAFETY: `one` wrote all m × n values (each thread its rows).
    unsafe { y.set_len(m * b.n) };
    Some(y)
}

/// `batch` independent products `x_i · B_i` (attention's, per sequence and head): x is `batch`
/// row-major m × k matrices, or k × m ones holding x_iᵀ when `x_transposed` (each is transposed
/// by the thread that takes it); z is `batch` matrices of `zr` × `zc`, and B_i is z_iᵀ when
/// `transposed` (so k = zc, n = zr) or z_i (k = zr, n = zc). Pairs are split between threads, each
/// product runs on one. Returns `batch` m × n matrices, or `None` where AMX cannot run.
#[allow(clippy::too_many_arguments)]
pub fn batched(
    x: &[f32],
    m: usize,
    k: usize,
    x_transposed: bool,
    z: &[f32],
    zr: usize,
    zc: usize,
    transposed: bool,
    batch: usize,
) -> Option<Vec<f32>> {
    let n = if transposed { zr } else { zc };
    let kz = if transposed { zc } else { zr };
    if !available() || kz != k || x.len() != batch * m * k || z.len() != batch * zr * zc {
        return None;
    }
    if batch * m * n == 0 {
        return Some(Vec::new());
    }
    let mut y: Vec<f32> = Vec::with_capacity(batch * m * n);
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(batch);
    let per = batch.div_ceil(threads);
    std::thread::scope(|s| {
        let spare = &mut y.spare_capacity_mut()[..batch * m * n];
        for (t, out) in spare.chunks_mut(per * m * n).enumerate() {
            s.spawn(move || {
                let mut xt = Vec::new();
                for (i, yi) in out.chunks_mut(m * n).enumerate() {
                    let pair = t * per + i;
                    let zi = &z[pair * zr * zc..(pair + 1) * zr * zc];
                    let b = if transposed {
                        PackedB::transposed(zi, zr, zc)
                    } else {
                        PackedB::plain(zi, zr, zc)
                    };
                    let xi = &x[pair * m * k..(pair + 1) * m * k];
                    if x_transposed {
                        transpose_into(xi, k, m, &mut xt);
                        one(&xt, m, &b, yi);
                    } else {
                        one(xi, m, &b, yi);
                    }
                }
            });
        }
    });
    // SAFETY: `one` wrote every pair's m × n values.
    unsafe { y.set_len(batch * m * n) };
    Some(y)
}

/// `src` (rows × cols, row-major) transposed into `dst` (cols × rows), in 32 × 32 blocks that
/// stay in cache.
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut Vec<f32>) {
    const B: usize = 32;
    dst.clear();
    dst.resize(rows * cols, 0.0);
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                let row = &src[r * cols..(r + 1) * cols];
                for c in c0..(c0 + B).min(cols) {
                    dst[c * rows + r] = row[c];
                }
            }
        }
    }
}

/// One product on this thread, writing all of `y` (m × b.n). Padded shapes go through a padded
/// buffer; whole ones are stored straight into y.
fn one(x: &[f32], m: usize, b: &PackedB, y: &mut [MaybeUninit<f32>]) {
    let mp = round_up(m.max(1), BLOCK);
    let a = pack_x(x, m, b.k, mp, b.kp);
    // SAFETY: only reached where `available()` holds; `a` holds mp packed rows and the tiles
    // store all mp × np values of their destination.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        if mp == m && b.np == b.n {
            x86::tiles(&a, b, y, mp);
            return;
        }
        let mut full: Vec<f32> = Vec::with_capacity(mp * b.np);
        x86::tiles(&a, b, &mut full.spare_capacity_mut()[..mp * b.np], mp);
        full.set_len(mp * b.np);
        for (dst, src) in y.chunks_mut(b.n).zip(full.chunks(b.np)) {
            for (d, v) in dst.iter_mut().zip(src) {
                d.write(*v);
            }
        }
    }
}

/// Rounds to the nearest bf16, ties to even (as `bf16::from_f32`), in a form the compiler
/// vectorizes; a NaN stays a (quiet) NaN.
#[inline(always)]
fn to_bf16(v: f32) -> bf16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    bf16::from_bits(if nan {
        ((b >> 16) as u16) | 0x40
    } else {
        rounded
    })
}

/// x (m × k, f32) in bf16 tiles: per 16-row block, per 32-column block, one contiguous tile.
fn pack_x(x: &[f32], m: usize, k: usize, mp: usize, kp: usize) -> Vec<bf16> {
    let kb = kp / TILE_K;
    let mut out = vec![bf16::ZERO; mp * kp];
    for (i, rows) in x.chunks(TILE_ROWS * k).enumerate() {
        for (r, row) in rows.chunks(k).enumerate() {
            for (kk, part) in row.chunks(TILE_K).enumerate() {
                let at = (i * kb + kk) * TILE_LEN + r * TILE_K;
                for (d, v) in out[at..at + part.len()].iter_mut().zip(part) {
                    *d = to_bf16(*v);
                }
            }
        }
    }
    debug_assert!(m <= mp);
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    use super::{bf16, PackedB, BLOCK, TILE_K, TILE_LEN, TILE_ROWS};

    /// The tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// y (rows × b.np) = x · B for `rows` (a multiple of 32) rows of packed x.
    ///
    /// # Safety
    /// The CPU must have AMX-BF16 and the process the tile state; `a` must hold `rows` packed
    /// rows of width b.kp and `y` rows × b.np values.
    pub(super) unsafe fn tiles(
        a: &[bf16],
        b: &PackedB,
        y: &mut [super::MaybeUninit<f32>],
        rows: usize,
    ) {
        let kb = b.kp / TILE_K;
        assert!(a.len() >= rows * b.kp && y.len() >= rows * b.np && b.tiles.len() >= b.np * b.kp);
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64;
            cfg.0[48 + t] = TILE_ROWS as u8;
        }
        let tile_stride: usize = 64;
        let y_stride = b.np * 4;
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
            for i in (0..rows).step_by(BLOCK) {
                let a0 = a.as_ptr().add((i / TILE_ROWS) * kb * TILE_LEN);
                let a1 = a0.add(kb * TILE_LEN);
                for j in (0..b.np / TILE_ROWS).step_by(2) {
                    let b0 = b.tiles.as_ptr().add(j * kb * TILE_LEN);
                    let b1 = b0.add(kb * TILE_LEN);
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                    for kk in 0..kb {
                        let o = kk * TILE_LEN;
                        asm!(
                            "tileloadd tmm4, [{a0} + {s}*1]",
                            "tileloadd tmm6, [{b0} + {s}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tileloadd tmm7, [{b1} + {s}*1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tileloadd tmm5, [{a1} + {s}*1]",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a0.add(o),
                            a1 = in(reg) a1.add(o),
                            b0 = in(reg) b0.add(o),
                            b1 = in(reg) b1.add(o),
                            s = in(reg) tile_stride,
                            options(nostack, readonly)
                        );
                    }
                    let c0 = y.as_mut_ptr().cast::<f32>().add(i * b.np + j * TILE_ROWS);
                    let c1 = c0.add(TILE_ROWS);
                    let c2 = c0.add(TILE_ROWS * b.np);
                    let c3 = c2.add(TILE_ROWS);
                    asm!(
                        "tilestored [{c0} + {s}*1], tmm0",
                        "tilestored [{c1} + {s}*1], tmm1",
                        "tilestored [{c2} + {s}*1], tmm2",
                        "tilestored [{c3} + {s}*1], tmm3",
                        c0 = in(reg) c0,
                        c1 = in(reg) c1,
                        c2 = in(reg) c2,
                        c3 = in(reg) c3,
                        s = in(reg) y_stride,
                        options(nostack)
                    );
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The exact product of the bf16-rounded operands, summed in f64.
    fn reference(x: &[f32], m: usize, b: &PackedB) -> Vec<f32> {
        let mut y = vec![0f32; m * b.n];
        for i in 0..m {
            for j in 0..b.n {
                let s: f64 = (0..b.k)
                    .map(|t| {
                        f64::from(bf16::from_f32(x[i * b.k + t]).to_f32()) * f64::from(b.get(t, j))
                    })
                    .sum();
                y[i * b.n + j] = s as f32;
            }
        }
        y
    }

    #[test]
    fn tile_products_equal_the_bf16_reference_on_odd_shapes() {
        if !available() {
            println!(
                "SKIPPED: this host cannot run AMX bf16 tiles ({}); the packing is checked, the products are not",
                cpu::features().describe()
            );
            let w = random(5 * 7, 1);
            let b = PackedB::transposed(&w, 5, 7);
            assert_eq!(b.get(3, 2), bf16::from_f32(w[2 * 7 + 3]).to_f32());
            assert!(matmul(&random(2 * 7, 2), 2, &b).is_none());
            return;
        }
        for (m, k, n, seed) in [
            (1, 32, 32, 1),
            (33, 70, 17, 2),
            (64, 576, 192, 3),
            (100, 96, 130, 4),
            (7, 1536, 64, 5),
        ] {
            let x = random(m * k, seed);
            let w = random(n * k, seed + 100);
            for (b, label) in [
                (PackedB::transposed(&w, n, k), "x·Wᵀ"),
                (PackedB::plain(&w, k, n), "x·W"),
            ] {
                let y = matmul(&x, m, &b).unwrap();
                let want = reference(&x, m, &b);
                // f32 accumulation of k products: a few ulps of the sum's magnitude.
                for (i, (g, r)) in y.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f32).sqrt() * (1.0 + r.abs());
                    assert!(
                        (g - r).abs() <= tol,
                        "{label} m={m} k={k} n={n} at {i}: {g} vs {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn rounding_to_bf16_matches_the_half_crate() {
        let mut values = random(10_000, 77);
        values.extend([
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-42,
            f32::INFINITY,
        ]);
        values.extend([f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000)]); // ties
        for v in values {
            assert_eq!(to_bf16(v).to_bits(), bf16::from_f32(v).to_bits(), "{v:e}");
        }
        assert!(to_bf16(f32::NAN).is_nan());
        assert!(to_bf16(f32::from_bits(0x7f80_0001)).is_nan());
    }

    #[test]
    fn batched_products_equal_one_product_per_pair() {
        if !available() {
            println!("SKIPPED: this host cannot run AMX bf16 tiles");
            return;
        }
        let (batch, m, k, n) = (5, 40, 64, 48);
        let x = random(batch * m * k, 21);
        // The same x_i stored transposed (k × m each).
        let xt: Vec<f32> = x
            .chunks(m * k)
            .flat_map(|xi| (0..k).flat_map(move |c| (0..m).map(move |r| xi[r * k + c])))
            .collect();
        for (transposed, x_transposed) in
            [(true, false), (false, false), (false, true), (true, true)]
        {
            let (zr, zc) = if transposed { (n, k) } else { (k, n) };
            let z = random(batch * zr * zc, 22);
            let input = if x_transposed { &xt } else { &x };
            let y = batched(input, m, k, x_transposed, &z, zr, zc, transposed, batch).unwrap();
            for i in 0..batch {
                let zi = &z[i * zr * zc..(i + 1) * zr * zc];
                let b = if transposed {
                    PackedB::transposed(zi, zr, zc)
                } else {
                    PackedB::plain(zi, zr, zc)
                };
                let want = matmul(&x[i * m * k..(i + 1) * m * k], m, &b).unwrap();
                assert_eq!(
                    y[i * m * n..(i + 1) * m * n],
                    want[..],
                    "pair {i}, transposed {transposed}, x transposed {x_transposed}"
                );
            }
        }
        assert!(batched(&x, m, k + 1, false, &random(10, 1), 2, 5, true, batch).is_none());
        assert_eq!(
            batched(&[], 0, k, false, &[], 0, k, true, 3),
            Some(Vec::new())
        );
        let b = PackedB::transposed(&[], 0, k);
        assert_eq!(matmul(&x[..2 * k], 2, &b), Some(Vec::new()));
        assert_eq!(
            matmul(&[], 0, &PackedB::transposed(&x[..k], 1, k)),
            Some(Vec::new())
        );
    }

    #[test]
    fn the_result_does_not_depend_on_how_rows_are_split() {
        if !available() {
            println!("SKIPPED: this host cannot run AMX bf16 tiles");
            return;
        }
        let (m, k, n) = (96, 64, 64);
        let x = random(m * k, 9);
        let b = PackedB::transposed(&random(n * k, 10), n, k);
        let all = matmul(&x, m, &b).unwrap();
        for start in [0, 32, 64] {
            let part = matmul(&x[start * k..(start + 32) * k], 32, &b).unwrap();
            assert_eq!(part, all[start * n..(start + 32) * n]);
        }
    }
}
