//! A batched Q8_0 matrix product for the CPU: `y = x · Wᵀ` with W in blocks of 32 int8 weights
//! sharing one f32 scale. Unlike candle's quantized matmul, which re-reads every weight block for
//! every row of x, this reads each weight block once per call and applies it to all rows, so a
//! decode step over many sequences costs little more weight traffic than one sequence.
//!
//! Activations are quantized to the same blocks per row (as llama.cpp does). Both sides are stored
//! *interleaved*: in each group of eight consecutive blocks, the first 32-byte vector holds bytes
//! 0..4 of all eight blocks, the next bytes 4..8, and so on. One vector instruction then adds four
//! products of each of eight blocks into eight separate int32 lanes, so a whole group needs one
//! int-to-float conversion and one fused multiply-add with its eight scales, where a block at a
//! time needs both per block. That cuts the per-block work of a batch row roughly in half (AVX2)
//! or to a third (AVX-512 VNNI, chosen at run time where the CPU has it). Blocks past the last
//! whole group keep the plain layout. Every path computes each block's integer dot product
//! exactly and combines the blocks in the same order, so a row's result does not depend on the
//! batch it ran in, nor on which of the x86 paths ran it.
#![allow(unsafe_code)]

use candle_core::{Device, Result, Tensor};

pub const BLOCK: usize = 32;
/// Blocks interleaved together: one int32 lane each in a 256-bit vector.
const GROUP: usize = 8;
const GROUP_BYTES: usize = GROUP * BLOCK;
/// Bytes of one block in one lane of one vector.
const LANE: usize = 4;

/// A row-major Q8_0 matrix: `rows` outputs over `cols` inputs.
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// rows × (cols / 32)
    scales: Vec<f32>,
    /// rows × cols, each row interleaved (see the module comment).
    quants: Vec<i8>,
}

/// Quantizes one 32-value block: returns its scale and writes the int8 values.
pub(crate) fn quantize_block(src: &[f32], dst: &mut [i8]) -> f32 {
    let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        dst.iter_mut().for_each(|q| *q = 0);
        return 0.0;
    }
    let d = amax / 127.0;
    let id = 1.0 / d;
    for (q, v) in dst.iter_mut().zip(src) {
        *q = (v * id).round().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// Where byte `e` of block `b` lives in an interleaved row.
#[inline]
fn interleaved_index(b: usize, e: usize, nb: usize) -> usize {
    let whole = nb / GROUP * GROUP;
    if b >= whole {
        return b * BLOCK + e;
    }
    let (g, j) = (b / GROUP, b % GROUP);
    g * GROUP_BYTES + (e / LANE) * (GROUP * LANE) + j * LANE + e % LANE
}

/// Quantizes one row of `cols` values into interleaved int8 `dst`, its block scales and (for the
/// VNNI path's unsigned-offset trick) each block's sum of quantized values.
fn quantize_row(src: &[f32], dst: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    let nb = src.len() / BLOCK;
    let whole = nb / GROUP * GROUP;
    let mut block = [0i8; BLOCK];
    for b in 0..nb {
        scales[b] = quantize_block(&src[b * BLOCK..(b + 1) * BLOCK], &mut block);
        sums[b] = block.iter().map(|&q| i32::from(q)).sum();
        if b >= whole {
            dst[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&block);
            continue;
        }
        // Lane `b % GROUP` of each of the group's eight vectors gets four bytes.
        for (c, four) in block.chunks_exact(LANE).enumerate() {
            let at = interleaved_index(b, c * LANE, nb);
            dst[at..at + LANE].copy_from_slice(four);
        }
    }
}

/// The matrix-vector kernels this CPU can run; each gives bit-identical results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// The reference every other kernel must match bit for bit; the kernel of non-x86 builds.
    #[cfg_attr(
        all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            not(test)
        ),
        allow(dead_code)
    )]
    Portable,
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    Avx2,
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs, detected once.
    fn best() -> Self {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(Self::detect)
    }

    fn detect() -> Self {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        {
            if std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                return Kernel::Vnni;
            }
            Kernel::Avx2
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        )))]
        Kernel::Portable
    }

    /// Rows of x that share one pass over a weight row (at most `MAX_TILE`).
    fn tile(self) -> usize {
        match self {
            Kernel::Portable => 1,
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            ))]
            Kernel::Avx2 => 4,
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            ))]
            Kernel::Vnni => 8,
        }
    }
}

const MAX_TILE: usize = 8;

/// Activations quantized for the kernels: `m` rows of `cols` values.
pub struct QuantRows {
    m: usize,
    cols: usize,
    quants: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
}

impl Q8Matrix {
    /// Quantizes an f32 (rows, cols) tensor; `cols` must be a multiple of 32.
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let data = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Self::from_f32(&data, rows, cols)
    }

    /// Quantizes a row-major (rows, cols) matrix; `cols` must be a multiple of 32.
    pub fn from_f32(data: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) || cols == 0 {
            candle_core::bail!("Q8 matrix needs columns in multiples of {BLOCK}, got {cols}");
        }
        if data.len() != rows * cols {
            candle_core::bail!("Q8 matrix: {} values for {rows} x {cols}", data.len());
        }
        let nb = cols / BLOCK;
        let mut scales = vec![0f32; rows * nb];
        let mut quants = vec![0i8; rows * cols];
        let mut sums = vec![0i32; nb];
        for ((s, q), src) in scales
            .chunks_mut(nb)
            .zip(quants.chunks_mut(cols))
            .zip(data.chunks(cols))
        {
            quantize_row(src, q, s, &mut sums);
        }
        Ok(Self {
            rows,
            cols,
            scales,
            quants,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * std::mem::size_of::<f32>()
    }

    /// `x` (m, cols) → (m, rows).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_on(x, Kernel::best())
    }

    fn forward_on(&self, x: &Tensor, kernel: Kernel) -> Result<Tensor> {
        let (m, cols) = x.dims2()?;
        let xv = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let xq = QuantRows::parallel(&xv, m, cols)?;
        let y = self.product_on(&xq, kernel)?;
        Tensor::from_vec(y, (m, self.rows), &Device::Cpu)
    }

    /// Quantized activations (m, cols) → (m, rows), row-major, on the worker pool. Callers that
    /// also need the activations elsewhere (LoRA) quantize them once for both.
    pub(crate) fn product(&self, xq: &QuantRows) -> Result<Vec<f32>> {
        self.product_on(xq, Kernel::best())
    }

    fn product_on(&self, xq: &QuantRows, kernel: Kernel) -> Result<Vec<f32>> {
        if xq.cols != self.cols {
            candle_core::bail!(
                "Q8 matmul: input has {} columns, matrix has {}",
                xq.cols,
                self.cols
            );
        }
        let m = xq.m;
        let (cols, nb) = (self.cols, self.cols / BLOCK);
        let tile = kernel.tile();
        // Output rows are shared out on candle's own worker pool (a second pool would fight it
        // for the same cores); each weight row's m outputs are written by exactly one worker.
        let n = self.rows;
        let mut y = vec![0f32; m * n];
        let out = SharedOut(y.as_mut_ptr());
        let out = &out;
        candle_core::utils::barrier_pool().execute_chunked(n, |range| {
            let mut tile_out = [0f32; MAX_TILE];
            for row in range {
                let w = &self.quants[row * cols..(row + 1) * cols];
                let ws = &self.scales[row * nb..(row + 1) * nb];
                let mut i = 0;
                while i < m {
                    let r = if m - i >= tile { tile } else { 1 };
                    dot_rows(kernel, w, ws, xq, i, r, &mut tile_out[..r]);
                    for (k, v) in tile_out[..r].iter().enumerate() {
                        // SAFETY: `i + k < m` and `row < n`, so the element lies inside `y`,
                        // which outlives this call; execute_chunked hands each weight row (one
                        // output column) to one worker only, so no element is written twice.
                        unsafe { *out.0.add((i + k) * n + row) = *v };
                    }
                    i += r;
                }
            }
        });
        Ok(y)
    }

    /// Input width.
    pub fn input(&self) -> usize {
        self.cols
    }
}

/// The output buffer, shared with the worker pool for disjoint writes.
struct SharedOut(*mut f32);
// SAFETY: workers write disjoint rows (see `forward`), so sharing the pointer races on nothing.
unsafe impl Sync for SharedOut {}

impl QuantRows {
    /// Quantizes `m` rows of `cols` values (a multiple of 32), on the worker pool for batches.
    pub fn parallel(x: &[f32], m: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) || x.len() != m * cols {
            candle_core::bail!(
                "Q8 activations: {} values for {m} rows of {cols} (a multiple of {BLOCK})",
                x.len()
            );
        }
        if m < 4 {
            return Ok(Self::new(x, m, cols));
        }
        let nb = cols / BLOCK;
        let mut rows = Self::zeroed(m, cols);
        // One writer per row.
        let work: Vec<_> = x
            .chunks(cols)
            .zip(rows.quants.chunks_mut(cols))
            .zip(rows.scales.chunks_mut(nb))
            .zip(rows.sums.chunks_mut(nb))
            .map(std::sync::Mutex::new)
            .collect();
        candle_core::utils::barrier_pool().execute_chunked(work.len(), |range| {
            for cell in &work[range] {
                if let Ok(mut guard) = cell.lock() {
                    let (((src, q), s), sum) = &mut *guard;
                    quantize_row(src, q, s, sum);
                }
            }
        });
        drop(work);
        Ok(rows)
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `t` of these rows against every row of `other` (as wide): `out[i]` is what a
    /// `Q8Matrix` of `other`'s rows gives for input row t, bit for bit (the block products are
    /// exact integers either way round). For small matrices (adapter factors) on the calling
    /// thread, `other`'s rows tiled against one row.
    pub fn dots_with(&self, t: usize, other: &QuantRows, out: &mut [f32]) {
        let (cols, nb) = (self.cols, self.cols / BLOCK);
        if other.cols != cols || t >= self.m {
            return;
        }
        let kernel = Kernel::best();
        let tile = kernel.tile();
        let w = &self.quants[t * cols..(t + 1) * cols];
        let ws = &self.scales[t * nb..(t + 1) * nb];
        let n = other.m.min(out.len());
        let mut i = 0;
        while i < n {
            let r = if n - i >= tile { tile } else { 1 };
            dot_rows(kernel, w, ws, other, i, r, &mut out[i..i + r]);
            i += r;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.quants.len() + (self.scales.len() + self.sums.len()) * 4
    }

    fn zeroed(m: usize, cols: usize) -> Self {
        let nb = cols / BLOCK;
        QuantRows {
            m,
            cols,
            quants: vec![0i8; m * cols],
            scales: vec![0f32; m * nb],
            sums: vec![0i32; m * nb],
        }
    }

    /// Quantizes `m` rows of `cols` values (a multiple of 32) on the calling thread.
    pub fn new(x: &[f32], m: usize, cols: usize) -> Self {
        let nb = cols / BLOCK;
        let mut rows = Self::zeroed(m, cols);
        for (((src, q), s), sum) in x
            .chunks(cols)
            .take(m)
            .zip(rows.quants.chunks_mut(cols))
            .zip(rows.scales.chunks_mut(nb))
            .zip(rows.sums.chunks_mut(nb))
        {
            quantize_row(src, q, s, sum);
        }
        rows
    }
}

/// Outputs of a `Q8Narrow` stored together: one int32 lane each in a 256-bit vector.
pub const NARROW_GROUP: usize = 8;

/// A tall, narrow matrix (a LoRA B: `rows` outputs over a few inputs) for `y += W · v` with v
/// quantized too. Rows are stored in groups of eight as `[group][width / 4][8 rows][4 values]`
/// (width padded to a multiple of 4 with zeros), so one vector instruction adds four products
/// into each of eight outputs: no widening of the weights to floats, one int-to-float conversion
/// per eight outputs. Each group of eight rows shares one scale (at rank 16, 128 values): a
/// scale per row would add a quarter to the bytes a rank-16 B streams, and most of them at rank 4.
pub struct Q8Narrow {
    rows: usize,
    /// Padded to a multiple of `LANE`.
    width: usize,
    quants: Vec<i8>,
    /// One per group of eight rows.
    scales: Vec<f32>,
}

/// A short vector quantized with one scale, for `Q8Narrow::add_product`.
#[derive(Clone, Debug, Default)]
pub struct QuantVec {
    quants: Vec<i8>,
    scale: f32,
    /// Σ quants (the VNNI path's unsigned-offset correction).
    sum: i32,
}

impl QuantVec {
    /// Quantizes `v`, padding it with zeros to `width` values (at least `v.len()`).
    pub fn new(v: &[f32], width: usize) -> Self {
        let mut quants = vec![0i8; width.max(v.len())];
        let scale = quantize_block(v, &mut quants[..v.len()]);
        let sum = quants.iter().map(|&q| i32::from(q)).sum();
        Self { quants, scale, sum }
    }
}

impl Q8Narrow {
    /// `w`: `rows` × `width` values, row-major. `None` unless rows is a multiple of 8.
    pub fn quantize(w: &[f32], rows: usize, width: usize) -> Option<Self> {
        if w.len() != rows * width || width == 0 || !rows.is_multiple_of(NARROW_GROUP) {
            return None;
        }
        let padded = width.next_multiple_of(LANE);
        let mut quants = vec![0i8; rows * padded];
        let mut scales = vec![0f32; rows / NARROW_GROUP];
        let mut group = vec![0i8; NARROW_GROUP * width];
        for (g, src) in w.chunks_exact(NARROW_GROUP * width).enumerate() {
            scales[g] = quantize_block(src, &mut group);
            for (lane, row) in group.chunks_exact(width).enumerate() {
                for (c, four) in row.chunks(LANE).enumerate() {
                    let at = (g * (padded / LANE) + c) * NARROW_GROUP * LANE + lane * LANE;
                    quants[at..at + four.len()].copy_from_slice(four);
                }
            }
        }
        Some(Self {
            rows,
            width: padded,
            quants,
            scales,
        })
    }

    /// The width vectors for `add_product` are padded to.
    pub fn width(&self) -> usize {
        self.width
    }

    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * std::mem::size_of::<f32>()
    }

    /// `y[i] += (W · v)[8 · groups.start + i]` for the rows of `groups`; `y` holds those rows.
    /// Every kernel gives the same bits: the dots are exact integers, scaled the same way.
    pub fn add_product(&self, groups: std::ops::Range<usize>, v: &QuantVec, y: &mut [f32]) {
        self.add_product_on(Kernel::best(), groups, v, y);
    }

    fn add_product_on(
        &self,
        kernel: Kernel,
        groups: std::ops::Range<usize>,
        v: &QuantVec,
        y: &mut [f32],
    ) {
        let chunks = self.width / LANE;
        let n = groups.len();
        assert!(
            groups.end * NARROW_GROUP <= self.rows
                && v.quants.len() == self.width
                && y.len() == n * NARROW_GROUP
        );
        let gb = chunks * NARROW_GROUP * LANE;
        let w = &self.quants[groups.start * gb..groups.end * gb];
        let d = &self.scales[groups];
        match kernel {
            Kernel::Portable => {
                for (g, (yg, &dg)) in y.chunks_exact_mut(NARROW_GROUP).zip(d).enumerate() {
                    let scale = dg * v.scale;
                    for (lane, yo) in yg.iter_mut().enumerate() {
                        let mut acc = 0i32;
                        for c in 0..chunks {
                            let at = (g * chunks + c) * NARROW_GROUP * LANE + lane * LANE;
                            for e in 0..LANE {
                                acc += i32::from(w[at + e]) * i32::from(v.quants[c * LANE + e]);
                            }
                        }
                        *yo += acc as f32 * scale;
                    }
                }
            }
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            ))]
            // SAFETY: the assertion bounds every access: n groups of `chunks` 32-byte vectors of
            // w, n scales, n × 8 outputs, and `chunks` four-byte words of v. Vnni is only
            // chosen where the CPU reports avx512vnni and avx512vl.
            Kernel::Avx2 | Kernel::Vnni => unsafe {
                let (w, d, q, y) = (w.as_ptr(), d.as_ptr(), v.quants.as_ptr(), y.as_mut_ptr());
                if kernel == Kernel::Vnni {
                    x86::narrow_vnni(w, d, q, v.sum, v.scale, chunks, n, y);
                } else {
                    x86::narrow_avx2(w, d, q, v.sum, v.scale, chunks, n, y);
                }
            },
        }
    }
}

/// One weight row (`w`, `ws`) against activation rows `i..i + r`, into `out[..r]`.
fn dot_rows(
    kernel: Kernel,
    w: &[i8],
    ws: &[f32],
    x: &QuantRows,
    i: usize,
    r: usize,
    out: &mut [f32],
) {
    let cols = w.len();
    let nb = ws.len();
    assert!(
        cols == nb * BLOCK
            && i + r <= x.m
            && x.quants.len() >= x.m * cols
            && x.scales.len() >= x.m * nb
            && x.sums.len() >= x.m * nb
            && out.len() >= r
    );
    let xq = &x.quants[i * cols..(i + r) * cols];
    let xs = &x.scales[i * nb..(i + r) * nb];
    let sums = &x.sums[i * nb..(i + r) * nb];
    match kernel {
        Kernel::Portable => {
            for k in 0..r {
                out[k] = portable(
                    w,
                    ws,
                    &xq[k * cols..(k + 1) * cols],
                    &xs[k * nb..(k + 1) * nb],
                );
            }
        }
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        Kernel::Avx2 | Kernel::Vnni => {
            let (w, ws, xq, xs, sums, o) = (
                w.as_ptr(),
                ws.as_ptr(),
                xq.as_ptr(),
                xs.as_ptr(),
                sums.as_ptr(),
                out.as_mut_ptr(),
            );
            // SAFETY: the assertion above bounds every read: r rows of `cols` bytes, `nb` scales
            // and sums, from row i; and r outputs. The kernels read only within those.
            // Vnni is only chosen where the CPU reports avx512vnni and avx512vl.
            unsafe {
                match (kernel, r) {
                    (Kernel::Vnni, 8) => x86::vnni::<8>(w, ws, xq, xs, sums, nb, o),
                    (Kernel::Vnni, _) => x86::vnni::<1>(w, ws, xq, xs, sums, nb, o),
                    (_, 4) => x86::avx2::<4>(w, ws, xq, xs, sums, nb, o),
                    _ => x86::avx2::<1>(w, ws, xq, xs, sums, nb, o),
                }
            }
        }
    }
}

/// The reference kernel: the same block products, summed in the same order as the x86 ones.
fn portable(w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> f32 {
    let nb = ws.len();
    let whole = nb / GROUP * GROUP;
    let block_dot = |b: usize| -> i32 {
        (0..BLOCK)
            .map(|e| {
                let at = interleaved_index(b, e, nb);
                i32::from(w[at]) * i32::from(x[at])
            })
            .sum()
    };
    // Lane j of the vector accumulator holds block j of every group.
    let mut lanes = [0f32; GROUP];
    for g in 0..whole / GROUP {
        for (j, lane) in lanes.iter_mut().enumerate() {
            let b = g * GROUP + j;
            *lane = (block_dot(b) as f32).mul_add(ws[b] * xs[b], *lane);
        }
    }
    let mut tail = 0f32;
    for b in whole..nb {
        tail += ws[b] * xs[b] * block_dot(b) as f32;
    }
    hsum8(lanes) + tail
}

/// The horizontal sum the vector kernels do: halves, then quarters, then the last pair.
fn hsum8(l: [f32; GROUP]) -> f32 {
    let q = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let p = [q[0] + q[2], q[1] + q[3]];
    p[0] + p[1]
}

/// The vector kernels: one weight row against `R` activation rows. Both come from one macro body
/// so they differ only in the block product; the helpers carry their own target features so they
/// inline into each kernel (a closure would not inherit the kernel's features).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
pub(super) mod x86 {
    use super::{BLOCK, GROUP, GROUP_BYTES, LANE};
    use std::arch::x86_64::*;

    /// AVX2: `|w|` (unsigned) and w itself, to move w's sign onto x.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prep_avx2(w: __m256i) -> (__m256i, __m256i) {
        (_mm256_sign_epi8(w, w), w)
    }

    /// AVX2: adds the four-byte products of each lane to `acc` (|w|·±x fits i16 pairs exactly).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_avx2(acc: __m256i, aw: __m256i, w: __m256i, x: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// VNNI: w + 128 as unsigned bytes; the kernel subtracts 128·Σx per block afterwards.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prep_vnni(w: __m256i) -> (__m256i, __m256i) {
        (_mm256_xor_si256(w, _mm256_set1_epi8(i8::MIN)), w)
    }

    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    fn dot_vnni(acc: __m256i, uw: __m256i, _w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, uw, x)
    }

    /// Sums eight floats in the order `super::hsum8` does.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(in crate::ops) fn hsum(a: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum_i32(a: __m256i) -> i32 {
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)))
    }

    macro_rules! kernel {
        ($name:ident, $features:literal, $prep:ident, $dot:ident, $offset:literal) => {
            /// SAFETY (callers): the CPU has the features named below; `w` holds one interleaved
            /// row of `nb` blocks and `ws` its `nb` scales; `x`, `xs` and `sums` hold `R` such
            /// rows (row-major); `out` has room for `R` floats.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize>(
                w: *const i8,
                ws: *const f32,
                x: *const i8,
                xs: *const f32,
                sums: *const i32,
                nb: usize,
                out: *mut f32,
            ) {
                let cols = nb * BLOCK;
                let whole = nb / GROUP;
                // SAFETY: every pointer offset below stays within the extents the caller vouches
                // for: byte offsets below `cols` per row, block indices below `nb`, rows below R.
                unsafe {
                    let load = |p: *const i8| _mm256_loadu_si256(p.cast());
                    let mut f = [_mm256_setzero_ps(); R];
                    for g in 0..whole {
                        let mut acc = [_mm256_setzero_si256(); R];
                        let base = g * GROUP_BYTES;
                        for c in 0..BLOCK / LANE {
                            let o = base + c * GROUP * LANE;
                            let (p, q) = $prep(load(w.add(o)));
                            for (r, a) in acc.iter_mut().enumerate() {
                                *a = $dot(*a, p, q, load(x.add(r * cols + o)));
                            }
                        }
                        let wsv = _mm256_loadu_ps(ws.add(g * GROUP));
                        for (r, (a, fr)) in acc.iter().zip(f.iter_mut()).enumerate() {
                            let mut a = *a;
                            if $offset != 0 {
                                let s = _mm256_loadu_si256(sums.add(r * nb + g * GROUP).cast());
                                a = _mm256_sub_epi32(
                                    a,
                                    _mm256_mullo_epi32(s, _mm256_set1_epi32($offset)),
                                );
                            }
                            let sc =
                                _mm256_mul_ps(wsv, _mm256_loadu_ps(xs.add(r * nb + g * GROUP)));
                            *fr = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), sc, *fr);
                        }
                    }
                    let mut tail = [0f32; R];
                    for b in whole * GROUP..nb {
                        let o = b * BLOCK;
                        let (p, q) = $prep(load(w.add(o)));
                        for (r, t) in tail.iter_mut().enumerate() {
                            let a = $dot(_mm256_setzero_si256(), p, q, load(x.add(r * cols + o)));
                            let s = hsum_i32(a) - $offset * *sums.add(r * nb + b);
                            *t += *ws.add(b) * *xs.add(r * nb + b) * s as f32;
                        }
                    }
                    for (r, (fr, t)) in f.iter().zip(tail).enumerate() {
                        *out.add(r) = hsum(*fr) + t;
                    }
                }
            }
        };
    }

    macro_rules! narrow {
        ($name:ident, $features:literal, $prep:ident, $dot:ident, $offset:literal) => {
            /// SAFETY (callers): the CPU has the features named below; `w` holds `n` groups of
            /// `chunks` 32-byte vectors, `d` `n` scales, `y` `n` × 8 floats, `v` `chunks` × 4
            /// bytes that sum to `v_sum`.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(
                w: *const i8,
                d: *const f32,
                v: *const i8,
                v_sum: i32,
                v_scale: f32,
                chunks: usize,
                n: usize,
                y: *mut f32,
            ) {
                // SAFETY: every offset stays within the extents the caller vouches for.
                unsafe {
                    for g in 0..n {
                        let mut acc = _mm256_setzero_si256();
                        for c in 0..chunks {
                            let (p, q) =
                                $prep(_mm256_loadu_si256(w.add((g * chunks + c) * 32).cast()));
                            let x =
                                _mm256_set1_epi32(v.add(c * LANE).cast::<i32>().read_unaligned());
                            acc = $dot(acc, p, q, x);
                        }
                        if $offset != 0 {
                            acc = _mm256_sub_epi32(acc, _mm256_set1_epi32($offset * v_sum));
                        }
                        let sc = _mm256_set1_ps(*d.add(g) * v_scale);
                        let yo = y.add(g * 8);
                        let add = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), sc);
                        _mm256_storeu_ps(yo, _mm256_add_ps(_mm256_loadu_ps(yo), add));
                    }
                }
            }
        };
    }

    narrow!(narrow_avx2, "avx2,fma", prep_avx2, dot_avx2, 0);
    narrow!(
        narrow_vnni,
        "avx2,fma,avx512vnni,avx512vl",
        prep_vnni,
        dot_vnni,
        128
    );

    kernel!(avx2, "avx2,fma", prep_avx2, dot_avx2, 0);
    kernel!(
        vnni,
        "avx2,fma,avx512vnni,avx512vl",
        prep_vnni,
        dot_vnni,
        128
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::test_values as lcg;

    #[test]
    fn matches_an_f32_matmul_within_quantization_error_for_any_batch() {
        let (rows, cols) = (70, 96);
        let w = Tensor::from_vec(lcg(rows * cols, 1), (rows, cols), &Device::Cpu).unwrap();
        let q = Q8Matrix::from_tensor(&w).unwrap();
        for m in [1usize, 3, 8, 33] {
            let x = Tensor::from_vec(lcg(m * cols, m as u64 + 7), (m, cols), &Device::Cpu).unwrap();
            let want: Vec<Vec<f32>> = x.matmul(&w.t().unwrap()).unwrap().to_vec2().unwrap();
            let got: Vec<Vec<f32>> = q.forward(&x).unwrap().to_vec2().unwrap();
            for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
                assert!((a - b).abs() < 0.05 * (1.0 + a.abs()), "m={m}: {a} vs {b}");
            }
        }
    }

    /// Every kernel this CPU has, on shapes with and without whole groups and a tail, and
    /// batches that exercise full tiles and leftover rows: bit-identical results.
    #[test]
    fn every_kernel_gives_the_same_bits_as_the_portable_one() {
        let mut kernels = vec![Kernel::Portable, Kernel::best()];
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        kernels.push(Kernel::Avx2);
        for nb in [1usize, 3, 8, 18, 48, 50] {
            let (rows, cols) = (13, nb * BLOCK);
            let w =
                Tensor::from_vec(lcg(rows * cols, nb as u64), (rows, cols), &Device::Cpu).unwrap();
            let q = Q8Matrix::from_tensor(&w).unwrap();
            for m in [1usize, 4, 9, 17] {
                let x = Tensor::from_vec(lcg(m * cols, 99 + m as u64), (m, cols), &Device::Cpu)
                    .unwrap();
                let want: Vec<f32> = q
                    .forward_on(&x, Kernel::Portable)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for k in &kernels {
                    let got: Vec<f32> = q
                        .forward_on(&x, *k)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    assert_eq!(got, want, "{k:?}, {nb} blocks, batch {m}");
                }
            }
        }
    }

    /// The narrow product (a LoRA B against a quantized rank vector): every kernel gives the
    /// portable kernel's bits, for ranks that fill and do not fill the four-value lanes, and all
    /// stay within int8 error of the f32 product.
    #[test]
    fn every_narrow_kernel_gives_the_same_bits_and_the_f32_product() {
        let mut kernels = vec![Kernel::best()];
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        kernels.push(Kernel::Avx2);
        let rows = 48;
        for width in [1usize, 4, 6, 16, 64] {
            let w = lcg(rows * width, width as u64);
            let q = Q8Narrow::quantize(&w, rows, width).unwrap();
            let v = lcg(width, 77 + width as u64);
            let qv = QuantVec::new(&v, q.width());
            let base = lcg(rows, 5);
            let run = |k: Kernel, groups: std::ops::Range<usize>| {
                let mut y = base[groups.start * 8..groups.end * 8].to_vec();
                q.add_product_on(k, groups, &qv, &mut y);
                y
            };
            let want = run(Kernel::Portable, 0..rows / 8);
            for k in &kernels {
                assert_eq!(run(*k, 0..rows / 8), want, "{k:?}, width {width}");
                assert_eq!(
                    run(*k, 2..5),
                    want[16..40],
                    "{k:?}, width {width}, groups 2..5"
                );
            }
            let amax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            let vmax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (o, got) in want.iter().enumerate() {
                let exact: f32 = (0..width).map(|j| w[o * width + j] * v[j]).sum();
                let tolerance = 0.02 * amax * vmax * width as f32;
                assert!(
                    (got - base[o] - exact).abs() <= tolerance,
                    "width {width}, row {o}: {} vs {exact}",
                    got - base[o]
                );
            }
        }
        assert!(
            Q8Narrow::quantize(&lcg(12, 1), 12, 1).is_none(),
            "12 rows are not whole groups"
        );
    }

    #[test]
    fn interleaving_places_every_byte_once() {
        for nb in [1usize, 8, 18] {
            let mut seen = vec![false; nb * BLOCK];
            for b in 0..nb {
                for e in 0..BLOCK {
                    let at = interleaved_index(b, e, nb);
                    assert!(!seen[at], "{nb} blocks: byte {e} of block {b} collides");
                    seen[at] = true;
                }
            }
        }
    }

    #[test]
    fn rows_are_independent_of_their_batch() {
        let (rows, cols) = (40, 64);
        let w = Tensor::from_vec(lcg(rows * cols, 3), (rows, cols), &Device::Cpu).unwrap();
        let q = Q8Matrix::from_tensor(&w).unwrap();
        let x = Tensor::from_vec(lcg(5 * cols, 4), (5, cols), &Device::Cpu).unwrap();
        let all: Vec<Vec<f32>> = q.forward(&x).unwrap().to_vec2().unwrap();
        for (i, row) in all.iter().enumerate() {
            let one: Vec<Vec<f32>> = q
                .forward(&x.narrow(0, i, 1).unwrap())
                .unwrap()
                .to_vec2()
                .unwrap();
            assert_eq!(&one[0], row);
        }
    }
}
