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
//! The tiles want their own byte order: activation rows with each block's 32 bytes together,
//! unbiased (`QuantRows` writes a batch meant for the tiles that way too, in the same pass that
//! quantizes it for the vector kernels; rows quantized only for those are put back in order once
//! per call), and the weights of 16 rows side by side, four bytes of each row per 64-byte
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
use super::qgemm::{BLOCK, GROUP};

/// Activation rows (and weight rows) per tile.
const TILE: usize = 16;
/// Bytes of one block's weights for a panel: 16 rows × 32 bytes.
const PANEL_BLOCK: usize = TILE * BLOCK;
/// Bytes of k one four-byte word holds, and words per block.
const WORD: usize = 4;
const WORDS: usize = BLOCK / WORD;

/// Activation rows from which `Q8Matrix::product` uses the tiles. A tile always computes 16 rows,
/// so 17 cost what 32 do. With the vector kernels' tail blocks in registers, 16 rows run faster on
/// them than on the tiles when a decode step streams the weights from memory (16.2 against 18.7 ms
/// a step's matrices, `cargo bench --bench qgemm -- streamed`) and about tie with the weights in
/// cache; at 24 rows the tiles are ahead in cache (1.8 against 2.0 ms) and level when streaming,
/// and at 32 they win both ways.
pub const MIN_ROWS: usize = 24;

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
/// extents do not agree. `natural`: the activations already in the tiles' order (see
/// `Natural::zeroed`), when they were quantized for the tiles.
pub(super) fn product(w: &Weights, x: &Inputs, natural: Option<&Natural>) -> Option<Vec<f32>> {
    let (n, cols) = (w.rows, w.cols);
    let nb = cols / BLOCK;
    if !usable()
        || cols != nb * BLOCK
        || w.quants.len() < n * cols
        || w.scales.len() < n * nb
        || x.quants.len() < x.m * cols
        || x.scales.len() < x.m * nb
        || natural.is_some_and(|a| a.cols != cols || a.rows() < x.m)
    {
        return None;
    }
    let m = x.m;
    if m == 0 || n == 0 || nb == 0 {
        return Some(vec![0f32; m * n]);
    }
    let built;
    let a = match natural {
        Some(a) => a,
        None => {
            built = Natural::new(x, cols);
            &built
        }
    };
    // Every value is written below (each panel all m rows of its columns), so y starts
    // uninitialized.
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let out = SharedOut(y.spare_capacity_mut().as_mut_ptr().cast());
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
                // The next panel's weights start coming from memory while this one computes
                // (decoding streams every weight once per step).
                let next = (n0 + TILE).min(n) * cols..(n0 + 2 * TILE).min(n) * cols;
                super::qgemm::prefetch_l2(&w.quants[next]);
                x86::pack(w, n0, &mut panel);
                x86::panel(a, m, &panel, out.0.add(n0), n, (n - n0).min(TILE));
            }
            x86::release();
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (range, &mut panel, out);
    });
    // SAFETY: the panels wrote all m × n values (see above); on other targets `usable()` is
    // false and this is not reached.
    unsafe { y.set_len(m * n) };
    Some(y)
}

/// The output buffer, shared with the worker pool for disjoint writes.
struct SharedOut(*mut f32);
// SAFETY: workers write disjoint output columns (one panel each), so sharing the pointer races on
// nothing.
unsafe impl Sync for SharedOut {}

/// Activations in block order, signed, padded with zero rows to whole tiles.
pub(super) struct Natural {
    /// `rows` × cols bytes.
    bytes: Vec<i8>,
    /// `rows` × nb scales (zero in the padding).
    scales: Vec<f32>,
    cols: usize,
    nb: usize,
    /// The blocks in the order the panels scale them, lane by lane: lane j's blocks j, j + 8, ...
    order: Vec<usize>,
}

impl Natural {
    /// Room for `m` rows of `cols` (a multiple of 32), all zero, for the quantizer to fill: row
    /// i's bytes are `bytes_mut()[i · cols..][..cols]`, block after block, signed, and its scales
    /// `scales_mut()[i · cols / 32..]`.
    pub(super) fn zeroed(m: usize, cols: usize) -> Self {
        let nb = cols / BLOCK;
        let rows = m.div_ceil(TILE) * TILE;
        Natural {
            bytes: vec![0; rows * cols],
            scales: vec![0.0; rows * nb],
            cols,
            nb,
            order: Self::order(nb),
        }
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [i8] {
        &mut self.bytes
    }

    pub(super) fn scales_mut(&mut self) -> &mut [f32] {
        &mut self.scales
    }

    /// Rows held, padding included.
    fn rows(&self) -> usize {
        self.bytes.len() / self.cols.max(1)
    }

    /// The blocks in the order the panels scale them, lane by lane.
    fn order(nb: usize) -> Vec<usize> {
        (0..GROUP.min(nb))
            .flat_map(|j| (j..nb).step_by(GROUP))
            .collect()
    }

    /// From rows quantized for the vector kernels, on the worker pool, a tile of rows at a time.
    fn new(x: &Inputs, cols: usize) -> Self {
        let nb = cols / BLOCK;
        let rows = x.m.div_ceil(TILE) * TILE;
        let mut bytes = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows * nb];
        scales[..x.m * nb].copy_from_slice(&x.scales[..x.m * nb]);
        let whole = nb / GROUP * GROUP * BLOCK;
        // One writer per tile of rows.
        let work: Vec<_> = x
            .quants
            .chunks(TILE * cols)
            .zip(bytes.chunks_mut(TILE * cols))
            .map(std::sync::Mutex::new)
            .collect();
        candle_core::utils::barrier_pool().execute_chunked(work.len(), |range| {
            for cell in &work[range] {
                let Ok(mut guard) = cell.lock() else { continue };
                let (src, dst) = &mut *guard;
                for (src, dst) in src.chunks(cols).zip(dst.chunks_mut(cols)) {
                    // In a whole group, word c of block j is word c · 8 + j.
                    for (s, d) in src[..whole]
                        .chunks_exact(GROUP * BLOCK)
                        .zip(dst[..whole].chunks_exact_mut(GROUP * BLOCK))
                    {
                        for (i, word) in s.chunks_exact(WORD).enumerate() {
                            let (c, j) = (i / GROUP, i % GROUP);
                            let to = j * BLOCK + c * WORD;
                            for (d, s) in d[to..to + WORD].iter_mut().zip(word) {
                                *d = s ^ x.bias;
                            }
                        }
                    }
                    for (d, s) in dst[whole..].iter_mut().zip(&src[whole..]) {
                        *d = s ^ x.bias;
                    }
                }
            }
        });
        drop(work);
        Natural {
            bytes,
            scales,
            cols,
            nb,
            order: Self::order(nb),
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
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{Natural, Panel, Weights, BLOCK, GROUP, PANEL_BLOCK, TILE};
    use super::{WORD, WORDS};

    /// Tile registers: two sets of (16×16 int32 dots, 16 activation rows × 32 bytes, the panel's
    /// 8 rows × 64 bytes of one block), so one block's product runs while the next is loaded.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// Blocks whose products are issued before the first is scaled and added: the tile unit
    /// works that far ahead of the vector code, each block's dots in its own buffer.
    const AHEAD: usize = 4;
    const RING: usize = AHEAD + 1;

    /// One block's 16×16 dots into memory at `$d` (64-byte rows): activation rows from `$x`
    /// (stride `$cols`) into tile `$a`, the panel's block from `$w` into `$b`, the product in
    /// `$c`. Used inside an `unsafe` block whose caller vouches for the addresses.
    macro_rules! block_dots {
        ($c:literal, $a:literal, $b:literal, $x:expr, $cols:expr, $w:expr, $d:expr) => {
            asm!(
                concat!("tileloadd ", $a, ", [{x} + {xs}*1]"),
                concat!("tileloadd ", $b, ", [{w} + {ws}*1]"),
                concat!("tilezero ", $c),
                concat!("tdpbssd ", $c, ", ", $a, ", ", $b),
                concat!("tilestored [{d} + {ds}*1], ", $c),
                x = in(reg) $x,
                xs = in(reg) $cols,
                w = in(reg) $w,
                ws = in(reg) TILE * 4,
                d = in(reg) $d,
                ds = in(reg) TILE * 4,
                options(nostack)
            )
        };
    }

    /// Loads the tile configuration on this thread.
    ///
    /// # Safety
    /// The CPU has AMX and the process the tile state.
    pub(super) unsafe fn configure() {
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1;
        // (bytes per row, rows) of tmm0..tmm5.
        let shapes = [(64u16, 16u8), (32, 16), (64, 8)];
        for (t, (colsb, rows)) in shapes.iter().chain(&shapes).enumerate() {
            cfg.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            cfg.0[48 + t] = *rows;
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

    /// Rows n0..n0 + 16 of `w` into `p` (rows past the matrix zero). Sixteen words (64 bytes)
    /// of each row are loaded at a time and transposed in registers, so word i of the 16 rows
    /// comes out as one 64-byte tile row; the scales go the same way, 16 blocks at a time.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack(w: &Weights, n0: usize, p: &mut Panel) {
        let (nb, cols) = (p.nb, w.cols);
        let valid = w.rows.saturating_sub(n0).min(TILE);
        assert!(
            w.quants.len() >= (n0 + valid) * cols
                && w.scales.len() >= (n0 + valid) * nb
                && cols == nb * BLOCK
                && p.bytes.len() >= nb * PANEL_BLOCK
                && p.scales.len() >= nb * TILE,
            "packing rows {n0}.. of {} x {cols}",
            w.rows
        );
        let words = nb * WORDS;
        let whole = nb / GROUP * GROUP;
        // SAFETY: the loads read, of rows n0..n0 + valid, words below `words` (masked at the
        // end) and scales below `nb`, inside the slices as asserted; each store writes one
        // 64-byte tile row of a block below nb, or its 16 scales, inside the panel's buffers.
        unsafe {
            let quants = w.quants.as_ptr().add(n0 * cols).cast::<i32>();
            for first in (0..words).step_by(TILE) {
                let keep = mask(words - first);
                let mut v = [_mm512_setzero_si512(); TILE];
                for (r, v) in v.iter_mut().enumerate().take(valid) {
                    *v = _mm512_maskz_loadu_epi32(keep, quants.add(r * cols / WORD + first));
                }
                transpose(&mut v);
                for (l, v) in v.iter().enumerate().take(words - first) {
                    // Word i of a row is word c of block b (see `qgemm::interleaved_index`).
                    let i = first + l;
                    let (b, c) = if i < whole * WORDS {
                        let (g, k) = (i / (GROUP * WORDS), i % (GROUP * WORDS));
                        (g * GROUP + k % GROUP, k / GROUP)
                    } else {
                        (i / WORDS, i % WORDS)
                    };
                    let to = p.bytes.as_mut_ptr().add(b * PANEL_BLOCK + c * TILE * WORD);
                    _mm512_storeu_si512(to.cast(), *v);
                }
            }
            let scales = w.scales.as_ptr().add(n0 * nb).cast::<i32>();
            for first in (0..nb).step_by(TILE) {
                let keep = mask(nb - first);
                let mut v = [_mm512_setzero_si512(); TILE];
                for (r, v) in v.iter_mut().enumerate().take(valid) {
                    *v = _mm512_maskz_loadu_epi32(keep, scales.add(r * nb + first));
                }
                transpose(&mut v);
                for (l, v) in v.iter().enumerate().take(nb - first) {
                    let to = p.scales.as_mut_ptr().add((first + l) * TILE);
                    _mm512_storeu_si512(to.cast(), *v);
                }
            }
        }
    }

    /// The first `n` (at most 16) of 16 lanes.
    #[inline]
    fn mask(n: usize) -> __mmask16 {
        ((1u32 << n.min(TILE)) - 1) as __mmask16
    }

    /// Transposes 16 vectors of 16 32-bit values: lane e of vector r becomes lane r of vector e.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose(v: &mut [__m512i; TILE]) {
        // Within each 128-bit quarter: pairs of rows interleaved by 32 bits, then by 64, so s[4i
        // + p] holds, in quarter q, element 4q + p of rows 4i..4i + 4.
        let mut t = [_mm512_setzero_si512(); TILE];
        for i in 0..TILE / 2 {
            t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
        }
        let mut s = [_mm512_setzero_si512(); TILE];
        for i in 0..TILE / 4 {
            s[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            s[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            s[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            s[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        // Then the quarters: element 4q + p of all rows is quarter q of s[p], s[4 + p], s[8 + p]
        // and s[12 + p].
        for p in 0..4 {
            let v0 = _mm512_shuffle_i32x4::<0x44>(s[p], s[4 + p]);
            let v1 = _mm512_shuffle_i32x4::<0xEE>(s[p], s[4 + p]);
            let v2 = _mm512_shuffle_i32x4::<0x44>(s[8 + p], s[12 + p]);
            let v3 = _mm512_shuffle_i32x4::<0xEE>(s[8 + p], s[12 + p]);
            v[p] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
            v[4 + p] = _mm512_shuffle_i32x4::<0xDD>(v0, v2);
            v[8 + p] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
            v[12 + p] = _mm512_shuffle_i32x4::<0xDD>(v1, v3);
        }
    }

    /// All of `a`'s rows against one packed panel: row i's results for the panel's first `valid`
    /// weight rows go to `out[i · stride..][..valid]`, for i below m.
    ///
    /// Blocks are taken lane by lane (lane j's blocks j, j + 8, ... in order), so each lane's
    /// sums for the tile's 16 rows stay in registers; products run `AHEAD` blocks in front of
    /// the scaling.
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
        struct Dots([[i32; TILE * TILE]; RING]);
        let mut dots = Dots([[0; TILE * TILE]; RING]);
        let keep = mask(valid);
        let order = &a.order;
        let mut lanes = [[_mm512_setzero_ps(); TILE]; GROUP];
        // SAFETY: every read below is inside the extents asserted above: activation tile t covers
        // rows t·16..t·16 + 16 of `a` and bytes b·32..b·32 + 32 of each; the panel's block b is
        // its bytes b·512.. and scales b·16..; the dots buffers are this frame's; the writes are
        // rows below m, `valid` columns each, which the caller vouches for.
        unsafe {
            for t in 0..m.div_ceil(TILE) {
                let rows = a.bytes.as_ptr().add(t * TILE * cols);
                let scales = a.scales.as_ptr().add(t * TILE * nb);
                let issue = |i: usize, dots: &mut Dots| {
                    let b = order[i];
                    let x = rows.add(b * BLOCK);
                    let w = p.bytes.as_ptr().add(b * PANEL_BLOCK);
                    let d = dots.0[i % RING].as_mut_ptr();
                    // Consecutive blocks use the two register sets.
                    if i.is_multiple_of(2) {
                        block_dots!("tmm0", "tmm1", "tmm2", x, cols, w, d);
                    } else {
                        block_dots!("tmm3", "tmm4", "tmm5", x, cols, w, d);
                    }
                };
                for i in 0..AHEAD.min(nb) {
                    issue(i, &mut dots);
                }
                let mut acc = [_mm512_setzero_ps(); TILE];
                for (k, &b) in order.iter().enumerate() {
                    if k + AHEAD < nb {
                        issue(k + AHEAD, &mut dots);
                    }
                    let d = dots.0[k % RING].as_ptr();
                    let wsv = _mm512_loadu_ps(p.scales.as_ptr().add(b * TILE));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let dr = _mm512_loadu_si512(d.add(r * TILE).cast());
                        let sc = _mm512_mul_ps(wsv, _mm512_set1_ps(*scales.add(r * nb + b)));
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dr), sc, *acc);
                    }
                    // The lane's last block: its sums are done.
                    if b + GROUP >= nb {
                        lanes[b % GROUP] = acc;
                        acc = [_mm512_setzero_ps(); TILE];
                    }
                }
                // The lanes summed as `qgemm::hsum8` sums them.
                let [l0, l1, l2, l3, l4, l5, l6, l7] = &lanes;
                for r in 0..(m - t * TILE).min(TILE) {
                    let q0 = _mm512_add_ps(l0[r], l4[r]);
                    let q1 = _mm512_add_ps(l1[r], l5[r]);
                    let q2 = _mm512_add_ps(l2[r], l6[r]);
                    let q3 = _mm512_add_ps(l3[r], l7[r]);
                    let y = _mm512_add_ps(_mm512_add_ps(q0, q2), _mm512_add_ps(q1, q3));
                    _mm512_mask_storeu_ps(out.add((t * TILE + r) * stride), keep, y);
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::arch::x86_64::*;

    use super::*;

    #[test]
    fn the_register_transpose_swaps_rows_and_lanes() {
        if !cpu::features().avx512f {
            println!("SKIPPED: this host has no AVX-512F");
            return;
        }
        let rows: [[i32; TILE]; TILE] =
            std::array::from_fn(|r| std::array::from_fn(|e| (r * 100 + e) as i32));
        // SAFETY: AVX-512F is present (checked above); the loads and stores touch the arrays.
        let got: [[i32; TILE]; TILE] = unsafe {
            let mut v: [__m512i; TILE] =
                std::array::from_fn(|r| _mm512_loadu_si512(rows[r].as_ptr().cast()));
            x86::transpose(&mut v);
            let mut out = [[0i32; TILE]; TILE];
            for (o, v) in out.iter_mut().zip(&v) {
                _mm512_storeu_si512(o.as_mut_ptr().cast(), *v);
            }
            out
        };
        for (e, row) in got.iter().enumerate() {
            for (r, &x) in row.iter().enumerate() {
                assert_eq!(x, (r * 100 + e) as i32, "lane {r} of vector {e}");
            }
        }
    }
}
