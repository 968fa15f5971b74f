//! The Q8_0 product of `qgemm` on AMX-INT8 tiles, for batches of activation rows (prefill, wide
//! decode), with the same bits as the vector kernels.
//!
//! One tile product `tdpbssd` multiplies 16 activation rows by 16 weight rows over 32 bytes of k:
//! exactly one Q8_0 block, so each of the 256 int32 results is one block's exact dot. The tile is
//! stored and each row of 16 dots is converted, scaled by the two blocks' scales and added (one
//! fused multiply-add) to the lane `qgemm` gives that block (b mod 8); the lanes are summed at the
//! end in `hsum8`'s order. That is the arithmetic of every `qgemm` kernel, so the results are
//! bit-identical to theirs (`qgemm`'s tests compare them on every shape they try).
//!
//! The tiles want their own byte order: activation rows with each block's 32 bytes together (the
//! rows are quantized interleaved for the vector kernels, so they are put back in order once per
//! call, and unbiased), and the weights of 16 rows side by side, four bytes of each row per 64-byte
//! tile row. The weights are repacked that way per panel of 16 rows as a worker reaches it, into a
//! buffer the size of the panel, and used against every 16-row tile of activations: the matrix
//! is held once, in the vector kernels' layout, and decoding a single sequence is unchanged.
//!
//! Panels are shared out on candle's worker pool as `qgemm` shares weight rows; each output is
//! computed by one worker in one order, so the thread count changes nothing. The tile
//! instructions are inline assembly (Rust's AMX intrinsics are not stable); they run only where
//! `cpu::features()` reports AMX-INT8, AVX-512 and the tile state granted.
#![allow(unsafe_code)]

use super::cpu;
use super::qgemm::{interleaved_index, BLOCK, GROUP};

/// Activation rows (and weight rows) per tile.
const TILE: usize = 16;
/// Bytes of one block's weights for a panel: 16 rows × 32 bytes.
const PANEL_BLOCK: usize = TILE * BLOCK;
/// Bytes of k one four-byte word holds, and words per block.
const WORD: usize = 4;
const WORDS: usize = BLOCK / WORD;

/// Activation rows from which `Q8Matrix::product` uses the tiles: below a whole tile the panel
/// repacking costs more than the vector kernels take.
pub const MIN_ROWS: usize = 16;

/// Whether the tile path runs here.
pub fn usable() -> bool {
    let f = cpu::features();
    cfg!(target_arch = "x86_64") && f.amx_int8 && f.amx_granted && f.avx512f
}

/// A Q8_0 weight matrix as `qgemm` stores it: `rows` rows of `cols` interleaved bytes and
/// `cols / 32` scales each.
pub(super) struct Weights<'a> {
    pub quants: &'a [i8],
    pub scales: &'a [f32],
    pub rows: usize,
    pub cols: usize,
}

/// Quantized activations as `qgemm::QuantRows` stores them: `m` interleaved rows, each byte
/// xor'ed with `bias`.
pub(super) struct Inputs<'a> {
    pub quants: &'a [i8],
    pub scales: &'a [f32],
    pub m: usize,
    pub bias: i8,
}

/// `x · Wᵀ`, m × rows, row-major; `None` where the tiles cannot run (see `usable`) or the
/// extents do not agree.
pub(super) fn product(w: &Weights, x: &Inputs) -> Option<Vec<f32>> {
    let (n, cols) = (w.rows, w.cols);
    let nb = cols / BLOCK;
    if !usable()
        || cols != nb * BLOCK
        || w.quants.len() < n * cols
        || w.scales.len() < n * nb
        || x.quants.len() < x.m * cols
        || x.scales.len() < x.m * nb
    {
        return None;
    }
    let m = x.m;
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 || nb == 0 {
        return Some(y);
    }
    let a = Natural::new(x, cols);
    let out = SharedOut(y.as_mut_ptr());
    let out = &out;
    candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(TILE), |range| {
        let mut panel = Panel::new(nb);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable()` held above (AMX-INT8, AVX-512F, tile state). Each panel p writes
        // output columns p·16.. (at most 16, below n) of rows below m, inside `y`, which outlives
        // the pool call; execute_chunked hands each panel to one worker only.
        unsafe {
            x86::configure();
            for p in range {
                let n0 = p * TILE;
                panel.pack(w, n0);
                x86::panel(&a, m, &panel, out.0.add(n0), n, (n - n0).min(TILE));
            }
            x86::release();
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (range, &mut panel, out);
    });
    Some(y)
}

/// The output buffer, shared with the worker pool for disjoint writes.
struct SharedOut(*mut f32);
// SAFETY: workers write disjoint output columns (one panel each), so sharing the pointer races on
// nothing.
unsafe impl Sync for SharedOut {}

/// Activations in block order, signed, padded with zero rows to whole tiles.
struct Natural {
    /// `rows` × cols bytes.
    bytes: Vec<i8>,
    /// `rows` × nb scales (zero in the padding).
    scales: Vec<f32>,
    cols: usize,
    nb: usize,
}

impl Natural {
    fn new(x: &Inputs, cols: usize) -> Self {
        let nb = cols / BLOCK;
        let rows = x.m.div_ceil(TILE) * TILE;
        let mut bytes = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows * nb];
        scales[..x.m * nb].copy_from_slice(&x.scales[..x.m * nb]);
        for (src, dst) in x.quants.chunks(cols).zip(bytes.chunks_mut(cols)).take(x.m) {
            for b in 0..nb {
                for c in 0..WORDS {
                    let at = interleaved_index(b, c * WORD, nb);
                    let to = b * BLOCK + c * WORD;
                    for (d, s) in dst[to..to + WORD].iter_mut().zip(&src[at..at + WORD]) {
                        *d = s ^ x.bias;
                    }
                }
            }
        }
        Natural {
            bytes,
            scales,
            cols,
            nb,
        }
    }
}

/// One panel of 16 weight rows in tile order: for each block, 8 tile rows of 64 bytes, tile row
/// c holding bytes 4c..4c + 4 of the block for each of the 16 rows; and the rows' scales, 16 per
/// block. Rows past the matrix are zero.
struct Panel {
    bytes: Vec<i8>,
    scales: Vec<f32>,
    nb: usize,
}

impl Panel {
    fn new(nb: usize) -> Self {
        Panel {
            bytes: vec![0; nb * PANEL_BLOCK],
            scales: vec![0.0; nb * TILE],
            nb,
        }
    }

    /// Rows n0..n0 + 16 of `w` (those that exist).
    fn pack(&mut self, w: &Weights, n0: usize) {
        let (nb, cols) = (self.nb, w.cols);
        let valid = w.rows.saturating_sub(n0).min(TILE);
        if valid < TILE {
            self.bytes.fill(0);
            self.scales.fill(0.0);
        }
        let whole = nb / GROUP * GROUP;
        for r in 0..valid {
            let src = &w.quants[(n0 + r) * cols..(n0 + r + 1) * cols];
            let scales = &w.scales[(n0 + r) * nb..(n0 + r + 1) * nb];
            for (b, &s) in scales.iter().enumerate() {
                self.scales[b * TILE + r] = s;
            }
            // A whole group's 256 bytes hold word c of block j at word c · 8 + j.
            for (g, group) in src[..whole * BLOCK].chunks_exact(GROUP * BLOCK).enumerate() {
                for (i, word) in group.chunks_exact(WORD).enumerate() {
                    let (c, j) = (i / GROUP, i % GROUP);
                    let to = (g * GROUP + j) * PANEL_BLOCK + c * TILE * WORD + r * WORD;
                    self.bytes[to..to + WORD].copy_from_slice(word);
                }
            }
            for (t, block) in src[whole * BLOCK..].chunks_exact(BLOCK).enumerate() {
                for (c, word) in block.chunks_exact(WORD).enumerate() {
                    let to = (whole + t) * PANEL_BLOCK + c * TILE * WORD + r * WORD;
                    self.bytes[to..to + WORD].copy_from_slice(word);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{Natural, Panel, BLOCK, GROUP, PANEL_BLOCK, TILE};

    /// Tile registers: tmm0 the 16×16 int32 dots, tmm1 16 activation rows × 32 bytes, tmm2 the
    /// panel's 8 rows × 64 bytes of one block.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// Loads the tile configuration on this thread.
    ///
    /// # Safety
    /// The CPU has AMX and the process the tile state.
    pub(super) unsafe fn configure() {
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1;
        // (bytes per row, rows) of tmm0, tmm1, tmm2.
        for (t, (colsb, rows)) in [(64u16, 16u8), (32, 16), (64, 8)].into_iter().enumerate() {
            cfg.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            cfg.0[48 + t] = rows;
        }
        // SAFETY: the caller vouches for AMX; the configuration is valid for palette 1.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
    }

    /// Releases this thread's tile state.
    ///
    /// # Safety
    /// As `configure`.
    pub(super) unsafe fn release() {
        // SAFETY: the caller vouches for AMX.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// All of `a`'s rows against one packed panel: row i's results for the panel's first `valid`
    /// weight rows go to `out[i · stride..][..valid]`, for i below m.
    ///
    /// # Safety
    /// `configure` ran on this thread; the CPU has AVX-512F; `a` holds whole tiles of at least m
    /// rows of the panel's width; `out` is valid for those writes and no other thread touches
    /// them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn panel(
        a: &Natural,
        m: usize,
        p: &Panel,
        out: *mut f32,
        stride: usize,
        valid: usize,
    ) {
        let (cols, nb) = (a.cols, a.nb);
        assert!(
            p.nb == nb
                && a.bytes.len() >= m.div_ceil(TILE) * TILE * cols
                && a.scales.len() >= m.div_ceil(TILE) * TILE * nb
                && p.bytes.len() >= nb * PANEL_BLOCK
                && p.scales.len() >= nb * TILE
                && valid <= TILE,
            "a panel of {valid} rows over {nb} blocks for {m} activation rows"
        );
        #[repr(C, align(64))]
        struct Dots([i32; TILE * TILE]);
        let mut dots = Dots([0; TILE * TILE]);
        let keep: __mmask16 = ((1u32 << valid) - 1) as __mmask16;
        let mut lanes = [[_mm512_setzero_ps(); TILE]; GROUP];
        // SAFETY: every read below is inside the extents asserted above: activation tile t covers
        // rows t·16..t·16 + 16 of `a` and bytes b·32..b·32 + 32 of each; the panel's block b is
        // its bytes b·512.. and scales b·16..; the writes are rows below m, `valid` columns each,
        // which the caller vouches for.
        unsafe {
            for t in 0..m.div_ceil(TILE) {
                let rows = a.bytes.as_ptr().add(t * TILE * cols);
                let scales = a.scales.as_ptr().add(t * TILE * nb);
                for (j, lane) in lanes.iter_mut().enumerate() {
                    let mut acc = [_mm512_setzero_ps(); TILE];
                    for b in (j..nb).step_by(GROUP) {
                        asm!(
                            "tileloadd tmm1, [{x} + {xs}*1]",
                            "tileloadd tmm2, [{w} + {ws}*1]",
                            "tilezero tmm0",
                            "tdpbssd tmm0, tmm1, tmm2",
                            "tilestored [{d} + {ds}*1], tmm0",
                            x = in(reg) rows.add(b * BLOCK),
                            xs = in(reg) cols,
                            w = in(reg) p.bytes.as_ptr().add(b * PANEL_BLOCK),
                            ws = in(reg) TILE * 4,
                            d = in(reg) dots.0.as_mut_ptr(),
                            ds = in(reg) TILE * 4,
                            options(nostack)
                        );
                        let wsv = _mm512_loadu_ps(p.scales.as_ptr().add(b * TILE));
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let d = _mm512_loadu_si512(dots.0.as_ptr().add(r * TILE).cast());
                            let sc = _mm512_mul_ps(wsv, _mm512_set1_ps(*scales.add(r * nb + b)));
                            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, *acc);
                        }
                    }
                    *lane = acc;
                }
                for r in 0..(m - t * TILE).min(TILE) {
                    let l = |j: usize| lanes[j][r];
                    let q0 = _mm512_add_ps(l(0), l(4));
                    let q1 = _mm512_add_ps(l(1), l(5));
                    let q2 = _mm512_add_ps(l(2), l(6));
                    let q3 = _mm512_add_ps(l(3), l(7));
                    let y = _mm512_add_ps(_mm512_add_ps(q0, q2), _mm512_add_ps(q1, q3));
                    _mm512_mask_storeu_ps(out.add((t * TILE + r) * stride), keep, y);
                }
            }
        }
    }
}
